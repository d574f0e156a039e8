#!/usr/bin/env python
"""Hard-negative mining speed and memory (longcontrast.mining), each row in a fresh process.

- doc2dial_bm25 / doc2dial_dense: data/mine_hard_negatives.py's work on the 682 shared Doc2Dial
  training queries against their documents' chunks (--per_document, 7 negatives; dense: the
  embedded MiniLM, filtered at 95% of the positive's cosine);
- dense_1m: 10k queries against 1M precomputed random unit vectors (384-d float16), 7 negatives,
  filtered at 95%: the blocked exact search and the selection, no encoding;
- bm25_index_1m: the BM25 index of 1M generated passages of ~100 words (Zipf-distributed over a
  50k-word vocabulary), then 1k queries mined from it; bm25s_index_1m: bm25s indexing the same.

    python bench/mining_speed.py                       # every row
    python bench/mining_speed.py --rows dense_1m       # some

Prints a table (seconds, peak RSS) and writes JSON (``--output``).
"""

import argparse
import json
import os
import sys
import tempfile
import time

from common import DOC2DIAL as SHARED, RESULTS, arguments, fresh_process, peak_mb, random_unit_vectors, run, write_json

ROWS = ("doc2dial_bm25", "doc2dial_dense", "dense_1m", "bm25_index_1m", "bm25s_index_1m")


def doc2dial(scorer: str) -> dict:
    from longcontrast.miner import MiningArguments, run

    with tempfile.TemporaryDirectory() as folder:
        args = MiningArguments(input=[os.path.join(SHARED, "train_triples.jsonl")],
                               output=os.path.join(folder, "mined.jsonl"),
                               corpus=os.path.join(SHARED, "dev", "documents.json"), per_document=True,
                               model_name_or_path="default" if scorer == "dense" else None, num_negatives=7,
                               max_score_ratio=0.95 if scorer == "dense" else None)
        summary = run(args)
    return {"queries": summary["records"], "seconds": summary["seconds"], "filtered": summary["filtered"]}


def dense_1m(size: int = 1_000_000, queries: int = 10_000, dim: int = 384) -> dict:
    import numpy as np
    import torch

    from longcontrast.mining import MiningConfig, mine

    torch.manual_seed(0)
    texts = random_unit_vectors(size, dim)  # (N, D) float16
    positives = torch.randint(0, size, (queries,))
    noisy = texts[positives].float() + 0.05 * torch.randn(queries, dim)  # each query near its positive
    query_vectors = noisy / noisy.norm(dim=1, keepdim=True)
    before = peak_mb()
    started = time.perf_counter()
    config = MiningConfig(num_negatives=7, max_score_ratio=0.95, scorer="dense")
    negatives, stats = mine([""] * queries, positives.tolist(), [np.arange(size)] * queries, [], config,
                            dense=(query_vectors, texts))
    seconds = time.perf_counter() - started
    return {"corpus": size, "queries": queries, "seconds": round(seconds, 1), "vectors_mb": round(texts.numel() * 2 / 2**20),
            "peak_before_mining_mb": round(before), "negatives_per_query": stats.negatives / stats.queries,
            "filtered": stats.filtered}


def generated_passages(size: int):
    """``size`` passages of 80-120 words, Zipf-distributed over a 50k-word vocabulary, and their lengths."""
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(50_000)])
    lengths = rng.integers(80, 121, size)
    texts = []
    for start in range(0, size, 10_000):  # a block at a time: no array of every word at once
        block = lengths[start: start + 10_000]
        words = vocabulary[rng.zipf(1.2, int(block.sum())) % len(vocabulary)]
        bounds = np.concatenate([[0], np.cumsum(block)])
        texts += [" ".join(words[bounds[i]: bounds[i + 1]]) for i in range(len(block))]
    return texts, lengths


def bm25s_index_1m(size: int = 1_000_000) -> dict:
    """The same index built by bm25s (Lucene scoring, the same tokens), for comparison."""
    import bm25s

    texts, _ = generated_passages(size)
    generated_mb = peak_mb()
    started = time.perf_counter()
    index = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    index.index(bm25s.tokenize(texts, stopwords=None, token_pattern=r"(?u)\b\w+\b", show_progress=False),
                show_progress=False)
    return {"corpus": size, "index_seconds": round(time.perf_counter() - started, 1),
            "peak_after_generating_mb": round(generated_mb), "peak_after_index_mb": round(peak_mb())}


def bm25_index_1m(size: int = 1_000_000, queries: int = 1_000) -> dict:
    import numpy as np

    from longcontrast.bm25 import BM25
    from longcontrast.mining import MiningConfig, mine

    rng = np.random.default_rng(1)
    texts, lengths = generated_passages(size)
    generated_mb = peak_mb()
    started = time.perf_counter()
    index = BM25(texts)
    index_seconds = time.perf_counter() - started
    index_mb = peak_mb()
    del index
    chosen = rng.choice(size, queries, replace=False)
    query_texts = [" ".join(texts[i].split()[:8]) for i in chosen]
    started = time.perf_counter()
    _, stats = mine(query_texts, chosen.tolist(), [np.arange(size)] * queries, texts, MiningConfig(num_negatives=7))
    return {"corpus": size, "mean_words": float(lengths.mean()), "index_seconds": round(index_seconds, 1),
            "peak_after_generating_mb": round(generated_mb), "peak_after_index_mb": round(index_mb),
            "queries": queries, "mining_seconds": round(time.perf_counter() - started, 1),
            "negatives_per_query": stats.negatives / stats.queries}


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--output", default=os.path.join(RESULTS, "mining_speed_cpu.json"))
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        measure = {"doc2dial_bm25": lambda: doc2dial("bm25"), "doc2dial_dense": lambda: doc2dial("dense"),
                   "dense_1m": dense_1m, "bm25_index_1m": bm25_index_1m, "bm25s_index_1m": bm25s_index_1m}[args.row]
        result = measure()
        print(json.dumps({**result, "peak_rss_mb": round(peak_mb())}))
        return 0
    results = {}
    if os.path.isfile(args.output):  # rows run before and not asked for now are kept
        with open(args.output) as handle:
            results = {k: v for k, v in json.load(handle).items() if k not in args.rows}
    for row in args.rows:
        started = time.perf_counter()
        results[row] = {**fresh_process(__file__, "--row", row), "wall_seconds": round(time.perf_counter() - started, 1)}
        print(f"{row}: {results[row]}", file=sys.stderr)
    print("| row | what | seconds | peak RSS MB |\n|---|---|---|---|")
    for row, r in results.items():
        what = {"doc2dial_bm25": f"{r.get('queries')} queries, BM25", "doc2dial_dense": f"{r.get('queries')} queries, MiniLM",
                "dense_1m": f"{r.get('queries')} queries x {r.get('corpus')} vectors",
                "bm25_index_1m": f"index of {r.get('corpus')} passages ({r.get('index_seconds')} s, peak "
                                 f"{r.get('peak_after_index_mb')} MB), then {r.get('queries')} queries mined",
                "bm25s_index_1m": f"bm25s: index of {r.get('corpus')} passages"}[row]
        seconds = r.get("seconds", r.get("mining_seconds", r.get("index_seconds")))
        print(f"| {row} | {what} | {seconds} | {r['peak_rss_mb']} |")
    write_json(args.output, results)
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
