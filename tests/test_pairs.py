"""Label-free pairs (data/make_pairs.py): crops are spans of their passage within the asked lengths,
inverse-cloze queries are sentences taken out of their positive, draws are seeded, bad input exits 2."""

import json

import pytest

from longcontrast import UserError
from longcontrast.pairs import make_pairs, sentences

PASSAGE = ("You can renew your permit online. The fee is ten dollars! Bring proof of address to the office. "
           "Offices are open five days a week.\nCall us with questions?")


def test_crops_are_spans_of_their_passage_within_the_asked_lengths():
    words = PASSAGE.split()
    records = make_pairs({"d": [PASSAGE] * 50}, method="crop", per_passage=2, seed=1, min_span=0.2, max_span=0.4)
    assert len(records) == 100 and all(r["document"] == "d" for r in records)
    for record in records:
        for span in (record["query"], record["positive"]):
            n = len(span.split())
            assert round(0.2 * len(words)) <= n <= round(0.4 * len(words)) and span in " ".join(words)
    assert len({(r["query"], r["positive"]) for r in records}) > 50  # random, not one crop repeated


def test_inverse_cloze_takes_a_sentence_out_of_its_positive():
    assert sentences(PASSAGE)[-2:] == ["Offices are open five days a week.", "Call us with questions?"]
    records = make_pairs([PASSAGE] * 40, method="ict", seed=0, keep_sentence=0.0)
    for record in records:
        assert record["query"] in sentences(PASSAGE) and record["query"] not in record["positive"]
        assert "document" not in record
    kept = make_pairs([PASSAGE] * 200, method="ict", seed=0, keep_sentence=0.5)
    share = sum(r["query"] in r["positive"] for r in kept) / len(kept)
    assert 0.35 < share < 0.65
    assert make_pairs([PASSAGE] * 5, method="ict", seed=3) == make_pairs([PASSAGE] * 5, method="ict", seed=3)


def test_too_short_passages_and_unknown_methods_are_errors():
    with pytest.raises(UserError, match="too short"):
        make_pairs(["one sentence only"], method="ict")
    with pytest.raises(UserError, match="unknown method"):
        make_pairs([PASSAGE], method="shuffle")


def test_script_writes_jsonl_and_refuses_to_overwrite(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_pairs", "data/make_pairs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus = tmp_path / "documents.json"
    corpus.write_text(json.dumps({"d": [PASSAGE, PASSAGE]}))
    out = tmp_path / "pairs.jsonl"
    assert script.main(["--corpus", str(corpus), "--output", str(out), "--method", "ict"]) == 0
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--corpus", str(corpus), "--output", str(out)])
    assert exit_info.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
