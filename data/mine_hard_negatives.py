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

from longcontrast import cli
from longcontrast.miner import MiningArguments, run


def main(argv=None) -> int:
    def mine(args):
        (arguments,) = cli.parser_for(MiningArguments, description=__doc__).parse_args_into_dataclasses(args=args)
        run(arguments)
    return cli.run(mine, argv)


if __name__ == "__main__":
    raise SystemExit(main())
