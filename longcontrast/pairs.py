"""Label-free training pairs from a corpus: what a retriever can learn about its corpus before it
sees a single question.

- ``crop`` (Contriever, Izacard et al. 2022): two independent random spans of one passage, each
  ``min_span``..``max_span`` of its words, as query and positive;
- ``ict`` (inverse cloze task, Lee et al. 2019): one random sentence of a passage as the query, the
  passage without it as the positive (the sentence is left in with probability ``keep_sentence``,
  0.1 in the paper, so the model also learns plain word overlap).

Records come out in the plain training format (``query``, ``positive``, and ``document`` when the
corpus is a ChatRAG ``documents.json``, so that ``--per_document`` mining works on them).
"""

from __future__ import annotations

import random
import re

from . import UserError

METHODS = ("crop", "ict")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def sentences(text: str) -> list[str]:
    """The sentences of a passage: split after . ! ? and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def crop_pair(text: str, rng: random.Random, *, min_span: float, max_span: float) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < 4:
        return None

    def span() -> str:
        length = max(1, round(len(words) * rng.uniform(min_span, max_span)))
        start = rng.randrange(0, len(words) - length + 1)
        return " ".join(words[start: start + length])

    return span(), span()


def ict_pair(text: str, rng: random.Random, *, keep_sentence: float) -> tuple[str, str] | None:
    parts = sentences(text)
    if len(parts) < 2:
        return None
    chosen = rng.randrange(len(parts))
    rest = parts if rng.random() < keep_sentence else parts[:chosen] + parts[chosen + 1:]
    return parts[chosen], " ".join(rest)


def make_pairs(corpus: dict[str, list[str]] | list[str], *, method: str, per_passage: int = 1, seed: int = 0,
               min_span: float = 0.1, max_span: float = 0.5, keep_sentence: float = 0.1) -> list[dict]:
    """``per_passage`` pairs from every passage of ``corpus`` (a ``documents.json`` mapping or a list),
    drawn from one generator seeded with ``seed``. Passages too short for the method (crop: under 4
    words; ict: one sentence) give none."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if not 0 < min_span <= max_span <= 1:
        raise UserError(f"spans must satisfy 0 < min_span <= max_span <= 1, got {min_span} and {max_span}")
    rng = random.Random(seed)
    named = corpus.items() if isinstance(corpus, dict) else [(None, corpus)]
    records = []
    for document, passages in named:
        for text in passages:
            for _ in range(per_passage):
                pair = (crop_pair(text, rng, min_span=min_span, max_span=max_span) if method == "crop"
                        else ict_pair(text, rng, keep_sentence=keep_sentence))
                if pair is not None:
                    records.append({"query": pair[0], "positive": pair[1],
                                    **({"document": document} if document is not None else {})})
    if not records:
        raise UserError(f"no {method} pairs: every passage is too short for it")
    return records
