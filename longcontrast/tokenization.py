"""Tokenization: the special tokens a tokenizer wraps a text in, texts to token ids cut on either
side (queries keep their end, passages their start), the tokens of a character span, and the
consecutive windows of a long passage (MaxP's pieces, late chunking's spans).

The bottom layer with :mod:`.readers`: it imports nothing from the package but :class:`UserError`.
"""

from __future__ import annotations

from . import UserError


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a single text (BERT: [CLS], [SEP])."""
    full = tokenizer("a")["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(bare)] == bare)
    return full[:start], full[start + len(bare) :]

def tokenize(tokenizer, texts: list[str], max_length: int, truncation_side: str, prompt: str = "") -> list[list[int]]:
    """Token ids with special tokens, at most ``max_length`` each, cut on ``truncation_side``.

    Queries are cut on the left (a dialogue's latest turns are kept), passages on the right; the
    special tokens are kept either way, and so is ``prompt`` (a prefix such as "query: "),
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


def window_spans(tokenizer, token_ids: list[list[int]], window: int, prompt: str = "") -> list[list[tuple[int, int]]]:
    """Per tokenised passage, the ``[start, end)`` ranges of its text tokens that its consecutive
    ``window``-token windows hold: ``[(0, len)]`` for a passage of at most ``window`` tokens (the
    passage is its own window); else pieces of ``window`` tokens less the special tokens and the
    prompt that each window is wrapped in (:func:`split_windows`).

    ``token_ids``: passages as :func:`tokenize` returns them (special tokens and the prompt included).
    """
    prefix, suffix = special_tokens(tokenizer)
    kept = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else 0
    width = window - len(prefix) - len(suffix) - kept
    if width < 1:
        raise UserError(f"--passage_window {window} leaves no room for text")
    spans = []
    for ids in token_ids:
        head, tail = len(prefix) + kept, len(ids) - len(suffix)
        spans.append([(0, len(ids))] if len(ids) <= window else
                     [(start, min(start + width, tail)) for start in range(head, tail, width)])
    return spans

def split_windows(tokenizer, token_ids: list[list[int]], window: int, prompt: str = "") -> tuple[list[list[int]], list[int]]:
    """Consecutive ``window``-token pieces of each tokenised passage, each a text of its own.

    ``token_ids``: passages as :func:`tokenize` returns them (special tokens and the prompt
    included, uncut). A passage of at most ``window`` tokens is one piece, itself; a longer one is
    cut into the pieces of :func:`window_spans`, each wrapped in the special tokens and the
    prompt, so that every piece reads as a passage of its own (MaxP, Dai & Callan 2019).
    Returns the pieces and, for each, the index of its passage (non-decreasing).
    """
    prefix, suffix = special_tokens(tokenizer)
    pieces, owner = [], []
    for passage, (ids, spans) in enumerate(zip(token_ids, window_spans(tokenizer, token_ids, window, prompt))):
        if len(ids) <= window:
            pieces.append(ids)
        else:
            instruction = ids[len(prefix): spans[0][0]]
            pieces.extend(prefix + instruction + ids[start:end] + suffix for start, end in spans)
        owner.extend([passage] * len(spans))
    return pieces, owner
