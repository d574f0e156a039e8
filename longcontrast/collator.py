"""The contrastive collator: training examples as a ``datasets.Dataset``, and rows of it tokenized
into one contrastive batch (queries, positives then hard negatives, the ids that mark copies,
position shifts and pooling spans).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import UserError
from .batching import unique_sequences
from .distributed import sequence_id
from .positions import draw_position_shifts
from .records import Example
from .tokenization import span_tokens, split_windows, tokenize


def make_dataset(examples: list[Example], teacher_scores: bool = False):
    """The examples as a ``datasets.Dataset`` with columns query, positive (the first),
    positives (all of the example's), known_positives (all of its query's), negatives and length;
    ``teacher_scores``: also positive_scores and negative_scores (every example must have them).

    ``length`` (characters of the query and the first positive) is what the Trainer's
    ``--train_sampling_strategy group_by_length`` groups by. Examples with a ``positive_span`` add a
    column of it (``[]`` where an example has none); with ``negative_spans``, a column of those.
    """
    import datasets

    spans = {}
    if any(e.positive_span for e in examples):
        spans["positive_span"] = [list(e.positive_span or ()) for e in examples]
    if any(e.negative_spans for e in examples):
        spans["negative_spans"] = [[list(s or ()) for s in (e.negative_spans or [None] * len(e.negatives))]
                                   for e in examples]
    if teacher_scores:
        spans["positive_scores"] = [e.positive_scores for e in examples]
        spans["negative_scores"] = [e.negative_scores for e in examples]
    return datasets.Dataset.from_dict({
        "query": [e.query for e in examples],
        "positive": [e.positive for e in examples],
        "positives": [e.positives for e in examples],
        "known_positives": [e.known_positives or e.positives for e in examples],
        "negatives": [e.negatives for e in examples],
        "length": [len(e.query) + len(e.positive) for e in examples],
        "dataset": [e.dataset for e in examples],
        **spans,
    })

def max_known_positives(examples: list[Example]) -> int:
    """The most positives any query has: the width of the collator's ``query_positive_ids``."""
    return max(len(e.known_positives or e.positives) for e in examples)

def check_spans(rows, tokenizer, max_length: int, prompt: str = "") -> None:
    """Every ``positive_span`` and ``negative_spans`` of ``rows`` (:func:`make_dataset`'s) within the
    first ``max_length`` tokens of its passage, checked before training starts (a span found past the
    cut in step 900 would stop a long run); raises :class:`UserError` naming the first example that fails."""
    for row in rows:
        pairs = [(row["positive"], row.get("positive_span")), *zip(row["negatives"], row.get("negative_spans") or ())]
        for text, span in pairs:
            if span:
                try:
                    span_tokens(tokenizer, text, tuple(span), max_length, prompt)
                except UserError as err:
                    raise UserError(f"the example with query {row['query'][:60]!r}: {err}") from None

@dataclass
class ContrastiveCollator:
    """Tokenises rows of :func:`make_dataset` into one contrastive batch (not padded yet).

    A row with several positives contributes one, drawn uniformly by a hash of ``(seed, epoch, query)``:
    one draw per query per epoch, the same in every process and in a resumed run (the trainer sets
    ``epoch`` at each epoch's start). Each row keeps at most ``num_hard_negatives`` hard negatives
    (:meth:`chosen_negatives`: the first listed, mined lists putting the hardest first, or drawn
    from the list by ``negative_sampling``); a row with fewer uses what it has, so the passages
    per batch may vary. Returns ``query_ids`` (B lists of token ids), ``passage_ids`` (P lists: the B
    positives in query order, then every row's hard negatives) and ``passage_text_ids`` (P,): equal
    integers for equal token sequences (in every process), which the loss uses to mask copies of a
    query's positive. ``max_positives`` > 1: also ``query_positive_ids`` (B, max_positives), the ids of
    every known positive of each query (-1 pads), all masked out of its negatives. ``max_positions``
    set: also ``passage_position_shifts`` (P ints), a random shift per distinct passage (copies share
    it, so they stay one text to encode) that places it within ``max_positions``
    (:func:`.positions.draw_position_shifts`), drawn from a generator keyed by the seed, the epoch and
    the batch's texts (resumable like the positive's draw). A row with a ``positive_span`` (its
    positive's evidence, in characters) or ``negative_spans``: also ``passage_pool_spans`` (P: the
    span's tokens, or None), so that the passage is read whole and pooled over the span only. A span
    is part of a passage's identity: another span of the same page is another passage (a negative of
    the same context), and the page pooled whole is masked only where the query knows it as a positive.
    Rows with teacher scores (``make_dataset(..., teacher_scores=True)``): also ``candidate_passages``
    and ``teacher_scores`` (B, 1 + num_hard_negatives), each query's own candidates for distillation.
    Rows with token ids (:func:`.token_ids.with_token_ids`, made with this collator's lengths and
    prompts) are not tokenised again. ``passage_segment_len`` set: ``passage_ids`` are the consecutive
    segments of every passage (:func:`.tokenization.split_windows`, each a text of its own) and
    ``passage_segment_owner`` the passage of each (non-decreasing); the loss scores a passage over all
    of its segments' token vectors (:func:`.late_interaction.join_segments`). Always ``dataset``:
    the rows' dataset index (-1 when they come from several), which a mixture gives its own query
    prompt and number of hard negatives (``dataset_prompts``, ``dataset_negatives``).
    """

    tokenizer: object
    query_max_len: int
    passage_max_len: int
    num_hard_negatives: int = 1
    query_prompt: str = ""  # prefix of every query (kept when the query is cut)
    passage_prompt: str = ""  # before every passage
    max_positions: int | None = None  # shift passages' position ids within this many positions (None: no shift)
    max_positives: int = 1  # the most positives a query has in the data (max_known_positives)
    seed: int = 0  # with the epoch, picks each query's positive (and its negatives, when sampled)
    epoch: int = 0
    negative_sampling: str = "first"  # first, random or rotate (see chosen_negatives)
    # per dataset (Example.dataset), where a mixture sets them: the query prompt and hard negatives
    dataset_prompts: tuple[str, ...] | None = None
    dataset_negatives: tuple[int, ...] | None = None
    corpus: object = None  # the documents rows name by id (.training_set.TrainingSet.corpus), or None
    passage_segment_len: int | None = None  # read each passage in consecutive segments of this many tokens

    def _draw(self, *parts: str) -> int:
        """A 63-bit number fixed by the seed, the epoch and ``parts``: the same in every process
        and in a resumed run, other in the next epoch."""
        key = "\0".join([str(self.seed), str(self.epoch), *parts]).encode("utf-8")
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def chosen_negatives(self, row: dict) -> list[int]:
        """The indices of the row's negatives this epoch uses: at most ``num_hard_negatives`` of
        them, ``first`` the first listed, ``random`` a draw without replacement keyed by (seed,
        epoch, query, positive), ``rotate`` the next window of the list each epoch (epoch e takes
        positions e*N .. e*N + N - 1, wrapping), so every negative is used before any is reused."""
        count, wanted = len(row["negatives"]), min(self._negatives(row), len(row["negatives"]))
        if self.negative_sampling == "first" or wanted == count:
            return list(range(wanted))
        if self.negative_sampling == "rotate":
            return [(self.epoch * wanted + j) % count for j in range(wanted)]
        generator = torch.Generator().manual_seed(self._draw("negatives", row["query"], row["positive"]))
        return torch.randperm(count, generator=generator)[:wanted].tolist()

    def _negatives(self, row: dict) -> int:
        return self.num_hard_negatives if self.dataset_negatives is None else self.dataset_negatives[row["dataset"]]

    def _tokenize_queries(self, rows: list[dict]) -> list[list[int]]:
        """Each row's query with its dataset's prompt, tokenized one prompt at a time."""
        prompts = [self.query_prompt if self.dataset_prompts is None else self.dataset_prompts[row["dataset"]]
                   for row in rows]
        ids: list[list[int]] = [[] for _ in rows]
        for prompt in dict.fromkeys(prompts):
            mine = [i for i, p in enumerate(prompts) if p == prompt]
            for i, tokens in zip(mine, tokenize(self.tokenizer, [rows[i]["query"] for i in mine], self.query_max_len,
                                                "left", prompt)):
                ids[i] = tokens
        return ids

    def _tokenize_passages(self, texts: list[str]) -> list[list[int]]:
        return tokenize(self.tokenizer, texts, self.passage_max_len, "right", self.passage_prompt)

    def _resolve(self, rows: list[dict]) -> list[dict]:
        """Rows that name their passages by id (``positive_rows``, ``negative_rows``: corpus rows)
        with those documents' texts, and token ids where the corpus has them, read in one fetch."""
        wanted = sorted({n for row in rows for n in (*row["positive_rows"], *row["negative_rows"])})
        if not wanted:
            return rows
        fetched, at = self.corpus[wanted], {n: i for i, n in enumerate(wanted)}  # column -> values
        resolved = []
        for row in rows:
            if row["positive_rows"]:
                found = {name: [[values[at[n]] for n in row[side + "_rows"]] for side in ("positive", "negative")]
                         for name, values in fetched.items()}
                row = dict(row, positive=found["text"][0][0], positives=found["text"][0], negatives=found["text"][1])
                if "input_ids" in found:
                    row.update(positives_ids=found["input_ids"][0], negatives_ids=found["input_ids"][1])
            resolved.append(row)
        return resolved

    def __call__(self, rows: list[dict]) -> dict:
        if self.corpus is not None:
            rows = self._resolve(rows)
        positives, drawn = [], []
        for row in rows:
            choices = row.get("positives") or [row["positive"]]
            drawn.append(self._draw(row["query"]) % len(choices))
            positives.append(choices[drawn[-1]])
        chosen = [self.chosen_negatives(row) for row in rows]
        negatives = [row["negatives"][i] for row, picks in zip(rows, chosen) for i in picks]
        cached = bool(rows) and "query_ids" in rows[0]  # token ids from the cache (.token_ids): the same cut
        if cached:
            passage_ids = [row["positives_ids"][d] for row, d in zip(rows, drawn)] + [
                row["negatives_ids"][i] for row, picks in zip(rows, chosen) for i in picks]
        else:
            passage_ids = self._tokenize_passages(positives + negatives)
        wanted = [row.get("positive_span") for row in rows]
        for row, picks in zip(rows, chosen):
            spans_of_row = row.get("negative_spans") or [None] * len(row["negatives"])
            wanted += [spans_of_row[i] for i in picks]
        spans = [span_tokens(self.tokenizer, text, span, self.passage_max_len, self.passage_prompt) if span else None
                 for text, span in zip(positives + negatives, wanted)]
        batch = {
            "query_ids": [row["query_ids"] for row in rows] if cached else self._tokenize_queries(rows),
            "passage_ids": passage_ids,
            # a span joins the identity after a -1, which no token id is
            "passage_text_ids": torch.tensor([sequence_id(ids + ([-1, *span] if span else []))
                                              for ids, span in zip(passage_ids, spans)]),  # (P,)
        }
        datasets = {row.get("dataset", 0) for row in rows}
        batch["dataset"] = datasets.pop() if len(datasets) == 1 else -1  # -1: a batch of several datasets
        if self.max_positives > 1:
            known = torch.full((len(rows), self.max_positives), -1, dtype=torch.long)  # (B, M)
            for index, row in enumerate(rows):
                ids = [sequence_id(x) for x in (row["known_positives_ids"] or row["positives_ids"] if cached else
                       self._tokenize_passages(row.get("known_positives") or row.get("positives") or [row["positive"]]))]
                known[index, : len(ids)] = torch.tensor(ids)
            batch["query_positive_ids"] = known
        if any(spans):
            batch["passage_pool_spans"] = spans
        if rows and rows[0].get("positive_scores") is not None:
            batch["candidate_passages"], batch["teacher_scores"] = self._candidates(rows, drawn, chosen)
        if self.passage_segment_len is not None:
            batch["passage_ids"], batch["passage_segment_owner"] = split_windows(
                self.tokenizer, passage_ids, self.passage_segment_len, self.passage_prompt)
        if self.max_positions is not None:
            unique, copy_of = unique_sequences(passage_ids)
            # a generator keyed by the epoch and the batch's texts: a resumed run draws the same shifts
            generator = torch.Generator().manual_seed(self._draw(*map(str, batch["passage_text_ids"].tolist())))
            shifts = draw_position_shifts([len(ids) for ids in unique], self.max_positions, generator)
            batch["passage_position_shifts"] = [shifts[i] for i in copy_of]
        return batch

    def _candidates(self, rows: list[dict], drawn: list[int], chosen: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1 + num_hard_negatives) index of each query's positive and own negatives among the
        batch's passages (-1 pads a row with fewer negatives), and the teacher's score of each (0 at pads)."""
        width = 1 + max(self.dataset_negatives or [self.num_hard_negatives])
        candidates = torch.full((len(rows), width), -1, dtype=torch.long)  # (B, K)
        scores = torch.zeros((len(rows), width), dtype=torch.float32)  # (B, K)
        start = len(rows)  # the negatives follow the B positives, row after row
        for index, (row, positive, picks) in enumerate(zip(rows, drawn, chosen)):
            count = len(picks)
            candidates[index, : 1 + count] = torch.tensor([index, *range(start, start + count)])
            scores[index, : 1 + count] = torch.tensor([row["positive_scores"][positive],
                                                       *[row["negative_scores"][i] for i in picks]])
            start += count
        return candidates, scores
