"""Retrieval metrics that cannot flatter a broken model, and the paired comparison of two models.

The ranking rule, everywhere a gold candidate is ranked (``evaluate.py``, the miner's BM25 row,
``bench/long_context.py``):

- candidates whose token sequence equals the gold's are the gold (one text, several indices);
- every other candidate scoring within :data:`TIE_TOLERANCE` of the gold ties with it, and ties are
  broken uniformly at random. For one gold per query (ChatRAG sets, the long-context tasks) the
  metrics are the exact expectation over that random order: with ``higher`` candidates above the
  gold and ``tied`` level with it, the gold's rank is uniform on ``higher + 1 ... higher + tied + 1``.
  A model that maps every text to one vector therefore scores at chance (Recall@1 = 1 / C), never 100.
- BEIR sets (several graded relevant documents per query) are ranked in one concrete order, their
  ties broken by a seeded random order of the corpus (:mod:`longcontrast.beir`), and scored by
  ``pytrec_eval``, the trec_eval implementation BEIR and MTEB use.

A query whose candidate scores span less than :data:`DEGENERATE_SPREAD` is *degenerate*: the model
cannot tell its candidates apart (collapse), and the evaluation says so loudly.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

# Cosines closer than this count as equal: float32 rounding of a 384-1024-wide dot product moves a
# score by ~1e-7, and a collapsed model's candidates differ by no more than that.
TIE_TOLERANCE = 1e-6
# A query whose candidates' scores all lie within this span is degenerate (the model has collapsed).
DEGENERATE_SPREAD = 1e-4

CHATRAG_METRICS = ("recall@1", "recall@5", "recall@20", "mrr@20", "ndcg@20")
BEIR_METRICS = ("ndcg@10", "recall@1", "recall@5", "recall@10", "recall@20", "recall@100", "mrr@10", "map@100")


class Rank(NamedTuple):
    """Where the gold lands: ``higher`` candidates score above it, ``tied`` others within the tolerance."""

    higher: int
    tied: int = 0


def gold_rank(scores: torch.Tensor, gold_index: int, gold_score: torch.Tensor | None = None,
              copies: torch.Tensor | None = None) -> Rank:
    """The gold's :class:`Rank` among one query's candidates.

    Args:
        scores: (C,) the query's scores against its candidates.
        gold_index: the gold candidate's index.
        gold_score: replaces the gold's own score when the gold was encoded differently (QReCC's
            answer rule).
        copies: (C,) True for candidates that are the gold's text (its token sequence); they
            neither outrank nor tie with it. The gold itself may be True or False.
    """
    if gold_score is None:
        gold_score = scores[gold_index]
    others = torch.ones_like(scores, dtype=torch.bool)  # (C,)
    others[gold_index] = False
    if copies is not None:
        others &= ~copies
    if not torch.isfinite(scores[others]).all() or not torch.isfinite(torch.as_tensor(gold_score)):
        raise ValueError("non-finite scores")  # callers check embeddings first; this is a guard
    gap = scores[others].double() - float(gold_score)  # (C - copies,)
    return Rank(int((gap > TIE_TOLERANCE).sum()), int((gap.abs() <= TIE_TOLERANCE).sum()))


def _prefix(values) -> np.ndarray:
    """``out[n] = sum of values[r - 1] for r = 1..n``: partial sums over ranks, 0 at n = 0."""
    return np.concatenate([[0.0], np.cumsum(values)])


def per_item_metrics(ranks: list[Rank | int]) -> dict[str, np.ndarray]:
    """Each item's expected Recall@1/5/20, MRR@20 and NDCG@20 (in [0, 1]) under random tie-breaking.

    ``ranks``: :class:`Rank` tuples, or plain 1-based ranks (no ties).
    """
    pairs = np.array([(r - 1, 0) if isinstance(r, (int, np.integer)) else tuple(r) for r in ranks], dtype=np.int64)
    higher, tied = pairs[:, 0], pairs[:, 1]  # (N,), (N,)
    first, last = higher + 1, higher + tied + 1  # the gold's possible ranks, inclusive
    spread = tied + 1.0
    out = {f"recall@{k}": np.clip(k - higher, 0, tied + 1) / spread for k in (1, 5, 20)}
    for name, gain in (("mrr@20", lambda r: 1 / r), ("ndcg@20", lambda r: 1 / math.log2(r + 1))):
        sums = _prefix([gain(r) for r in range(1, 21)])  # (21,) ranks past 20 score nothing
        out[name] = (sums[np.minimum(last, 20)] - sums[np.minimum(first - 1, 20)]) / spread
    return out


def retrieval_metrics(ranks: list[Rank | int]) -> dict[str, float]:
    """Recall@1/5/20, MRR@20 and NDCG@20 in percent: the mean of :func:`per_item_metrics`."""
    return {name: 100 * float(values.mean()) for name, values in per_item_metrics(ranks).items()}


def beir_metrics(qrels: dict[str, dict[str, int]], run: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per-query BEIR metrics (in [0, 1]) of ranked lists, computed by ``pytrec_eval``.

    Args:
        qrels: ``{query id: {document id: grade}}``; grade 0 is judged non-relevant; graded gains
            count in nDCG as trec_eval counts them (gain = grade).
        run: ``{query id: [document id, ...]}``, best first; this order is the ranking (the scores
            pytrec_eval sees are derived from it, so its own tie-breaking by document id never applies).

    Returns ``{metric: {query id: value}}`` for :data:`BEIR_METRICS`; MRR@10 is trec_eval's
    reciprocal rank of the run cut at 10, MAP@100 its ``map_cut_100``.
    """
    import pytrec_eval

    scored = {q: {doc: float(len(docs) - i) for i, doc in enumerate(docs)} for q, docs in run.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,5,10,20,100", "map_cut.100"})
    cut = {q: {doc: s for doc, s in docs.items() if s > len(docs) - 10} for q, docs in scored.items()}
    main = evaluator.evaluate(scored)
    reciprocal = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    names = {"ndcg@10": "ndcg_cut_10", "map@100": "map_cut_100", **{f"recall@{k}": f"recall_{k}" for k in (1, 5, 10, 20, 100)}}
    out = {metric: {q: values[key] for q, values in main.items()} for metric, key in names.items()}
    out["mrr@10"] = {q: reciprocal.get(q, {}).get("recip_rank", 0.0) for q in main}
    return {metric: out[metric] for metric in BEIR_METRICS}


def paired_difference(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 0,
                      confidence: float = 0.95) -> dict[str, float]:
    """Is B better than A? The mean per-query difference ``b - a`` with a paired bootstrap interval.

    Args:
        a, b: (N,) one metric of each query, for models A and B, in the same query order.

    Returns ``difference`` (mean of b - a), ``low`` / ``high`` (the percentile bootstrap
    ``confidence`` interval of that mean, queries resampled with replacement) and ``p`` (two-sided
    paired randomisation test: each query's difference flips sign at random; add-one smoothed).
    Units are those of ``a`` and ``b``.
    """
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)  # (N,)
    if diff.ndim != 1 or not len(diff):
        raise ValueError("need two equal-length, non-empty vectors")
    rng = np.random.default_rng(seed)
    observed = diff.mean()
    batch = max(1, 10_000_000 // len(diff))  # resamples at a time: at most ~80 MB of draws
    means, extreme = [], 0
    for start in range(0, resamples, batch):
        size = min(batch, resamples - start)
        means.append(diff[rng.integers(0, len(diff), (size, len(diff)))].mean(axis=1))  # (size,)
        flipped = (diff * rng.choice((-1.0, 1.0), (size, len(diff)))).mean(axis=1)  # (size,)
        extreme += int((np.abs(flipped) >= abs(observed) - 1e-12).sum())
    alpha = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [alpha, 1 - alpha])
    return {"difference": float(observed), "low": float(low), "high": float(high),
            "p": (1 + extreme) / (1 + resamples)}
