"""Batching token sequences: right padding (with position shifts and pooling spans), length-sorted
groups bounded by texts and padded tokens, and the distinct sequences of a batch (a passage that
appears twice is encoded once).
"""

from __future__ import annotations

import torch

from .positions import position_ids


def pad(sequences: list[list[int]], pad_token_id: int, device=None, shifts: list[int] | None = None,
        spans: list[tuple[int, int] | None] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to their own longest: ``input_ids`` and ``attention_mask``, (N, L);
    with ``shifts`` (one per text) also ``position_ids`` (:func:`.positions.position_ids`); with
    ``spans`` (a token range or None per text) also ``pool_mask`` (N, L): the tokens each vector pools
    (the span, or every real token where None)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (N, L)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if shifts is not None:
        batch["position_ids"] = position_ids([len(s) for s in sequences], length, shifts).to(device)  # (N, L)
    if spans is not None:
        pool_mask = attention_mask.clone()  # (N, L)
        for row, span in enumerate(spans):
            if span is not None:
                pool_mask[row] = 0
                pool_mask[row, span[0] : span[1]] = 1
        batch["pool_mask"] = pool_mask.to(device)
    return batch

def length_sorted_groups(sequences: list[list[int]], max_texts: int | None, max_tokens: int | None) -> list[list[int]]:
    """Indices of the sequences, longest first, cut into groups that are padded together.

    Sorting puts texts of similar length together, so little compute goes to padding. A group
    holds at most ``max_texts`` texts and at most ``max_tokens`` padded tokens (texts x its longest
    text; ``None``: no limit); a text longer than ``max_tokens`` goes alone.
    """
    groups: list[list[int]] = []
    for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])):
        group = groups[-1] if groups else None
        if group is not None:
            width = len(sequences[group[0]])  # the first text of a group is its longest
            if (max_texts is None or len(group) < max_texts) and (max_tokens is None or (len(group) + 1) * width <= max_tokens):
                group.append(index)
                continue
        groups.append([index])
    return groups

def unique_sequences(sequences: list[list[int]], tags: list | None = None) -> tuple[list[list[int]], list[int]]:
    """The distinct token id lists (first occurrences, in input order) and, for each input, the
    index of its distinct copy: ``unique[copy_of[i]] == sequences[i]``. With ``tags`` (hashable, one
    per sequence: e.g. its pooling span), equal ids with different tags stay distinct."""
    index: dict[tuple, int] = {}
    keys = [(tuple(ids), None if tags is None else tags[i]) for i, ids in enumerate(sequences)]
    copy_of = [index.setdefault(key, len(index)) for key in keys]
    return [list(ids) for ids, _ in index], copy_of

def length_sorted_mini_batches(
    sequences: list[list[int]], max_texts: int | None, max_tokens: int | None, pad_token_id: int, device=None,
    shifts: list[int] | None = None, spans: list[tuple[int, int] | None] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The :func:`length_sorted_groups` as mini-batches, each padded to its own longest (with each
    text's position shift and pooling span, if given).

    Returns the mini-batches and ``order``: ``order[k]`` is the input index of the k-th text fed.
    """
    groups = length_sorted_groups(sequences, max_texts, max_tokens)
    order = [index for group in groups for index in group]
    pick = lambda values, group: None if values is None else [values[i] for i in group]  # noqa: E731
    batches = [pad([sequences[i] for i in group], pad_token_id, device, pick(shifts, group), pick(spans, group))
               for group in groups]
    return batches, order
