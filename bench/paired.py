#!/usr/bin/env python
"""Paired comparisons between any two rows of an evaluate.py result file (written with --per_item):
for each pair A B, the per-query mean of B - A with its paired bootstrap 95% interval and
randomisation-test p-value, on the whole set and each of its parts (the page-split halves). A row
is a model's name, optionally with a reading in brackets (``"default [maxp@512]"``); rows joined
by `` & `` are one row whose per-query values are their mean (several training seeds of a model).

    python bench/paired.py outputs/eval.json --pairs "default@colbert128" "outputs/li" \\
        "default [maxp@512]" "outputs/li" "bm25" "outputs/li+bm25@0.5" --metric ndcg@10
"""

import re

import numpy as np

from longcontrast import UserError
from longcontrast.metrics import paired_difference
from longcontrast.readers import read_json

from common import arguments, run, write_json

ROW = re.compile(r"^(?P<name>.+?)(?: \[(?P<reading>[^\]]+)\])?$")


def scored(results: dict, spec: str, set_name: str) -> dict:
    """The JSON of one row's reading on ``set_name``."""
    match = ROW.match(spec)
    name, reading = match["name"], match["reading"]
    if name not in results:
        raise UserError(f"no row {name!r} in the file; rows: {', '.join(results)}")
    row = results[name].get(set_name)
    if row is None:
        raise UserError(f"row {name!r} has no set {set_name!r}")
    if reading:
        if reading not in row:
            raise UserError(f"row {name!r} has no reading {reading!r}")
        row = row[reading]
    if "per_item" not in row:
        raise UserError(f"row {spec!r} has no per-item values: evaluate with --per_item")
    return row


def parts(row: dict) -> dict[str, dict]:
    """``{"all": row, "split=report": ..., ...}``: the row and its nested parts with per-item values."""
    out = {"all": row}
    for key, value in row.items():
        if isinstance(value, dict) and "per_item" in value and "@" not in key.split()[0]:
            out[key] = value
    return out


def per_item(results: dict, spec: str, set_name: str, metric: str) -> dict[str, np.ndarray]:
    """Each part's per-query ``metric`` of a row, or of rows joined by `` & `` averaged query by query."""
    rows = [parts(scored(results, one.strip(), set_name)) for one in spec.split(" & ")]
    for row in rows:
        if metric not in row["all"]["per_item"]:
            raise UserError(f"no metric {metric!r} in row {spec!r}; it has {', '.join(row['all']['per_item'])}")
    values = {part: [np.asarray(row[part]["per_item"][metric], dtype=np.float64) for row in rows]
              for part in rows[0] if all(part in row for row in rows)}
    if any(len({len(v) for v in each}) > 1 for each in values.values()):
        raise UserError(f"the rows of {spec!r} have different numbers of queries")
    return {part: np.mean(each, axis=0) for part, each in values.items()}  # (N,) each


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("results", help="an evaluate.py --per_item JSON file")
    parser.add_argument("--pairs", nargs="+", required=True, metavar="ROW", help="rows, two by two: A B [A B ...]")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument("--set", default=None, help="the set (default: the file's only one)")
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--output", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        raise UserError("--pairs takes rows two by two (A B): an odd number was given")
    results = read_json(args.results)["results"]
    sets = {s for row in results.values() for s in row if isinstance(row[s], dict) and "num_items" in row[s]}
    set_name = args.set or (sets.pop() if len(sets) == 1 else None)
    if set_name is None:
        raise UserError(f"the file has several sets ({', '.join(sorted(sets))}): choose one with --set")
    print(f"{args.metric}, B - A (points; paired bootstrap 95% interval over queries; p: randomisation test)")
    print("| A | B | part | A | B | B - A [95%] | p |")
    print("|---|---|---|---|---|---|---|")
    table = []
    for a_spec, b_spec in zip(args.pairs[::2], args.pairs[1::2]):
        a_parts, b_parts = (per_item(results, spec, set_name, args.metric) for spec in (a_spec, b_spec))
        for part in (p for p in a_parts if p in b_parts):
            a, b = a_parts[part], b_parts[part]
            found = paired_difference(a, b, resamples=args.resamples)
            table.append({"a": a_spec, "b": b_spec, "part": part, "a_mean": a.mean(), "b_mean": b.mean(), **found})
            print(f"| {a_spec} | {b_spec} | {part} | {a.mean():.2f} | {b.mean():.2f} | {found['difference']:+.2f} "
                  f"[{found['low']:+.2f}, {found['high']:+.2f}] | {found['p']:.3f} |")
    if args.output:
        write_json(args.output, {"results": args.results, "metric": args.metric, "rows": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
