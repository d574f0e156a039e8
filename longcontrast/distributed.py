"""Cross-device negatives: one contrastive batch spread over all processes of a distributed run.

Every process gathers the query and passage embeddings of all processes and computes the same
global loss (the mean over all queries of the global batch), scoring each query against every
positive and hard negative of the global batch. Autograd reaches only the process's own rows of
the gathered tensors (the others are constants here), so the gradient it gets with respect to its
own embeddings is exactly that of the global loss. Each process therefore holds its own share of
the global parameter gradient, and the global gradient is their sum; DDP averages instead of
summing, which :func:`world_size` compensates: the loss is multiplied by it before the backward
(``contrastive_step``), never in what is logged.
"""

from __future__ import annotations

import gc
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .loss import BatchLabels


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shut_down() -> None:
    """Tear the process group down before the interpreter exits. Left to exit-time destructors,
    gloo's threads sometimes abort a process that finished its work ("terminate called without an
    active exception", exit -6, seen about once in ten torchrun launches)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers first: a reducer outliving its group can hang the exit
        dist.destroy_process_group()


def any_process(flags: list[bool], device) -> list[bool]:
    """Each flag OR-ed over all processes, so that they all take the same decision (the flags
    themselves when not distributed). One small all-reduce."""
    if world_size() == 1:
        return list(flags)
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(value) for value in values.tolist()]


def sequence_id(token_ids: list[int]) -> int:
    """A 63-bit id equal for equal token sequences in every process (Python's ``hash`` differs per
    process): the identity of a passage as the model reads it, the one GradCache deduplicates by."""
    data = b"".join(int(t).to_bytes(8, "little", signed=True) for t in token_ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All processes' ``local`` rows, concatenated in rank order; this process's rows keep autograd.

    Processes may hold different numbers of rows (an example with fewer hard negatives) and, for
    (n_r, L_r, D) token vectors, different lengths: those are zero-padded to the longest
    (:mod:`.late_interaction`: zero rows are padding).

    Args:
        local: (n_r, ...) this process's rows.

    Returns:
        (sum n_r, ...) the gathered rows and the list of n_r.
    """
    shape = torch.tensor(local.shape[:2] if local.dim() == 3 else local.shape[:1], device=local.device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    sizes = [int(s[0].item()) for s in shapes]
    if local.dim() == 3:
        local = F.pad(local, (0, 0, 0, max(int(s[1].item()) for s in shapes) - local.size(1)))  # (n_r, L, D)
    padded = local.new_zeros((max(sizes), *local.shape[1:]))  # (n_max, ...)
    padded[: local.size(0)] = local.detach()
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    parts = [g[:n] for g, n in zip(gathered, sizes)]
    parts[dist.get_rank()] = local  # the one slice autograd differentiates
    return torch.cat(parts), sizes


def gather_batch(
    queries: torch.Tensor, passages: torch.Tensor, labels: BatchLabels,
) -> tuple[torch.Tensor, torch.Tensor, BatchLabels]:
    """The global contrastive batch from each process's (B_r, D) queries, (P_r, D) passages and labels.

    Each process lays its passages out as its B_r positives (in query order) then its hard
    negatives, so after gathering the passages are [positives 0, negatives 0, positives 1, ...],
    not all positives first: query i of rank r has its positive at (passages of ranks < r) + i, and
    its candidates (for distillation) move by the same offset.

    Returns:
        queries (B, D), passages (P, D) and the global batch's labels: targets (B,),
        passage_text_ids (P,), and where given query_positive_ids (B, M), candidates and
        teacher_scores (B, K).
    """
    all_queries, query_counts = gather_rows(queries)  # (B, D)
    all_passages, passage_counts = gather_rows(passages)  # (P, D)
    offsets = torch.tensor([0, *passage_counts[:-1]]).cumsum(0).tolist()
    targets = torch.cat([offset + torch.arange(count) for offset, count in zip(offsets, query_counts)])  # (B,)
    gathered = {name: gather_rows(value)[0] if value is not None else None
                for name, value in labels._asdict().items() if name != "targets"}
    if labels.candidates is not None:
        rank_offsets = torch.repeat_interleave(torch.tensor(offsets), torch.tensor(query_counts))  # (B,)
        candidates = gathered["candidates"]  # (B, K)
        gathered["candidates"] = torch.where(candidates >= 0, candidates + rank_offsets[:, None].to(candidates.device),
                                             candidates)
    return all_queries, all_passages, BatchLabels(targets=targets.to(queries.device), **gathered)
