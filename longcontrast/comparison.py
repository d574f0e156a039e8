"""Paired comparisons of evaluation results, per query: the mean difference of a metric with its
paired bootstrap 95% interval and randomisation-test p-value (:func:`.metrics.paired_difference`),
on every part both results scored per item. ``evaluate.py`` and the benchmarks call these.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .metrics import paired_difference
from .results import Scored


class Difference(NamedTuple):
    """``other - base`` in points: the mean per-query difference, its interval and p-value."""

    difference: float
    low: float
    high: float
    p: float


Comparison = dict[str, dict[str, Difference]]  # {part ("all", "split=report gold_start>=512"): {metric: Difference}}


def paired(base: Scored, other: Scored, *, resamples: int = 10_000, label: str = "") -> Comparison:
    """``other`` against ``base`` on every part both scored per item; parts are named after
    ``label`` (``"maxp@512 split=report"``; the whole set is ``label`` or ``"all"``)."""
    others = dict(other.walk())
    out = {}
    for part, scored in base.walk():
        if scored.per_item and others.get(part) is not None and others[part].per_item:
            out[f"{label} {part}".strip() or "all"] = {
                metric: Difference(**paired_difference(np.array(values), np.array(others[part].per_item[metric]),
                                                       resamples=resamples))
                for metric, values in scored.per_item.items()}
    return out


def compare(rows: dict, resamples: int) -> dict[str, dict[str, Comparison]]:
    """Each row after the first against the first (``rows``: name -> :class:`.evaluation.ModelResults`),
    on every set and reading both have: ``{row: {set: {part: {metric: Difference}}}}``."""
    (_, base), *others = rows.items()
    out = {}
    for name, row in others:
        for set_name, readings in row.sets.items():
            for reading, scored in readings.items():
                if reading in base.sets.get(set_name, {}):
                    found = paired(base.sets[set_name][reading], scored, resamples=resamples,
                                   label="" if reading == "whole" else reading)
                    if found:
                        out.setdefault(name, {}).setdefault(set_name, {}).update(found)
    return out


def compare_windows(rows: dict, resamples: int) -> dict[str, dict[str, Comparison]]:
    """Whole passages against MaxP windows, per query: does reading the whole long passage beat
    chunking it? Each row's whole reading (and its late-chunked windows, ``late@W``, and a
    late-interaction model's token vectors, ``tokens@W``, which read the whole passage too) against its own ``maxp@W`` (``"<set> whole - maxp@W"``) and every other row's
    (``"<set> whole - <row> maxp@W"``: a long-context model against a 512-token one's chunking).
    Positive: the whole-passage reader is better."""
    out = {}
    for name, row in rows.items():
        for set_name, readings in row.sets.items():
            readers = {k: v for k, v in readings.items() if k == "whole" or k.startswith(("late@", "tokens@"))}
            for reader, read in readers.items():
                for other, other_row in rows.items():
                    for key, windowed in other_row.sets.get(set_name, {}).items():
                        if key.startswith("maxp@"):
                            found = paired(windowed, read, resamples=resamples)
                            if found:
                                label = f"{set_name} {reader} - " + (key if other == name else f"{other} {key}")
                                out.setdefault(name, {})[label] = found
    return out


def format_comparison(comparison: dict[str, dict[str, Comparison]], title: str) -> str:
    """A Markdown table of :func:`compare` or :func:`compare_windows`: difference [95% interval]
    per metric, one row per model, set and part."""
    rows = [(name, where, part, cells) for name, by_set in comparison.items()
            for where, by_part in by_set.items() for part, cells in by_part.items()]
    if not rows:
        return ""
    metrics = list(rows[0][3])
    lines = [f"\n{title} (points; paired bootstrap 95% interval over queries; p: randomisation test)",
             "| model | set | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, where, part, cells in rows:
        lines.append(f"| {name} | {where}{'' if part == 'all' else ' ' + part} | " + " | ".join(
            f"{c.difference:+.2f} [{c.low:+.2f}, {c.high:+.2f}] " + ("p<0.001" if c.p < 0.001 else f"p={c.p:.3f}")
            for c in cells.values()) + " |")
    return "\n".join(lines)


def to_json(comparison: dict) -> dict:
    """The nested comparison with each :class:`Difference` as a ``{difference, low, high, p}`` object."""
    if isinstance(comparison, Difference):
        return comparison._asdict()
    return {key: to_json(value) for key, value in comparison.items()}
