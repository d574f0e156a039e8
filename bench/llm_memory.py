#!/usr/bin/env python
"""Peak memory and step time of a decoder embedder's training step: full fine-tuning, LoRA, LoRA +
activation checkpointing, each with GradCache mini-batches and without, in one process or over two
(gloo on CPU, NCCL on GPUs), replicated (DDP) or sharded (FSDP2).

The model is a random Qwen3 of Qwen3-Embedding-0.6B's shape, built from its config (nothing is
downloaded); a batch is ``--batch`` queries of 32 tokens and as many passages of ``--passage_len``,
last-token pooling, AdamW on the trainable parameters. Each configuration runs in a process of its
own and reports its peak memory (``ru_maxrss``; on GPU max_memory_allocated) and the mean time of
the steps after the first; one that would need more than ``--memory_limit_gb`` is out of memory.

    python bench/llm_memory.py                         # the CPU table (JSON: bench/results/llm_memory_cpu.json)
    python bench/llm_memory.py --configs ddp_full_gradcache4 fsdp2_full_gradcache4 ddp_lora_gradcache4 \
        fsdp2_lora_gradcache4 --layers 4 --batch 4 --passage_len 128 --steps 2 --output bench/results/llm_memory_sharded_cpu.json
    python bench/llm_memory.py --passage_len 8192 --device cuda --bf16 --steps 3 --output bench/results/llm_memory_gpu.json
"""

import argparse
import json
import os
import re
import resource
import sys
import time

from common import RESULTS, arguments, fresh_process, run, write_json

# "lora": LoRA, else full fine-tuning; "_ckpt": activation checkpointing; "_gradcacheM": GradCache mini-batches of M;
# "_batchB": B queries instead of --batch; "ddp_" / "fsdp2_": two processes, the model replicated or sharded
CONFIGS = ("full", "full_gradcache4", "lora", "lora_gradcache4", "lora_ckpt", "lora_ckpt_gradcache4",
           "lora_ckpt_gradcache4_batch4", "ddp_full_gradcache4", "fsdp2_full_gradcache4", "ddp_lora_gradcache4",
           "fsdp2_lora_gradcache4")
PROCESSES = 2
QWEN3_EMBEDDING_06B = dict(vocab_size=151669, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=32768,
                           rope_theta=1_000_000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           pad_token_id=151643, eos_token_id=151643)


def settings(name: str, batch: int) -> tuple[bool, bool, int | None, int, str | None]:
    """A configuration's LoRA, checkpointing, GradCache mini-batch (None: none), batch and sharding (None: one process)."""
    number = {key: int(found[1]) if (found := re.search(key + r"(\d+)", name)) else None for key in ("gradcache", "batch")}
    sharding = name.partition("_")[0] if name.startswith(("ddp_", "fsdp2_")) else None
    return "lora" in name, "ckpt" in name, number["gradcache"], number["batch"] or batch, sharding


def child(args) -> dict:
    """One configuration in this process: build, step, measure."""
    import torch
    import torch.distributed as dist

    from longcontrast.lora import add_lora
    from longcontrast.modeling import DualEncoder
    from longcontrast.loss import LossSettings
    from longcontrast.sharding import shard
    from longcontrast.step import contrastive_step
    from longcontrast.trainer import local
    from transformers import AutoModel, Qwen3Config

    lora, checkpointing, mini_batch, batch, sharding = settings(args.child, args.batch)
    limit = int(args.memory_limit_gb * 2**30)
    if args.device == "cpu":
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = torch.device(args.device)
    if sharding:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
        if device.type == "cuda":
            device = torch.device("cuda", dist.get_rank())
            torch.cuda.set_device(device)
    torch.manual_seed(0)
    config = Qwen3Config(**{**QWEN3_EMBEDDING_06B, "num_hidden_layers": args.layers}, attention_dropout=0.0)
    encoder = AutoModel.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if lora:
        encoder = add_lora(encoder, base_path="random-qwen3", r=16, alpha=32, dropout=0.0)
    model = DualEncoder(encoder, "lasttoken").to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    if sharding == "fsdp2":
        model = shard(model)
    stepped = torch.nn.parallel.DistributedDataParallel(model) if sharding == "ddp" else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "query_ids": [[*torch.randint(0, 150000, (31,), generator=g).tolist(), 151643] for _ in range(batch)],
        "passage_ids": [[*torch.randint(0, 150000, (args.passage_len - 1,), generator=g).tolist(), 151643]
                        for _ in range(batch)],
        "passage_text_ids": torch.arange(batch),
    }
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                output = contrastive_step(stepped, inputs, loss=LossSettings(0.05), pad_token_id=151643, device=device,
                                          mini_batch_size=mini_batch, cross_device=sharding is not None)
        except (RuntimeError, MemoryError) as err:
            if sharding or ("memory" not in str(err).lower() and not isinstance(err, MemoryError)):
                raise  # a process of two that returned alone would leave the other waiting in a collective
            return {"config": args.child, "batch": batch, "out_of_memory": True, "limit_gb": args.memory_limit_gb}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes
    # what this process holds of parameters, gradients and AdamW's two moments (its shards under FSDP2)
    held = sum(local(t).numel() * local(t).element_size() for p in model.parameters()
               for t in [p, *([p.grad] if p.grad is not None else []), *optimizer.state.get(p, {}).values()]
               if t.dim() > 0)
    row = {"config": args.child, "batch": batch, "passage_len": args.passage_len, "layers": args.layers,
           "lora": lora, "activation_checkpointing": checkpointing, "gradcache_mini_batch": mini_batch,
           "processes": dist.get_world_size() if sharding else 1, "sharding": sharding,
           "trainable_parameters": sum(p.numel() for p in trainable),
           "parameters": sum(p.numel() for p in model.parameters()),
           "state_gb": round(held / 2**30, 2), "peak_gb": round(peak / 2**30, 2),
           "step_seconds": round(sum(times[1:] or times) / len(times[1:] or times), 1),
           "loss": round(output.loss.item(), 4), "device": args.device, "bf16": args.bf16}
    if sharding:  # the largest process's figures
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        row = {**row, **{key: max(r[key] for r in rows) for key in ("state_gb", "peak_gb", "step_seconds")}}
        dist.destroy_process_group()
    return row


def table(rows: list[dict]) -> str:
    lines = ["| config | processes | batch | LoRA | checkpointing | GradCache | parameters + gradients + AdamW GB "
             "| peak GB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("out_of_memory"):
            lines.append(f"| {r['config']} | | {r['batch']} | | | | | > {r['limit_gb']} (out of memory) | - |")
            continue
        lines.append(f"| {r['config']} | {r.get('processes', 1)} {r.get('sharding') or ''} | {r['batch']} | "
                     f"{'yes' if r['lora'] else 'no'} | {'yes' if r['activation_checkpointing'] else 'no'} | "
                     f"{r['gradcache_mini_batch'] or 'no'} | {r.get('state_gb', '-')} | {r['peak_gb']} | {r['step_seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--configs", nargs="+", default=[c for c in CONFIGS if not c.startswith(("ddp_", "fsdp2_"))],
                        choices=list(CONFIGS), help="Default: the one-process ones (ddp_*, fsdp2_*: two processes).")
    parser.add_argument("--batch", type=int, default=16, help="Queries (and passages) per contrastive batch.")
    parser.add_argument("--passage_len", type=int, default=512, help="Tokens per passage.")
    parser.add_argument("--layers", type=int, default=28, help="Decoder layers (28: Qwen3-Embedding-0.6B).")
    parser.add_argument("--steps", type=int, default=1,
                        help="Optimizer steps per configuration (with more, the first is not timed).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="Run the step under bf16 autocast (GPU).")
    parser.add_argument("--memory_limit_gb", type=float, default=20.0,
                        help="CPU: address-space limit of each configuration's process (an allocation past it fails).")
    parser.add_argument("--output", default=os.path.join(RESULTS, "llm_memory_cpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        row = child(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row), flush=True)
        return 0
    passed = list(sys.argv[1:] if argv is None else argv)  # each child parses the same flags
    rows = []
    for name in args.configs:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCESSES), __file__] \
            if settings(name, args.batch)[4] else [__file__]
        try:
            rows.append(fresh_process(*launcher, *passed, "--child", name))
        except RuntimeError as err:
            if "memory" not in str(err).lower():
                raise
            # an allocation failed outside the step (e.g. in the optimizer)
            rows.append({"config": name, "batch": settings(name, args.batch)[3], "out_of_memory": True,
                         "limit_gb": args.memory_limit_gb})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
        write_json(args.output, {"command": " ".join(sys.argv), "rows": rows})
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(run(main))
