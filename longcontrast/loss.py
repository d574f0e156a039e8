"""The training objective: InfoNCE over cosine similarity (or MaxSim of token vectors, see
:mod:`.late_interaction`) with in-batch and hard negatives, distillation from teacher scores (KL or
MarginMSE over each query's own candidates), and Matryoshka prefixes of the vector. Pure functions
of the embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .late_interaction import similarity


class LossOutput(NamedTuple):
    loss: torch.Tensor  # () mean cross-entropy over the queries
    accuracy: torch.Tensor  # () fraction of queries whose own positive scores highest
    parts: dict = {}  # named detached terms of the loss, for logging (see training_loss); never mutated


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
        query_embeddings: (B, D) L2-normalised query embeddings, or (B, Lq, D) token vectors
            (:mod:`.late_interaction`; the similarity is then the mean MaxSim).
        passage_embeddings: (P, D) L2-normalised passage embeddings (or (P, Lp, D) token vectors):
            the positives and the hard negatives of the whole batch, in any layout that ``targets``
            describes.
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
    # float32 at least, even inside an autocast region: at temperature 0.01 bf16 logits would sit
    # on a grid 0.5 apart
    return infonce(similarity(query_embeddings, passage_embeddings), temperature, targets, passage_text_ids,
                   query_positive_ids)


def infonce(similarities: torch.Tensor, temperature: float, targets: torch.Tensor | None = None,
            passage_text_ids: torch.Tensor | None = None, query_positive_ids: torch.Tensor | None = None) -> LossOutput:
    """:func:`contrastive_loss` from the (B, P) similarities of the batch's queries and passages."""
    num_queries = similarities.size(0)
    if targets is None:
        targets = torch.arange(num_queries, device=similarities.device)  # (B,)
    scores = similarities / temperature  # (B, P)
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


class BatchLabels(NamedTuple):
    """What the loss needs of a contrastive batch besides its embeddings (see :func:`training_loss`)."""

    targets: torch.Tensor | None = None  # (B,) each query's own positive among the passages; None: arange(B)
    passage_text_ids: torch.Tensor | None = None  # (P,) equal for passages of identical text
    query_positive_ids: torch.Tensor | None = None  # (B, M) ids of every positive of each query, -1 pads
    candidates: torch.Tensor | None = None  # (B, K) passage index of each query's positive then its own negatives, -1 pads
    teacher_scores: torch.Tensor | None = None  # (B, K) the teacher's score of each candidate (pads: any value)


@dataclass(frozen=True)
class LossSettings:
    """The training objective: InfoNCE, distillation from teacher scores, Matryoshka prefixes.

    The loss is ``sum_d w_d * (contrastive_weight * InfoNCE_d + distill_weight * distill_d)`` over
    the Matryoshka dimensions ``d`` (the whole vector when there are none), each computed on the
    first ``d`` coordinates of every embedding, re-normalised.
    """

    temperature: float = 0.05  # the student's: logits are cosine / temperature
    contrastive_weight: float = 1.0
    distill_weight: float = 0.0
    teacher_temperature: float = 1.0  # the teacher's logits are its scores / teacher_temperature
    distill_loss: str = "kl"  # kl: KL(teacher || student) over each query's candidates; margin_mse
    matryoshka_dims: tuple[int, ...] = ()  # decreasing; () trains the whole vector only
    matryoshka_weights: tuple[float, ...] = ()  # one per dim; () weighs each 1

    @property
    def distills(self) -> bool:
        return self.distill_weight > 0


DISTILL_LOSSES = ("kl", "margin_mse")


def distillation_loss(
    query_embeddings: torch.Tensor, passage_embeddings: torch.Tensor, candidates: torch.Tensor,
    teacher_scores: torch.Tensor, *, temperature: float, teacher_temperature: float, kind: str = "kl",
) -> torch.Tensor:
    """The student's scores of each query's own candidates fitted to a teacher's.

    Args:
        query_embeddings: (B, D) and ``passage_embeddings`` (P, D), L2-normalised (or token
            vectors, as in :func:`contrastive_loss`).
        candidates: (B, K) index into the passages of each query's positive (column 0) and its own
            hard negatives; -1 pads a query with fewer.
        teacher_scores: (B, K) the teacher's score of each candidate (values at pads are ignored).
        temperature: the student's logits are cosine / ``temperature``; the teacher's are
            ``teacher_scores / teacher_temperature``.
        kind: ``kl``: the mean over queries of KL(teacher || student) between the two softmax
            distributions over the candidates (FlagEmbedding's ``kl_div`` up to the teacher's
            entropy, which has no gradient); ``margin_mse``: the mean squared difference between
            the student's and the teacher's logit margins positive - negative (Hofstaetter et al. 2020).

    Returns:
        () the loss, in nats for ``kl``.
    """
    return distill(similarity(query_embeddings, passage_embeddings), candidates, teacher_scores,
                   temperature=temperature, teacher_temperature=teacher_temperature, kind=kind)


def distill(similarities: torch.Tensor, candidates: torch.Tensor, teacher_scores: torch.Tensor, *, temperature: float,
            teacher_temperature: float, kind: str = "kl") -> torch.Tensor:
    """:func:`distillation_loss` from the (B, P) similarities of the batch's queries and passages."""
    valid = candidates >= 0  # (B, K)
    student = similarities.gather(1, candidates.clamp(min=0)) / temperature  # (B, K)
    teacher = teacher_scores.to(student.dtype) / teacher_temperature  # (B, K)
    if kind == "margin_mse":
        margins = (student[:, :1] - student) - (teacher[:, :1] - teacher)  # (B, K); column 0 is 0
        negatives = valid.clone()
        negatives[:, 0] = False
        return (margins.square() * negatives).sum() / negatives.sum().clamp(min=1)
    if kind != "kl":
        raise ValueError(f"distillation loss must be one of {DISTILL_LOSSES}, got {kind!r}")
    log_student = student.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)  # (B, K)
    log_teacher = teacher.masked_fill(~valid, float("-inf")).log_softmax(dim=-1)  # (B, K)
    terms = torch.where(valid, log_teacher.exp() * (log_teacher - log_student), torch.zeros_like(student))  # (B, K)
    return terms.sum(dim=-1).mean()


def training_loss(
    query_embeddings: torch.Tensor, passage_embeddings: torch.Tensor, labels: BatchLabels, settings: LossSettings,
) -> LossOutput:
    """The objective of :class:`LossSettings` over one contrastive batch: a pure function of the
    (B, D) query and (P, D) passage embeddings (L2-normalised; or token vectors) and the batch's labels, so GradCache's
    cached embedding gradients are exactly the whole batch's.

    Returns ``LossOutput(loss, accuracy, parts)``: the accuracy of the first (widest) dimension;
    ``parts`` the detached InfoNCE and distillation terms of that dimension, for logging.
    """
    dims = settings.matryoshka_dims or (query_embeddings.size(-1),)
    weights = settings.matryoshka_weights or (1.0,) * len(dims)
    if settings.distills and (labels.candidates is None or labels.teacher_scores is None):
        raise ValueError("distillation needs the batch's candidates and teacher scores")
    total, accuracy, parts = 0.0, None, {}
    for dim, weight in zip(dims, weights):
        queries, passages = query_embeddings, passage_embeddings
        if dim < query_embeddings.size(-1):
            # a prefix of a unit vector, re-normalised: the cosine a truncated index computes
            # (a token vector's prefix too; padding rows stay zero)
            queries, passages = F.normalize(queries[..., :dim], dim=-1), F.normalize(passages[..., :dim], dim=-1)  # (B, d), (P, d)
        similarities = similarity(queries, passages)  # (B, P), computed once for both terms
        contrastive = infonce(similarities, settings.temperature, labels.targets, labels.passage_text_ids,
                              labels.query_positive_ids)
        loss = settings.contrastive_weight * contrastive.loss
        if accuracy is None:
            accuracy, parts["contrastive"] = contrastive.accuracy, contrastive.loss.detach()
        if settings.distills:
            distill_term = distill(similarities, labels.candidates, labels.teacher_scores,
                                   temperature=settings.temperature, teacher_temperature=settings.teacher_temperature,
                                   kind=settings.distill_loss)
            loss = loss + settings.distill_weight * distill_term
            parts.setdefault("distill", distill_term.detach())
        total = total + weight * loss
    return LossOutput(total, accuracy, parts)
