import json

import pytest

from conftest import conversation_records, write_jsonl
from longcontrast import UserError
from longcontrast.distributed import sequence_id
from longcontrast.collator import ContrastiveCollator, make_dataset
from longcontrast.batching import length_sorted_mini_batches, unique_sequences
from longcontrast.tokenization import tokenize
from longcontrast.records import format_query, load_examples, parse_record

MESSAGES = [
    {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
    {"role": "user", "content": " q4 "},
]


def test_format_query_keeps_last_turns_as_user_agent_lines():
    assert format_query(MESSAGES, 3) == "user: q3\nagent: a3\nuser: q4"
    assert format_query(MESSAGES[:1], 5) == "user: q1"
    assert format_query(MESSAGES).splitlines()[0] == "user: q2"


@pytest.mark.parametrize("record, expected", [
    ({"messages": MESSAGES[-1:], "positive": "p", "hard_negatives": ["n1", "n2"]}, ("user: q4", "p", ["n1", "n2"])),
    ({"anchor": "a", "positive": "p", "negative": "n"}, ("a", "p", ["n"])),
    ({"anchor": "a", "positive": "p", "negative": ["n", "m"]}, ("a", "p", ["n", "m"])),
    ({"anchor": "a", "positive": "p"}, ("a", "p", [])),
    ({"query": "q", "positive": "p", "negatives": ["n"]}, ("q", "p", ["n"])),
])
def test_three_formats(record, expected):
    example = parse_record(record, "x:1")
    assert (example.query, example.positive, example.negatives) == expected


@pytest.mark.parametrize("record, message", [
    ({"positive": "p"}, "no query"),
    ({"query": "q"}, "no 'positive'"),
    ({"query": "", "positive": "p"}, "'query' must be a non-empty string"),
    ({"query": "q", "positive": "p", "negatives": 3}, "'negatives' must be a string or a list"),
    ({"messages": [], "positive": "p"}, "'messages' must be a non-empty list"),
    ([1, 2], "expected a JSON object"),
    ({"query": "q", "anchor": "a", "positive": "p"}, "ambiguous record: it has both 'anchor' and 'query'"),
    ({"messages": MESSAGES, "positive": "p", "negatives": ["n"]},
     r"a conversation record \(with 'messages' and 'positive'\) takes its negatives as 'hard_negatives', not 'negatives'"),
    ({"anchor": "a", "positive": "p", "negatives": ["n"]}, "takes its negatives as 'negative', not 'negatives'"),
    ({"query": "q", "positive": "page", "positive_span": [2]}, r"'positive_span' must be \[start, end\]"),
    ({"query": "q", "positive": "page", "positive_span": [2, 9]}, "not a non-blank part of its text"),
    ({"query": "q", "positive": "p", "negatives": ["n"], "negative_spans": [[0, 1], None]}, "one \\[start, end\\] or null"),
    ({"query": "q", "positive": "p", "negatives": ["n"], "negative_spans": [[0, 3]]}, r"'negative_spans'\[0\] \[0, 3\]"),
    ({"query": "q", "positive": "a  b", "positive_span": [1, 3]}, "not a non-blank part"),
    ({"query": "q", "pos": ["p", "r"], "positive_span": [0, 1]}, "needs exactly one positive"),
])
def test_bad_records_name_the_place(record, message):
    with pytest.raises(UserError, match=message) as err:
        parse_record(record, "f.jsonl:7")
    assert str(err.value).startswith("f.jsonl:7:")


def test_jsonl_json_parquet_and_folders_read_the_same(tmp_path):
    import datasets

    records = conversation_records(4) + [{"query": "q", "positive": "p", "negatives": ["n"]}]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "b.json").write_text(json.dumps(records))
    rows = [{"anchor": f"q{i}", "positive": "p", "negative": ["n"]} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reference = load_examples([jsonl])
    assert load_examples([str(tmp_path / "b.json")]) == reference
    assert len(load_examples([str(tmp_path / "c.parquet")])) == 5
    saved = load_examples([str(tmp_path / "saved")])
    assert len(saved) == 5 and saved[0].negatives == ["n"]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", records[:2])
    write_jsonl(folder / "2.jsonl", records[2:])
    assert load_examples([str(folder)]) == reference


def test_exact_duplicates_are_dropped_with_a_warning(tmp_path, caplog):
    records = conversation_records(4)
    jsonl = write_jsonl(tmp_path / "a.jsonl", records + records[1:2])
    copy = write_jsonl(tmp_path / "copy.jsonl", records)
    with caplog.at_level("WARNING"):
        assert load_examples([jsonl, copy]) == load_examples([jsonl])
    assert "dropped 5 exact duplicate examples" in caplog.text and "a.jsonl:5 repeats" in caplog.text
    other_negative = dict(records[0], hard_negatives=["something else"])  # not a duplicate
    assert len(load_examples([write_jsonl(tmp_path / "b.jsonl", records + [other_negative])])) == 5


def test_mixed_formats_in_one_file(tmp_path):
    import datasets

    records = [conversation_records(1)[0], {"anchor": "a", "positive": "p", "negative": "n"},
               {"query": "q", "positive": "p2", "negatives": []}]
    examples = load_examples([write_jsonl(tmp_path / "mixed.jsonl", records)])
    assert [e.query for e in examples][1:] == ["a", "q"] and examples[0].query.startswith("user: ")
    # In a table every row has every column; the other formats' fields are None (or empty) there.
    rows = [{"anchor": "a", "query": None, "positive": "p", "negative": ["n"], "negatives": []},
            {"anchor": None, "query": "q", "positive": "p2", "negative": None, "negatives": ["m"]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mixed.parquet"))
    examples = load_examples([str(tmp_path / "mixed.parquet")])
    assert [(e.query, e.negatives) for e in examples] == [("a", ["n"]), ("q", ["m"])]


def test_truncated_last_line_is_named(tmp_path):
    good = json.dumps(conversation_records(1)[0])
    (tmp_path / "cut.jsonl").write_text(good + "\n" + good[:40])
    with pytest.raises(UserError, match=r"cut.jsonl:2: malformed JSON line .*looks truncated"):
        load_examples([str(tmp_path / "cut.jsonl")])
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n")  # a byte-order mark is fine
    assert len(load_examples([str(tmp_path / "bom.jsonl")])) == 1


def test_turns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", conversation_records(1))
    assert load_examples([path], num_turns=1)[0].query == "user: what does it cost 0?"


def test_prompts_are_kept_when_texts_are_cut(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "what does the permit cost"
    whole = tokenize(tokenizer, [text], 64, "left", prompt="query: ")[0]
    assert whole == tokenizer("query: " + text)["input_ids"]  # as sentence-transformers tokenizes a prompt
    prompt_ids = tokenizer("query: ", add_special_tokens=False)["input_ids"]
    for side in ("left", "right"):
        cut = tokenize(tokenizer, [text], len(prompt_ids) + 5, side, prompt="query: ")[0]
        assert len(cut) == len(prompt_ids) + 5 and cut[1 : 1 + len(prompt_ids)] == prompt_ids
    assert tokenize(tokenizer, [text], len(prompt_ids) + 5, "left", prompt="query: ")[0][-4:-1] == whole[-4:-1]
    with pytest.raises(UserError, match="after the prompt"):
        tokenize(tokenizer, [text], len(prompt_ids) + 2, "left", prompt="query: ")
    rows = [{"query": text, "positive": "the fee", "negatives": ["an office"]}]
    batch = ContrastiveCollator(tokenizer, 64, 64, 1, "query: ", "passage: ")(rows)
    assert batch["query_ids"][0] == whole
    assert batch["passage_ids"] == [tokenizer("passage: the fee")["input_ids"], tokenizer("passage: an office")["input_ids"]]


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_examples([str(tmp_path / "nope.jsonl")])


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(conversation_records(1)[0]) + "\n{not json\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        load_examples([str(path)])


def test_empty_data_set(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty"):
        load_examples([str(tmp_path / "empty.jsonl")])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="empty"):
        load_examples([str(tmp_path / "empty.json")])


def test_non_utf8_and_unknown_type(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "caf\xe9", "positive": "p"}\n')
    with pytest.raises(UserError, match="latin.jsonl:2: not valid UTF-8"):
        load_examples([str(tmp_path / "latin.jsonl")])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="broken.parquet: not a readable Parquet file"):
        load_examples([str(tmp_path / "broken.parquet")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        load_examples([str(tmp_path / "data.csv")])
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no data files"):
        load_examples([str(tmp_path / "nothing")])


def test_num_hard_negatives_takes_the_first(tiny_model_dir):
    from transformers import AutoTokenizer

    from longcontrast.records import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = list(make_dataset([Example("q", "p", ["n1", "n2", "n3"]), Example("q", "p", [])]))
    two = ContrastiveCollator(tokenizer, 16, 16, num_hard_negatives=2)(rows)
    assert len(two["passage_ids"]) == 2 + 2  # two positives, the first two negatives of row 0
    assert two["passage_ids"][2] == tokenize(tokenizer, ["n1"], 16, "right")[0]
    assert len(ContrastiveCollator(tokenizer, 16, 16, num_hard_negatives=0)(rows)["passage_ids"]) == 2


def pool_collator(tokenizer, sampling, epoch=0, seed=0):
    return ContrastiveCollator(tokenizer, 16, 16, num_hard_negatives=3, seed=seed, epoch=epoch,
                               negative_sampling=sampling)


def test_rotate_uses_every_negative_once_before_reusing_any(tiny_model_dir):
    """A pool of 7 negatives, 3 a step: epochs 0, 1, 2 take 0-2, 3-5, 6 0 1; the teacher's score
    of each candidate follows its negative."""
    from transformers import AutoTokenizer

    from longcontrast.records import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pool = [f"n{i}" for i in range(7)]
    example = Example("q", "p", pool, positive_scores=[9.0], negative_scores=[float(i) for i in range(7)])
    row = list(make_dataset([example], teacher_scores=True))[0]
    used = [pool_collator(tokenizer, "rotate", epoch).chosen_negatives(row) for epoch in range(4)]
    assert used == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4]]
    assert sorted(sum(used[:2], []) + used[2][:1]) == list(range(7))  # each once before any reuse
    batch = pool_collator(tokenizer, "rotate", 1)([row])
    assert batch["passage_ids"][1:] == tokenize(tokenizer, ["n3", "n4", "n5"], 16, "right")
    assert batch["teacher_scores"].tolist() == [[9.0, 3.0, 4.0, 5.0]]
    assert pool_collator(tokenizer, "first", 3).chosen_negatives(row) == [0, 1, 2]


def test_random_draws_depend_on_seed_epoch_and_record_only(tiny_model_dir):
    """Two collators with the same seed and epoch (two processes, or a resumed run) draw the same
    negatives; another epoch or seed draws others; a pool no larger than the step's share is used whole."""
    from transformers import AutoTokenizer

    from longcontrast.records import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = list(make_dataset([Example(f"q{i}", f"p{i}", [f"n{j}" for j in range(30)]) for i in range(5)]
                             + [Example("short", "p", ["a", "b"])]))
    draws = lambda **kw: [pool_collator(tokenizer, "random", **kw).chosen_negatives(r) for r in rows]  # noqa: E731
    first = draws(epoch=2, seed=7)
    assert first == draws(epoch=2, seed=7)
    assert all(len(set(d)) == len(d) for d in first) and first[-1] == [0, 1]
    assert first != draws(epoch=3, seed=7) and first != draws(epoch=2, seed=8)
    assert len({tuple(d) for d in first[:5]}) == 5  # each record its own draw


def test_truncation_sides_keep_special_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "user: a\nagent: b\nuser: c"
    full = tokenize(tokenizer, [text], 100, "right")[0]
    left = tokenize(tokenizer, [text], 5, "left")[0]
    right = tokenize(tokenizer, [text], 5, "right")[0]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert full[0] == cls and full[-1] == sep
    assert left == [cls] + full[-4:-1] + [sep]  # the latest turn survives
    assert right == full[:4] + [sep]


def test_collator_layout_and_duplicate_ids(tiny_model_dir):
    from transformers import AutoTokenizer

    from longcontrast.records import Example

    collate = ContrastiveCollator(AutoTokenizer.from_pretrained(tiny_model_dir), 16, 16)
    batch = collate(list(make_dataset(
        [Example("q0", "same", ["n0"]), Example("q1", "same", []), Example("q2", "other", ["same"])])))
    assert len(batch["query_ids"]) == 3 and len(batch["passage_ids"]) == 5
    # positives first in query order, then the hard negatives: same, same, other, n0, same
    same, other, n0 = (sequence_id(ids) for ids in tokenize(collate.tokenizer, ["same", "other", "n0"], 16, "right"))
    assert batch["passage_text_ids"].tolist() == [same, same, other, n0, same]
    assert len({same, other, n0}) == 3
    # one identity: the token sequence; an uncased tokenizer reads "SAME" as "same"
    upper = collate(list(make_dataset([Example("q0", "SAME", []), Example("q1", "same", [])])))
    assert upper["passage_text_ids"].tolist() == [same, same]


def test_positive_span_pools_the_tokens_of_its_characters(tiny_model_dir, tmp_path):
    """A record's positive_span (characters of its positive) and negative_spans become the token ranges
    whose states their vectors pool; a span is part of the passage's identity, and the page pooled
    whole stays masked for a query that knows it as a positive."""
    from transformers import AutoTokenizer

    page = "the permit fee is 12. the office is open 3 days. bring proof of address."
    start = page.index("the office")
    end = page.index(" bring")
    path = write_jsonl(tmp_path / "spans.jsonl", [
        {"query": "when is the office open", "positive": page, "positive_span": [start, end], "negatives": ["the library"]},
        {"query": "when is the office open", "positive": page, "negatives": [page], "negative_spans": [[0, 21]]},
    ])
    examples = load_examples([path])
    assert [e.positive_span for e in examples] == [(start, end), None]
    assert [e.negative_spans for e in examples] == [None, [(0, 21)]]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    collate = ContrastiveCollator(tokenizer, 16, 64, max_positives=2)
    batch = collate(list(make_dataset(examples)))
    spans = batch["passage_pool_spans"]
    assert spans[1:3] == [None, None]
    ids = batch["passage_ids"][0]
    assert tokenizer.decode(ids[spans[0][0] : spans[0][1]]) == "the office is open 3 days."
    assert tokenizer.decode(batch["passage_ids"][3][spans[3][0] : spans[3][1]]) == "the permit fee is 12."
    # the span is part of the identity; the page pooled whole stays masked as a known positive
    assert batch["passage_text_ids"][0] != batch["passage_text_ids"][1]
    assert batch["passage_text_ids"][1] in batch["query_positive_ids"][0]
    # cut where the span begins after the kept tokens: one error line, not a silent empty vector
    with pytest.raises(UserError, match="lies past the first 8 tokens"):
        ContrastiveCollator(tokenizer, 16, 8)(list(make_dataset(examples)))
    # no span in the data: no column, no key
    from longcontrast.records import Example

    assert "passage_pool_spans" not in collate(list(make_dataset([Example("q", page, ["n"])])))


def test_unique_sequences_keeps_equal_ids_with_other_tags_apart():
    unique, copy_of = unique_sequences([[1, 2], [1, 2], [1, 2], [3]], [None, (0, 1), None, None])
    assert unique == [[1, 2], [1, 2], [3]] and copy_of == [0, 1, 0, 2]


def test_mini_batches_are_length_sorted_and_padded_to_their_own_longest():
    sequences = [[1] * 3, [1] * 9, [1] * 2, [1] * 4, [1] * 8]
    batches, order = length_sorted_mini_batches(sequences, 2, None, 0)
    assert order == [1, 4, 3, 0, 2]
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 9), (2, 4), (1, 2)]
    assert batches[1]["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    whole, _ = length_sorted_mini_batches(sequences, None, None, 0)
    assert len(whole) == 1


def test_unique_sequences_maps_every_copy_to_one_distinct_sequence():
    sequences = [[1, 2], [3], [1, 2], [1, 2, 3], [3]]
    unique, copy_of = unique_sequences(sequences)
    assert unique == [[1, 2], [3], [1, 2, 3]]
    assert copy_of == [0, 1, 0, 2, 1]
    assert [unique[k] for k in copy_of] == sequences


def test_token_budget_bounds_padded_tokens():
    sequences = [[1] * n for n in (30, 2, 9, 10, 3, 3, 4, 12)]
    batches, order = length_sorted_mini_batches(sequences, 100, 24, 0)
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    # longest first: 30 | 12 10 | 9 4 | 3 3 2 -- the 30-token text exceeds the budget and goes alone
    assert shapes == [(1, 30), (2, 12), (2, 9), (3, 3)]
    assert order == [0, 7, 3, 2, 6, 4, 5, 1]
    capped, _ = length_sorted_mini_batches(sequences, 2, 24, 0)
    assert [tuple(b["input_ids"].shape) for b in capped] == [(1, 30), (2, 12), (2, 9), (2, 3), (1, 2)]


def test_real_doc2dial_triples_load(caplog):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "doc2dial" / "train_triples.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data/doc2dial is not here")
    examples = load_examples([str(path)])
    assert len(examples) == 679  # 682 lines, 3 of them exact repeats of earlier ones
    assert "dropped 3 exact duplicate examples" in caplog.text
    assert all(e.query.startswith(("user: ", "agent: ")) and len(e.negatives) == 7 for e in examples)


def test_texts_far_longer_than_the_limits_are_truncated(tiny_model_dir):
    from transformers import AutoTokenizer

    from longcontrast.records import Example

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    huge = " ".join(["permit office"] * 20000)  # 40000 words
    batch = ContrastiveCollator(tokenizer, 16, 24)(list(make_dataset([Example(huge, huge, [huge])])))
    assert [len(x) for x in batch["query_ids"]] == [16]
    assert [len(x) for x in batch["passage_ids"]] == [24, 24]
    assert batch["query_ids"][0][-1] == tokenizer.sep_token_id and batch["passage_ids"][0][0] == tokenizer.cls_token_id
