#!/usr/bin/env python
"""Several training seeds of one long-context recipe, read together: R@1 of the page dev set per
seed (with mean and standard deviation) for whole pages, the model's own 512-token windows (MaxP),
its late chunks and the 512-position MiniLM's windows; then each reading against each window row,
each item's R@1 first averaged over the seeds, with a paired 95% bootstrap interval over items.

Each input is a page evaluation with per-item values of the trained model beside the 512-position
``default`` (``recipes/long_context.sh``'s OUTPUT_DIR/eval_doc2dial_pages.json).

    python bench/seeds.py bench/results/long_context_recipe_pages.json bench/results/long_context_seed{1,2}_pages.json
"""

import logging

import numpy as np

from longcontrast import UserError
from longcontrast.metrics import paired_difference
from longcontrast.readers import read_json

from common import arguments, run, write_json

logger = logging.getLogger("seeds")
PARTS = {"all": "", "past 512": "gold_start>=512", "report, past 512": "split=report gold_start>=512",
         "selection, past 512": "split=selection gold_start>=512"}


def readings(path: str) -> dict[str, dict]:
    """The four readings of one evaluation file: name -> its doc2dial results (per-item R@1 kept)."""
    data = read_json(path)
    results = data.get("pages", data)["results"]
    trained = [name for name in results if name != "default"]
    if "default" not in results or len(trained) != 1:
        raise UserError(f"{path}: expected the 512-position 'default' and one trained model")
    model, minilm = results[trained[0]]["doc2dial"], results["default"]["doc2dial"]
    if "late@512" not in model or "per_item" not in model:
        raise UserError(f"{path}: needs --passage_window 512 --late_chunking --per_item results")
    return {"whole": model, "own MaxP": model["maxp@512"], "late chunks": model["late@512"],
            "MiniLM MaxP": minilm["maxp@512"]}


def recall(results: dict, part: str) -> np.ndarray:
    """(N,) per-item R@1 (0 or 100) of one part (``""``: all items)."""
    for key in part.split():
        results = results[key]
    return np.asarray(results["per_item"]["recall@1"], dtype=np.float64)


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("evaluations", nargs="+", help="page evaluation JSON files, one per seed")
    parser.add_argument("--output", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    runs = [readings(path) for path in args.evaluations]
    out = {"evaluations": args.evaluations, "recall@1": {}, "paired": {}}
    header = " | ".join(PARTS) + " |\n" + "|---" * (len(PARTS) + 1) + "|"
    lines = ["| reading | " + header]
    for reading in runs[0]:
        cells = []
        for label, part in PARTS.items():
            values = out["recall@1"].setdefault(reading, {})[label] = [float(recall(run[reading], part).mean())
                                                                        for run in runs]  # one per seed
            sd = np.std(values, ddof=1) if len(values) > 1 else 0
            cells.append(" / ".join(f"{v:.1f}" for v in values) + f" (mean {np.mean(values):.1f}, sd {sd:.1f})")
        lines.append(f"| {reading} | " + " | ".join(cells) + " |")
    lines += ["", "| seed-averaged items | " + header]
    for reading, window in [(r, w) for r in ("whole", "late chunks") for w in ("own MaxP", "MiniLM MaxP")]:
        cells = []
        for label, part in PARTS.items():
            base, other = (np.mean([recall(run[name], part) for run in runs], axis=0) for name in (window, reading))
            paired = out["paired"].setdefault(f"{reading} - {window}", {})[label] = paired_difference(base, other)
            cells.append(f"{paired['difference']:+.2f} [{paired['low']:+.2f}, {paired['high']:+.2f}]")
        lines.append(f"| {reading} - {window} | " + " | ".join(cells) + " |")
    logger.info("%d seeds: R@1 per seed\n%s", len(runs), "\n".join(lines))
    if args.output:
        write_json(args.output, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
