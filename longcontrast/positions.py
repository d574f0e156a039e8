"""Position extension: growing a learned absolute position table, and training it cheaply.

Two concepts live here. :func:`extend_position_embeddings` grows a BERT-style table (512 learned
rows) to e.g. 8192 with one of :data:`POSITION_INITS`. :func:`draw_position_shifts` and
:func:`position_ids` implement shifted position ids (PoSE, Zhu et al. 2024, as LongEmbed used it
to tune E5-Base-4k): a short training passage reads its tokens at positions ``u + 1, u + 2, ...``
for a random ``u``, so the new rows learn from short texts without ever running long ones.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

POSITION_INITS = ("copy", "interpolate", "interpolate_all", "hierarchical", "random")
# Weight of the block vector in the hierarchical decomposition (Su, 2020: "hierarchical
# decomposition position encoding"); 0.4 is the value the method was published and tested with.
HIERARCHICAL_ALPHA = 0.4


def interpolated_rows(trained: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) rows spread evenly over ``trained`` (n, D): row ``k`` is ``trained`` read at the
    fractional index ``k * (n - 1) / (count - 1)``, linearly between its two neighbours."""
    n = trained.size(0)
    where = torch.arange(count, dtype=torch.float64) * (n - 1) / max(count - 1, 1)  # (count,)
    low = where.floor().long().clamp(max=n - 1)  # (count,)
    high = (low + 1).clamp(max=n - 1)  # (count,)
    frac = (where - low).unsqueeze(1).to(trained.dtype)  # (count, 1)
    return trained[low] * (1 - frac) + trained[high] * frac  # (count, D)


def extended_position_table(trained: torch.Tensor, num_positions: int, init: str) -> torch.Tensor:
    """A position table of ``num_positions`` rows grown from the trained one.

    Args:
        trained: (n, D) the trained absolute position table.
        num_positions: rows of the new table (>= n).
        init: how the table is filled. Every init but ``interpolate_all`` keeps rows 0..n-1
            bit-identical, so a text of up to n tokens reads exactly as before extension.
            ``"copy"``: the trained table repeated (Longformer's initialisation): position
            ``i * n + j`` starts as position ``j``, so local order is intact and blocks are told apart
            by training.
            ``"interpolate"``: rows n.. spread the trained table over the new positions (row ``p`` is
            the trained table read at ``p * (n - 1) / (num_positions - 1)``, linear in between):
            smooth and distinct, in order, but neighbours there are near copies until trained.
            ``"interpolate_all"``: LongEmbed's linear interpolation of the whole table (row ``i`` of
            the trained table lands at position ``i * (num_positions - 1) / (n - 1)``): short texts
            too read compressed positions, so they change until the table is trained.
            ``"hierarchical"``: position ``i * n + j`` gets ``a * u_i + (1 - a) * u_j`` with
            ``u_k = (p_k - a * p_0) / (1 - a)`` and ``a = 0.4`` (Su's hierarchical decomposition),
            i.e. ``p_j + a / (1 - a) * (p_i - p_0)``. On BERT-style models row 0 (always [CLS]) is
            several times longer than the others, so the block offset swamps the row.
            ``"random"``: normal(0, 0.02) noise, as the original code did (for comparison only).
            docs/long-context.md measures them before and after training.

    Returns:
        (num_positions, D) the new table, in ``trained``'s dtype.
    """
    n, _ = trained.shape
    if num_positions < n:
        raise ValueError(f"cannot shrink the position table from {n} to {num_positions}")
    positions = torch.arange(num_positions)
    if init == "interpolate_all":
        return interpolated_rows(trained, num_positions)
    if init == "hierarchical":
        alpha = HIERARCHICAL_ALPHA
        u = (trained - alpha * trained[:1]) / (1 - alpha)  # (n, D)
        blocks = (positions // n) % n  # more than n * n positions repeat the block pattern
        table = alpha * u[blocks] + (1 - alpha) * u[positions % n]  # (num_positions, D)
    elif init == "copy":
        table = trained[positions % n].clone()  # (num_positions, D)
    elif init == "interpolate":
        table = interpolated_rows(trained, num_positions)  # (num_positions, D); rows 0..n-1 replaced below
    elif init == "random":
        table = torch.randn(num_positions, trained.size(1), dtype=trained.dtype) * 0.02
    else:
        raise ValueError(f"unknown position init {init!r}; choose from {POSITION_INITS}")
    table[:n] = trained  # rows 0..n-1 bit-identical to the trained ones
    return table.to(trained.dtype)


def position_table(model: nn.Module) -> nn.Embedding | None:
    """The learned absolute position table (``model.embeddings.position_embeddings``), or ``None``
    for models whose positions are rotary (ModernBERT) or relative only (DeBERTa-v3)."""
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    return table if isinstance(table, nn.Embedding) else None


def position_offset(table: nn.Embedding) -> int:
    """Rows before the first real position. RoBERTa, XLM-R and MPNet number positions from
    ``padding_idx + 1`` (their tables have 2 extra rows); BERT, DistilBERT, ELECTRA from 0."""
    return 0 if table.padding_idx is None else table.padding_idx + 1


def token_positions(model: nn.Module) -> int:
    """The longest text (in tokens, special tokens included) the model reads: its learned table's
    rows less the offset, else the configured native length."""
    table = position_table(model)
    return table.num_embeddings - position_offset(table) if table is not None else model.config.max_position_embeddings


def extend_position_embeddings(model: nn.Module, num_positions: int, init: str = "copy") -> None:
    """Grow a model's learned absolute position table in place so that it reads ``num_positions`` tokens.

    The rows before the first real position (RoBERTa-style offset) stay where they are; the table
    of real positions is extended by :func:`extended_position_table`. The new table is a trainable
    ``nn.Parameter`` (keeping the old ``padding_idx``); the ``position_ids`` and ``token_type_ids``
    buffers and ``config.max_position_embeddings`` follow, so a saved model reloads with
    ``AutoModel.from_pretrained`` at the new length. A table already that long is left as it is.
    """
    embeddings, old = model.embeddings, position_table(model)
    offset = position_offset(old)
    trained_positions = old.num_embeddings - offset
    if num_positions <= trained_positions:
        if num_positions < trained_positions:
            logger.info("keeping the model's %d positions (asked for %d)", trained_positions, num_positions)
        return
    with torch.no_grad():
        weight = old.weight.detach().float().cpu()  # (offset + n, D)
        table = torch.cat([weight[:offset], extended_position_table(weight[offset:], num_positions, init)])
    rows = offset + num_positions
    new = nn.Embedding(rows, old.embedding_dim, padding_idx=old.padding_idx, device=old.weight.device,
                       dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(table)
    new.weight.requires_grad_(True)
    embeddings.position_embeddings = new
    device = old.weight.device
    if hasattr(embeddings, "position_ids"):
        embeddings.position_ids = torch.arange(rows, device=device).expand((1, -1))  # (1, rows)
    if hasattr(embeddings, "token_type_ids"):
        embeddings.token_type_ids = torch.zeros((1, rows), dtype=torch.long, device=device)  # (1, rows)
    model.config.max_position_embeddings = rows
    logger.info("extended the position table from %d to %d positions (%s%s)", trained_positions, num_positions, init,
                f"; {offset} offset rows kept in front" if offset else "")


def unchanged_rows(table: nn.Embedding | None, checkpoint_rows: int, init: str) -> int | None:
    """The rows of an extended table still as the checkpoint (``checkpoint_rows`` rows, its
    ``config.max_position_embeddings``) had them, which ``--trainable_parameters new_positions``
    freezes; ``None`` when the table was not extended (or there is none). ``interpolate_all`` moves
    every real row, so only the offset rows count."""
    if table is None or table.num_embeddings <= checkpoint_rows:
        return None
    return position_offset(table) if init == "interpolate_all" else checkpoint_rows


def freeze_rows(table: nn.Embedding, rows: int) -> None:
    """Zero the gradient of the table's first ``rows`` rows, so that only the rows after them train
    (LongEmbed's E5-Base-4k trained only the new rows: texts of up to the trained length then read
    exactly as before, whatever training does). The optimizer must not decay weights: decoupled
    weight decay would still shrink the frozen rows."""

    def zero_trained_rows(grad: torch.Tensor) -> torch.Tensor:  # (num_embeddings, D), on the model's device
        grad = grad.clone()
        grad[:rows] = 0
        return grad

    table.weight.register_hook(zero_trained_rows)


def draw_position_shifts(lengths: list[int], max_positions: int, generator: torch.Generator | None = None) -> list[int]:
    """A random shift ``u`` per text, uniform over 0..``max_positions - length``: the text's last
    token then sits at most at position ``max_positions - 1``. Drawn from ``generator`` (default:
    torch's global generator; the collator passes its own, keyed by epoch and batch)."""
    return [int(torch.randint(0, max(max_positions - n, 0) + 1, (1,), generator=generator)) for n in lengths]


def position_ids(lengths: list[int], width: int, shifts: list[int]) -> torch.Tensor:
    """(N, width) position ids of right-padded texts read at shifted positions.

    Token 0 (``[CLS]``, which CLS pooling reads and which opens every real text) stays at
    position 0; tokens ``1..L-1`` sit at ``u + 1 .. u + L - 1``, as the text would if it started
    ``u`` tokens into a long one behind its ``[CLS]``. Padding columns get position 0.
    """
    ids = torch.zeros(len(lengths), width, dtype=torch.long)  # (N, width)
    for row, (length, shift) in enumerate(zip(lengths, shifts)):
        ids[row, 1:length] = torch.arange(1, length) + shift
    return ids
