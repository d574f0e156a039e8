#!/usr/bin/env python
"""Step time and peak memory: origin_train vs efficient_train (GradCache) vs sentence-transformers.

Each configuration runs in a fresh process (its peak RSS is its own): one warm-up step, then --steps
timed steps (forward, backward, SGD update) on other batches of B queries, B positives and B hard
negatives, the same batches for every method. Methods: ``origin`` (origin_train's step), ``efficient``
(efficient_train's GradCache step: length-sorted mini-batches, each distinct text encoded once),
``efficient_every_copy`` (every copy encoded), ``st_cached`` (sentence-transformers'
CachedMultipleNegativesRankingLoss on the same model, token ids and mini-batches) and
``efficient_colbert`` (GradCache over --colbert_dim token vectors scored by MaxSim). Data: ``equal``
(random token ids, every text --lengths tokens) or ``doc2dial`` (the shared triples, cut at --lengths).
Peak memory: max_memory_allocated on GPU, peak RSS on CPU. Results: docs/performance.md.

    python bench/train_speed.py --batch_sizes 16 96 --lengths 256 --data equal doc2dial
"""

import argparse
import itertools
import json
import os
import random
import sys
import time

from common import DOC2DIAL as SHARED, RESULTS, arguments, fresh_process, line_plots, peak_mb, run, write_json

DOC2DIAL = os.path.join(SHARED, "train_triples.jsonl")
METHODS = ("origin", "efficient", "efficient_every_copy", "st_cached", "efficient_colbert")
BGE_LARGE_SHAPE = "bge-large-shape"
MODERNBERT_SHAPE = "modernbert-minilm-shape"  # rotary positions, MiniLM's size: compared with MiniLM on CPU
SHAPES = (BGE_LARGE_SHAPE, MODERNBERT_SHAPE)


def make_batches(args, tokenizer) -> list[dict]:
    """Collator-style inputs of 1 + --steps different batches (the first is the warm-up): token id
    lists for B queries and (1 + hard negatives) x B passages. Every method sees the same batches."""
    import torch

    from longcontrast.collator import ContrastiveCollator, make_dataset
    from longcontrast.records import load_examples

    rng = random.Random(0)
    count = 1 + args.steps
    if args.data == "equal":
        def text_ids(length):
            return [tokenizer.cls_token_id] + [rng.randrange(1000, 20000) for _ in range(length - 2)] + [
                tokenizer.sep_token_id]
        passages = (1 + args.hard_negatives) * args.batch_size
        return [{"query_ids": [text_ids(args.query_length or args.length) for _ in range(args.batch_size)],
                 "passage_ids": [text_ids(args.length) for _ in range(passages)],
                 "passage_text_ids": torch.arange(passages)} for _ in range(count)]
    examples = load_examples([args.doc2dial])
    order = []
    while len(order) < count * args.batch_size:  # consecutive slices of shuffled passes over the data
        rng.shuffle(examples)
        order += examples
    collate = ContrastiveCollator(tokenizer, min(256, args.length), args.length, args.hard_negatives)
    return [collate(list(make_dataset(order[k * args.batch_size: (k + 1) * args.batch_size]))) for k in range(count)]


def worker(args) -> dict:
    import torch

    from longcontrast.batching import pad, unique_sequences
    from longcontrast.modeling import DualEncoder, default_model_path, load_encoder
    from longcontrast.loss import LossSettings
    from longcontrast.step import contrastive_step

    torch.manual_seed(0)
    device = torch.device(args.device)
    if args.model in SHAPES:
        encoder, tokenizer = random_shaped(args.model, max(512, args.length), args.dropout, args.attention_dropout,
                                           args.tokenizer)
        model_path = args.tokenizer or default_model_path()  # st_cached's Transformer module, weights replaced
    else:
        model_path = args.model or default_model_path()
        encoder, tokenizer = load_encoder(model_path, max(512, args.length), dropout=args.dropout,
                                          attention_dropout=args.attention_dropout)
    encoder.to(device)
    batches = make_batches(args, tokenizer)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    deduplicate = args.method in ("efficient", "efficient_colbert")

    if args.method == "st_cached":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        transformer = Transformer(model_path)
        transformer.auto_model = encoder  # the same (extended) weights
        model = SentenceTransformer(modules=[transformer, Pooling(encoder.config.hidden_size, "cls")], device=args.device)
        loss = CachedMultipleNegativesRankingLoss(model, scale=1 / args.temperature, mini_batch_size=args.mini_batch_size)
        b = args.batch_size

        def step(inputs):
            columns = [inputs["query_ids"], inputs["passage_ids"][:b]]
            columns += [inputs["passage_ids"][b:]] if args.hard_negatives else []
            with autocast:
                value = loss([pad(column, tokenizer.pad_token_id, device) for column in columns], None)
            value.backward()
            return value
    else:
        projection = torch.nn.Linear(encoder.config.hidden_size, args.colbert_dim, bias=False) \
            if args.method.endswith("_colbert") else None
        model = DualEncoder(encoder, "cls", projection=projection).to(device)
        mini_batch = None if args.method == "origin" else args.mini_batch_size

        def step(inputs):
            with autocast:
                return contrastive_step(model, inputs, loss=LossSettings(args.temperature), pad_token_id=tokenizer.pad_token_id,
                                        device=device, mini_batch_size=mini_batch, deduplicate=deduplicate)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    def update(inputs):
        step(inputs)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def encoded(inputs):
        """The texts the step runs through the encoder."""
        sides = inputs["query_ids"], inputs["passage_ids"]
        if deduplicate:
            sides = [unique_sequences(side)[0] for side in sides]
        return [ids for side in sides for ids in side]

    update(batches[0])  # warm-up
    timed = batches[1:]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for inputs in timed:
        update(inputs)
    seconds = (time.perf_counter() - started) / len(timed)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_mb()
    runs = [encoded(b) for b in timed]
    flops = sum(step_flops(encoder.config, texts, extra_forward=args.method != "origin") for texts in runs) / len(timed)
    tokens = sum(len(x) for b in timed for x in b["query_ids"] + b["passage_ids"]) / len(timed)
    texts = sum(len(b["query_ids"]) + len(b["passage_ids"]) for b in timed) / len(timed)
    return {"step_seconds": seconds, "peak_memory_mb": peak, "tokens_per_step": tokens, "texts": texts,
            "encoded_texts": sum(map(len, runs)) / len(timed), "tflops": flops / seconds / 1e12}


def random_shaped(shape: str, positions: int, dropout, attention_dropout, tokenizer_path: str | None):
    """A randomly initialised encoder and the BERT uncased tokenizer (BGE's vocabulary) from
    ``tokenizer_path`` or the embedded MiniLM. Shapes: BGE-large's (24 layers, 1024 wide, 335M
    parameters) or a ModernBERT (rotary positions, alternating local/global attention) of MiniLM's
    size (6 layers, 384 wide)."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, ModernBertConfig

    from longcontrast.modeling import default_model_path

    attention_dropout = attention_dropout if attention_dropout is not None else dropout
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or default_model_path())
    if shape == BGE_LARGE_SHAPE:
        config = BertConfig(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, max_position_embeddings=positions,
                            hidden_dropout_prob=dropout or 0.0, attention_probs_dropout_prob=attention_dropout or 0.0)
    else:
        config = ModernBertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
            max_position_embeddings=max(positions, 8192), pad_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id, global_attn_every_n_layers=3, local_attention=128,
            embedding_dropout=dropout or 0.0, mlp_dropout=dropout or 0.0, attention_dropout=attention_dropout or 0.0)
    return AutoModel.from_config(config, attn_implementation="sdpa"), tokenizer


def step_flops(config, encoded: list[list[int]], extra_forward: bool) -> float:
    """Matrix FLOPs of one step over the texts it encodes: forward = 2 x (non-embedding parameters)
    per token + 4 x n^2 x hidden per layer per text (QK^T and attention x V); backward = 2 forwards;
    GradCache adds one more forward. Padding is not counted."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 2 * hidden * config.intermediate_size  # weights of one layer
    forward = sum(2 * len(ids) * per_layer * layers + 4 * len(ids) ** 2 * hidden * layers for ids in encoded)
    return forward * (4 if extra_forward else 3)


def padding_report(args, samples: int = 200) -> None:
    """Token accounting on the Doc2Dial triples: how much of a step is padding with unsorted
    mini-batches (as CachedMNRL cuts them) and with length-sorted ones (efficient_train). For a
    cost linear in padded tokens, "all padding removed / unsorted" bounds what any padding
    trimming can gain over the peer."""
    from longcontrast.batching import length_sorted_groups
    from longcontrast.records import load_examples
    from longcontrast.modeling import default_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model or default_model_path())
    examples = load_examples([args.doc2dial])
    rng = random.Random(0)
    print(f"Doc2Dial triples, max {args.lengths[0]} tokens, mini-batch {args.mini_batch_size}, {samples} random batches")
    print("| batch | real / unsorted padded | sorted padded / unsorted padded |")
    print("|---|---|---|")
    for batch_size in args.batch_sizes:
        real = unsorted = ordered = 0
        for _ in range(samples):
            batch = rng.sample(examples, batch_size)
            sides = ([e.query for e in batch], [e.positive for e in batch] + [e.negatives[0] for e in batch])
            for texts in sides:
                lengths = [min(args.lengths[0], len(x)) for x in tokenizer(texts)["input_ids"]]
                real += sum(lengths)
                for start in range(0, len(lengths), args.mini_batch_size):
                    chunk = lengths[start : start + args.mini_batch_size]
                    unsorted += max(chunk) * len(chunk)
                for group in length_sorted_groups([[0] * n for n in lengths], args.mini_batch_size, None):
                    ordered += max(lengths[i] for i in group) * len(group)
        print(f"| {batch_size} | {real / unsorted:.3f} | {ordered / unsorted:.3f} |")


def main(argv=None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--model", default=None, help="default: the embedded all-MiniLM-L6-v2; "
                        f"'{BGE_LARGE_SHAPE}': a random encoder of BGE-large's shape; '{MODERNBERT_SHAPE}': a random "
                        "ModernBERT of MiniLM's size (nothing downloaded)")
    parser.add_argument("--hard_negatives", type=int, default=1, choices=[0, 1],
                        help="hard negatives per query (0: a batch of B queries holds 2B texts)")
    parser.add_argument("--methods", nargs="+", default=["origin", "efficient", "st_cached"], choices=METHODS)
    parser.add_argument("--data", nargs="+", default=["equal", "doc2dial"], choices=["equal", "doc2dial"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[16, 32, 64, 96])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256])
    parser.add_argument("--query_length", type=int, default=None,
                        help="tokens per query with --data equal (default: the --lengths value, as every passage)")
    parser.add_argument("--mini_batch_size", type=int, default=8)
    parser.add_argument("--colbert_dim", type=int, default=128, help="token vector width of efficient_colbert")
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=None, help="override the model's dropout")
    parser.add_argument("--attention_dropout", type=float, default=None, help="override its attention dropout")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for the random shapes (default: "
                        "the embedded MiniLM's; bench/kit/minilm on a machine without that package)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default=None)
    parser.add_argument("--doc2dial", default=DOC2DIAL)
    parser.add_argument("--output", default=os.path.join(RESULTS, "train_speed.json"))
    parser.add_argument("--no_plot", action="store_true", help="write no PNG beside --output")
    parser.add_argument("--padding", action="store_true", help="only print the padding accounting of the Doc2Dial "
                        "triples (--batch_sizes, --lengths, --mini_batch_size)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.padding:
        padding_report(args)
        return
    if args.worker:  # one configuration, in this fresh process
        vars(args).update(json.loads(args.worker))
        print(json.dumps(worker(args)), flush=True)
        return
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    passed = list(sys.argv[1:] if argv is None else argv)  # each worker parses the same flags, then its config
    print(f"device {args.device}; mini-batch {args.mini_batch_size}; {args.steps} timed steps; B queries, "
          "B positives, B hard negatives per batch")
    peak = matmul_tflops(args.device) if args.device.startswith("cuda") else None
    if peak:
        print(f"measured bf16 matmul throughput: {peak:.0f} TFLOP/s")
    print("| data | length | batch | texts | method | step s | peak MB | tokens/s | TFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for data, length, batch_size, method in itertools.product(args.data, args.lengths, args.batch_sizes, args.methods):
        config = {"data": data, "length": length, "batch_size": batch_size, "method": method}
        try:
            result = fresh_process(__file__, *passed, "--device", args.device, "--worker", json.dumps(config))
        except RuntimeError as err:
            result = {"error": str(err).strip().splitlines()[-1]}
            print(f"| {data} | {length} | {batch_size} | | {method} | failed: {result['error']} | | | | |")
        else:
            share = f"{result['tflops'] / peak:.0%}" if peak else "-"
            texts = f"{result['texts']:.0f}" + (f" ({result['encoded_texts']:.1f} distinct)"
                                                if result["encoded_texts"] != result["texts"] else "")
            print(f"| {data} | {length} | {batch_size} | {texts} | {method} | {result['step_seconds']:.2f} | "
                  f"{result['peak_memory_mb']:.0f} | {result['tokens_per_step'] / result['step_seconds']:.0f} | "
                  f"{result['tflops']:.2f} | {share} |", flush=True)
        rows.append({**config, **result})
    write_json(args.output, {"command": " ".join(sys.argv), "device": args.device, "mini_batch_size": args.mini_batch_size,
                             "steps": args.steps, "matmul_tflops": peak, "rows": rows})
    if not args.no_plot:
        plot(rows, os.path.splitext(args.output)[0] + ".png")


def matmul_tflops(device: str) -> float:
    """The card's measured bf16 matrix throughput: 8192^3 matmuls, best of several."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12)
    return best


def plot(rows, path) -> None:
    """Peak memory and step time against the contrastive batch, a line per method, data and length."""
    lines = {}
    for r in sorted((r for r in rows if "step_seconds" in r), key=lambda r: r["batch_size"]):
        lines.setdefault(f"{r['method']} {r['data']} L={r['length']}", []).append(r)
    line_plots(path, [{"xlabel": "contrastive batch", "ylabel": ylabel,
                       "lines": {label: [(r["batch_size"], r[key]) for r in points] for label, points in lines.items()}}
                      for key, ylabel in (("peak_memory_mb", "peak memory (MB)"), ("step_seconds", "step time (s)"))])


if __name__ == "__main__":
    raise SystemExit(run(main))
