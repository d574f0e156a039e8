#!/usr/bin/env python
"""What evaluation during training costs: the same `efficient_train.py` run (the embedded
all-MiniLM-L6-v2 on the generated sample, ``--steps`` GradCache steps of batch 16) without and with
``--eval_data`` evaluated every ``--eval_steps`` steps, each a fresh process; wall time of each, and
the evaluations' own time as the trainer logs it (``eval_runtime``).

    python bench/eval_overhead.py                      # 100 steps, one evaluation of the sample's 101 queries
    python bench/eval_overhead.py --eval_data ../shared/data/doc2dial/dev --eval_steps 50

Prints a table and writes JSON (``--output``).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from common import RESULTS, ROOT, arguments, run, write_json


def timed_run(output: str, steps: int, evaluation: list[str]) -> dict:
    """One training run in a fresh process: wall time (s) and the logged evaluations."""
    command = [sys.executable, os.path.join(ROOT, "efficient_train.py"), "--output_dir", output, "--max_steps", str(steps),
               "--save_strategy", "no", "--logging_steps", "10", "--seed", "42", *evaluation]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"efficient_train.py failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(output, "loss_log.jsonl")) as handle:
        logged = [json.loads(line) for line in handle]
    evaluations = [entry for entry in logged if "eval_runtime" in entry]
    return {"seconds": round(seconds, 1), "evaluations": len(evaluations),
            "eval_seconds": round(sum(e["eval_runtime"] for e in evaluations), 2),
            "metrics": {k: v for k, v in (evaluations[-1] if evaluations else {}).items() if k.startswith("eval_")}}


def main(argv=None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--steps", type=int, default=100, help="training steps of each run")
    parser.add_argument("--eval_data", default=os.path.join(ROOT, "data", "chatrag_sample"),
                        help="the development set (default: the sample's three ChatRAG sets, 101 queries)")
    parser.add_argument("--eval_steps", type=int, default=100, help="evaluate every N steps")
    parser.add_argument("--output", default=os.path.join(RESULTS, "eval_overhead.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        plain = timed_run(os.path.join(work, "plain"), args.steps, [])
        evaluated = timed_run(os.path.join(work, "evaluated"), args.steps,
                              ["--eval_data", args.eval_data, "--eval_steps", str(args.eval_steps)])
    added = (evaluated["seconds"] - plain["seconds"]) / plain["seconds"]
    print(f"\n| run | wall s | evaluations | evaluation s |\n|---|---|---|---|\n"
          f"| {args.steps} steps | {plain['seconds']:.1f} | 0 | - |\n"
          f"| {args.steps} steps, --eval_steps {args.eval_steps} | {evaluated['seconds']:.1f} | "
          f"{evaluated['evaluations']} | {evaluated['eval_seconds']:.1f} |")
    print(f"evaluation adds {100 * added:+.1f}% of wall time ({100 * evaluated['eval_seconds'] / plain['seconds']:.1f}% "
          f"by its logged runtime); target < 10%")
    write_json(args.output, {"steps": args.steps, "eval_data": os.path.relpath(args.eval_data, ROOT),
                             "eval_steps": args.eval_steps, "plain": plain, "evaluated": evaluated,
                             "added_fraction": round(added, 4)})


if __name__ == "__main__":
    run(main)
