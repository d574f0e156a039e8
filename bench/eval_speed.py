#!/usr/bin/env python
"""evaluate.py's batched, length-sorted encoding against one text at a time (the original's way).

Runs both on the same Doc2Dial dev subset (../shared/data/doc2dial/dev), checks that the metrics
are identical, and prints a table of encoding times and the speed-up. Writes JSON.

    python bench/eval_speed.py [--documents dmv] [--max_items 200] [--batch_size 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from longcontrast.data import pad, tokenize  # noqa: E402
from longcontrast.evaluation import encode, gold_rank, load_chatrag, load_retriever, retrieval_metrics  # noqa: E402
from longcontrast.modeling import DualEncoder, read_pooling  # noqa: E402

DEV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "doc2dial", "dev")


def one_at_a_time(model, token_ids, side, pad_id, device):
    """The original's way: one forward per text (with evaluate.py's bf16 autocast on CUDA, so only
    the batching differs)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        return torch.stack([model(**pad([ids], pad_id, device), side=side)[0].float().cpu() for ids in token_ids])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", default=None, help="default: the embedded MiniLM")
    parser.add_argument("--data", default=DEV)
    parser.add_argument("--documents", nargs="+", default=["dmv"])
    parser.add_argument("--max_items", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=None, help="default: as evaluate.py (64 on GPU, 8 on CPU)")
    parser.add_argument("--passage_max_len", type=int, default=512)
    parser.add_argument("--random_weights", action="store_true", help="random weights of --model_path's shape (its "
                        "config and tokenizer suffice, e.g. bench/kit/minilm): timing only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "eval_speed.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
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
    items, documents = load_chatrag(args.data, "doc2dial")
    items = [it for it in items if it.document in args.documents][: args.max_items]
    names = sorted({it.document for it in items})
    chunks = [c for name in names for c in documents[name]]
    offsets = {name: sum(len(documents[n]) for n in names[:i]) for i, name in enumerate(names)}
    chunk_ids = tokenize(tokenizer, chunks, args.passage_max_len, "right")
    query_ids = tokenize(tokenizer, [it.query for it in items], 256, "left")
    pad_id = tokenizer.pad_token_id

    rows, embeddings = {}, []
    for name, run in {
        "one text at a time": lambda ids, side: one_at_a_time(model, ids, side, pad_id, device),
        f"batched {args.batch_size}, sorted by length": lambda ids, side: encode(
            model, ids, side, args.batch_size, pad_id, device),
    }.items():
        started = time.perf_counter()
        c, q = run(chunk_ids, "passage"), run(query_ids, "query")
        seconds = time.perf_counter() - started
        embeddings.append(torch.cat([c, q]).float().cpu())
        ranks = [gold_rank(c[offsets[it.document]: offsets[it.document] + len(documents[it.document])] @ q[i],
                           it.gold_index) for i, it in enumerate(items)]
        rows[name] = {"seconds": seconds, **retrieval_metrics(ranks)}
    slow, fast = rows.values()
    identical = all(abs(slow[k] - fast[k]) < 1e-9 for k in slow if k != "seconds")
    print(f"{len(items)} queries, {len(chunks)} chunks of {names}; device {device}; torch threads {torch.get_num_threads()}")
    print("| encoding | seconds | texts/s | Recall@1 | Recall@5 | Recall@20 |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        rate = (len(items) + len(chunks)) / r["seconds"]
        print(f"| {name} | {r['seconds']:.1f} | {rate:.1f} | {r['recall@1']:.2f} | {r['recall@5']:.2f} | {r['recall@20']:.2f} |")
    largest = (embeddings[0] - embeddings[1]).abs().max().item()
    print(f"speed-up: {slow['seconds'] / fast['seconds']:.2f}x; metrics identical: {identical}; "
          f"largest embedding difference {largest:.1e}")
    with open(args.output, "w") as handle:
        json.dump({"device": str(device), "random_weights": args.random_weights, "items": len(items), "chunks": len(chunks), "results": rows,
                   "speedup": slow["seconds"] / fast["seconds"], "identical_metrics": identical,
                   "largest_embedding_difference": largest}, handle, indent=2)


if __name__ == "__main__":
    main()
