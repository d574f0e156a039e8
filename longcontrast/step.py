"""One contrastive batch's forward and backward: the plain step (the whole batch with autograd,
origin_train.py) or GradCache over length-sorted mini-batches (efficient_train.py). Pure
functions of the model and the batch; the optimizer step is the caller's."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from .batching import length_sorted_mini_batches, pad, unique_sequences
from .distributed import gather_batch, world_size
from .gradcache import grad_cache_step
from .late_interaction import join_segments
from .loss import BatchLabels, LossOutput, LossSettings, training_loss


def contrastive_step(
    model, inputs: dict, *, loss: LossSettings, pad_token_id: int, device,
    mini_batch_size: int | None = None, mini_batch_tokens: int | None = None,
    scale: float = 1.0, backward=torch.Tensor.backward, cross_device: bool = False, deduplicate: bool = True,
) -> LossOutput:
    """Forward and backward of one contrastive batch from :class:`ContrastiveCollator`; gradients
    are left in ``.grad`` (the optimizer step is the caller's). ``loss`` is the objective
    (:func:`.loss.training_loss`).

    ``mini_batch_size=None``: the plain step, the whole batch encoded with autograd. Otherwise
    GradCache over mini-batches of at most ``mini_batch_size`` texts and ``mini_batch_tokens``
    padded tokens, cut from length-sorted texts (less padding); the loss sees the embeddings back
    in batch order. ``scale`` multiplies the loss before differentiation. ``deduplicate``: GradCache
    encodes each distinct token sequence of a side once and the loss sees it at every row holding a
    copy (autograd adds the copies' gradients); the plain step encodes every copy.

    ``passage_segment_owner`` in ``inputs`` (token vectors): ``passage_ids`` are segments, encoded
    and cached one by one, and the loss scores each passage over all of its own
    (:func:`.late_interaction.join_segments`).

    ``cross_device``: the loss spans the batches of all processes (:mod:`.distributed`); the
    backward runs on ``world_size * scale * loss`` so that DDP's averaging yields the gradient of
    the global loss. A ``DistributedDataParallel`` ``model`` synchronises gradients once, in the
    last GradCache replay.
    """
    labels = BatchLabels(**{name: inputs[key].to(device) if inputs.get(key) is not None else None for name, key in (
        ("passage_text_ids", "passage_text_ids"), ("query_positive_ids", "query_positive_ids"),
        ("candidates", "candidate_passages"), ("teacher_scores", "teacher_scores"))})
    shifts = inputs.get("passage_position_shifts")  # P ints (shifted position ids) or None
    spans = inputs.get("passage_pool_spans")  # P token ranges pooled (None: the whole text), or None
    owner = inputs.get("passage_segment_owner")  # the passage of each segment, or None: a passage is one piece

    def loss_fn(queries, passages):  # (B, D), (P, D) in batch order; (S, L, D) segments when read in segments
        if owner is not None:
            passages = join_segments(passages, owner)  # (P, K * L, D)
        if cross_device:
            return training_loss(*gather_batch(queries, passages, labels), loss)
        return training_loss(queries, passages, labels, loss)

    if cross_device:
        scale = scale * world_size()
    if mini_batch_size is None:
        queries = pad(inputs["query_ids"], pad_token_id, device)
        passages = pad(inputs["passage_ids"], pad_token_id, device, shifts, spans)
        return full_batch_step(model, queries, passages, loss_fn, scale, backward)

    def mini_batches(sequences, shifts=None, spans=None):
        """Length-sorted mini-batches of the distinct (sequence, pooling span) pairs, and for each input
        row the row of its embedding among theirs. Copies share their shift (see ContrastiveCollator)."""
        unique, copy_of = unique_sequences(sequences, spans) if deduplicate else (sequences, list(range(len(sequences))))

        def per_unique(values):  # one value per distinct pair (copies share theirs)
            if values is None:
                return None
            value_of = dict(zip(copy_of, values))
            return [value_of[u] for u in range(len(unique))]

        batches, order = length_sorted_mini_batches(unique, mini_batch_size, mini_batch_tokens, pad_token_id, device,
                                                    per_unique(shifts), per_unique(spans))
        return batches, inverse_permutation(order)[torch.tensor(copy_of, dtype=torch.long)]

    queries, query_restore = mini_batches(inputs["query_ids"])
    passages, passage_restore = mini_batches(inputs["passage_ids"], shifts, spans)
    sync_context = None
    if isinstance(model, DistributedDataParallel):
        sync_context = lambda is_last: contextlib.nullcontext() if is_last else model.no_sync()  # noqa: E731
    return grad_cache_step(
        lambda batch, side: model(**batch, side=side),
        queries, passages,
        lambda q, p: loss_fn(q[query_restore], p[passage_restore]),
        device, scale, backward, sync_context,
    )


def inverse_permutation(order: list[int]) -> torch.Tensor:
    """``restore`` with ``sorted_rows[restore] == rows`` when ``sorted_rows = rows[order]``."""
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return restore


def full_batch_step(model, queries: dict, passages: dict, loss_fn, scale: float, backward) -> LossOutput:
    """The plain step: encode the whole batch with autograd, one backward through everything."""
    output = loss_fn(model(**queries, side="query"), model(**passages, side="passage"))  # (B, D), (P, D)
    backward(output.loss * scale)
    return LossOutput(output.loss.detach(), output.accuracy, output.parts)
