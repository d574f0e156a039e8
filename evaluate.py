#!/usr/bin/env python
"""Top-k retrieval quality of text encoders: ChatRAG-Bench's Doc2Dial, QuAC and QReCC, or your own
corpus in the BEIR layout.

    python evaluate.py                                   # the embedded default model, generated sample
    python evaluate.py --model_path outputs/run-X default --data-folder /data/ChatRAG-Bench
    python evaluate.py --model_path outputs/run-X --beir my_corpus/ --run_file outputs/run.trec

Prints one table (ChatRAG: Average, Doc2Dial, QuAC, QReCC x Recall@1/5/20, MRR@20, NDCG@20; BEIR:
nDCG@10, Recall@1/5/10/20/100, MRR@10, MAP@100; in percent) and writes the numbers as JSON. With
several models, each after the first is compared with the first: the per-query difference with a
paired bootstrap 95% interval and a randomisation-test p-value. Every flag also takes dashes for
underscores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from longcontrast import UserError
from longcontrast.beir import evaluate_beir, evaluate_beir_bm25, format_beir_table
from longcontrast.readers import load_beir
from longcontrast.evaluation import (
    DATASETS, DEFAULT_BM25_WEIGHT, EvalConfig, average, evaluate_bm25, evaluate_dataset, format_table, parts, without_per_item,
)
from longcontrast.inference import DEFAULT_MAX_TOKENS, PRECISIONS, autocast_dtype, load_retriever, prompts_for
from longcontrast.metrics import paired_difference
from longcontrast.modeling import POOLING_MODES
from longcontrast.positions import token_positions

logger = logging.getLogger("evaluate")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, *aliases, **kwargs):
        spellings = {"--" + name, "--" + name.replace("_", "-"), *aliases}
        parser.add_argument(*sorted(spellings), dest=name, **kwargs)

    flag("model_path", nargs="+", default=None,
         help="Model folders to evaluate (a training output, with or without query_encoder/ and context_encoder/, "
              "or any encoder); 'default' is the embedded all-MiniLM-L6-v2, 'bm25' the keyword baseline (BM25, "
              "k1 0.9, b 0.4, over each document's chunks, or over the whole --beir corpus). Default: default.")
    flag("query_encoder_path", help="Query encoder folder (with --context_encoder_path, instead of --model_path).")
    flag("context_encoder_path", help="Context encoder folder.")
    flag("data_folder", default=os.path.join(HERE, "data", "chatrag_sample"),
         help="Folder with <dataset>/test.json and <dataset>/documents.json (default: the generated sample).")
    flag("eval_dataset", default="all", choices=[*DATASETS, "all"], help="Which set to evaluate.")
    flag("query_max_len", type=int, default=256, help="Max query tokens (cut on the left: latest turns kept).")
    flag("passage_max_len", type=int, default=1024,
         help="Max chunk tokens (cut on the right; capped at the model's position table).")
    flag("beir", default=None, metavar="DIR",
         help="Evaluate on a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv): every query ranks the "
              "whole corpus. Replaces --data-folder and --eval-dataset.")
    flag("split", default="test", help="The BEIR qrels split (qrels/<split>.tsv).")
    flag("run_file", default=None,
         help="BEIR: also write each model's top 100 per query as a TREC run file (several models: -2, -3... "
              "before the extension for the second, third...).")
    flag("corpus_embeddings", default=None, metavar="PATH",
         help="BEIR: cache of the corpus embeddings (one model): written on the first run, reused when model, "
              "corpus and settings match, refused when they do not.")
    flag("embedding_dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
         help="BEIR: how corpus embeddings are kept (scores are float32 either way). auto: float16 on GPU, "
              "float32 on CPU.")
    flag("faiss", action="store_true", help="BEIR: search with FAISS's exact flat index (needs faiss-cpu or "
         "faiss-gpu) instead of the built-in blocked search.")
    flag("passage_window", type=int, default=None, metavar="W",
         help="Also score every passage longer than W tokens as the best of its consecutive W-token windows, "
              "each embedded on its own (MaxP): the chunking baseline of long documents.")
    flag("late_chunking", action="store_true",
         help="With --passage_window (ChatRAG sets): also score every passage as the best of the same W-token "
              "windows, each the mean of its token states from ONE pass over the whole passage (late chunking, "
              "Guenther et al. 2024): chunk-sized vectors that read the whole passage's context. Rows late@W.")
    flag("fuse_bm25", nargs="*", type=float, default=None, metavar="W",
         help="ChatRAG sets: also rank with each model fused with BM25: each document's chunks scored "
              "(1 - W) * z(cosine) + W * z(BM25), z-scored per query; a row NAME+bm25@W per weight, compared like a "
              f"model. Bare: W {DEFAULT_BM25_WEIGHT:g} (chosen on the Doc2Dial dev selection half, docs/evaluation.md).")
    flag("batch_size", type=int, default=None,
         help="Texts encoded at once (default: 64 on GPU; 8 on CPU, where bigger batches only add padding).")
    flag("max_tokens_per_batch", type=int, default=DEFAULT_MAX_TOKENS,
         help="Padded tokens per forward pass (texts x the longest); a longer text goes alone. The default "
              "holds two 8192-token passages.")
    flag("bootstrap_samples", type=int, default=10_000,
         help="Resamples of the paired bootstrap comparing each model with the first.")
    flag("query_turns", "--num_turns", "--num-turns", type=int, default=5,
         help="A conversation query keeps its last N turns (as in training).")
    flag("page_split", action="store_true",
         help="Also score the set in two halves split by page (the items' source_doc_id; each page in one half, "
              "the halves of about equal size): choose recipes on split=selection, quote split=report.")
    flag("per_item", action="store_true",
         help="Keep every item's metrics in the JSON (for paired comparisons made elsewhere).")
    flag("split_at_token", type=int, default=512,
         help="Sets whose items carry gold_start_token (where the answer starts in the gold text, e.g. the whole "
              "pages of ../shared/data/doc2dial/pages/dev) are also scored apart for answers starting before and "
              "from this token.")
    flag("query_instruction", default=None,
         help="Prefix of every query (default: the model's recorded 'query' prompt, none if it records none).")
    flag("passage_instruction", default=None,
         help="Prefix of every chunk (default: the model's recorded 'document' prompt, none if it records none).")
    flag("trust_remote_code", action="store_true",
         help="Run the model's own code from its folder (e.g. nomic-bert, jina-bert); only for code you trust.")
    flag("pooling", choices=list(POOLING_MODES), default=None,
         help="Pooling when the model records none in a sentence-transformers config (default: cls).")
    flag("no_qrecc_answer", action="store_true",
         help="Do not append ' || <first answer>' to QReCC's gold chunk (ChatRAG's evaluation does).")
    flag("output_file", default=None, help="JSON results file (default: outputs/eval-<time>.json).")
    flag("device", default=None, help="cuda, cuda:1, cpu... (default: cuda if available).")
    flag("torch_dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
         help="dtype of the loaded weights (auto: the checkpoint's). Half-precision weights halve the memory of a "
              "large embedder; encoding then runs in that dtype whatever --precision says.")
    flag("precision", choices=list(PRECISIONS), default="auto",
         help="Encode in float32 or under bf16 / fp16 autocast. auto: on a GPU bf16 where it computes in bf16, "
              "else fp16; fp32 on CPU. On a CPU with AVX512-BF16 or AMX, bf16 is about 1.5x faster (embeddings "
              "move by ~1e-3); on others it is slower.")
    args = parser.parse_args(argv)
    if args.late_chunking and not args.passage_window:
        parser.error("--late_chunking pools the token states over --passage_window W windows: give --passage_window")
    if args.late_chunking and args.beir:
        parser.error("--late_chunking scores the ChatRAG sets (--data-folder), not a BEIR corpus")
    if args.fuse_bm25 == []:
        args.fuse_bm25 = [DEFAULT_BM25_WEIGHT]
    args.fuse_bm25 = list(dict.fromkeys(args.fuse_bm25)) if args.fuse_bm25 is not None else None
    if any(not 0 < weight < 1 for weight in args.fuse_bm25 or []):
        parser.error(f"--fuse_bm25 weights must lie strictly between 0 and 1, not {args.fuse_bm25}")
    for name in ("query_max_len", "passage_max_len", "batch_size", "query_turns", "passage_window",
                 "max_tokens_per_batch", "bootstrap_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    autocast = autocast_dtype(args.precision, device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        args.embedding_dtype, torch.float16 if device.type == "cuda" else torch.float32)
    datasets = list(DATASETS) if args.eval_dataset == "all" else [args.eval_dataset]
    if args.query_encoder_path or args.context_encoder_path:
        models = {f"{args.query_encoder_path} + {args.context_encoder_path}": None}
    else:  # name shown in the table -> folder (None: the embedded default)
        models = {name: None if name == "default" else name for name in (args.model_path or ["default"])}
    if args.corpus_embeddings and len(models) > 1:
        raise UserError("--corpus_embeddings caches one model's corpus: evaluate one model with it")
    if args.fuse_bm25 and args.beir:
        raise UserError("--fuse_bm25 fuses the scores of the ChatRAG sets' chunks (--data-folder), not of a BEIR corpus")
    beir = load_beir(args.beir, args.split) if args.beir else None
    rows = {}
    for number, (name, model_path) in enumerate(models.items(), 1):
        run_file = args.run_file
        if run_file and number > 1:
            stem, extension = os.path.splitext(run_file)
            run_file = f"{stem}-{number}{extension}"
        if name == "bm25" and beir is not None:
            rows[name] = {"beir": evaluate_beir_bm25(beir, run_file=run_file)}
            continue
        if name == "bm25":
            config = EvalConfig(num_turns=args.query_turns, split_at_token=args.split_at_token,
                                page_split=args.page_split)
            results = {}
            for dataset in datasets:
                started = time.perf_counter()
                results[dataset] = {**evaluate_bm25(args.data_folder, dataset, config),
                                    "seconds": round(time.perf_counter() - started, 2)}
            if len(datasets) > 1:
                results["average"] = average({d: results[d] for d in datasets})
            rows[name] = results
            continue
        model, tokenizer = load_retriever(model_path, args.query_encoder_path, args.context_encoder_path, args.pooling,
                                          args.trust_remote_code, dtype=args.torch_dtype if args.torch_dtype == "auto"
                                          else getattr(torch, args.torch_dtype))
        model.to(device)
        positions = token_positions(model.query_encoder)
        prompts = prompts_for(model, args.query_instruction, args.passage_instruction)
        config = EvalConfig(query_max_len=min(args.query_max_len, positions),
                            passage_max_len=min(args.passage_max_len, positions), batch_size=batch_size,
                            max_tokens=args.max_tokens_per_batch, num_turns=args.query_turns,
                            qrecc_answer_rule=not args.no_qrecc_answer, autocast=autocast, embedding_dtype=dtype,
                            query_prompt=prompts["query"], passage_prompt=prompts["document"],
                            split_at_token=args.split_at_token, passage_window=args.passage_window,
                            late_chunking=args.late_chunking, page_split=args.page_split, fuse_bm25=tuple(args.fuse_bm25 or ()))
        logger.info("%s reads queries up to %d tokens and passages up to %d (its position table: %d)%s", name,
                    config.query_max_len, config.passage_max_len, positions,
                    f"; also every passage as its {args.passage_window}-token windows" if args.passage_window else "")
        results, fused = {}, {}
        try:
            if beir is not None:
                started = time.perf_counter()
                results["beir"] = evaluate_beir(model, tokenizer, beir, replace(config, passage_window=None), device,
                                                run_file=run_file, cache=args.corpus_embeddings, use_faiss=args.faiss)
                if args.passage_window:
                    stem, extension = os.path.splitext(run_file or "")
                    results["beir"][f"maxp@{args.passage_window}"] = evaluate_beir(
                        model, tokenizer, beir, config, device, use_faiss=args.faiss,
                        run_file=f"{stem}.maxp{args.passage_window}{extension}" if run_file else None)
                results["beir"]["seconds"] = round(time.perf_counter() - started, 2)
                logger.info("%s: %s", name, {k: round(v, 2) for k, v in results["beir"].items()
                                             if isinstance(v, float)})
            for dataset in datasets if beir is None else []:
                started = time.perf_counter()
                results[dataset] = evaluate_dataset(model, tokenizer, args.data_folder, dataset, config, device)
                results[dataset]["seconds"] = round(time.perf_counter() - started, 2)
                for weight in config.fuse_bm25:
                    fused.setdefault(f"{name}+bm25@{weight:g}", {})[dataset] = results[dataset].pop(f"+bm25@{weight:g}")
                logger.info("%s %s: %s", name, dataset,
                            {k: round(v, 2) for k, v in results[dataset].items() if isinstance(v, (int, float))})
        except UserError as err:
            raise UserError(f"model {name}: {err}") from err
        if len(datasets) > 1 and beir is None:
            results["average"] = average({d: results[d] for d in datasets})
        results["pooling"] = model.pooling
        results["prompts"] = prompts
        results["tokens_read"] = {"query": config.query_max_len, "passage": config.passage_max_len}
        rows[name] = results
        for hybrid, per_dataset in fused.items():
            rows[hybrid] = {**per_dataset, **({"average": average(per_dataset)} if len(per_dataset) > 1 else {})}
    return rows


def _paired_parts(base: dict, other: dict, resamples: int) -> dict:
    """``other`` against ``base`` on every part both scored per item (``"all"``, ``gold_start>=512``...):
    per metric the mean per-query difference ``other - base`` with its paired interval and p-value."""
    others = dict(parts(other))
    return {part or "all": {metric: paired_difference(np.array(values), np.array(others[part]["per_item"][metric]),
                                                      resamples=resamples)
                            for metric, values in metrics["per_item"].items()}
            for part, metrics in parts(base) if "per_item" in metrics and "per_item" in others.get(part, {})}


def compare(rows: dict[str, dict], resamples: int) -> dict:
    """Each model after the first against the first, on every set and part both have: per metric
    the mean per-query difference (points) with its paired bootstrap 95% interval and p-value."""
    (first, base), *others = rows.items()
    out = {}
    for name, results in others:
        for dataset, scored in results.items():
            if not isinstance(scored, dict) or "per_item" not in scored or dataset not in base:
                continue
            paired = _paired_parts(base[dataset], scored, resamples)
            if paired:
                out.setdefault(name, {})[dataset] = paired
    return out


def compare_windows(rows: dict[str, dict], resamples: int) -> dict:
    """Whole passages against MaxP windows, per query (paired), on every set scored both ways: does
    reading the whole long passage beat chunking it? Each model's whole passages (and its late-chunked
    windows, ``late@W``, which read the whole passage too) are compared with its own windows
    (``"<set> whole - maxp@W"``, ``"<set> late@W - maxp@W"``) and with every other model's
    (``"<set> whole - <model> maxp@W"``: e.g. a long-context model against a 512-token one's
    chunking). Positive = the whole-passage reader is better."""
    out = {}
    for name, results in rows.items():
        for dataset, scored in results.items():
            if not isinstance(scored, dict):
                continue
            readers = {"whole": scored, **{key: value for key, value in scored.items()
                                           if key.startswith("late@") and isinstance(value, dict)}}
            for (reader, read), (other, other_results) in itertools.product(readers.items(), rows.items()):
                for key, windowed in (other_results.get(dataset) or {}).items():
                    if not key.startswith("maxp@") or not isinstance(windowed, dict):
                        continue
                    paired = _paired_parts(windowed, read, resamples)
                    if paired:
                        label = f"{dataset} {reader} - {key}" if other == name else f"{dataset} {reader} - {other} {key}"
                        out.setdefault(name, {})[label] = paired
    return out


def format_comparison(comparison: dict, first: str) -> str:
    """A Markdown table of :func:`compare`: difference [95% interval] per metric, one row per model and set."""
    rows = [(name, dataset, part, cells) for name, datasets in comparison.items()
            for dataset, by_part in datasets.items() for part, cells in by_part.items()]
    if not rows:
        return ""
    metrics = list(rows[0][3])
    lines = [f"\nDifference to {first} (points; paired bootstrap 95% interval over queries; p: randomisation test)",
             "| model | set | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, dataset, part, cells in rows:
        lines.append(f"| {name} | {dataset}{'' if part == 'all' else ' ' + part} | " + " | ".join(
            f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] "
            + ("p<0.001" if c["p"] < 0.001 else f"p={c['p']:.3f}") for c in cells.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        rows = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    comparison = compare(rows, args.bootstrap_samples) if len(rows) > 1 else {}
    windows = compare_windows(rows, args.bootstrap_samples) if args.passage_window else {}
    print(format_beir_table({n: r["beir"] for n, r in rows.items()}) if args.beir else format_table(rows))
    if comparison:
        print(format_comparison(comparison, next(iter(rows))))
    if windows:
        print(format_comparison(windows, "MaxP windows").replace("Difference to", "Whole passages against"))
    output_file = args.output_file or os.path.join("outputs", time.strftime("eval-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as handle:
        json.dump({"data_folder": args.beir or args.data_folder, "results": rows if args.per_item else without_per_item(rows),
                   "comparison": comparison, "whole_vs_windows": windows}, handle, indent=2)
    print(f"results written to {output_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
