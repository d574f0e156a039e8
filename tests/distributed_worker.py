"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU).

For each configuration, one contrastive step through DistributedDataParallel with cross-device
negatives, on this rank's share of a common batch; rank 0 saves the parameter gradients and how
many gradient all-reduces (DDP bucket reductions) the step made.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT_DIR
"""

import dataclasses
import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import conversation_records
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from longcontrast.collator import ContrastiveCollator
from longcontrast.lora import add_lora
from longcontrast.loss import LossSettings
from longcontrast.modeling import DualEncoder, load_encoder
from longcontrast.records import parse_record
from longcontrast.sharding import shard
from longcontrast.step import contrastive_step

PER_RANK = 3
TEMPERATURE = 0.05
# name: (mini_batch_size or None for the plain step, hard negatives, untied, DDP sees the replays)
CONFIGS = {
    "origin_neg0": (None, 0, False, True),
    "origin_neg2": (None, 2, False, True),
    "efficient_neg0": (2, 0, False, True),
    "efficient_neg2": (2, 2, False, True),
    "efficient_untied_neg2": (2, 2, True, True),
    "origin_untied_neg2": (None, 2, True, True),
    # Shifted position ids (--shift_positions): each passage's shift derived from its text (the same
    # in every process and in the one-process reference; see shifted()).
    "efficient_neg2_shifted": (2, 2, False, True),
    "origin_neg2_shifted": (None, 2, False, True),
    # Each query of rank 0 is asked again on rank 1 with another positive: both positives are
    # known positives of both, masked out of each other's negatives across the processes.
    "efficient_neg2_known": (2, 2, False, True),
    "origin_neg2_known": (None, 2, False, True),
    # Teacher scores on every row: KL distillation over each query's own candidates, with InfoNCE,
    # on two Matryoshka prefixes (candidate indices move with each rank's passages when gathered).
    "efficient_neg2_distill": (2, 2, False, True),
    "origin_neg2_distill": (None, 2, False, True),
    # Negative control: the replays reach DDP through a wrapper, so no no_sync: one all-reduce
    # per mini-batch.
    "efficient_neg2_without_no_sync": (2, 2, False, False),
    # Late interaction (--colbert_dim 16): token vectors of different lengths on the two processes,
    # gathered zero-padded, MaxSim over the global batch
    "efficient_neg2_colbert": (2, 2, False, True),
    "origin_neg2_colbert": (None, 2, False, True),
    # FSDP2 instead of DDP (longcontrast.sharding): parameters, gradients sharded over the processes
    "fsdp2_efficient_neg2": (2, 2, False, True),
    "fsdp2_origin_neg2": (None, 2, False, True),
    "fsdp2_efficient_untied_neg2": (2, 2, True, True),
    "fsdp2_efficient_neg2_distill": (2, 2, False, True),
    "fsdp2_efficient_neg2_checkpointing": (2, 2, False, True),  # activation checkpointing inside the replays
    "fsdp2_efficient_neg2_lora": (2, 2, False, True),  # LoRA adapters, sharded with their frozen base
    # Dropout on, the same seed per rank: sharding must not change the masks the replays draw again
    "efficient_neg2_dropout": (2, 2, False, True),
    "fsdp2_efficient_neg2_dropout": (2, 2, False, True),
}


def rows(n: int, name: str = "") -> list[dict]:
    """Rows as make_dataset gives them (query, positive, negatives, known positives). For a
    ``*_known`` configuration, record i + n/2 asks record i's question (another positive)."""
    records = conversation_records(n)
    if name.endswith("_known"):
        for i in range(n // 2):
            records[i + n // 2]["messages"] = records[i]["messages"]
    if name.endswith("_distill"):
        for i, record in enumerate(records):
            record["positive_scores"] = [1.0 + i % 3]
            record["negative_scores"] = [0.5 * j - i % 2 for j in range(len(record["hard_negatives"]))]
    examples = [parse_record(record, f"record {i}") for i, record in enumerate(records)]
    for example in examples:
        example.known_positives = list(dict.fromkeys(e.positive for e in examples if e.query == example.query))
    return [dataclasses.asdict(example) for example in examples]


def loss_settings(name: str) -> LossSettings:
    if name.endswith("_distill"):
        return LossSettings(TEMPERATURE, distill_weight=1.0, teacher_temperature=0.5, matryoshka_dims=(32, 8))
    return LossSettings(TEMPERATURE)


def collator(tokenizer, negatives: int, name: str) -> ContrastiveCollator:
    return ContrastiveCollator(tokenizer, 32, 48, negatives, max_positives=2 if name.endswith("_known") else 1)


def build(model_dir: str, untied: bool, name: str = "") -> tuple[DualEncoder, object]:
    """The tiny model of a configuration; ``*_lora``: LoRA adapters (r 4) on it, B initialised
    away from zero so that every adapter weight has a gradient."""
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(model_dir, 128, "copy", dropout=0.1 if name.endswith("_dropout") else 0.0)
    if name.endswith("_lora"):
        encoder = add_lora(encoder, base_path=model_dir, r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for parameter_name, parameter in encoder.named_parameters():
                if "lora_B" in parameter_name:
                    parameter.normal_(std=0.1)
    projection = torch.nn.Linear(encoder.config.hidden_size, 16, bias=False) if name.endswith("_colbert") else None
    model = DualEncoder.untied(encoder, "cls") if untied else DualEncoder(encoder, "cls", projection=projection)
    return model.train(), tokenizer  # (dropout, where the configuration has it)


def shifted(batch: dict, name: str, max_positions: int = 128) -> dict:
    """For a ``*_shifted`` configuration, the batch with a position shift per passage that depends on
    its text only, so every process and the one-process reference give a text the same shift."""
    if name.endswith("_shifted"):
        batch["passage_position_shifts"] = [
            int(text) % (max_positions - len(ids) + 1) for text, ids in zip(batch["passage_text_ids"], batch["passage_ids"])
        ]
    return batch


class Passthrough(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def fsdp2_step(model, tokenizer, batch_rows: list[dict], name: str, out_dir: str) -> None:
    """One contrastive step of the sharded model; rank 0 saves the whole gradients (gathered from
    the shards) and how much of the parameters this process holds."""
    mini_batch_size, negatives, _, _ = CONFIGS[name]
    batch = collator(tokenizer, negatives, name)(batch_rows)
    torch.manual_seed(100 + dist.get_rank())  # dropout masks: as the DDP run of the same name draws them
    contrastive_step(model, batch, loss=loss_settings(name), pad_token_id=tokenizer.pad_token_id, device="cpu",
                     mini_batch_size=mini_batch_size, cross_device=True)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}  # collective
    local = sum(p.to_local().numel() for p in model.parameters())
    if dist.get_rank() == 0:
        torch.save({"grads": grads, "local_share": local / sum(p.numel() for p in model.parameters())},
                   Path(out_dir) / f"{name}.pt")
    dist.barrier()


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, (mini_batch_size, negatives, untied, ddp_sees_replays) in CONFIGS.items():
        batch_rows = rows(PER_RANK * world, name)
        model, tokenizer = build(model_dir, untied, name)
        if name.startswith("fsdp2_"):
            if name.endswith("_checkpointing"):
                model.activation_checkpointing_enable()
            fsdp2_step(shard(model), tokenizer, batch_rows[rank * PER_RANK: (rank + 1) * PER_RANK], name, out_dir)
            continue
        ddp = DistributedDataParallel(
            model, broadcast_buffers=False, bucket_cap_mb=0.01,  # several buckets on a tiny model
            find_unused_parameters=untied and mini_batch_size is not None,
        )
        count = [0]

        def counting_hook(state, bucket, count=count):
            count[0] += 1
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        batch = shifted(collator(tokenizer, negatives, name)(batch_rows[rank * PER_RANK : (rank + 1) * PER_RANK]), name)
        # Step 1 warms up: DDP puts all gradients in one bucket for its first backward and cuts the
        # real buckets (bucket_cap_mb) after it. Step 2, same batch and weights, is measured.
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            count[0] = 0
            torch.manual_seed(100 + rank)  # dropout masks: as the FSDP2 run of the same name draws them
            contrastive_step(ddp if ddp_sees_replays else Passthrough(ddp), batch, loss=loss_settings(name),
                             pad_token_id=tokenizer.pad_token_id, device="cpu", mini_batch_size=mini_batch_size,
                             cross_device=True)
        if rank == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            logging_data = ddp._get_ddp_logging_data()
            torch.save({"grads": grads, "allreduces": count[0], "logging": logging_data}, Path(out_dir) / f"{name}.pt")
        dist.barrier()
        # A DDP object outliving its process group can hang the interpreter's exit (its reducer's
        # destructor joins gloo threads): release each one before the next, and before the group.
        del ddp
        gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
