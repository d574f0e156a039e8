#!/usr/bin/env python
"""Exact top-k search at corpus scale (longcontrast.search, what evaluate.py --beir and the miner use).

Each row runs in a fresh process: a generated corpus of N random unit vectors (float16 by
default, generated block by block), Q random unit queries, top-100 by the blocked search. Peak
memory is the process's peak RSS; "above vectors" subtracts the process before the corpus existed
and the corpus's own bytes. Encoding throughput (the embedded MiniLM, generated ~100-word
passages, evaluate.py's CPU batching) tells how long embedding such a corpus would take.

    python bench/search_speed.py                                   # 100k and 1M x 384, 1k and 10k queries
    python bench/search_speed.py --sizes 1000000 --dim 1024 --queries 10000 --device cuda   # on a GPU

Prints a table and writes JSON (``--output``).
"""

import argparse
import json
import os
import random
import sys
import time

from common import RESULTS, arguments, fresh_process, peak_mb, random_unit_vectors, run, write_json


def search_row(size: int, queries: int, dim: int, dtype: str, device: str, k: int) -> dict:
    """One measurement, in this process (run by --row in a fresh one)."""
    import torch

    from longcontrast.search import top_k

    torch.manual_seed(0)
    before = peak_mb()  # the process before the corpus: imports only grow it, so its peak is its size
    corpus = random_unit_vectors(size, dim, dtype, device)  # (N, D)
    query_vectors = torch.randn(queries, dim, device=device)
    query_vectors /= query_vectors.norm(dim=1, keepdim=True)
    vectors_mb = corpus.numel() * corpus.element_size() / 2**20
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    scores, indices = top_k(query_vectors, corpus, k, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = peak_mb()
    row = {"corpus": size, "queries": queries, "dim": dim, "dtype": dtype, "device": device, "k": k,
           "seconds": round(seconds, 2), "vectors_mb": round(vectors_mb, 1), "rss_before_mb": round(before, 1),
           "peak_rss_mb": round(peak, 1), "peak_above_vectors_mb": round(peak - before - vectors_mb, 1),
           "queries_per_second": round(queries / seconds, 1)}
    if device.startswith("cuda"):
        row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # a spot check that the blocked search is exact: one query against a full sort
    full = (query_vectors[:1] @ corpus.float().T).topk(k)
    row["exact"] = bool(torch.equal(full.indices.cpu(), indices[:1]))
    return row


def encoding_row(passages: int, batch_size: int) -> dict:
    """MiniLM encoding throughput on generated ~100-word passages (evaluate.py's CPU defaults)."""
    import torch

    from longcontrast.tokenization import tokenize
    from longcontrast.inference import encode, load_retriever

    torch.set_grad_enabled(False)
    words = ("permit fee office renew apply license vehicle benefits claim record student loan payment address "
             "proof identity online form deadline medical veteran disability retirement income tax card").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(80, 120))) for _ in range(passages)]
    model, tokenizer = load_retriever(None)
    ids = tokenize(tokenizer, texts, 512, "right")
    started = time.perf_counter()
    encode(model, ids, "passage", batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    seconds = time.perf_counter() - started
    return {"passages": passages, "mean_tokens": round(sum(map(len, ids)) / len(ids), 1), "seconds": round(seconds, 2),
            "passages_per_second": round(passages / seconds, 1),
            "hours_for_1M": round(1_000_000 / (passages / seconds) / 3600, 1)}


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--queries", nargs="+", type=int, default=[1_000, 10_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encode_passages", type=int, default=1_000,
                        help="Passages for the MiniLM encoding throughput (0: skip).")
    parser.add_argument("--output", default=os.path.join(RESULTS, "search_speed_cpu.json"))
    parser.add_argument("--row", nargs=2, type=int, metavar=("SIZE", "QUERIES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        print(json.dumps(search_row(*args.row, args.dim, args.dtype, args.device, args.k)))
        return 0
    rows = []
    for size in args.sizes:
        for queries in args.queries:
            rows.append(fresh_process(__file__, "--row", str(size), str(queries), "--dim", str(args.dim), "--dtype",
                                      args.dtype, "--device", args.device, "--k", str(args.k)))
            print(f"{size} x {queries}: {rows[-1]['seconds']} s", file=sys.stderr)
    encoding = encoding_row(args.encode_passages, 8) if args.encode_passages else None
    print(f"top-{args.k}, {args.dim}-d {args.dtype} vectors on {args.device}")
    print("| corpus | queries | seconds | queries/s | vectors MB | peak RSS MB | peak above vectors MB | exact |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus']:,} | {r['queries']:,} | {r['seconds']} | {r['queries_per_second']} | {r['vectors_mb']} | "
              f"{r['peak_rss_mb']} | {r['peak_above_vectors_mb']} | {r['exact']} |")
    if encoding:
        print(f"MiniLM encoding: {encoding['passages_per_second']} passages/s ({encoding['mean_tokens']} tokens each), "
              f"about {encoding['hours_for_1M']} h for 1M passages on this machine")
    write_json(args.output, {"rows": rows, "encoding": encoding, "arguments": vars(args)})
    print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
