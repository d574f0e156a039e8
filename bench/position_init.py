#!/usr/bin/env python
"""Which initialisation of the extended position rows lets an untrained model read past 512 tokens?

Ranks the chunks of one Doc2Dial dev document (../shared/data/doc2dial/dev) for its first queries,
with every chunk preceded by ~510 tokens of unrelated text (chunks of another document), so that
the chunk's own text sits at positions 511 and beyond. Compares --position_init copy, hierarchical
and random against the plain chunks and against cutting at 512. Prints a table and writes JSON.

    python bench/position_init.py [--model PATH] [--queries 200] [--output bench/results/position_init.json]
"""

from __future__ import annotations

import argparse
import os
import random

import torch


from longcontrast.tokenization import tokenize
from longcontrast.retrieval_sets import load_chatrag
from longcontrast.inference import encode
from longcontrast.metrics import gold_rank, retrieval_metrics
from longcontrast.modeling import DualEncoder, default_model_path, load_encoder
from longcontrast.positions import POSITION_INITS

from common import DOC2DIAL, write_json

DEV = os.path.join(DOC2DIAL, "dev")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="BERT-style model (default: the embedded MiniLM)")
    parser.add_argument("--data", default=DEV)
    parser.add_argument("--document", default="dmv")
    parser.add_argument("--filler_document", default="ssa")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--prefix_tokens", type=int, default=510)
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "position_init.json"))
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model_path = args.model or default_model_path()
    items, documents = load_chatrag(args.data, "doc2dial")
    items = [it for it in items if it.document == args.document][: args.queries]
    base, tokenizer = load_encoder(model_path, None, dropout=0.0)
    trained_positions = base.config.max_position_embeddings
    chunks = tokenize(tokenizer, documents[args.document], trained_positions, "right")
    other = [ids[1:-1] for ids in tokenize(tokenizer, documents[args.filler_document], 100_000, "right")]
    rng = random.Random(0)

    def prefix():
        ids = []
        while len(ids) < args.prefix_tokens:
            ids += rng.choice(other)
        return ids[: args.prefix_tokens]

    long_chunks = [[c[0]] + prefix() + c[1:] for c in chunks]  # [CLS] unrelated... chunk... [SEP]
    cut_chunks = [c[: trained_positions - 1] + [c[-1]] for c in long_chunks]
    queries = tokenize(tokenizer, [it.query for it in items], 256, "left")
    length = 1 << (max(len(c) for c in long_chunks) - 1).bit_length()

    def score(encoder, chunk_ids):
        model = DualEncoder(encoder.eval(), "mean")
        q = encode(model, queries, "query", batch_size=32, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
        c = encode(model, chunk_ids, "passage", batch_size=16, pad_token_id=tokenizer.pad_token_id,
                   device=torch.device("cpu"))
        ranks = [gold_rank(c @ q[i], it.gold_index) for i, it in enumerate(items)]
        return retrieval_metrics(ranks)

    rows = {"plain chunks (no prefix)": score(base, chunks), "prefix + chunk, cut at 512": score(base, cut_chunks)}
    for init in POSITION_INITS:
        torch.manual_seed(0)
        encoder, _ = load_encoder(model_path, length, init, dropout=0.0)
        rows[f"prefix + chunk, --position_init {init}"] = score(encoder, long_chunks)
    print(f"{len(items)} queries of '{args.document}' over its {len(chunks)} chunks, "
          f"{args.prefix_tokens} unrelated tokens before each chunk; {model_path}")
    print("| setting | Recall@1 | Recall@5 | Recall@20 | MRR@20 |\n|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['recall@1']:.1f} | {m['recall@5']:.1f} | {m['recall@20']:.1f} | {m['mrr@20']:.1f} |")
    write_json(args.output, {"model": model_path, "queries": len(items), "results": rows})


if __name__ == "__main__":
    main()
