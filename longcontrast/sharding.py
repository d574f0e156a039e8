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
