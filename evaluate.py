#!/usr/bin/env python
"""Top-k retrieval quality of text encoders: ChatRAG-Bench's Doc2Dial, QuAC and QReCC, or your own
corpus in the BEIR layout.

    python evaluate.py                                   # the embedded default model, generated sample
    python evaluate.py --model_path outputs/run-X default --data-folder /data/ChatRAG-Bench
    python evaluate.py --model_path bm25 outputs/run-X --beir my_corpus/ --passage_window 512

Prints one table (ChatRAG: Average, Doc2Dial, QuAC, QReCC x Recall@1/5/20, MRR@20, NDCG@20; BEIR:
nDCG@10, Recall@1/5/10/20/100, MRR@10, MAP@100; in percent) and writes the numbers as JSON. With
several models, each after the first is compared with the first: the per-query difference with a
paired bootstrap 95% interval and a randomisation-test p-value. Every flag also takes dashes for
underscores.
"""

from __future__ import annotations

import json
import logging
import os
import time

from longcontrast import UserError, cli
from longcontrast.comparison import compare, compare_windows, format_comparison, to_json
from longcontrast.eval_arguments import (ModelArguments, ReadingArguments, RunArguments, SetArguments, dense_retriever,
                                         load_sets, untrained_late_interaction, validate)
from longcontrast.evaluation import ModelResults, evaluate, format_table
from longcontrast.retrieval_sets import CorpusSet
from longcontrast.bm25 import VARIANTS
from longcontrast.retrievers import BM25Retriever, DenseRetriever, Hybrid

logger = logging.getLogger("evaluate")
SHORT = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "map@100": "MAP@100", "mrr@20": "MRR@20", "ndcg@20": "NDCG@20",
         **{f"recall@{k}": f"R@{k}" for k in (1, 5, 10, 20, 100)}}


def write_runs(retriever, data, run_file: str, number: int) -> None:
    """A corpus set's rankings as TREC run files: ``run_file`` (``-N`` before its extension for the
    N-th model), ``.maxpW`` before it for MaxP."""
    stem, extension = os.path.splitext(run_file)
    stem += f"-{number}" if number > 1 else ""
    for reading, ranked in retriever.rank(data).items():
        data.write_trec(ranked, stem + ("" if reading == "whole" else "." + reading.replace("@", "")) + extension)


def run(argv=None) -> int:
    # 1. arguments
    models, sets, readings, run = cli.parser_for(ModelArguments, SetArguments, ReadingArguments, RunArguments,
                                                 description=__doc__).parse_args_into_dataclasses(args=argv)
    validate(models, sets, readings, run)
    # 2. the evaluation sets
    data = load_sets(sets)
    # 3. each model (and its hybrids with BM25) on each set
    keyword = BM25Retriever()  # the default variant: the one every hybrid fuses with
    keywords = {"bm25": keyword, **{f"bm25-{variant}": BM25Retriever(variant) for variant in VARIANTS}}
    paths = {f"{models.query_encoder_path} + {models.passage_encoder_path}": None} if models.query_encoder_path else {
        name: None if name == "default" else name for name in (models.model_path or ["default"])}
    rows: dict[str, ModelResults] = {}
    for number, (name, path) in enumerate(paths.items(), 1):
        try:
            retriever, info = ((keywords[name], {"bm25": keywords[name].variant}) if name in keywords
                               else dense_retriever(path, models, readings, run))
            # the model, its prefixes (from the same encodings) and each of them fused with BM25
            variants = {name: (retriever, info)} if name in keywords else {name: (retriever, info), **{
                f"{name}@dim{dim}": (retriever.truncated(dim), {**info, "truncate_dim": dim})
                for dim in readings.truncate_dim or ()}}
            if models.untrained_colbert_dim and type(retriever) is DenseRetriever:
                dim = models.untrained_colbert_dim
                variants[f"{name}@colbert{dim}"] = (untrained_late_interaction(retriever, dim), {
                    **info, "pooling": f"MaxSim of {dim}-d token vectors, untrained projection (seed 0)"})
            for label, (each, each_info) in variants.items():
                rows[label] = ModelResults({d.name: evaluate(each, d) for d in data}, each_info)
                for weight in readings.fuse_bm25 if name not in keywords else ():
                    hybrid = Hybrid(each, keyword, weight)
                    rows[f"{label}+bm25@{weight:g}"] = ModelResults({d.name: evaluate(hybrid, d) for d in data})
        except UserError as err:
            raise UserError(f"model {name}: {err}") from err
        for d in data:
            logger.info("%s %s: %s", name, d.name, {k: round(v, 2) for k, v in rows[name].sets[d.name]["whole"].metrics.items()})
            if run.run_file and isinstance(d, CorpusSet):
                write_runs(retriever, d, run.run_file, number)
    # 4. paired comparisons: each row against the first, whole passages against windows
    comparison = compare(rows, run.bootstrap_samples) if len(rows) > 1 else {}
    windows = compare_windows(rows, run.bootstrap_samples) if readings.passage_window else {}
    # 5. tables and JSON
    print(format_table(rows, data[0].metric_names, SHORT))
    print(format_comparison(comparison, f"Difference to {next(iter(rows))}"))
    print(format_comparison(windows, "Whole passages against MaxP windows"))
    output_file = run.output_file or os.path.join("outputs", time.strftime("eval-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as handle:
        json.dump({"data_folder": sets.beir or sets.data_folder,
                   "results": {name: row.to_json(per_item=run.per_item) for name, row in rows.items()},
                   "comparison": to_json(comparison), "whole_vs_windows": to_json(windows)}, handle, indent=2)
    print(f"results written to {output_file}")
    return 0


def main(argv=None) -> int:
    return cli.run(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
