#!/usr/bin/env python
"""Download ChatRAG-Bench's Doc2Dial, QuAC and QReCC into the layout evaluate.py reads.

    python data/download_chatrag.py --output_dir data/chatrag    # needs internet access
    bash eval.sh   # with DATA_FOLDER=data/chatrag

Writes OUTPUT_DIR/<dataset>/test.json (items with messages, document, ground_truth_ctx, answers;
other fields dropped to save space) and OUTPUT_DIR/<dataset>/documents.json, from the Hugging Face
dataset nvidia/ChatRAG-Bench (files data/<dataset>/test.json and documents.json; see its card for
the licence of each set).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ID = "nvidia/ChatRAG-Bench"
DATASETS = ("doc2dial", "quac", "qrecc")
KEEP = ("id", "messages", "document", "ground_truth_ctx", "answers")


def convert_item(raw: dict, position: int) -> dict:
    """One ChatRAG-Bench item reduced to what the retrieval evaluation reads, checked."""
    missing = [k for k in ("messages", "document", "ground_truth_ctx") if k not in raw]
    if missing or "index" not in (raw.get("ground_truth_ctx") or {}):
        raise ValueError(f"item {position}: missing {missing or ['ground_truth_ctx.index']}")
    item = {k: raw[k] for k in KEEP if k in raw}
    item["ground_truth_ctx"] = {k: v for k, v in raw["ground_truth_ctx"].items() if k in ("index", "ctx")}
    item["document"] = str(raw["document"])
    return item


def convert(test_file: Path, documents_file: Path, output: Path) -> int:
    """Write the converted set to ``output``; returns its number of items."""
    items = [convert_item(raw, i) for i, raw in enumerate(json.loads(test_file.read_text(encoding="utf-8")))]
    documents = json.loads(documents_file.read_text(encoding="utf-8"))
    absent = sorted({it["document"] for it in items} - set(documents))
    if absent:
        raise ValueError(f"{test_file}: documents {absent[:5]} are not in {documents_file}")
    output.mkdir(parents=True, exist_ok=True)
    (output / "test.json").write_text(json.dumps(items))
    (output / "documents.json").write_text(json.dumps(documents))
    return len(items)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", "--output-dir", default="data/chatrag")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args(argv)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        print("error: pip install huggingface_hub", file=sys.stderr)
        return 2
    for dataset in args.datasets:
        try:
            paths = [Path(hf_hub_download(REPO_ID, f"data/{dataset}/{name}", repo_type="dataset"))
                     for name in ("test.json", "documents.json")]
        except Exception as err:  # offline, proxy, gated repo...: say so in one line
            print(f"error: cannot download {REPO_ID} data/{dataset} from the Hugging Face hub "
                  f"(are you offline?): {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        try:
            count = convert(*paths, Path(args.output_dir) / dataset)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{dataset}: {count} items -> {Path(args.output_dir) / dataset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
