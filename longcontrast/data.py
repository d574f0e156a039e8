"""Training data: reading the three record formats, query formatting, tokenising and padding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import UserError
from .distributed import sequence_id
from .positions import draw_position_shifts, position_ids

logger = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RecordFormat:
    """Where one training-record format keeps its query, positive(s) and hard negatives."""

    name: str
    query: str
    positive: str
    negatives: str


# Detected per record by its query and positive fields (a BEIR folder is read as flagembedding records).
FORMATS = (
    RecordFormat("conversation", "messages", "positive", "hard_negatives"),  # ChatRAG-style dialogues
    RecordFormat("synthetic", "anchor", "positive", "negative"),  # sentence-transformers (anchor, positive, negative)
    RecordFormat("plain", "query", "positive", "negatives"),
    RecordFormat("flagembedding", "query", "pos", "neg"),  # FlagEmbedding's fine-tuning files (BGE)
    RecordFormat("tevatron", "query", "positive_passages", "negative_passages"),  # lists of {docid, title, text}
)


@dataclass
class Example:
    """One training example: a query text, its positive passage(s) and its hard negatives."""

    query: str
    positive: str  # the first positive
    negatives: list[str] = field(default_factory=list)
    other_positives: list[str] = field(default_factory=list)  # more positives: one of all is drawn per epoch
    known_positives: list[str] = field(default_factory=list)  # every positive of this query in the data

    @property
    def positives(self) -> list[str]:
        return [self.positive, *self.other_positives]


def join_title(title, text) -> str:
    """BEIR's and tevatron's passage: ``title + " " + text``, stripped (the text alone without a title)."""
    return f"{title or ''} {text or ''}".strip()


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


def parse_record(record, where: str, num_turns: int = 5) -> Example:
    """An :class:`Example` from one record in any of the :data:`FORMATS`.

    conversation: ``messages`` (role/content turns), ``positive``, ``hard_negatives``;
    synthetic: ``anchor``, ``positive``, ``negative`` (a string or a list);
    plain: ``query``, ``positive``, ``negatives``;
    flagembedding: ``query``, ``pos`` (list), ``neg`` (list), optional ``prompt`` (put before the query);
    tevatron: ``query``, ``positive_passages``, ``negative_passages`` (lists of ``{docid, title, text}``).
    ``where`` names the record in error messages (``file:line``).
    """
    form = record_format(record, where)
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
    return Example(query, positives[0], negatives, positives[1:])


def _iter_file_records(path: Path):
    """(where, record) pairs of one data file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as handle:
                for line_number, raw in enumerate(handle, start=1):
                    where = f"{path}:{line_number}"
                    try:
                        line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                    except UnicodeDecodeError as err:
                        raise UserError(f"{where}: not valid UTF-8 text ({err.reason} at byte {err.start} of the line)") from err
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        hint = "" if raw.endswith(b"\n") else (
                            "; it is the last line and has no newline: the file looks truncated (was it fully written?)")
                        raise UserError(f"{where}: malformed JSON line ({err.msg}){hint}") from err
                    yield where, record
        elif suffix == ".json":
            with open(path, encoding="utf-8-sig") as handle:
                try:
                    records = json.load(handle)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from err
            if isinstance(records, dict) and isinstance(records.get("data"), list):
                records = records["data"]
            if not isinstance(records, list):
                raise UserError(f"{path}: a .json data file must hold a list of records")
            for index, record in enumerate(records):
                yield f"{path}: record {index}", record
        elif suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except pyarrow.ArrowException as err:
                raise UserError(f"{path}: not a readable Parquet file ({err})") from err
            for index, record in enumerate(rows):
                yield f"{path}: row {index}", record
        else:
            raise UserError(f"{path}: unsupported data file type; use {', '.join(DATA_SUFFIXES)}")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from err


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()


def _iter_folder_records(folder: Path):
    if _is_saved_dataset(folder):
        import datasets

        dataset = datasets.load_from_disk(str(folder))
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise UserError(f"{folder}: a saved DatasetDict needs a 'train' split, found {list(dataset)}")
            dataset = dataset["train"]
        for index, record in enumerate(dataset):
            yield f"{folder}: row {index}", record
        return
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no data files ({', '.join(DATA_SUFFIXES)}) in this folder")
    for path in files:
        yield from _iter_file_records(path)


def is_beir_folder(folder: Path) -> bool:
    return all((folder / name).exists() for name in ("corpus.jsonl", "queries.jsonl", "qrels"))


def _iter_beir_records(folder: Path):
    """A BEIR folder's training split (``qrels/train.tsv``) as flagembedding records: one per query,
    every relevant document (score > 0) a positive, no negatives (mine them:
    ``data/mine_hard_negatives.py --input FOLDER``)."""
    from .beir import load_beir

    data = load_beir(str(folder), "train")
    text_of = dict(zip(data.doc_ids, data.passages))
    for query_id, query in zip(data.query_ids, data.queries):
        positives = [text_of[doc] for doc, grade in data.qrels[query_id].items() if grade > 0]
        yield f"{folder}: query {query_id}", {"query": query, "pos": positives, "neg": []}


def iter_records(name: str):
    """(where, record) pairs of a data file or folder (see :func:`load_examples`); ``where`` names
    the record in messages (``file:line``)."""
    path = Path(name)
    if not path.exists():
        raise UserError(f"data not found: {name}")
    if path.is_dir():
        return _iter_beir_records(path) if is_beir_folder(path) else _iter_folder_records(path)
    return _iter_file_records(path)


def load_examples(paths: list[str], num_turns: int = 5) -> list[Example]:
    """Every example of the given files and folders, in order.

    A folder is a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/train.tsv``), a
    ``datasets.save_to_disk`` folder, or holds data files, read in name order. Any problem (a
    missing file, a malformed or truncated line, bytes that are not UTF-8, a record without a query
    or positive or with an empty text, no examples at all) raises :class:`UserError` naming the
    file and line. Records of all :data:`FORMATS` may be mixed. Exact duplicates (same query,
    positives and negatives) are dropped with a warning, so that a file concatenated twice does not
    weigh every example double. Every example learns all positives of its query anywhere in the
    data (``known_positives``): none of them is ever its negative.
    """
    if not paths:
        raise UserError("no training data given (--train_data)")
    examples, seen, duplicates = [], {}, []
    for name in paths:
        count = len(examples)
        for where, record in iter_records(name):
            example = parse_record(record, where, num_turns)
            key = (example.query, tuple(example.positives), tuple(example.negatives))
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


def make_dataset(examples: list[Example]):
    """The examples as a ``datasets.Dataset`` with columns query, positive (the first),
    positives (all of the example's), known_positives (all of its query's), negatives and length.

    ``length`` (characters of the query and the first positive) is what the Trainer's
    ``--train_sampling_strategy group_by_length`` groups by.
    """
    import datasets

    return datasets.Dataset.from_dict({
        "query": [e.query for e in examples],
        "positive": [e.positive for e in examples],
        "positives": [e.positives for e in examples],
        "known_positives": [e.known_positives or e.positives for e in examples],
        "negatives": [e.negatives for e in examples],
        "length": [len(e.query) + len(e.positive) for e in examples],
    })


def max_known_positives(examples: list[Example]) -> int:
    """The most positives any query has: the width of the collator's ``query_positive_ids``."""
    return max(len(e.known_positives or e.positives) for e in examples)


def read_json(path: str | Path):
    """A JSON file's content; a missing, unreadable or malformed file raises :class:`UserError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise UserError(f"{path}: not found") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: malformed JSON at line {err.lineno} ({err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})") from err


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


def pad(sequences: list[list[int]], pad_token_id: int, device=None, shifts: list[int] | None = None
        ) -> dict[str, torch.Tensor]:
    """Right-pad token id lists to their own longest: ``input_ids`` and ``attention_mask``, (N, L);
    with ``shifts`` (one per text) also ``position_ids`` (:func:`.positions.position_ids`)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)  # (N, L)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (N, L)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if shifts is not None:
        batch["position_ids"] = position_ids([len(s) for s in sequences], length, shifts).to(device)  # (N, L)
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
    the batch's texts (resumable like the positive's draw).
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
        batch = {
            "query_ids": tokenize(self.tokenizer, [row["query"] for row in rows], self.query_max_len, "left",
                                  self.query_prompt),
            "passage_ids": passage_ids,
            "passage_text_ids": torch.tensor([sequence_id(ids) for ids in passage_ids]),  # (P,)
        }
        if self.max_positives > 1:
            known = torch.full((len(rows), self.max_positives), -1, dtype=torch.long)  # (B, M)
            for index, row in enumerate(rows):
                ids = [sequence_id(x) for x in self._tokenize_passages(row.get("known_positives") or [row["positive"]])]
                known[index, : len(ids)] = torch.tensor(ids)
            batch["query_positive_ids"] = known
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


def unique_sequences(sequences: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct token id lists (first occurrences, in input order) and, for each input, the
    index of its distinct copy: ``unique[copy_of[i]] == sequences[i]``."""
    index: dict[tuple[int, ...], int] = {}
    copy_of = [index.setdefault(tuple(ids), len(index)) for ids in sequences]
    return [list(ids) for ids in index], copy_of


def length_sorted_mini_batches(
    sequences: list[list[int]], max_texts: int | None, max_tokens: int | None, pad_token_id: int, device=None,
    shifts: list[int] | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """The :func:`length_sorted_groups` as mini-batches, each padded to its own longest (with each
    text's position shift, if given).

    Returns the mini-batches and ``order``: ``order[k]`` is the input index of the k-th text fed.
    """
    groups = length_sorted_groups(sequences, max_texts, max_tokens)
    order = [index for group in groups for index in group]
    batches = [pad([sequences[i] for i in group], pad_token_id, device, None if shifts is None else [shifts[i] for i in group])
               for group in groups]
    return batches, order


def default_train_data() -> str:
    """The sample training set the project generates into ``data/``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample_train.jsonl")
