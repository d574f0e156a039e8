"""Loading a trained retriever and encoding texts with it: what evaluation, mining and the
benchmarks share.

Encoding is length-sorted and bounded twice: at most ``batch_size`` texts and at most
``max_tokens`` padded tokens per forward pass (a long passage goes alone), so 8192-token passages
never meet in one pass unless the budget allows it. A non-finite embedding ends the run with a
:class:`UserError` naming the text: a diverged model must never be scored.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import UserError
from .batching import length_sorted_groups, pad, unique_sequences
from .late_interaction import read_projection
from .modeling import (DualEncoder, default_model_path, from_pretrained, load_tokenizer, pool, prepare_tokenizer,
                       read_pooling, read_prompts)

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Padded tokens per forward pass when the caller sets no budget: two 8192-token passages at a time.
DEFAULT_MAX_TOKENS = 16384


def load_retriever(model_path=None, query_encoder_path=None, passage_encoder_path=None, pooling=None,
                   trust_remote_code=False, dtype=None):
    """A :class:`DualEncoder` and tokenizer for evaluation.

    ``model_path``: a folder saved by training (with or without ``query_encoder/`` and
    ``passage_encoder/``) or any encoder; ``None``: the embedded default. Or separate
    ``query_encoder_path`` and ``passage_encoder_path``. Pooling: the one recorded in the query
    encoder's sentence-transformers config, else ``pooling``, else ``cls``. The recorded prompts
    (``"query"`` of the query encoder, ``"document"`` of the passage encoder) land in ``.prompts``;
    the folders read land in ``.paths`` (what a cache of its embeddings is keyed by). ``dtype``: the
    weights' dtype (``None`` float32; ``"auto"`` the checkpoint's, e.g. bf16 for an 8B embedder).
    """
    if query_encoder_path or passage_encoder_path:
        if model_path or not (query_encoder_path and passage_encoder_path):
            raise UserError("give either --model_path or both --query_encoder_path and --passage_encoder_path")
    else:
        model_path = model_path or default_model_path()
        if not Path(model_path).exists() and os.sep in str(model_path):
            raise UserError(f"model folder not found: {model_path}")
        split = Path(model_path) / "query_encoder"
        # untied folders: passage_encoder/, or context_encoder/ as earlier versions saved them
        passages = next((Path(model_path) / name for name in ("passage_encoder", "context_encoder")
                         if (Path(model_path) / name).is_dir()), None)
        if split.is_dir() and passages is not None:
            query_encoder_path, passage_encoder_path = str(split), str(passages)
        else:
            query_encoder_path = passage_encoder_path = str(model_path)

    def load(path):
        return from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype).eval()

    query_encoder = load(query_encoder_path)
    passage_encoder = load(passage_encoder_path) if passage_encoder_path != query_encoder_path else None
    recorded = read_pooling(query_encoder_path)
    if recorded and pooling and recorded != pooling:
        logger.warning("%s records %s pooling; using it instead of --pooling %s", query_encoder_path, recorded, pooling)
    prompts = {"query": read_prompts(query_encoder_path).get("query", ""),
               "document": read_prompts(passage_encoder_path).get("document", "")}
    model = DualEncoder(query_encoder, recorded or pooling or "cls", passage_encoder, prompts,
                        paths={"query": query_encoder_path, "passage": passage_encoder_path},
                        projection=read_projection(query_encoder_path))  # late interaction: PyLate's 1_Dense
    tokenizer = load_tokenizer(query_encoder_path, trust_remote_code)
    prepare_tokenizer(tokenizer, model.pooling)  # a base decoder evaluated as it comes: pad and end token
    return model, tokenizer


def prompts_for(model: DualEncoder, query_prompt: str | None, passage_prompt: str | None) -> dict[str, str]:
    """The query and passage ("document") prompts to encode with: the given prompts, else the
    ones the model records, else none."""
    given = {"query": query_prompt, "document": passage_prompt}
    return {side: model.prompts.get(side, "") if prompt is None else prompt for side, prompt in given.items()}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("fp32", "bf16", "fp16" or "auto"); ``None`` is float32.

    auto: on a CUDA GPU bf16 where the card computes in it (Ampere and later), else fp16 (T4,
    V100: bf16 would be emulated and slow); float32 on CPU. The choice is logged.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
        logger.info("precision auto on %s: %s", device, precision)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_finite(vectors: torch.Tensor, rows: list[int], first_copy: dict[int, int], *, desc: str, side: str,
                  texts: list[str] | None) -> None:
    """Stop on a non-finite (b, D) embedding, naming the first text (of ``rows``) that gave one."""
    finite = torch.isfinite(vectors).all(dim=1)  # (b,)
    if not bool(finite.all()):
        index = first_copy[rows[int((~finite).nonzero()[0])]]
        text = f" {texts[index][:80]!r}" if texts is not None else ""
        raise UserError(f"{desc}: the model gives a non-finite embedding (NaN or inf) for {side} {index}{text}; "
                        "it has diverged or its weights are broken, so it is not scored")


def batches_of_distinct(token_ids: list[list[int]], *, batch_size: int, max_tokens: int | None, desc: str):
    """The distinct sequences, each text's distinct index, each distinct's first text, and the
    length-sorted groups of distinct indices to encode (with a progress bar on a terminal)."""
    if not token_ids:
        raise UserError(f"{desc}: nothing to encode")
    unique, copy_of = unique_sequences(token_ids)
    first_copy = {}
    for index, distinct in enumerate(copy_of):
        first_copy.setdefault(distinct, index)
    groups = length_sorted_groups(unique, batch_size, max_tokens or DEFAULT_MAX_TOKENS)
    # padded one batch at a time: a whole corpus padded at once would not fit on the device;
    # the bar shows on a terminal only (disable=None), not in logs
    return unique, copy_of, first_copy, tqdm(groups, desc=desc, leave=False, unit="batch", disable=None)


def encode(model: DualEncoder, token_ids: list[list[int]], side: str, *, batch_size: int, pad_token_id: int,
           device: torch.device, max_tokens: int | None = None, autocast: torch.dtype | None = None,
           out_dtype: torch.dtype = torch.float32, desc: str = "encoding", texts: list[str] | None = None
           ) -> torch.Tensor:
    """(N, D) embeddings of token id lists, on the CPU in ``out_dtype``.

    Each distinct token sequence is encoded once and its vector returned for every copy: a text
    repeated in a corpus then scores exactly as its copies do, whatever the padding of the batch it
    would have landed in (padding moves float32 results by ~1e-7). Texts are sorted by length
    (longest first, so memory peaks at once); a forward pass holds at most ``batch_size`` texts and
    at most ``max_tokens`` padded tokens (``None``: :data:`DEFAULT_MAX_TOKENS`); a text longer than
    the budget goes alone. ``autocast``: encode under autocast in that dtype. ``texts``: the
    texts the ids come from, to name one whose embedding is not finite.
    """
    if getattr(model, "projection", None) is not None:
        raise UserError(f"{desc}: {model.paths.get('passage', 'the model')} is a late-interaction model (a vector per "
                        "token); this step reads one vector per text: give it a single-vector model (or BM25)")
    unique, copy_of, first_copy, groups = batches_of_distinct(token_ids, batch_size=batch_size, max_tokens=max_tokens, desc=desc)
    embeddings = None
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), context:
        for rows in groups:
            batch = pad([unique[i] for i in rows], pad_token_id, device)
            vectors = model(**batch, side=side).float()  # (b, D)
            check_finite(vectors, rows, first_copy, desc=desc, side=side, texts=texts)
            if embeddings is None:
                embeddings = torch.empty(len(unique), vectors.shape[1], dtype=out_dtype)  # (U, D)
            embeddings[torch.tensor(rows)] = vectors.to("cpu", out_dtype)
    return embeddings[torch.tensor(copy_of, dtype=torch.long)]  # (N, D)


def late_chunk_embeddings(model: DualEncoder, token_ids: list[list[int]], spans: list[list[tuple[int, int]]], *,
                          batch_size: int, pad_token_id: int, device: torch.device, max_tokens: int | None = None,
                          autocast: torch.dtype | None = None, desc: str = "late chunks",
                          texts: list[str] | None = None) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Late chunking (Günther et al. 2024): each passage read once, whole, and its token states
    mean-pooled over each of its ``spans`` (the mean whatever the model's pooling, as the paper does), so
    every window's vector carries the context of the whole passage.

    A passage's first span is widened to its start and its last to its end, so the leading special
    tokens and prompt join the first window and the closing ones the last (a one-span passage pools
    all its tokens). Returns (R, D) unit-norm window vectors, on the CPU, the passage of each
    (non-decreasing), and the (N, D) whole-passage embeddings that :func:`encode` gives, pooled
    from the same pass (the model's pooling), so a passage is read once for both; copies of a
    passage share their vectors.
    """
    unique, copy_of, first_copy, groups = batches_of_distinct(token_ids, batch_size=batch_size, max_tokens=max_tokens, desc=desc)
    span_of = {distinct: spans[index] for distinct, index in first_copy.items()}
    vectors_of: dict[int, torch.Tensor] = {}
    whole = None
    context = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.inference_mode(), context:
        for rows in groups:
            batch = pad([unique[i] for i in rows], pad_token_id, device)
            hidden = model.hidden_states(**batch, side="passage")  # (b, L, D)
            pooled = pool(hidden, batch["attention_mask"], model.pooling)  # (b, D)
            check_finite(pooled, rows, first_copy, desc=desc, side="passage", texts=texts)
            if whole is None:
                whole = torch.empty(len(unique), pooled.shape[1])  # (U, D)
            whole[torch.tensor(rows)] = pooled.cpu()
            for row, distinct in enumerate(rows):
                bounds = span_of[distinct]
                edges = [0] + [start for start, _ in bounds[1:]] + [len(unique[distinct])]
                pooled = torch.stack([hidden[row, a:b].mean(dim=0) for a, b in zip(edges, edges[1:])])  # (k, D)
                check_finite(pooled, [distinct] * len(pooled), first_copy, desc=desc, side="passage", texts=texts)
                vectors_of[distinct] = torch.nn.functional.normalize(pooled, dim=-1).to("cpu", torch.float32)
    owner = [passage for passage, distinct in enumerate(copy_of) for _ in range(len(vectors_of[distinct]))]
    windows = torch.cat([vectors_of[distinct] for distinct in copy_of])  # (R, D)
    return windows, owner, whole[torch.tensor(copy_of, dtype=torch.long)]  # (R, D), (R,), (N, D)
