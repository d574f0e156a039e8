"""Training batches: the examples as a dataset, tokenising, padding, the contrastive collator and
length-sorted mini-batches (the records themselves: :mod:`.records`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

from . import UserError
from .distributed import sequence_id
from .positions import draw_position_shifts, position_ids
from .records import Example

def make_dataset(examples: list[Example]):
    """The examples as a ``datasets.Dataset`` with columns query, positive (the first),
    positives (all of the example's), known_positives (all of its query's), negatives and length.

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
    return datasets.Dataset.from_dict({
        "query": [e.query for e in examples],
        "positive": [e.positive for e in examples],
        "positives": [e.positives for e in examples],
        "known_positives": [e.known_positives or e.positives for e in examples],
        "negatives": [e.negatives for e in examples],
        "length": [len(e.query) + len(e.positive) for e in examples],
        **spans,
    })


def max_known_positives(examples: list[Example]) -> int:
    """The most positives any query has: the width of the collator's ``query_positive_ids``."""
    return max(len(e.known_positives or e.positives) for e in examples)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a single text (BERT: [CLS], [SEP])."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    return full[:start], full[start + len(bare) :]


def tokenize(tokenizer, texts: list[str], max_length: int, truncation_side: str, prompt: str = "") -> list[list[int]]:
    """Token ids with special tokens, at most ``max_length`` each, cut on ``truncation_side``.

    Queries are cut on the left (a dialogue's latest turns are kept), passages on the right; the
    special tokens are kept either way, and so is ``prompt`` (an instruction such as "query: "),
    which is tokenized together with each text, as sentence-transformers does, and never cut.
    """
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    kept = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
    if budget - kept < 1:
        raise UserError(f"max length {max_length} leaves no room for text" + (f" after the prompt {prompt!r}" if prompt else ""))
    ids = tokenizer([prompt + t for t in texts], add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    if truncation_side == "left":
        return [prefix + (x[:kept] + x[kept:][len(x) - budget:] if len(x) > budget else x) + suffix for x in ids]
    return [prefix + x[:budget] + suffix for x in ids]


def span_tokens(tokenizer, text: str, span: tuple[int, int], max_length: int, prompt: str = "") -> tuple[int, int]:
    """The tokens ``[start, end)`` of ``tokenize(tokenizer, [text], max_length, "right", prompt)[0]``
    that carry the characters ``span`` of ``text``: every token overlapping them, within the kept
    length. A span cut off entirely by ``max_length`` raises :class:`UserError`."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("span records (positive_span, negative_spans) need a fast tokenizer (character offsets); "
                        "this model's is not")
    prefix, suffix = special_tokens(tokenizer)
    offsets = tokenizer([prompt + text], add_special_tokens=False, truncation=False, verbose=False,
                        return_offsets_mapping=True)["offset_mapping"][0]
    start, end = span[0] + len(prompt), span[1] + len(prompt)
    kept = max_length - len(prefix) - len(suffix)
    inside = [i for i, (a, b) in enumerate(offsets[:kept]) if a < end and b > start and b > a]
    if not inside:
        raise UserError(f"a span ({span[0]}-{span[1]}) lies past the first {max_length} tokens of its passage; "
                        "cut the passage so that the span starts within --passage_max_len tokens")
    return len(prefix) + inside[0], len(prefix) + inside[-1] + 1


def check_spans(examples: list[Example], tokenizer, max_length: int, prompt: str = "") -> None:
    """Every ``positive_span`` and ``negative_spans`` within the first ``max_length`` tokens of its
    passage, checked before training starts (a span found past the cut in step 900 would stop a long
    run); raises :class:`UserError` naming the first example that fails."""
    for example in examples:
        pairs = [(example.positive, example.positive_span), *zip(example.negatives, example.negative_spans or ())]
        for text, span in pairs:
            if span:
                try:
                    span_tokens(tokenizer, text, span, max_length, prompt)
                except UserError as err:
                    raise UserError(f"the example with query {example.query[:60]!r}: {err}") from None


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


@dataclass
class ContrastiveCollator:
    """Tokenises rows of :func:`make_dataset` into one contrastive batch (not padded yet).

    A row with several positives contributes one, drawn uniformly by a hash of ``(seed, epoch, query)``:
    one draw per query per epoch, the same in every process and in a resumed run (the trainer sets
    ``epoch`` at each epoch's start). Each row keeps at most ``num_hard_negatives`` hard negatives, in
    listed order (mined lists put the hardest first); a row with fewer uses what it has, so the passages
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
    """

    tokenizer: object
    query_max_len: int
    passage_max_len: int
    num_hard_negatives: int = 1
    query_prompt: str = ""  # instruction before every query (kept when the query is cut)
    passage_prompt: str = ""  # before every passage
    max_positions: int | None = None  # shift passages' position ids within this many positions (None: no shift)
    max_positives: int = 1  # the most positives a query has in the data (max_known_positives)
    seed: int = 0  # with the epoch, picks each query's positive
    epoch: int = 0

    def _draw(self, *parts: str) -> int:
        """A 63-bit number fixed by the seed, the epoch and ``parts``: the same in every process
        and in a resumed run, other in the next epoch."""
        key = "\0".join([str(self.seed), str(self.epoch), *parts]).encode("utf-8")
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    def _tokenize_passages(self, texts: list[str]) -> list[list[int]]:
        return tokenize(self.tokenizer, texts, self.passage_max_len, "right", self.passage_prompt)

    def __call__(self, rows: list[dict]) -> dict:
        positives = []
        for row in rows:
            choices = row.get("positives") or [row["positive"]]
            positives.append(choices[self._draw(row["query"]) % len(choices)])
        negatives = [n for row in rows for n in row["negatives"][: self.num_hard_negatives]]
        passage_ids = self._tokenize_passages(positives + negatives)
        wanted = [row.get("positive_span") for row in rows]
        for row in rows:
            wanted += (row.get("negative_spans") or [None] * len(row["negatives"]))[: self.num_hard_negatives]
        spans = [span_tokens(self.tokenizer, text, span, self.passage_max_len, self.passage_prompt) if span else None
                 for text, span in zip(positives + negatives, wanted)]
        batch = {
            "query_ids": tokenize(self.tokenizer, [row["query"] for row in rows], self.query_max_len, "left",
                                  self.query_prompt),
            "passage_ids": passage_ids,
            # a span joins the identity after a -1, which no token id is
            "passage_text_ids": torch.tensor([sequence_id(ids + ([-1, *span] if span else []))
                                              for ids, span in zip(passage_ids, spans)]),  # (P,)
        }
        if self.max_positives > 1:
            known = torch.full((len(rows), self.max_positives), -1, dtype=torch.long)  # (B, M)
            for index, row in enumerate(rows):
                ids = [sequence_id(x) for x in self._tokenize_passages(row.get("known_positives") or [row["positive"]])]
                known[index, : len(ids)] = torch.tensor(ids)
            batch["query_positive_ids"] = known
        if any(spans):
            batch["passage_pool_spans"] = spans
        if self.max_positions is not None:
            unique, copy_of = unique_sequences(passage_ids)
            # a generator keyed by the epoch and the batch's texts: a resumed run draws the same shifts
            generator = torch.Generator().manual_seed(self._draw(*map(str, batch["passage_text_ids"].tolist())))
            shifts = draw_position_shifts([len(ids) for ids in unique], self.max_positions, generator)
            batch["passage_position_shifts"] = [shifts[i] for i in copy_of]
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


def default_train_data() -> str:
    """The sample training set the project generates into ``data/``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample_train.jsonl")
