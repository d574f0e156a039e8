#!/usr/bin/env python
"""Top-k retrieval quality of text encoders on ChatRAG-Bench's Doc2Dial, QuAC and QReCC.

    python evaluate.py                                   # the embedded default model, generated sample
    python evaluate.py --model_path outputs/run-X default --data-folder /data/ChatRAG-Bench

Prints one table (rows: models; columns: Average, Doc2Dial, QuAC, QReCC x Recall@1/5/20, MRR@20,
NDCG@20, in percent) and writes the numbers as JSON. Every flag also takes dashes for underscores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from longcontrast import UserError
from longcontrast.modeling import POOLING_MODES
from longcontrast.positions import token_positions
from longcontrast.evaluation import (
    DATASETS, EvalConfig, average, evaluate_dataset, format_table, load_retriever, prompts_for, uses_bf16,
)

logger = logging.getLogger("evaluate")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, **kwargs):
        spellings = {"--" + name, "--" + name.replace("_", "-")}
        parser.add_argument(*sorted(spellings), dest=name, **kwargs)

    flag("model_path", nargs="+", default=None,
         help="Model folders to evaluate (a training output, with or without query_encoder/ and context_encoder/, "
              "or any encoder); 'default' is the embedded all-MiniLM-L6-v2. Default: default.")
    flag("query_encoder_path", help="Query encoder folder (with --context_encoder_path, instead of --model_path).")
    flag("context_encoder_path", help="Context encoder folder.")
    flag("data_folder", default=os.path.join(HERE, "data", "chatrag_sample"),
         help="Folder with <dataset>/test.json and <dataset>/documents.json (default: the generated sample).")
    flag("eval_dataset", default="all", choices=[*DATASETS, "all"], help="Which set to evaluate.")
    flag("query_max_len", type=int, default=256, help="Max query tokens (cut on the left: latest turns kept).")
    flag("passage_max_len", type=int, default=1024,
         help="Max chunk tokens (cut on the right; capped at the model's position table).")
    flag("batch_size", type=int, default=None,
         help="Texts encoded at once (default: 64 on GPU; 8 on CPU, where bigger batches only add padding).")
    flag("num_turns", type=int, default=5, help="Dialogue turns kept in a query.")
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
    flag("precision", choices=["auto", "fp32", "bf16"], default="auto",
         help="Encode in float32 or under bf16 autocast. auto: bf16 on GPU, fp32 on CPU. On a CPU with "
              "AVX512-BF16 or AMX, bf16 is about 1.5x faster (embeddings move by ~1e-3); on others it is slower.")
    args = parser.parse_args(argv)
    for name in ("query_max_len", "passage_max_len", "batch_size", "num_turns"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    bf16 = uses_bf16(args.precision, device)
    datasets = list(DATASETS) if args.eval_dataset == "all" else [args.eval_dataset]
    if args.query_encoder_path or args.context_encoder_path:
        models = {f"{args.query_encoder_path} + {args.context_encoder_path}": None}
    else:  # name shown in the table -> folder (None: the embedded default)
        models = {name: None if name == "default" else name for name in (args.model_path or ["default"])}
    rows = {}
    for name, model_path in models.items():
        model, tokenizer = load_retriever(model_path, args.query_encoder_path, args.context_encoder_path, args.pooling,
                                          args.trust_remote_code)
        model.to(device)
        positions = token_positions(model.query_encoder)
        prompts = prompts_for(model, args.query_instruction, args.passage_instruction)
        config = EvalConfig(min(args.query_max_len, positions), min(args.passage_max_len, positions),
                            batch_size, args.num_turns, not args.no_qrecc_answer, bf16, prompts["query"],
                            prompts["document"], args.split_at_token)
        results = {}
        for dataset in datasets:
            started = time.perf_counter()
            results[dataset] = evaluate_dataset(model, tokenizer, args.data_folder, dataset, config, device)
            results[dataset]["seconds"] = round(time.perf_counter() - started, 2)
            logger.info("%s %s: %s", name, dataset,
                        {k: round(v, 2) for k, v in results[dataset].items() if not isinstance(v, dict)})
        if len(datasets) > 1:
            results["average"] = average({d: results[d] for d in datasets})
        results["pooling"] = model.pooling
        results["prompts"] = prompts
        rows[name] = results
    return rows


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    try:
        rows = run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(format_table(rows))
    output_file = args.output_file or os.path.join("outputs", time.strftime("eval-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as handle:
        json.dump({"data_folder": args.data_folder, "results": rows}, handle, indent=2)
    print(f"results written to {output_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
