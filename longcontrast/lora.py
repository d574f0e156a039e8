"""LoRA adapters on the encoder through ``peft`` (Hu et al. 2021): what makes an 8B embedder
trainable on one GPU. The base weights stay frozen (in the dtype they were loaded in); the adapter
weights train in float32, so does any module named in ``modules_to_save``.

The trained encoder is saved as its adapter (``adapter_config.json`` naming the base model), which
``SentenceTransformer(folder)`` and ``AutoModel.from_pretrained(folder)`` load onto the base, or,
merged into the base weights, as a plain model (:func:`merge`).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from . import UserError

logger = logging.getLogger(__name__)

# Every linear layer of the encoder (QLoRA's choice; for decoders q/k/v/o and the gated MLP, for
# BERT-like encoders query/key/value and the dense layers), but never the unused pooler: a
# parameter without a gradient would stall DDP.
DEFAULT_TARGET_MODULES = "all-linear"
EXCLUDED_MODULES = ["pooler.dense"]


def add_lora(encoder: nn.Module, *, base_path: str, r: int, alpha: float, dropout: float,
             target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> nn.Module:
    """``encoder`` wrapped as a ``peft`` LoRA model; only the adapter (and ``modules_to_save``) trains.

    ``base_path`` is what the saved adapter names as its base: a local folder is recorded as an
    absolute path so that the adapter loads from any working directory.
    """
    from peft import LoraConfig, get_peft_model

    targets = target_modules or DEFAULT_TARGET_MODULES
    excluded = [name for name, _ in encoder.named_modules() if name.endswith(tuple(EXCLUDED_MODULES))]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        exclude_modules=excluded if excluded and not target_modules else None,
                        modules_to_save=modules_to_save or None)
    try:
        # autocast_adapter_dtype (peft's default): adapters in float32 over half-precision base weights
        model = get_peft_model(encoder, config)
    except ValueError as err:  # e.g. target modules that the model does not have
        raise UserError(f"LoRA: {str(err).splitlines()[0]}") from err
    model.peft_config["default"].base_model_name_or_path = (
        os.path.abspath(base_path) if os.path.isdir(base_path) else base_path)
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()  # modules_to_save copies of half weights: train in float32
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d alpha=%g dropout=%g on %s: %d of %d parameters train (%.2f%%)", r, alpha, dropout,
                targets, trainable, total, 100 * trainable / total)
    return model


def merge(model: nn.Module) -> nn.Module:
    """The base model with the adapter folded into its weights (in place: the adapter is gone)."""
    return model.merge_and_unload()
