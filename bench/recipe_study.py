#!/usr/bin/env python
"""Which training recipe gives the best retriever? Train and evaluate on the shared Doc2Dial split.

Every row trains all-MiniLM-L6-v2 with efficient_train.py on the queries and positives of
../shared/data/doc2dial/train_triples.jsonl, with hard negatives from one source, and evaluates it
on ../shared/data/doc2dial/dev (Recall@1/5/20, MRR@20, NDCG@20). Negative sources:

- ``shared``: the 7 BM25 negatives that come with the file;
- ``bm25``: re-mined with data/mine_hard_negatives.py's BM25 from the chunks of each query's own
  document (dev/documents.json: the corpus of every domain, used as negatives only; dev queries
  and labels are never read before evaluation);
- ``dense``: mined with the untrained model from the same chunks, NV-Retriever's filter (drop
  candidates above 95% of the positive's cosine); ``dense_nofilter``: the same without the filter;
- ``iterative:ROW``: mined like ``dense`` with the model trained by row ROW.

Rows ``untrained`` and ``bm25`` (BM25 ranking the same items, the keyword baseline) train nothing.
Each row runs in fresh processes; its wall times (mining, training) are what this machine took.
Results are merged into --output (JSON, one entry per row, so the study can run in parts) and
printed as a table.

    python bench/recipe_study.py --rows untrained shared_n1 dense_n3
    python bench/recipe_study.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data", "doc2dial")
TRAIN = os.path.join(SHARED, "train_triples.jsonl")
CORPUS = os.path.join(SHARED, "dev", "documents.json")
DEV = os.path.join(SHARED, "dev")

# name -> (negatives, hard negatives per query, batch, epochs, temperature, learning rate, extra flags)
BASE = {"negatives": "shared", "num_hard_negatives": 1, "batch": 16, "epochs": 1, "temperature": 0.05, "lr": 2e-5}
ROWS = {
    "bm25": None,
    "untrained": None,
    "shared_n1": {},
    "shared_n3": {"num_hard_negatives": 3},
    "shared_n7": {"num_hard_negatives": 7},
    "bm25_n3": {"negatives": "bm25", "num_hard_negatives": 3},
    "dense_n1": {"negatives": "dense"},
    "dense_n3": {"negatives": "dense", "num_hard_negatives": 3},
    "dense_nofilter_n3": {"negatives": "dense_nofilter", "num_hard_negatives": 3},
    "dense_n7": {"negatives": "dense", "num_hard_negatives": 7},
    "dense_n3_b32": {"negatives": "dense", "num_hard_negatives": 3, "batch": 32},
    "dense_n3_b64": {"negatives": "dense", "num_hard_negatives": 3, "batch": 64},
    "dense_n3_t0.02": {"negatives": "dense", "num_hard_negatives": 3, "temperature": 0.02},
    "dense_n3_t0.1": {"negatives": "dense", "num_hard_negatives": 3, "temperature": 0.1},
    "dense_n3_e2": {"negatives": "dense", "num_hard_negatives": 3, "epochs": 2},
    "dense_n3_e3": {"negatives": "dense", "num_hard_negatives": 3, "epochs": 3},
    "dense_n3_lr5e-5": {"negatives": "dense", "num_hard_negatives": 3, "lr": 5e-5},
    "iterative_n3": {"negatives": "iterative:dense_n3", "num_hard_negatives": 3},
    "dense_n1_b32": {"negatives": "dense", "batch": 32},
    "dense_n1_b64": {"negatives": "dense", "batch": 64},
    "dense_n1_t0.02": {"negatives": "dense", "temperature": 0.02},
    "dense_n1_e2": {"negatives": "dense", "epochs": 2},
    "iterative_n1": {"negatives": "iterative:dense_n1"},
}


def run(command: list[str], log: str) -> float:
    """Run a command (output to ``log``); its wall seconds. A failure ends the study with its log's tail."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        with open(log) as handle:
            sys.exit(f"{' '.join(command)} failed ({code}):\n" + handle.read()[-3000:])
    return time.perf_counter() - started


def negatives_file(source: str, args, results: dict) -> tuple[str, float]:
    """The training file for a negatives source and the mining seconds: mined once per set of
    mining flags (the file name carries their hash, so other flags mine again) and then reused."""
    if source == "shared":
        return TRAIN, 0.0
    command = [sys.executable, "data/mine_hard_negatives.py", "--input", TRAIN, "--corpus", CORPUS,
               "--per_document", "--num_negatives", "7"]
    if source.startswith(("dense", "iterative")):
        model = "default"
        if source.startswith("iterative:"):
            model = os.path.join(args.work_dir, source.split(":", 1)[1])
            if not os.path.isdir(model):
                sys.exit(f"row {source.split(':', 1)[1]} must run before {source}")
        command += ["--model_name_or_path", model, *args.precision_flags]
        if source != "dense_nofilter":
            command += ["--max_score_ratio", "0.95"]
    flags = hashlib.sha256(json.dumps(command[1:]).encode()).hexdigest()[:10]
    path = os.path.join(args.work_dir, f"train_{source.replace(':', '_')}_{flags}.jsonl")
    if not os.path.exists(path):
        run([*command, "--output", path], path + ".log")
    return path, json.load(open(path + ".json"))["seconds"]


def evaluate(model: str, output_file: str, args) -> dict:
    # always float32: evaluate.py's CPU default, the precision every figure in the README uses
    command = [sys.executable, "evaluate.py", "--data-folder", DEV, "--eval-dataset", "doc2dial",
               "--output_file", output_file, "--model_path", model]
    seconds = run(command, output_file + ".log")
    results = json.load(open(output_file))["results"]
    return {**next(iter(results.values()))["doc2dial"], "eval_seconds": round(seconds, 1)}


def bm25_row() -> dict:
    """The keyword baseline on the same dev set: BM25 (data/mine_hard_negatives.py's, k1 0.9, b 0.4,
    statistics of each document's chunks) ranking each item's document, ranked by evaluate.py's rule
    (copies of the gold are the gold, other ties are broken at random)."""
    import numpy as np
    import torch

    sys.path.insert(0, ROOT)
    from longcontrast.evaluation import load_chatrag
    from longcontrast.metrics import gold_rank, retrieval_metrics
    from longcontrast.bm25 import BM25

    items, documents = load_chatrag(DEV, "doc2dial")
    ranks = []
    for name, chunks in documents.items():
        mine = [item for item in items if item.document == name]
        if mine:
            bm25 = BM25(chunks)
            scores = bm25.scores(bm25.query_matrix([item.query for item in mine]), np.arange(len(chunks)))  # (q, C)
            ranks += [gold_rank(row, item.gold_index, copies=torch.tensor([c == chunks[item.gold_index] for c in chunks]))
                      for row, item in zip(scores, mine)]
    return {"recipe": "bm25", "num_items": len(ranks), **retrieval_metrics(ranks)}


def study_row(name: str, args, results: dict) -> dict:
    if name == "bm25":
        return bm25_row()
    if ROWS[name] is None:
        return {"recipe": "untrained", **evaluate("default", os.path.join(args.work_dir, "untrained_eval.json"), args)}
    spec = {**BASE, **ROWS[name]}
    train_file, mining_seconds = negatives_file(spec["negatives"], args, results)
    output_dir = os.path.join(args.work_dir, name)
    command = [sys.executable, "efficient_train.py", "--train_data", train_file, "--output_dir", output_dir,
               "--overwrite_output_dir", "--num_hard_negatives", str(spec["num_hard_negatives"]),
               "--per_device_train_batch_size", str(spec["batch"]), "--num_train_epochs", str(spec["epochs"]),
               "--temperature", str(spec["temperature"]), "--learning_rate", str(spec["lr"]),
               "--save_strategy", "no", "--logging_steps", "10", "--disable_tqdm", "true", *args.train_flags]
    if os.path.isfile(os.path.join(output_dir, "training_args.json")) and args.reuse:
        # a finished model of an earlier, interrupted study: only evaluated; the Trainer's own runtime
        log = [json.loads(line) for line in open(os.path.join(output_dir, "loss_log.jsonl"))]
        train_seconds = next(entry["train_runtime"] for entry in log if "train_runtime" in entry)
    else:
        train_seconds = run(command, output_dir + ".log")
    return {"recipe": spec, "mining_seconds": round(mining_seconds, 1), "train_seconds": round(train_seconds, 1),
            **evaluate(output_dir, output_dir + "_eval.json", args)}


def table(results: dict) -> str:
    lines = ["| row | negatives | n | B | epochs | T | lr | R@1 | R@5 | R@20 | MRR@20 | NDCG@20 | mining s | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        spec = r["recipe"]
        cells = [spec] + ["-"] * 5 if isinstance(spec, str) else [
            spec["negatives"], spec["num_hard_negatives"], spec["batch"], spec["epochs"], spec["temperature"], spec["lr"]]
        metrics = [f"{r[m]:.2f}" for m in ("recall@1", "recall@5", "recall@20", "mrr@20", "ndcg@20")]
        times = [str(r.get("mining_seconds", "-")), str(r.get("train_seconds", "-"))]
        lines.append("| " + " | ".join(map(str, [name, *cells, *metrics, *times])) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="Rows to run, in order (default: all).")
    parser.add_argument("--list", action="store_true", help="List the rows and exit.")
    parser.add_argument("--reuse", action="store_true",
                        help="A row whose trained model is already in --work_dir is only evaluated (its training "
                             "time is then the Trainer's train_runtime, without loading).")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "recipe_study"),
                        help="Mined files, trained models and logs.")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "recipe_study.json"),
                        help="JSON results, merged with the rows already there.")
    parser.add_argument("--bf16", action="store_true",
                        help="Train and mine under bf16 autocast on the CPU (fast on AVX512-BF16/AMX); evaluation stays float32.")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in ROWS.items():
            print(name, "untrained" if spec is None else {**BASE, **spec})
        return 0
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; --list shows them")
    if not os.path.isfile(TRAIN):
        parser.error(f"{TRAIN} not found: the study reads ../shared/data/doc2dial")
    args.precision_flags = ["--precision", "bf16"] if args.bf16 else []
    args.train_flags = ["--bf16", "--use_cpu"] if args.bf16 else []
    os.makedirs(args.work_dir, exist_ok=True)
    results = json.load(open(args.output)) if os.path.exists(args.output) else {}
    for name in args.rows:
        print(f"row {name} ...", flush=True)
        results[name] = {**study_row(name, args, results), "bf16": args.bf16}
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
        print(table({name: results[name]}).splitlines()[-1], flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
