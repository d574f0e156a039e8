#!/usr/bin/env python
"""Make label-free training pairs from a corpus (no questions, no labels needed).

    # Contriever's random cropping over the chunks of a ChatRAG documents.json, 2 pairs a chunk:
    python data/make_pairs.py --corpus documents.json --method crop --per_passage 2 --output pairs.jsonl
    # the inverse cloze task: a sentence as the query, its passage as the positive
    python data/make_pairs.py --corpus corpus.jsonl --method ict --output pairs.jsonl

Train on the pairs alone (a first stage) or beside your labelled data
(`efficient_train.py --train_data train.jsonl pairs.jsonl`). Mining works on them as on any records.
"""

import json
import logging
import os
from dataclasses import dataclass, field

from longcontrast import UserError, cli
from longcontrast.pairs import METHODS, make_pairs
from longcontrast.readers import read_corpus

logger = logging.getLogger("make_pairs")


@dataclass
class PairArguments:
    corpus: str = field(metadata={"help": "Passages: a ChatRAG documents.json, a JSON list, a .jsonl (strings or "
                                  "objects with 'text') or a .txt (one a line)."})
    output: str = field(metadata={"help": "Where the pairs go (JSON lines: query, positive[, document])."})
    method: str = field(default="crop", metadata={
        "help": "crop: two random spans of a passage (Contriever); ict: a sentence and the rest of its passage "
                "(inverse cloze).", "choices": list(METHODS)})
    per_passage: int = field(default=1, metadata={"help": "Pairs drawn from each passage."})
    min_span: float = field(default=0.1, metadata={"help": "crop: shortest span, as a fraction of the passage's words."})
    max_span: float = field(default=0.5, metadata={"help": "crop: longest span, as a fraction of the passage's words."})
    keep_sentence: float = field(default=0.1, metadata={
        "help": "ict: probability that the query sentence stays in its positive."})
    seed: int = field(default=0, metadata={"help": "Seed of the random draws."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --output."})


def pairs(argv) -> None:
    (args,) = cli.parser_for(PairArguments, description=__doc__).parse_args_into_dataclasses(args=argv)
    if args.per_passage < 1:
        raise UserError(f"--per_passage must be >= 1, got {args.per_passage}")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserError(f"{args.output} exists; pass --overwrite to replace it")
    records = make_pairs(read_corpus(args.corpus), method=args.method, per_passage=args.per_passage, seed=args.seed,
                         min_span=args.min_span, max_span=args.max_span, keep_sentence=args.keep_sentence)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".tmp", "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(args.output + ".tmp", args.output)
    logger.info("%d %s pairs written to %s", len(records), args.method, args.output)


def main(argv=None) -> int:
    return cli.run(pairs, argv)


if __name__ == "__main__":
    raise SystemExit(main())
