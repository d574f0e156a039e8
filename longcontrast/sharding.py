"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the dual encoder: parameters, gradients and
optimizer states sharded over the processes, one unit per transformer block.

GradCache stays exact under it without special handling: the no-grad pass and each replay gather
the parameters like any forward, and each replay's backward reduce-scatters its share of the
gradient into the sharded ``.grad``, which accumulates; a sum of reduce-scatters is the
reduce-scatter of the sum, so after the last replay every process holds its shard of the whole
batch's gradient (FSDP2 averages over processes as DDP does, which ``contrastive_step``'s
``cross_device`` scaling compensates). Reducing once per step instead
(``set_requires_gradient_sync(False)`` until the last replay) would keep an unsharded gradient on
every process between replays: the memory FSDP exists to save, so the reduction per mini-batch is
kept (tests/test_distributed.py checks the gradients against one process with the whole batch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn


def block_classes(encoder: nn.Module) -> set[str]:
    """The class names transformers never splits across devices (``_no_split_modules``: a BERT
    layer and its embeddings, a decoder layer): FSDP2's units."""
    names = set(getattr(encoder, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(encoder).__name__} names no _no_split_modules: no transformer block to shard by")
    return names


def shard(model: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Apply ``fully_shard`` to every block of every encoder of a :class:`.modeling.DualEncoder`,
    then to the model itself (the root unit: what is left, e.g. a final norm); in place, returned.
    ``fsdp_kwargs`` go to each ``fully_shard`` call (``mp_policy``, ``reshard_after_forward``...)."""
    from torch.distributed.fsdp import fully_shard

    for encoder in model.encoders():
        names = block_classes(encoder)
        for module in list(encoder.modules()):
            if type(module).__name__ in names:
                fully_shard(module, **fsdp_kwargs)
    return fully_shard(model, **fsdp_kwargs)


@dataclass(frozen=True)
class ShardingSettings:
    """How ``--fsdp`` shards the model: ``reshard_after_forward`` frees each block's gathered
    parameters after its forward (``full_shard``; ``shard_grad_op`` keeps them until the backward),
    ``bf16`` computes with bfloat16 parameters while reducing gradients and keeping the master
    weights in float32 (``MixedPrecisionPolicy``)."""

    reshard_after_forward: bool = True
    bf16: bool = False

    def fully_shard_kwargs(self) -> dict:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        return {"reshard_after_forward": self.reshard_after_forward, **({"mp_policy": policy} if policy else {})}


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap")


def settings_from_flags(fsdp, fsdp_config, *, bf16: bool) -> ShardingSettings:
    """The Trainer's ``--fsdp`` / ``--fsdp_config`` read as FSDP2 settings; ValueError naming what
    this sharding does not do (CPU offload, hybrid sharding, FSDP1, other config keys)."""
    options = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, list) else []
    options = [o for o in options if o.lower() != "true"]
    unknown = [o for o in options if o not in FSDP_OPTIONS]
    if unknown:
        raise ValueError(f"--fsdp {' '.join(unknown)} is not supported: give full_shard or shard_grad_op (each "
                         "transformer block is one FSDP2 unit)")
    config = fsdp_config or {}
    if isinstance(config, str):
        with open(config, encoding="utf-8") as handle:
            config = json.load(handle)
    config = {key.removeprefix("fsdp_"): value for key, value in config.items()}
    if int(config.pop("version", 2)) != 2:
        raise ValueError("--fsdp_config version 1 is not supported: the model is sharded with FSDP2 (fully_shard)")
    reshard = bool(config.pop("reshard_after_forward", "shard_grad_op" not in options))
    if config:
        raise ValueError(f"--fsdp_config keys {sorted(config)} are not supported (only version and "
                         "reshard_after_forward; every transformer block is wrapped)")
    return ShardingSettings(reshard_after_forward=reshard, bf16=bf16)


def gathered_state_dict(model: nn.Module) -> dict:
    """The whole (unsharded) state dict of a sharded model, in CPU memory on process 0 (empty on the
    others); a collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
