#!/usr/bin/env python
"""evaluate.py's batched, length-sorted encoding against one text at a time (the original's way).

Encodes the chunks and queries of a ChatRAG-format set (default: the whole Doc2Dial dev set in
../shared/data/doc2dial/dev, 900 chunks and 628 queries) both ways, with evaluate.py's lengths
and precision, checks that the metrics are identical, and prints a table of encoding times per
side and the speed-up. Writes JSON.

    python bench/eval_speed.py [--documents dmv] [--batch_size 8] [--precision auto] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


from longcontrast.tokenization import tokenize
from longcontrast.retrieval_sets import load_chatrag
from longcontrast.retrievers import EncodeSettings
from longcontrast.inference import PRECISIONS, autocast_dtype, encode, load_retriever
from longcontrast.metrics import gold_rank, retrieval_metrics
from longcontrast.modeling import DualEncoder, read_pooling

from common import DOC2DIAL

DEV = os.path.join(DOC2DIAL, "dev")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="default: the embedded MiniLM")
    parser.add_argument("--data", default=DEV)
    parser.add_argument("--documents", nargs="+", default=None, help="only the items of these documents (default: all)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: as evaluate.py (64 on GPU, 8 on CPU)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="auto",
                        help="as evaluate.py: auto is bf16 (or fp16 where bf16 is emulated) on GPU, fp32 on CPU")
    parser.add_argument("--random_weights", action="store_true", help="random weights of --model_path's shape (its "
                        "config and tokenizer suffice, e.g. bench/kit/minilm): timing only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "eval_speed.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    autocast = autocast_dtype(args.precision, device)
    bf16 = autocast is not None
    if args.random_weights:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.model_path)
        encoder = AutoModel.from_config(config, attn_implementation="sdpa")
        model = DualEncoder(encoder, read_pooling(args.model_path) or "cls")
        tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    else:
        model, tokenizer = load_retriever(args.model_path)
    model.to(device).eval()
    lengths = EncodeSettings()  # evaluate.py's defaults, capped at the position table as it does
    positions = model.config.max_position_embeddings
    items, documents = load_chatrag(args.data, "doc2dial")
    items = [it for it in items if args.documents is None or it.document in args.documents]
    names = sorted({it.document for it in items})
    chunks = [c for name in names for c in documents[name]]
    offsets = {name: sum(len(documents[n]) for n in names[:i]) for i, name in enumerate(names)}
    texts = {"passage": tokenize(tokenizer, chunks, min(lengths.passage_max_len, positions), "right"),
             "query": tokenize(tokenizer, [it.query for it in items], min(lengths.query_max_len, positions), "left")}
    pad_id = tokenizer.pad_token_id

    rows, embeddings = {}, []
    for name, run in {
        # the original's way, one forward per text, at the same precision: only the batching differs
        "one text at a time": lambda ids, side: encode(model, ids, side, batch_size=1, pad_token_id=pad_id,
                                                      device=device, autocast=autocast),
        f"batched {args.batch_size}, sorted by length": lambda ids, side: encode(
            model, ids, side, batch_size=args.batch_size, pad_token_id=pad_id, device=device, autocast=autocast),
    }.items():
        out, seconds = {}, {}
        for side, ids in texts.items():
            started = time.perf_counter()
            out[side] = run(ids, side)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[side] = time.perf_counter() - started
        c, q = out["passage"], out["query"]
        embeddings.append(torch.cat([c, q]).float().cpu())
        ranks = [gold_rank(c[offsets[it.document]: offsets[it.document] + len(documents[it.document])] @ q[i],
                           it.gold_index) for i, it in enumerate(items)]
        rows[name] = {"passage_seconds": seconds["passage"], "query_seconds": seconds["query"],
                      "seconds": sum(seconds.values()), **retrieval_metrics(ranks)}
    slow, fast = rows.values()
    identical = all(abs(slow[k] - fast[k]) < 1e-9 for k in slow if not k.endswith("seconds"))
    print(f"{len(items)} queries, {len(chunks)} chunks of {names}; device {device}; "
          f"{'bf16 autocast' if bf16 else 'fp32'}; torch threads {torch.get_num_threads()}")
    print("| encoding | chunks s | queries s | total s | texts/s | Recall@1 | Recall@5 | Recall@20 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rate = (len(items) + len(chunks)) / r["seconds"]
        print(f"| {name} | {r['passage_seconds']:.1f} | {r['query_seconds']:.1f} | {r['seconds']:.1f} | {rate:.1f} | "
              f"{r['recall@1']:.2f} | {r['recall@5']:.2f} | {r['recall@20']:.2f} |")
    largest = (embeddings[0] - embeddings[1]).abs().max().item()
    speedups = {side: slow[f"{side}_seconds"] / fast[f"{side}_seconds"] for side in ("passage", "query")}
    print(f"speed-up: {slow['seconds'] / fast['seconds']:.2f}x (chunks {speedups['passage']:.2f}x, queries "
          f"{speedups['query']:.2f}x); metrics identical: {identical}; largest embedding difference {largest:.1e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"device": str(device), "bf16": bf16, "random_weights": args.random_weights, "items": len(items),
                   "chunks": len(chunks), "batch_size": args.batch_size, "results": rows,
                   "speedup": slow["seconds"] / fast["seconds"], "speedup_per_side": speedups,
                   "identical_metrics": identical, "largest_embedding_difference": largest}, handle, indent=2)


if __name__ == "__main__":
    main()
