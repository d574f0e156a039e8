"""Training records as users bring them: the formats (plain, sentence-transformers, ChatRAG
conversations, FlagEmbedding, tevatron; a BEIR folder is read as FlagEmbedding records) and the
examples they become. Files are read by :mod:`.readers`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from . import UserError
from .readers import iter_records, join_title

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordFormat:
    """Where one training-record format keeps its query, positive(s) and hard negatives."""

    name: str
    query: str
    positive: str
    negatives: str
    # teacher scores: (one per positive, one per negative), or one field holding [positive, negatives...]
    scores: tuple[str, ...] = ("positive_scores", "negative_scores")

# Detected per record by its query and positive fields (a BEIR folder is read as flagembedding records).
FORMATS = (
    RecordFormat("conversation", "messages", "positive", "hard_negatives"),  # ChatRAG-style dialogues
    # (anchor, positive, negative) columns, or negative_1..negative_n (mine_hard_negatives' n-tuple); its
    # output_scores column "scores" holds [positive, negatives...]
    RecordFormat("sentence-transformers", "anchor", "positive", "negative", ("scores",)),
    RecordFormat("plain", "query", "positive", "negatives"),
    RecordFormat("flagembedding", "query", "pos", "neg", ("pos_scores", "neg_scores")),  # FlagEmbedding's files (BGE)
    RecordFormat("tevatron", "query", "positive_passages", "negative_passages"),  # lists of {docid, title, text}
    # tevatron's corpus layout: passages named by their ids in a corpus given beside (--train_corpus)
    RecordFormat("tevatron-ids", "query", "positive_document_ids", "negative_document_ids"),
    RecordFormat("tevatron-ids", "query_text", "positive_document_ids", "negative_document_ids"),
)
BY_ID = "tevatron-ids"

@dataclass
class Example:
    """One training example: a query text, its positive passage(s) and its hard negatives."""

    query: str
    positive: str  # the first positive
    negatives: list[str] = field(default_factory=list)
    other_positives: list[str] = field(default_factory=list)  # more positives: one of all is drawn per epoch
    known_positives: list[str] = field(default_factory=list)  # every positive of this query in the data
    # (start, end) characters of the positive that its vector pools (the rest is read as context), or None
    positive_span: tuple[int, int] | None = None
    negative_spans: list[tuple[int, int] | None] | None = None  # the same for each negative, or None
    positive_scores: list[float] | None = None  # a teacher's score of each positive (distillation), or None
    negative_scores: list[float] | None = None  # and of each negative
    dataset: int = 0  # which of the run's datasets (--train_data entries) it comes from
    # a record that names its passages by document id (tevatron's corpus layout): the ids, its texts empty
    positive_ids: list[str] | None = None
    negative_ids: list[str] | None = None

    @property
    def positives(self) -> list[str]:
        return [self.positive, *self.other_positives]

def passage_text(value, what: str, where: str) -> str:
    """A passage given as a string or as a ``{title, text}`` object (tevatron, BEIR): the title and
    the text joined by a space, as BEIR and tevatron join them."""
    if isinstance(value, dict):
        if not isinstance(value.get("text"), str):
            raise UserError(f"{where}: {what} as an object needs a 'text' string, got {sorted(value)}")
        value = join_title(value.get("title"), value["text"])
    return _text(value, what, where)

def format_query(messages: list[dict], num_turns: int = 5) -> str:
    """A conversation as ChatRAG-Bench's retrievers see it: the last ``num_turns`` turns, one line each.

    ``[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]`` becomes
    ``"user: hi\\nagent: hello"`` (the role ``assistant`` is written ``agent``). Training and
    evaluation both call this, so they see the same strings.
    """
    lines = []
    for turn in messages[-num_turns:]:
        role = "agent" if turn["role"] == "assistant" else turn["role"]
        lines.append(f"{role}: {turn['content'].strip()}")
    return "\n".join(lines).strip()

def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: {what} must be a non-empty string, got {value!r:.80}")
    return value

def _text_list(value, what: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{where}: {what} must be a string or a list of strings, got {type(value).__name__}")
    return [passage_text(v, what, where) for v in value]

def record_format(record, where: str) -> RecordFormat:
    """The format of one record, from its query and positive fields; ambiguous or incomplete
    records raise :class:`UserError` naming the fields."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    # A missing field, None (a Parquet column of other rows) and, for negatives, [] count as absent.
    queries = sorted({f.query for f in FORMATS if record.get(f.query) is not None})
    if len(queries) > 1:
        raise UserError(f"{where}: ambiguous record: it has both {queries[0]!r} and {queries[1]!r}")
    if not queries:
        raise UserError(f"{where}: no query: expected a 'messages', 'anchor' or 'query' field")
    candidates = [f for f in FORMATS if f.query == queries[0]]
    found = [f for f in candidates if record.get(f.positive) is not None]
    if len(found) > 1:
        raise UserError(f"{where}: ambiguous record: it has both {found[0].positive!r} and {found[1].positive!r}")
    if not found:
        expected = " or ".join(repr(f.positive) for f in candidates)
        raise UserError(f"{where}: no {expected} field (the positive)")
    chosen = found[0]
    stray = [f.negatives for f in FORMATS if f.negatives != chosen.negatives and record.get(f.negatives) not in (None, [], "")]
    if stray:  # e.g. 'negatives' next to 'messages': the user's negatives would be silently ignored
        raise UserError(f"{where}: a {chosen.name} record (with {chosen.query!r} and {chosen.positive!r}) takes its "
                        f"negatives as {chosen.negatives!r}, not {stray[0]!r}")
    return chosen

def parse_record(record, where: str, num_turns: int = 5, *, require_scores: bool = False,
                 corpus: bool = False) -> Example:
    """An :class:`Example` from one record in any of the :data:`FORMATS`.

    conversation: ``messages`` (role/content turns), ``positive``, ``hard_negatives``;
    sentence-transformers: ``anchor``, ``positive``, ``negative`` (a string or a list);
    plain: ``query``, ``positive``, ``negatives``;
    flagembedding: ``query``, ``pos`` (list), ``neg`` (list), optional ``prompt`` (put before the query);
    tevatron: ``query``, ``positive_passages``, ``negative_passages`` (lists of ``{docid, title, text}``).
    Teacher scores, optional (distillation): ``pos_scores`` and ``neg_scores`` (flagembedding),
    ``scores`` = [positive, negatives...] (sentence-transformers), ``positive_scores`` and
    ``negative_scores`` (the others).
    tevatron-ids: ``query`` or ``query_text``, ``positive_document_ids``, ``negative_document_ids``
    (ids of a corpus: the example holds them, its texts empty), read only where ``corpus`` says a
    corpus is given to look them up.
    ``where`` names the record in error messages (``file:line``); ``require_scores``: a record
    without teacher scores is an error (distillation).
    """
    form = record_format(record, where)
    if form.name == BY_ID:
        return _by_id(record, form, where, corpus=corpus, require_scores=require_scores)
    if form.query == "messages":
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list of turns")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
                raise UserError(f"{where}: each turn in 'messages' needs a 'role' and a 'content'")
            _text(turn.get("content"), "each turn's 'content'", where)
        query = format_query(messages, num_turns)
    else:
        query = _text(record[form.query], f"{form.query!r}", where)
        if form.name == "flagembedding" and record.get("prompt"):
            query = _text(record["prompt"], "'prompt'", where) + query
    positives = _text_list(record[form.positive], f"{form.positive!r}", where)
    if not positives:
        raise UserError(f"{where}: {form.positive!r} is empty: a record needs a positive")
    negatives = _text_list(record.get(form.negatives), f"'{form.negatives}'", where)
    if form.name == "sentence-transformers":
        numbered = sorted((int(k.rsplit("_", 1)[1]), k) for k in record if k.startswith("negative_") and k[9:].isdigit())
        negatives += [passage_text(record[k], repr(k), where) for _, k in numbered if record[k] is not None]
    positive_scores, negative_scores = _teacher_scores(record, form, len(positives), len(negatives), where)
    _check_scores(positive_scores, where, require_scores)
    if record.get("positive_span") is not None and len(positives) != 1:
        raise UserError(f"{where}: 'positive_span' needs exactly one positive, got {len(positives)}")
    span = _span(record.get("positive_span"), positives[0], "'positive_span'", where)
    negative_spans = record.get("negative_spans")
    if negative_spans is not None:
        if not isinstance(negative_spans, list) or len(negative_spans) != len(negatives):
            raise UserError(f"{where}: 'negative_spans' must be a list with one [start, end] or null per negative "
                            f"({len(negatives)})")
        negative_spans = [_span(v, n, f"'negative_spans'[{i}]", where) for i, (v, n) in enumerate(zip(negative_spans, negatives))]
    return Example(query, positives[0], negatives, positives[1:], positive_span=span, negative_spans=negative_spans,
                   positive_scores=positive_scores, negative_scores=negative_scores)


def _check_scores(positive_scores, where: str, required: bool) -> None:
    if required and positive_scores is None:
        raise UserError(f"{where}: no teacher scores, which --distill_weight needs in every record "
                        "(data/score_with_teacher.py writes them)")


def _by_id(record: dict, form: RecordFormat, where: str, *, corpus: bool, require_scores: bool) -> Example:
    if not corpus:
        raise UserError(f"{where}: this record names its passages by document id ({form.positive!r}); give the "
                        "corpus they come from (--train_corpus, or 'corpus' in a mixture file); only training reads it")
    ids = []
    for name in (form.positive, form.negatives):
        value = record.get(name) or []
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise UserError(f"{where}: {name!r} must be a list of document ids, got {value!r:.80}")
        ids.append([str(v) for v in value])
    if not ids[0]:
        raise UserError(f"{where}: {form.positive!r} is empty: a record needs a positive")
    if record.get("positive_span") is not None or record.get("negative_spans") is not None:
        raise UserError(f"{where}: spans are read with passage texts, not with document ids")
    positive_scores, negative_scores = _teacher_scores(record, form, len(ids[0]), len(ids[1]), where)
    _check_scores(positive_scores, where, require_scores)
    return Example(_text(record[form.query], f"{form.query!r}", where), "", positive_ids=ids[0], negative_ids=ids[1],
                   positive_scores=positive_scores, negative_scores=negative_scores)


def _teacher_scores(record: dict, form: RecordFormat, num_positives: int, num_negatives: int,
                    where: str) -> tuple[list[float] | None, list[float] | None]:
    """A record's teacher scores (one per positive, one per negative, finite numbers), or (None, None)."""
    given = [name for name in form.scores if record.get(name) is not None]
    if not given:
        return None, None
    expected = [num_positives + num_negatives] if len(form.scores) == 1 else [num_positives, num_negatives]
    values = []
    for name, count in zip(form.scores, expected):
        value = record.get(name)
        if value is None and count:
            raise UserError(f"{where}: {given[0]!r} without {name!r}: a {form.name} record with teacher scores needs "
                            f"{count} in {name!r}")
        value = [value] if isinstance(value, (int, float)) else ([] if value is None else value)
        if (not isinstance(value, list) or len(value) != count
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise UserError(f"{where}: {name!r} must be a list of {count} numbers (one per "
                            f"{'positive and negative' if len(form.scores) == 1 else name.split('_')[0]}), "
                            f"got {value!r:.80}")
        if not all(math.isfinite(v) for v in value):
            raise UserError(f"{where}: {name!r} holds a non-finite score: {value!r:.80}")
        values.append([float(v) for v in value])
    if len(values) == 1:  # one field: [positives..., negatives...]
        return values[0][:num_positives], values[0][num_positives:]
    return values[0], values[1]

def _span(value, text: str, what: str, where: str) -> tuple[int, int] | None:
    """An optional span: ``[start, end]`` characters of ``text``. The text is then read whole as
    context and its vector pools the span's tokens only (late chunking in training: the evidence
    read inside its page)."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                         for v in value)):
        raise UserError(f"{where}: {what} must be [start, end] character offsets, got {value!r:.80}")
    start, end = value
    if not 0 <= start < end <= len(text) or not text[start:end].strip():
        raise UserError(f"{where}: {what} {list(value)} is not a non-blank part of its text ({len(text)} characters)")
    return start, end

def load_examples(paths: list[str], num_turns: int = 5, *, require_scores: bool = False) -> list[Example]:
    """Every example of the given files and folders (:func:`.readers.iter_records`), in order, each
    knowing the index of its path (``Example.dataset``).

    A folder is a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``), a
    ``datasets.save_to_disk`` folder, or holds data files, read in name order. Any problem (a
    missing file, a malformed or truncated line, bytes that are not UTF-8, a record without a query
    or positive or with an empty text, no examples at all) raises :class:`UserError` naming the
    file and line. Records of all :data:`FORMATS` may be mixed. Exact duplicates (same query,
    positives and negatives) are dropped with a warning, so that a file concatenated twice does not
    weigh every example double. Every example learns all positives of its query anywhere in the
    data (``known_positives``): none of them is ever its negative. ``require_scores``: a record
    without teacher scores is an error too (distillation).
    """
    if not paths:
        raise UserError("no training data given (--train_data)")
    examples, seen, duplicates = [], {}, []
    for dataset, name in enumerate(paths):
        count = len(examples)
        for where, record in iter_records(name):
            example = parse_record(record, where, num_turns, require_scores=require_scores)
            example.dataset = dataset
            key = (example.query, tuple(example.positives), tuple(example.negatives), example.positive_span,
                   tuple(example.negative_spans or ()))
            if key in seen:
                duplicates.append((where, seen[key]))
                continue
            seen[key] = where
            examples.append(example)
        logger.info("read %d examples from %s", len(examples) - count, name)
    if duplicates:
        where, first = duplicates[0]
        logger.warning("dropped %d exact duplicate examples (the first: %s repeats %s)", len(duplicates), where, first)
    if not examples:
        raise UserError(f"the training data is empty: {', '.join(paths)}")
    known: dict[str, list[str]] = {}
    for example in examples:
        mine = known.setdefault(example.query, [])
        mine.extend(p for p in example.positives if p not in mine)
    for example in examples:
        example.known_positives = known[example.query]
    return examples

def normalised(text: str) -> str:
    """The key under which two texts count as identical: whitespace runs collapsed, ends stripped."""
    return " ".join(text.split())
