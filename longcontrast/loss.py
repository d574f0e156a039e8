"""InfoNCE over cosine similarity, with in-batch and hard negatives."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over the queries
    accuracy: torch.Tensor  # () fraction of queries whose own positive scores highest


def contrastive_loss(
    query_embeddings: torch.Tensor,
    passage_embeddings: torch.Tensor,
    temperature: float,
    targets: torch.Tensor | None = None,
    passage_text_ids: torch.Tensor | None = None,
    query_positive_ids: torch.Tensor | None = None,
) -> LossOutput:
    """InfoNCE loss of each query against every passage of the batch.

    Args:
        query_embeddings: (B, D) L2-normalised query embeddings.
        passage_embeddings: (P, D) L2-normalised passage embeddings: the positives and the hard
            negatives of the whole batch, in any layout that ``targets`` describes.
        temperature: the similarities (cosines, in [-1, 1]) are divided by it before the softmax;
            0.05 is a scale of 20. Must be > 0.
        targets: (B,) index into the passages of each query's own positive; default ``arange(B)``
            (positives first, in query order).
        passage_text_ids: (P,) an integer per passage, equal for passages of identical text. A
            passage with the same text as a query's own positive, at another index (the same chunk
            reached through another example of the batch), is not a negative for that query: its
            logit is masked out. ``None`` masks nothing.
        query_positive_ids: (B, M) the ids of every positive of each query (-1 pads): a passage
            with any of them is masked out of that query's negatives too (a query with several
            positives, or repeated in several examples). Needs ``passage_text_ids``.

    Returns:
        ``LossOutput(loss, accuracy)``: the mean cross-entropy and the in-batch top-1 accuracy.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_queries = query_embeddings.size(0)
    if targets is None:
        targets = torch.arange(num_queries, device=query_embeddings.device)  # (B,)
    # float32 at least, even inside an autocast region: at temperature 0.01 bf16 logits would sit
    # on a grid 0.5 apart
    dtype = torch.promote_types(query_embeddings.dtype, torch.float32)
    with torch.autocast(query_embeddings.device.type, enabled=False):
        scores = query_embeddings.to(dtype) @ passage_embeddings.to(dtype).T / temperature  # (B, P)
    if passage_text_ids is not None:
        positive_ids = passage_text_ids[targets]  # (B,)
        same_text = passage_text_ids[None, :] == positive_ids[:, None]  # (B, P)
        if query_positive_ids is not None:
            same_text |= (passage_text_ids[None, :, None] == query_positive_ids[:, None, :]).any(dim=-1)  # (B, P)
        same_text[torch.arange(num_queries, device=scores.device), targets] = False
        scores = scores.masked_fill(same_text, float("-inf"))  # (B, P)
    loss = F.cross_entropy(scores, targets)
    accuracy = (scores.detach().argmax(dim=-1) == targets).float().mean()
    return LossOutput(loss, accuracy)
