#!/usr/bin/env python
"""Mine hard negatives for query/positive pairs from a corpus, with false-negative filtering.

    # BM25 over the chunks of each record's own document (ChatRAG layout):
    python data/mine_hard_negatives.py --input train.jsonl --corpus documents.json --per_document \\
        --output train_bm25.jsonl
    # a dense model (e.g. one just trained: iterative mining), NV-Retriever's 95% filter:
    python data/mine_hard_negatives.py --input train.jsonl --corpus documents.json --per_document \\
        --model_name_or_path outputs/run-X --max_score_ratio 0.95 --output train_mined.jsonl

Writes the input records as JSON lines with their negatives field replaced (hardest first), and a
summary beside them (OUTPUT.json). `--help` lists every flag.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longcontrast import UserError  # noqa: E402
from longcontrast.mining import MiningArguments, run  # noqa: E402


def main(argv=None) -> int:
    from transformers import HfArgumentParser

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    parser = HfArgumentParser(MiningArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
