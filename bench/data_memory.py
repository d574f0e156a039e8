#!/usr/bin/env python
"""Training on data larger than memory (longcontrast.training_set): peak resident memory and wall
time of a short `efficient_train.py` run as the training file grows, with the training-data cache
cold (the file read into it) and warm (the same file again: the cache mapped).

Each size is a generated JSON-lines file (``--negatives`` negatives a record, short texts from a
fixed vocabulary, every record distinct; about 600 bytes a record with 7 negatives). Each run is a
fresh process under a small wrapper that reports the run's own peak RSS (``ru_maxrss`` of its
child) and wall time; the model is the embedded all-MiniLM-L6-v2 and the run takes ``--steps``
GradCache steps of batch 16.

    python bench/data_memory.py                              # 20,000 and 2,000,000 records
    python bench/data_memory.py --sizes 20000 200000 --work /tmp/dm

Prints a table and writes JSON (``--output``). Generated files and caches stay in ``--work``
(reused when the same size is asked for again; delete the folder to free the disk).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

from common import RESULTS, ROOT, arguments, run, write_json

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "sa", "ti", "vu", "ze")
         for b in ("ban", "cor", "dul", "fen", "gis", "hum", "jot", "lek", "mor", "nap")]  # 100 words
WRAPPER = ("import json, resource, subprocess, sys, time\n"
           "start = time.perf_counter()\n"
           "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "print(json.dumps({'rc': done.returncode, 'seconds': time.perf_counter() - start, 'stderr': done.stderr[-2000:],\n"
           "  'peak_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")


def generate(path: str, count: int, negatives: int) -> None:
    """``count`` distinct records of a query, a positive and ``negatives`` negatives (seeded)."""
    rng = random.Random(count)

    def text(kind: str, index: int, length: int) -> str:
        return f"{kind} {index} " + " ".join(rng.choices(WORDS, k=length))

    with open(path + ".tmp", "w") as handle:
        for index in range(count):
            record = {"query": text("question", index, 6), "positive": text("answer", index, 8),
                      "negatives": [text(f"other{n}", index, 8) for n in range(negatives)]}
            handle.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)


def measured_run(data: str, cache: str, output: str, steps: int, negatives: int) -> dict:
    """One training run in a fresh process: its peak RSS (MB) and wall time (s)."""
    command = [sys.executable, os.path.join(ROOT, "efficient_train.py"), "--train_data", data,
               "--data_cache_dir", cache, "--output_dir", output, "--overwrite_output_dir", "--max_steps", str(steps),
               "--per_device_train_batch_size", "16", "--num_hard_negatives", str(negatives),
               "--query_max_len", "32", "--passage_max_len", "64", "--save_strategy", "no", "--logging_steps", "1"]
    done = subprocess.run([sys.executable, "-c", WRAPPER, *command], capture_output=True, text=True, cwd=ROOT)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["rc"] != 0:
        raise RuntimeError(f"efficient_train.py on {data} failed:\n{row['stderr']}")
    return {"peak_mb": round(row["peak_mb"], 1), "seconds": round(row["seconds"], 1)}


def main(argv=None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 2_000_000], help="records per file")
    parser.add_argument("--negatives", type=int, default=7, help="negatives per record (all used each step)")
    parser.add_argument("--steps", type=int, default=2, help="training steps a run takes")
    parser.add_argument("--work", default="/tmp/longcontrast-data-memory", help="generated files and caches")
    parser.add_argument("--output", default=os.path.join(RESULTS, "data_memory.json"))
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for size in args.sizes:
        # 1. the file (kept between invocations)
        data = os.path.join(args.work, f"records_{size}_{args.negatives}.jsonl")
        if not os.path.exists(data):
            start = time.perf_counter()
            generate(data, size, args.negatives)
            print(f"generated {data} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        # 2. a cold run (empty cache), then a warm one (the same cache)
        cache = os.path.join(args.work, f"cache_{size}")
        shutil.rmtree(cache, ignore_errors=True)
        output = os.path.join(args.work, "model")
        cold = measured_run(data, cache, output, args.steps, args.negatives)
        warm = measured_run(data, cache, output, args.steps, args.negatives)
        cache_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs) / 2**20
        rows.append({"records": size, "file_mb": round(os.path.getsize(data) / 2**20, 1),
                     "cache_mb": round(cache_mb, 1), "cold": cold, "warm": warm})
    # 3. the table and the targets (each size against the first)
    base = rows[0]
    print("\n| records | file MB | cache MB | cold: peak MB | cold: s | warm: peak MB | warm: s |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['records']:,} | {row['file_mb']:,.0f} | {row['cache_mb']:,.0f} | {row['cold']['peak_mb']:,.0f} | "
              f"{row['cold']['seconds']:.1f} | {row['warm']['peak_mb']:,.0f} | {row['warm']['seconds']:.1f} |")
    for row in rows[1:]:
        limit = 1.5 * base["cold"]["peak_mb"] + 1024
        row["targets"] = {
            "peak_mb_limit": round(limit, 1),
            "peak_ok": max(row["cold"]["peak_mb"], row["warm"]["peak_mb"]) <= limit,
            "warm_ok": row["warm"]["seconds"] <= max(row["cold"]["seconds"] / 5, base["warm"]["seconds"] + 15)}
        print(f"{row['records']:,} records: peak <= 1.5 x {base['cold']['peak_mb']:,.0f} + 1024 = {limit:,.0f} MB: "
              f"{row['targets']['peak_ok']}; warm <= cold / 5 or <= {base['warm']['seconds']:.1f} + 15 s: "
              f"{row['targets']['warm_ok']}")
    write_json(args.output, {"steps": args.steps, "negatives": args.negatives, "batch": 16, "rows": rows})


if __name__ == "__main__":
    run(main)
