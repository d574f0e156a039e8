#!/usr/bin/env python
"""Score training records with a teacher, for distillation (efficient_train.py --distill_weight).

    # a cross-encoder (reranker) folder:
    python data/score_with_teacher.py --input train_mined.jsonl --cross_encoder my-reranker/ --output train_scored.jsonl
    # the deployed hybrid: a dense model fused with BM25 over each record's own document:
    python data/score_with_teacher.py --input train_mined.jsonl --model_name_or_path default --fuse_bm25 0.3 \\
        --corpus documents.json --per_document --output train_scored.jsonl

Scores every positive and hard negative of each record and writes the records as JSON lines with
their format's score fields (FlagEmbedding's pos_scores/neg_scores, a sentence-transformers
'scores' column, positive_scores/negative_scores otherwise), and a summary beside them
(OUTPUT.json). `--help` lists every flag.
"""

from longcontrast import cli
from longcontrast.teacher import TeacherArguments, run


def main(argv=None) -> int:
    def score(args):
        (arguments,) = cli.parser_for(TeacherArguments, description=__doc__).parse_args_into_dataclasses(args=args)
        run(arguments)
    return cli.run(score, argv)


if __name__ == "__main__":
    raise SystemExit(main())
