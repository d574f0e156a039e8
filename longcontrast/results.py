"""Evaluation results as typed values: a :class:`Run` (what a retriever scored for each query of a
set) and :class:`Scored` (the metrics of a run: means, per-item values and named parts), with the
JSON layout that ``evaluate.py`` writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class Run:
    """One reading's scores of a retrieval set's queries.

    ``candidates[q]`` (k,) passage indices into the set's passages and ``scores[q]`` (k,) their
    scores: every candidate of the query's group in group order (a ChatRAG document's chunks), or
    the best ``k`` of a corpus, best first (BEIR). ``copy_of`` (N,): per passage, the id of its
    distinct text as this retriever reads it (copies of the gold count as the gold); ``gold_scores``
    (Q,): scores that replace the gold's own (QReCC's answer rule); ``info``: counts to report
    (``windows``: the pieces a MaxP or late-chunked reading scored).
    """

    candidates: list[torch.Tensor]
    scores: list[torch.Tensor]
    copy_of: torch.Tensor | None = None
    gold_scores: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Scored:
    """Metrics of one run on one set, in percent: ``metrics`` (the mean of each), ``per_item`` (each
    query's value, in the set's query order), ``parts`` (the same for named subsets: answers past
    token 512, the selection and report halves, each with its own parts) and ``info`` (counts and
    seconds that are not metrics)."""

    num_items: int
    metrics: dict[str, float]
    per_item: dict[str, list[float]]
    parts: dict[str, Scored] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Scored]]:
        """``(name, scored)`` of this result (name ``""``) and every nested part
        (``"gold_start>=512"``, ``"split=report gold_start>=512"``)."""
        yield prefix.strip(), self
        for name, part in self.parts.items():
            yield from part.walk(f"{prefix} {name}")

    def to_json(self, *, per_item: bool = True) -> dict:
        """``{"num_items", <metric>: mean, "per_item": {...}, <info>, <part>: {...}}``."""
        out = {"num_items": self.num_items, **self.metrics, **self.info}
        if per_item:
            out["per_item"] = self.per_item
        out.update({name: part.to_json(per_item=per_item) for name, part in self.parts.items()})
        return out
