"""Evaluation: one interface for every retriever and every retrieval set.

``evaluate(retriever, data) -> {reading: Scored}`` scores each reading of a retriever
(:mod:`.retrievers`: dense whole / MaxP / late chunking, BM25, their hybrids) on a set
(:mod:`.retrieval_sets`: ChatRAG layout or a BEIR corpus). :class:`ModelResults` gathers one
model's results over sets; the paired comparisons are :mod:`.comparison`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .results import Scored
from .retrievers import BM25Retriever

logger = logging.getLogger(__name__)


def evaluate(retriever, data) -> dict[str, Scored]:
    """Each reading of ``retriever`` on ``data``, scored; ``info["seconds"]`` of the first reading
    holds the time of the whole call (ranking and scoring)."""
    started = time.perf_counter()
    what = "BM25" if isinstance(retriever, BM25Retriever) else "model"
    scored = {reading: data.score(run, what=what) for reading, run in retriever.rank(data).items()}
    next(iter(scored.values())).info["seconds"] = round(time.perf_counter() - started, 2)
    return scored


@dataclass
class ModelResults:
    """One row of the results: each set's readings (``{set: {reading: Scored}}``, ``whole`` first)
    and what describes the model (pooling, prompts, tokens read)."""

    sets: dict[str, dict[str, Scored]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def average(self) -> dict[str, float] | None:
        """The unweighted mean over sets of each metric of the whole reading (the ChatRAG table's
        Average column), or None for a single set."""
        if len(self.sets) < 2:
            return None
        wholes = [readings["whole"].metrics for readings in self.sets.values()]
        return {m: sum(w[m] for w in wholes) / len(wholes) for m in wholes[0]}

    def to_json(self, *, per_item: bool = True) -> dict:
        """``{set: {<whole reading's JSON>, <reading>: {...}}, "average": {...}, <info>}``."""
        out = {}
        for name, readings in self.sets.items():
            whole, *others = readings.items()
            out[name] = {**whole[1].to_json(per_item=per_item),
                         **{reading: scored.to_json(per_item=per_item) for reading, scored in others}}
        if self.average():
            out["average"] = self.average()
        return {**out, **self.info}


def format_table(rows: dict[str, ModelResults], metrics: tuple[str, ...], short: dict[str, str]) -> str:
    """A Markdown table: one row per model (its Average first when it has several sets), then one per
    model, set, reading and part (``model [doc2dial maxp@64 gold_start>=512, 135 items]``)."""
    sets = list(dict.fromkeys(name for row in rows.values() for name in row.sets))
    columns = (["average"] if any(row.average() for row in rows.values()) else []) + sets
    title = {"average": "Average ", "doc2dial": "Doc2Dial ", "quac": "QuAC ", "qrecc": "QReCC ", "beir": ""}
    counted = columns == ["beir"]  # a corpus: its queries get a column, its rows no set name
    lines = ["| model | " + ("queries | " if counted else "")
             + " | ".join(f"{title.get(c, c + ' ')}{short[m]}" for c in columns for m in metrics) + " |",
             "|---|" + "---|" * (counted + len(columns) * len(metrics))]
    for name, row in rows.items():
        values = {c: row.sets[c]["whole"].metrics for c in sets if c in row.sets}
        if row.average():
            values["average"] = row.average()
        count = f"{row.sets[sets[0]]['whole'].num_items} | " if counted and sets[0] in row.sets else "- | " * counted
        lines.append(f"| {name} | " + count + " | ".join(f"{values[c][m]:.2f}" if c in values else "-"
                                                 for c in columns for m in metrics) + " |")
    for name, row in rows.items():
        for set_name, readings in row.sets.items():
            for reading, scored in readings.items():
                for part, value in scored.walk("" if reading == "whole" else reading):
                    if part:
                        cells = [f"{value.metrics[m]:.2f}" if c == set_name else "-" for c in columns for m in metrics]
                        label = f"{name} [{part}]" if counted else f"{name} [{set_name} {part}, {value.num_items} items]"
                        lines.append(f"| {label} | " + (f"{value.num_items} | " if counted else "") + " | ".join(cells) + " |")
    return "\n".join(lines)
