#!/usr/bin/env python
"""Does a model read long text? Synthetic passkey and needle retrieval from 256 to 8192 tokens.

The tasks are LongEmbed's (:mod:`longcontrast.synthetic`): per length, 100 documents of that many of
the model's own tokens, 50 of them asked for; Acc@1 by evaluate.py's rule (a tie with the gold is a
share of a hit), also split by whether the fact starts before or from token 512. Each model reads
each text cut at its own position limit, as LongEmbed does. Whole Doc2Dial pages are evaluate.py's
(``--data-folder ../shared/data/doc2dial/pages/dev --passage_max_len 8192 --passage_window 512``).

    python bench/long_context.py                                  # the embedded MiniLM at 512 positions
    python bench/long_context.py --models default=default long=outputs/long --lengths 256 512 1024 2048 4096
    python bench/long_context.py --untrained_inits copy interpolate   # the MiniLM extended, before training

Prints a table, writes JSON (``--output``) and a PNG of Acc@1 against length (``--plot``).
"""

import logging
import os
import time

import torch

from longcontrast.evaluation import evaluate
from longcontrast.inference import load_retriever, prompts_for
from longcontrast.modeling import DualEncoder, default_model_path, load_encoder, read_pooling
from longcontrast.positions import POSITION_INITS, token_positions
from longcontrast.readers import read_json
from longcontrast.retrievers import DenseRetriever, EncodeSettings
from longcontrast.synthetic import TASKS, load_haystack, synthetic_set

from common import DOC2DIAL, RESULTS, arguments, line_plots, run, write_json

logger = logging.getLogger("long_context")
LENGTHS = (256, 512, 1024, 2048, 4096)  # the CPU default; add 8192 on a GPU


def load_models(specs: list[str], untrained_inits: list[str], extend_to: int):
    """{label: (DualEncoder, tokenizer)} loader thunks: ``label=path`` or ``path`` ('default' is the
    embedded MiniLM); each untrained init adds the default model extended to ``extend_to`` with it."""
    loaders = {}
    for spec in specs:
        label, _, path = spec.rpartition("=")
        label = label or path
        loaders[label] = (lambda path=path: load_retriever(None if path == "default" else path))
    for init in untrained_inits:
        def extended(init=init):
            torch.manual_seed(0)
            path = default_model_path()
            encoder, tokenizer = load_encoder(path, extend_to, init, dropout=0.0)
            return DualEncoder(encoder.eval(), read_pooling(path) or "cls"), tokenizer
        loaders[f"MiniLM {extend_to} {init}, untrained"] = extended
    return loaders


def run_synthetic(model, tokenizer, kind, length, haystack, args) -> tuple[float, dict]:
    """Acc@1 of one task at one length, and Acc@1 apart for facts starting before / from token 512."""
    limit = token_positions(model.query_encoder)
    data = synthetic_set(kind, length, tokenizer, haystack=haystack, documents=args.num_documents,
                         queries=args.num_queries, seed=args.seed)
    prompts = prompts_for(model, None, None)  # the ones the model records, as evaluate.py reads them
    # a prompt's tokens come on top of the document's own length
    extra = len(tokenizer(prompts["document"], add_special_tokens=False)["input_ids"]) if prompts["document"] else 0
    settings = EncodeSettings(query_max_len=min(limit, 128), passage_max_len=min(limit, length + extra),
                              batch_size=args.batch_size, autocast=torch.bfloat16 if args.bf16 else None,
                              query_prompt=prompts["query"], passage_prompt=prompts["document"],
                              device=torch.device(args.device))
    scored = evaluate(DenseRetriever(model, tokenizer, settings), data)["whole"]
    by_depth = {name: {"queries": part.num_items, "acc@1": part.metrics["recall@1"]}
                for name, part in (("fact<512", scored.parts.get("gold_start<512")),
                                   ("fact>=512", scored.parts.get("gold_start>=512"))) if part}
    return scored.metrics["recall@1"], by_depth


def format_tables(results: dict, lengths: list[int]) -> str:
    lines = []
    for kind in TASKS:
        if not any(kind in r for r in results.values()):
            continue
        lines += [f"\n{kind} Acc@1 (%)", "| model | " + " | ".join(map(str, lengths)) + " | mean |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for label, r in results.items():
            cells = [f"{r[kind][str(n)]:.1f}" if str(n) in r.get(kind, {}) else "-" for n in lengths]
            mean = f"{r[kind]['mean']:.1f}" if "mean" in r.get(kind, {}) else "-"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} |")
        split = {label: r[f"{kind}_by_depth"] for label, r in results.items() if f"{kind}_by_depth" in r}
        if split:  # is a fact past the trained positions found as often as one before them?
            lines += [f"\n{kind} Acc@1 (%) by where the fact starts: before token 512 / from 512 (queries)",
                      "| model | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
            for label, by_length in split.items():
                cells = [" / ".join(f"{p['acc@1']:.0f} ({p['queries']})" for p in by_length[str(n)].values())
                         if str(n) in by_length else "-" for n in lengths]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, lengths: list[int], path: str) -> None:
    """Acc@1 against document length, a panel a task (none for results of whole pages only)."""
    panels = [{"title": kind, "xlabel": "document length (tokens)", "ylabel": "Acc@1 (%)", "log2_x": True,
               "ylim": (-2, 102), "lines": {label: [(n, r[kind][str(n)]) for n in lengths if str(n) in r[kind]]
                                            for label, r in results.items() if kind in r}}
              for kind in TASKS if any(kind in r for r in results.values())]
    if panels:
        line_plots(path, panels)


def parse_args(argv=None):
    parser = arguments(__doc__)
    parser.add_argument("--models", nargs="*", default=["MiniLM 512=default"],
                        help="Models as LABEL=PATH or PATH ('default': the embedded all-MiniLM-L6-v2, 512 positions).")
    parser.add_argument("--untrained_inits", nargs="*", default=[], choices=POSITION_INITS,
                        help="Also the embedded MiniLM extended to --extend_to positions with each init, untrained.")
    parser.add_argument("--extend_to", type=int, default=8192)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS),
                        help="Document lengths in tokens (default: up to 4096, the CPU default; add 8192 on a GPU).")
    parser.add_argument("--num_documents", type=int, default=100)
    parser.add_argument("--num_queries", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="Generation seed (names, keys, needles, depths).")
    parser.add_argument("--pages", default=os.path.join(DOC2DIAL, "pages", "dev"),
                        help="Whole-page dev set whose sentences are the needle haystack.")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="Encode under bf16 autocast (GPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(RESULTS, "long_context.json"))
    parser.add_argument("--plot", default=None, help="PNG of Acc@1 against length (default: --output with .png).")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the results already in --output and run only what is missing.")
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    haystack = load_haystack(args.pages) if "needle" in args.tasks else []
    results, runs = {}, []
    if args.reuse and os.path.isfile(args.output):
        previous = read_json(args.output)
        results, runs = previous["results"], previous.get("runs", [])
    runs.append({k: v for k, v in vars(args).items() if k != "reuse"})
    for label, load in load_models(args.models, args.untrained_inits, args.extend_to).items():
        model, tokenizer = load()
        model.to(args.device)
        row = results.setdefault(label, {})
        row["positions"] = token_positions(model.query_encoder)
        for kind in (k for k in args.tasks if k in TASKS):
            done = row.setdefault(kind, {})
            for length in args.lengths:
                if str(length) not in done:
                    started = time.perf_counter()
                    done[str(length)], split = run_synthetic(model, tokenizer, kind, length, haystack, args)
                    row.setdefault(f"{kind}_by_depth", {})[str(length)] = split
                    logger.info("%s %s %d: Acc@1 %.1f (%.0f s)", label, kind, length, done[str(length)],
                                time.perf_counter() - started)
            done["mean"] = sum(v for k, v in done.items() if k != "mean") / len([k for k in done if k != "mean"])
            # after every task of a model: an interrupted run keeps what it measured, and --reuse goes on from there
            write_json(args.output, {"runs": runs, "results": results})
    lengths = sorted({int(n) for r in results.values() for k in TASKS for n in r.get(k, {}) if n != "mean"})
    print(format_tables(results, lengths))
    plot_path = args.plot or os.path.splitext(args.output)[0] + ".png"
    plot(results, lengths, plot_path)
    print(f"results written to {args.output}" + (f" and {plot_path}" if os.path.isfile(plot_path) else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
