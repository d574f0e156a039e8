#!/usr/bin/env python
"""Which training recipe gives the best retriever? Rows trained with several seeds, chosen on one
half of the dev pages and reported on the other (method and results: docs/recipe-study.md).

Every row trains all-MiniLM-L6-v2 with efficient_train.py on ../shared/data/doc2dial/train_triples.jsonl
once per seed and evaluates each model with ``evaluate.py --page_split``. A row (``--list``) is its
differences to BASE: the negatives (``shared``: the file's; ``dense``, ``hybrid``: re-mined from each
query's own document, filtered at 95% of the positive's score; ``iterative:ROW``: mined by ROW's first
model), label-free ``pairs``, SQuALITY's training questions (``squality``), a ``teacher`` whose scores it distils, Matryoshka dims, the query's turns
(``all_turns``: the whole conversation) and the training flags. Every trained row also gives
``ROW+bm25@W`` (fused with BM25 at each weight W) and ``ROW@dimD`` (vectors cut to D); ``soup:ROW``
averages ROW's seed models. The table gives each half's recall over seeds and report-half paired 95%
intervals against the baselines, each query's metric averaged over the seeds. Results are merged
into --output, a row at a time, so the study can run in parts.

    python bench/recipe_study.py --rows bm25_all_turns dense_n1_e2_all_turns distill_trained_n3_e2_all_turns --seeds 0 1 2
    python bench/recipe_study.py --list
"""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

from longcontrast import UserError

from common import DOC2DIAL as SHARED, RESULTS, ROOT, SHARED as DATA, arguments, run, write_json

TRAIN = os.path.join(SHARED, "train_triples.jsonl")
CORPUS = os.path.join(SHARED, "dev", "documents.json")
DEV = os.path.join(SHARED, "dev")
SQUALITY = os.path.join(DATA, "long", "squality_train")  # another domain: 999 questions on 50 stories

# row -> its differences to BASE (None: a baseline that trains nothing); "soup:ROW" rows are implicit
BASE = {"negatives": "shared", "num_hard_negatives": 1, "batch": 16, "epochs": 1, "temperature": 0.05, "lr": 2e-5,
        "pairs": None, "teacher": None, "distill_weight": 0.0, "teacher_temperature": 1.0,
        "matryoshka_dims": None, "query_turns": 5, "query_max_len": 256, "negative_sampling": "first",
        "mixed_batches": False, "squality": False}
# teacher -> (its dense model: "default" or a row whose first seed's model it is, BM25's weight): the model fused
# with BM25 over each record's own document, z-scored over the document's chunks, as the recipe deploys it
TEACHERS = {"hybrid": ("default", 0.3), "trained_hybrid": ("plain_n1_e2", 0.3),
            "trained_hybrid_all_turns": ("dense_n1_e2_all_turns", 0.2)}
DISTILLED = {"negatives": "dense", "epochs": 2, "teacher": "hybrid", "distill_weight": 1.0}
TRAINED_TEACHER = {**DISTILLED, "teacher": "trained_hybrid", "epochs": 1, "teacher_temperature": 0.5}
# the whole conversation as the query (no dev or training dialogue has more than 17 turns), up to MiniLM's 512 positions
ALL_TURNS = {"query_turns": 32, "query_max_len": 512}
# baselines that train nothing: name -> (evaluate.py's model, query flags)
BASELINES = {"bm25": ("bm25", {}), "untrained": ("default", {}), "bm25_all_turns": ("bm25", ALL_TURNS),
             "untrained_all_turns": ("default", ALL_TURNS)}
ROWS = {
    **{name: None for name in BASELINES},
    "hybrid_n1": {"negatives": "hybrid"},
    "dense_n1_crop": {"negatives": "dense", "pairs": "crop", "mixed_batches": True},
    "dense_n3_b32_lr4e-5": {"negatives": "dense", "num_hard_negatives": 3, "batch": 32, "lr": 4e-5},
    "dense_n1_lr5e-5": {"negatives": "dense", "lr": 5e-5},
    "dense_n1_e2": {"negatives": "dense", "epochs": 2},
    # distillation from the hybrid teacher's scores of each query's positive and hard negatives
    "distill_n1_e2_tt0.5": {**DISTILLED, "teacher_temperature": 0.5},
    "distill_n3_e1_tt0.5": {**DISTILLED, "num_hard_negatives": 3, "epochs": 1, "teacher_temperature": 0.5},
    # ... and from the recipe's trained model fused with BM25 (the deployed hybrid, R@1 +7 over the model alone)
    "distill_trained_n3_e1": {**TRAINED_TEACHER, "num_hard_negatives": 3},
    "distill_trained_n7_e1": {**TRAINED_TEACHER, "num_hard_negatives": 7},
    # Matryoshka prefixes on the recipe's row, and the recipe's row again with its models kept, to cut
    # its vectors the same way (ROW@dimD): what MRL adds over truncating a model trained without it
    "mrl_n1_e2": {"negatives": "dense", "epochs": 2, "matryoshka_dims": [384, 256, 128, 64]},
    "plain_n1_e2": {"negatives": "dense", "epochs": 2},
    # the recipe's row with the whole conversation as the query, in mining, training and evaluation
    "dense_n1_e2_all_turns": {"negatives": "dense", "epochs": 2, **ALL_TURNS},
    "mrl_n1_e2_all_turns": {"negatives": "dense", "epochs": 2, "matryoshka_dims": [384, 256, 128, 64], **ALL_TURNS},
    # levers on the whole-conversation recipe: a third epoch, negatives mined by its own model, and distillation
    # from its deployed hybrid (the recipe's model fused with BM25 at 0.2)
    "dense_n1_e3_all_turns": {"negatives": "dense", "epochs": 3, **ALL_TURNS},
    "iterative_n1_e2_all_turns": {"negatives": "iterative:dense_n1_e2_all_turns", "epochs": 2, **ALL_TURNS},
    "distill_trained_n3_e2_all_turns": {**DISTILLED, "teacher": "trained_hybrid_all_turns", "teacher_temperature": 0.5,
                                        "num_hard_negatives": 3, **ALL_TURNS},
    "distill_mrl_n3_e2_all_turns": {**DISTILLED, "teacher": "trained_hybrid_all_turns", "teacher_temperature": 0.5,
                                    "num_hard_negatives": 3, "matryoshka_dims": [384, 256, 128, 64], **ALL_TURNS},
    # training as practitioners train, on the plain whole-conversation row: its negative drawn anew each epoch
    # from the pool of 7 mined ones (instead of the first), and the records beside label-free crops of the
    # corpus, each batch from one dataset (the default with two files) or the two shuffled together
    "pool_random_n1_e2_all_turns": {"negatives": "dense", "epochs": 2, "negative_sampling": "random", **ALL_TURNS},
    "crop_n1_e1_all_turns": {"negatives": "dense", "pairs": "crop", **ALL_TURNS},
    "crop_mixed_n1_e1_all_turns": {"negatives": "dense", "pairs": "crop", "mixed_batches": True, **ALL_TURNS},
    # ... and a third dataset from another domain (SQuALITY's questions on fiction stories, read to 512 tokens)
    "squality_crop_n1_e1_all_turns": {"negatives": "dense", "pairs": "crop", "squality": True, **ALL_TURNS},
    "squality_crop_mixed_n1_e1_all_turns": {"negatives": "dense", "pairs": "crop", "squality": True,
                                            "mixed_batches": True, **ALL_TURNS},
}
HALVES = ("selection", "report")
FUSION_WEIGHTS = (0.2, 0.3, 0.4, 0.5)  # BM25's weight in each hybrid row
TRUNCATED_DIMS = (256, 128, 64)  # every trained model is also scored on these prefixes of its vectors (ROW@dimD)
METRICS = ("recall@1", "recall@5", "recall@20")


def call(command: list[str], log: str) -> float:
    """Run a command (output to ``log``); its wall seconds. A failure ends the study with its log's tail."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        with open(log) as handle:
            sys.exit(f"{' '.join(command)} failed ({code}):\n" + handle.read()[-3000:])
    return time.perf_counter() - started


def cached(command: list[str], stem: str, args) -> str:
    """The output of a data command, made once per set of flags (the file name carries their hash)."""
    flags = hashlib.sha256(json.dumps(command[1:]).encode()).hexdigest()[:10]
    path = os.path.join(args.work_dir, f"{stem}_{flags}.jsonl")
    if not os.path.exists(path):
        call([*command, "--output", path], path + ".log")
    return path


def query_flags(spec: dict) -> list[str]:
    """The query flags of mining, training and evaluation for a (partial) row spec; none at BASE's values, so
    the cached files of rows that read 5 turns keep their names."""
    turns, length = (spec.get(k, BASE[k]) for k in ("query_turns", "query_max_len"))
    if (turns, length) == (BASE["query_turns"], BASE["query_max_len"]):
        return []
    return ["--query_turns", str(turns), "--query_max_len", str(length)]


def negatives_file(source: str, args, query: list[str]) -> tuple[str, float]:
    """The training file for a negatives source (its queries as ``query`` flags make them) and the mining seconds."""
    if source == "shared":
        return TRAIN, 0.0
    command = [sys.executable, "data/mine_hard_negatives.py", "--input", TRAIN, "--corpus", CORPUS,
               "--per_document", "--num_negatives", "7", "--passage_max_len", "512"]  # as the recipe was measured
    if source.startswith(("dense", "iterative", "hybrid")):
        model = "default"
        if source.startswith("iterative:"):
            model = os.path.join(args.work_dir, source.split(":", 1)[1], f"seed{args.seeds[0]}")
            if not os.path.isdir(model):
                raise UserError(f"row {source.split(':', 1)[1]} must run before {source}")
        command += ["--model_name_or_path", model, *args.precision_flags]
        if source == "hybrid":
            command += ["--scorer", "hybrid"]
        command += ["--max_score_ratio", "0.95"]
        command += query
    path = cached(command, f"train_{source.replace(':', '_')}", args)
    return path, json.load(open(path + ".json"))["seconds"]


def evaluate(model: str, output_file: str, dims: tuple[int, ...] = (), query: list[str] = ()) -> tuple[dict, dict, dict]:
    """evaluate.py on the dev set, split by page, per-item values kept (float32, as every figure):
    the model's results, for a dense model per BM25 weight those of its hybrid (--fuse_bm25), and
    per Matryoshka dimension D those of its vectors cut to D (--truncate_dim)."""
    weights = [] if model == "bm25" else [f"{w:g}" for w in FUSION_WEIGHTS]
    if not os.path.exists(output_file):
        call([sys.executable, "evaluate.py", "--data-folder", DEV, "--eval-dataset", "doc2dial", "--page_split",
             "--per_item", "--output_file", output_file, "--model_path", model, *query,
             *(["--fuse_bm25", *weights] if weights else []), *(["--truncate_dim", *map(str, dims)] if dims else [])],
            output_file + ".log")
    rows = {name: row["doc2dial"] for name, row in json.load(open(output_file))["results"].items()}
    return (rows[model], {w: rows[f"{model}+bm25@{w}"] for w in weights},
            {d: rows[f"{model}@dim{d}"] for d in dims if f"{model}@dim{d}" in rows})


def halves(scored: dict) -> dict:
    """Per half: the means and the per-item values of the study's metrics."""
    return {half: {"num_items": scored[f"split={half}"]["num_items"],
                   **{m: scored[f"split={half}"][m] for m in METRICS},
                   "per_item": {m: scored[f"split={half}"]["per_item"][m] for m in METRICS}} for half in HALVES}


def soup(row: str, args) -> str:
    """The uniform average of a row's seed models (same start, same architecture), saved beside them."""
    import shutil

    from safetensors.torch import load_file, save_file

    folders = [os.path.join(args.work_dir, row, f"seed{seed}") for seed in args.seeds]
    missing = [f for f in folders if not os.path.isfile(os.path.join(f, "model.safetensors"))]
    if missing:
        raise UserError(f"soup:{row} needs the trained seeds of row {row} first: {missing}")
    target = os.path.join(args.work_dir, row, "soup")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folders[0], target, ignore=shutil.ignore_patterns("*.safetensors", "checkpoint-*"))
    states = [load_file(os.path.join(f, "model.safetensors")) for f in folders]
    averaged = {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
                for k, v in states[0].items()}
    save_file(averaged, os.path.join(target, "model.safetensors"), metadata={"format": "pt"})
    return target


def study_row(name: str, args) -> dict:
    """The row's entry: recipe, seconds and per seed the halves' results (``seeds``); for a dense
    model also per BM25 weight those of its hybrid (``fused_seeds``: weight -> seed -> halves)."""
    if name in BASELINES:
        model, spec = BASELINES[name]
        output = {"bm25": "bm25_eval.json", "untrained": "untrained_eval_hybrid.json"}.get(name, f"{name}_eval.json")
        alone, fused, _ = evaluate(model, os.path.join(args.work_dir, output), query=query_flags(spec))
        return {"recipe": {"model": model, **spec}, "seeds": {"-": halves(alone)},
                "fused_seeds": {w: {"-": halves(r)} for w, r in fused.items()}}
    if name.startswith("soup:"):
        row = name.split(":", 1)[1]
        folder = soup(row, args)
        alone, fused, _ = evaluate(folder, folder + "_eval_hybrid.json", query=query_flags(ROWS[row]))
        return {"recipe": f"soup of {row}, seeds {args.seeds}", "seeds": {"soup": halves(alone)},
                "fused_seeds": {w: {"soup": halves(r)} for w, r in fused.items()}}
    spec = {**BASE, **ROWS[name]}
    query = query_flags(spec)
    train_file, mining_seconds = negatives_file(spec["negatives"], args, query)
    if spec["teacher"]:
        teacher, weight = TEACHERS[spec["teacher"]]
        if teacher != "default":
            teacher = os.path.join(args.work_dir, teacher, f"seed{args.seeds[0]}")
            if not os.path.isfile(os.path.join(teacher, "training_args.json")):
                raise UserError(f"row {TEACHERS[spec['teacher']][0]} must run before {name}: its model is the teacher")
        train_file = cached([sys.executable, "data/score_with_teacher.py", "--input", train_file, "--model_name_or_path",
                             teacher, "--fuse_bm25", str(weight), "--corpus", CORPUS, "--per_document",
                             *args.precision_flags, *query], f"scored_{spec['negatives']}_{spec['teacher']}", args)
    data = [train_file]
    if spec["pairs"]:
        data.append(cached([sys.executable, "data/make_pairs.py", "--corpus", CORPUS, "--method", spec["pairs"]],
                           f"pairs_{spec['pairs']}", args))
    if spec["squality"]:
        data.append(SQUALITY)
    seeds, fused_seeds, truncated_seeds, train_seconds = {}, {}, {}, {}
    for seed in args.seeds:
        output_dir = os.path.join(args.work_dir, name, f"seed{seed}")
        command = [sys.executable, "efficient_train.py", "--train_data", *data, "--output_dir", output_dir,
                   "--overwrite_output_dir", "--num_hard_negatives", str(spec["num_hard_negatives"]),
                   "--per_device_train_batch_size", str(spec["batch"]), "--num_train_epochs", str(spec["epochs"]),
                   "--temperature", str(spec["temperature"]), "--learning_rate", str(spec["lr"]), "--seed", str(seed),
                   "--save_strategy", "no", "--logging_steps", "10", "--disable_tqdm", "true", *args.train_flags, *query,
                   *(["--distill_weight", str(spec["distill_weight"]), "--teacher_temperature",
                      str(spec["teacher_temperature"])] if spec["distill_weight"] else []),
                   *(["--matryoshka_dims", *map(str, spec["matryoshka_dims"])] if spec["matryoshka_dims"] else []),
                   *(["--negative_sampling", spec["negative_sampling"]] if spec["negative_sampling"] != "first" else []),
                   *(["--mixed_batches"] if spec["mixed_batches"] else [])]
        if os.path.isfile(os.path.join(output_dir, "training_args.json")):
            # a finished model of an earlier, interrupted study: only evaluated; the Trainer's own runtime
            log = [json.loads(line) for line in open(os.path.join(output_dir, "loss_log.jsonl"))]
            train_seconds[seed] = next(entry["train_runtime"] for entry in log if "train_runtime" in entry)
        else:
            os.makedirs(os.path.dirname(output_dir), exist_ok=True)
            train_seconds[seed] = round(call(command, output_dir + ".log"), 1)
        alone, fused, truncated = evaluate(output_dir, output_dir + "_eval_hybrid.json", TRUNCATED_DIMS, query)
        seeds[str(seed)] = halves(alone)
        for weight, result in fused.items():
            fused_seeds.setdefault(weight, {})[str(seed)] = halves(result)
        for dim, result in truncated.items():
            truncated_seeds.setdefault(dim, {})[str(seed)] = halves(result)
    return {"recipe": spec, "mining_seconds": round(mining_seconds, 1), "train_seconds": train_seconds, "seeds": seeds,
            "fused_seeds": fused_seeds, "truncated_seeds": truncated_seeds}


def seed_mean(row: dict, half: str, metric: str) -> np.ndarray:
    """(N,) each query's metric averaged over the row's seeds."""
    return np.mean([np.array(v[half]["per_item"][metric]) for v in row["seeds"].values()], axis=0)


def baselines(name: str, results: dict, versus: str | None = None) -> dict[str, str]:
    """The rows a row is compared with on the report half: label -> row."""
    # the untrained model is read with the row's own queries; BM25 with the default ones and the whole conversation
    recipe = results.get(name.partition("+bm25@")[0].partition("@dim")[0], {}).get("recipe")
    untrained = "untrained_all_turns" if isinstance(recipe, dict) and query_flags(recipe) else "untrained"
    found = {"BM25": "bm25", "BM25 all turns": "bm25_all_turns", "untrained": untrained}
    if "+bm25@" in name:  # a hybrid against the untrained model's hybrid at the same weight: does training still pay?
        found["untrained hybrid"] = f"{untrained}+bm25@{name.partition('+bm25@')[2]}"
    if "@dim" in name:  # a prefix row (ROW@dimD) against its own models' whole vectors
        found["full width"] = name.partition("@dim")[0]
    if versus:
        found[versus] = versus
    return {label: row for label, row in found.items() if row in results and row != name}


def table(results: dict, versus: str | None = None) -> str:
    """Per row: mean and spread over seeds of each half's recall, and report-half paired intervals
    (also against the row ``versus``, with the selection half's too)."""
    from longcontrast.metrics import paired_difference

    compared = [("BM25", "recall@1"), ("BM25 all turns", "recall@1"), ("untrained", "recall@1"),
                ("untrained", "recall@20"), ("untrained hybrid", "recall@1"), ("full width", "recall@1"),
                *([(versus, "recall@1")] if versus else [])]
    lines = ["| row | seeds | selection R@1 | report R@1 | report R@5 | report R@20 | "
             + " | ".join(f"report R@{metric[7:]} - {label} [95%]" for label, metric in compared)
             + (f" | selection R@1 - {versus} [95%]" if versus else "") + " | train s |",
             "|---" * (7 + len(compared) + bool(versus)) + "|"]
    for name, row in results.items():
        def spread(half, metric):
            values = [v[half][metric] for v in row["seeds"].values()]
            return f"{np.mean(values):.2f}" + (f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else "")

        def interval(label, metric):
            if label not in others:
                return "-"
            c = paired_difference(seed_mean(results[others[label]], "report", metric), seed_mean(row, "report", metric))
            return f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"

        others, seconds = baselines(name, results, versus), row.get("train_seconds") or {}
        versus_selection = "-"
        if versus in others:
            c = paired_difference(seed_mean(results[versus], "selection", "recall@1"),
                                  seed_mean(row, "selection", "recall@1"))
            versus_selection = f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]"
        lines.append("| " + " | ".join([name, str(len(row["seeds"])), spread("selection", "recall@1"),
                                        *(spread("report", m) for m in METRICS), *(interval(*c) for c in compared),
                                        *([versus_selection] if versus else []),
                                        f"{np.mean(list(seconds.values())):.0f}" if seconds else "-"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--rows", nargs="+", default=["bm25", "bm25_all_turns", "untrained_all_turns", "dense_n1_e2_all_turns",
                                                      "distill_trained_n3_e2_all_turns"],
                        help="Rows to run, in order (--list shows them; soup:ROW for any trained ROW).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training seeds of every trained row.")
    parser.add_argument("--list", action="store_true", help="List the rows and exit.")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "recipe_study"),
                        help="Mined files, trained models, their evaluations and logs (a finished model or evaluation "
                             "found there is reused).")
    parser.add_argument("--output", default=os.path.join(RESULTS, "recipe_study_split.json"),
                        help="JSON results, merged with the rows already there.")
    parser.add_argument("--table", action="store_true", help="Print the table of --output and exit.")
    parser.add_argument("--versus", metavar="ROW", help="The table also compares every row with ROW (both halves).")
    parser.add_argument("--bf16", action="store_true",
                        help="Train and mine under bf16 autocast on the CPU (fast on AVX512-BF16/AMX); evaluation stays float32.")
    args = parser.parse_args(argv)
    if args.list:
        for name, spec in ROWS.items():
            print(name, "baseline" if spec is None else {**BASE, **spec})
        return 0
    results = json.load(open(args.output)) if os.path.exists(args.output) else {}
    if args.versus and args.versus not in results:
        parser.error(f"--versus {args.versus}: no such row in {args.output}")
    if args.table:
        print(table(results, args.versus))
        return 0
    unknown = [r for r in args.rows if r not in ROWS and not (r.startswith("soup:") and r[5:] in ROWS)]
    if unknown:
        parser.error(f"unknown rows {unknown}; --list shows them")
    if not os.path.isfile(TRAIN):
        parser.error(f"{TRAIN} not found: the study reads ../shared/data/doc2dial")
    args.precision_flags = ["--precision", "bf16"] if args.bf16 else []
    args.train_flags = ["--bf16", "--use_cpu"] if args.bf16 else []
    os.makedirs(args.work_dir, exist_ok=True)
    for name in args.rows:
        print(f"row {name} ...", flush=True)
        row = study_row(name, args)
        fused, truncated = row.pop("fused_seeds", {}), row.pop("truncated_seeds", {})
        results[name] = {**row, "bf16": args.bf16}
        for weight, seeds in fused.items():  # the same models, their scores fused with BM25's: a row each
            results[f"{name}+bm25@{weight}"] = {"recipe": f"{name} fused with BM25, weight {weight}", "seeds": seeds,
                                                "bf16": args.bf16}
        for dim, seeds in truncated.items():  # the same models' vectors cut to their first dim coordinates
            results[f"{name}@dim{dim}"] = {"recipe": f"{name}, vectors cut to {dim} dimensions", "seeds": seeds,
                                           "bf16": args.bf16}
        write_json(args.output, results, indent=None)  # per-item values: one line
        print(table(results).splitlines()[-1], flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
