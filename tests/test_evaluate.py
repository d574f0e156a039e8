import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from longcontrast import UserError
from longcontrast.batching import pad
from longcontrast.tokenization import tokenize
from longcontrast.records import format_query
from helpers import EvalConfig, evaluate_dataset
from longcontrast.metrics import CHATRAG_METRICS as METRICS
from longcontrast.retrieval_sets import load_chatrag
from longcontrast.inference import encode, load_retriever
from longcontrast.metrics import Rank, gold_rank, retrieval_metrics
from longcontrast.modeling import DualEncoder, load_encoder
from helpers import DOCS, item, write_set

DOC2DIAL_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "doc2dial" / "dev"


def test_metrics_against_hand_computation():
    ranks = [1, 2, 5, 6, 20, 21]
    m = retrieval_metrics(ranks)
    assert m["recall@1"] == pytest.approx(100 / 6)
    assert m["recall@5"] == pytest.approx(300 / 6)
    assert m["recall@20"] == pytest.approx(500 / 6)
    assert m["mrr@20"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 5 + 1 / 6 + 1 / 20) / 6)
    assert m["ndcg@20"] == pytest.approx(100 * sum(1 / math.log2(r + 1) for r in [1, 2, 5, 6, 20]) / 6)
    assert retrieval_metrics([25, 100]) == {k: 0 for k in m}  # misses beyond 20 score nothing


def test_ties_are_broken_at_random_and_copies_are_the_gold():
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1])
    assert gold_rank(scores, 0) == Rank(1, 1) and gold_rank(scores, 2) == Rank(1, 1)
    assert gold_rank(scores, 1) == Rank(0, 0) and gold_rank(scores, 3) == Rank(3, 0)
    assert gold_rank(scores, 3, gold_score=torch.tensor(0.95)) == Rank(0, 0)  # QReCC: gold re-encoded
    copies = torch.tensor([True, False, True, False])  # candidates 0 and 2 are one text
    assert gold_rank(scores, 0, copies=copies) == Rank(1, 0)
    assert gold_rank(scores + torch.tensor([0, 0, 5e-7, 0]), 0) == Rank(1, 1)  # within float32 rounding: a tie
    assert gold_rank(scores + torch.tensor([0, 0, 1e-5, 0]), 0) == Rank(2, 0)


def hand_metrics(rank: int) -> dict[str, float]:
    return {"recall@1": float(rank <= 1), "recall@5": float(rank <= 5), "recall@20": float(rank <= 20),
            "mrr@20": 1 / rank if rank <= 20 else 0.0, "ndcg@20": 1 / math.log2(rank + 1) if rank <= 20 else 0.0}


def random_tie_break(higher: int, tied: int, draws: int, seed: int = 0) -> dict[str, float]:
    """Monte Carlo of the rule: shuffle the gold among its ties, many times, and average."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, tied + 1, (draws,), generator=generator)
    total = {k: 0.0 for k in METRICS}
    for position in positions.tolist():
        for k, v in hand_metrics(higher + 1 + position).items():
            total[k] += 100 * v / draws
    return total


@pytest.mark.parametrize("higher, tied", [(0, 0), (0, 3), (2, 5), (17, 6), (0, 224), (30, 2)])
def test_expected_metrics_equal_random_tie_breaking(higher, tied):
    assert retrieval_metrics([Rank(higher, tied)]) == pytest.approx(random_tie_break(higher, tied, 20_000), abs=1.5)
    exact = {k: 100 * sum(hand_metrics(higher + 1 + p)[k] for p in range(tied + 1)) / (tied + 1) for k in METRICS}
    assert retrieval_metrics([Rank(higher, tied)]) == pytest.approx(exact)


def test_a_constant_model_scores_at_chance():
    scores = torch.zeros(10)  # every candidate the same score: Recall@1 is 1 in 10, not 100
    metrics = retrieval_metrics([gold_rank(scores, g) for g in range(10)])
    assert metrics["recall@1"] == pytest.approx(10) and metrics["recall@5"] == pytest.approx(50)
    assert metrics["recall@20"] == pytest.approx(100)  # all 10 candidates fit in the top 20


def test_load_chatrag_formats_queries_like_training(tmp_path):
    write_set(tmp_path / "quac", [item(0, gold=3)], DOCS)
    items, documents = load_chatrag(str(tmp_path), "quac", num_turns=2)
    assert items[0].query == "agent: at the office\nuser: what does it cost 0"
    assert items[0].query == format_query(json.loads((tmp_path / "quac" / "test.json").read_text())[0]["messages"], 2)
    assert items[0].gold_index == 3 and documents == DOCS


@pytest.mark.parametrize("items, documents, message", [
    ([item(0, doc="missing")], DOCS, "document 'missing' is not in documents.json"),
    ([item(0, gold=8)], DOCS, "gold index 8 is out of range"),
    ([], DOCS, "empty"),
    ([{"id": 1}], DOCS, "needs 'messages'"),
])
def test_bad_sets(tmp_path, items, documents, message):
    write_set(tmp_path / "doc2dial", items, documents)
    with pytest.raises(UserError, match=message):
        load_chatrag(str(tmp_path), "doc2dial")


def test_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_chatrag(str(tmp_path), "doc2dial")


@pytest.fixture(scope="module")
def saved_models(tiny_model_dir, tmp_path_factory):
    """A shared-encoder model saved with mean pooling, and an untied one with cls pooling."""
    root = tmp_path_factory.mktemp("saved")
    encoder, tokenizer = load_encoder(tiny_model_dir, dropout=0.0)
    DualEncoder(encoder, "mean").save(root / "shared", tokenizer, max_seq_length=64)
    torch.manual_seed(1)
    untied = DualEncoder.untied(encoder, "cls")
    with torch.no_grad():
        for p in untied.passage_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    untied.save(root / "untied", tokenizer, max_seq_length=64)
    return root


def test_pooling_read_from_saved_model(saved_models):
    model, _ = load_retriever(str(saved_models / "shared"), pooling="cls")
    assert model.pooling == "mean" and model.passage_encoder is None


def test_separate_query_and_passage_encoders(saved_models, tmp_path):
    model, _ = load_retriever(str(saved_models / "untied"))
    assert model.pooling == "cls" and model.passage_encoder is not None
    same, _ = load_retriever(None, str(saved_models / "untied" / "query_encoder"),
                             str(saved_models / "untied" / "passage_encoder"))
    assert same.passage_encoder is not None
    with pytest.raises(UserError):
        load_retriever(None, str(saved_models / "untied" / "query_encoder"), None)
    # a folder saved by earlier versions, with context_encoder/, and the flag's old spelling
    import shutil
    old = tmp_path / "old"
    shutil.copytree(saved_models / "untied" / "query_encoder", old / "query_encoder")
    shutil.copytree(saved_models / "untied" / "passage_encoder", old / "context_encoder")
    loaded, _ = load_retriever(str(old))
    assert loaded.paths["passage"] == str(old / "context_encoder")
    from longcontrast.eval_arguments import ModelArguments
    from longcontrast.cli import parser_for
    (parsed,) = parser_for(ModelArguments).parse_args_into_dataclasses(args=["--query_encoder_path", "q",
                                                                            "--context_encoder_path", "p"])
    assert parsed.passage_encoder_path == "p"
    (parsed,) = parser_for(ModelArguments).parse_args_into_dataclasses(args=["--query-encoder-path", "q",
                                                                            "--context-encoder-path", "p"])
    assert parsed.passage_encoder_path == "p"  # ChatRAG's own spelling: an alias takes dashes too


def test_an_unknown_flag_is_one_error_line(capsys):
    import evaluate
    from helpers import run_main

    err = run_main(evaluate, ["--no_such_flag", "1"], capsys)
    assert err.count("\n") == 1 and err.startswith("error: ") and "--no_such_flag" in err


def brute_force_metrics(model, tokenizer, items, documents, config, gold_suffix=None):
    """One text at a time; every ordering of the gold among the candidates scoring within 1e-6 of it
    (other texts than its own) enumerated, hand formulas averaged over them."""
    def one(text, side, max_len, truncation):
        ids = tokenize(tokenizer, [text], max_len, truncation)
        with torch.no_grad():
            return model(**pad(ids, tokenizer.pad_token_id), side=side)[0].float()

    chunk_cache, values = {}, []
    for it in items:
        q = one(it.query, "query", config.query_max_len, "left")
        chunks = documents[it.document]
        scores = []
        for c, text in enumerate(chunks):
            if c == it.gold_index and gold_suffix is not None:
                scores.append(float(q @ one(text + gold_suffix(it), "passage", config.passage_max_len, "right")))
                continue
            key = (it.document, c)
            if key not in chunk_cache:
                chunk_cache[key] = one(text, "passage", config.passage_max_len, "right")
            scores.append(float(q @ chunk_cache[key]))
        gold = scores[it.gold_index]
        # copies of the gold are the gold
        rival_scores = [scores[c] for c, text in enumerate(chunks) if text != chunks[it.gold_index]]
        above = sum(s > gold + 1e-6 for s in rival_scores)
        level = sum(abs(s - gold) <= 1e-6 for s in rival_scores)
        orders = [hand_metrics(above + 1 + p) for p in range(level + 1)]
        values.append({k: sum(o[k] for o in orders) / len(orders) for k in METRICS})
    return {k: 100 * sum(v[k] for v in values) / len(values) for k in METRICS}


def test_bf16_precision_encodes_under_autocast(saved_models):
    model, tokenizer = load_retriever(str(saved_models / "shared"))
    ids = tokenize(tokenizer, ["how do i renew my permit", "office address", "fee"], 32, "right")
    cpu = {"batch_size": 2, "pad_token_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    fp32 = encode(model, ids, "passage", **cpu)
    bf16 = encode(model, ids, "passage", **cpu, autocast=torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert 0 < (fp32 - bf16).abs().max().item() < 0.05  # bf16 rounding, nothing more


def test_qrecc_answer_rule(saved_models, tmp_path):
    write_set(tmp_path / "qrecc", [item(i, gold=i % 8, answers=(f"permit {i} costs {i}",)) for i in range(6)], DOCS)
    model, tokenizer = load_retriever(str(saved_models / "shared"))
    model.double()
    config = EvalConfig(query_max_len=64, passage_max_len=64, batch_size=4)
    items, documents = load_chatrag(str(tmp_path), "qrecc")
    with_rule = evaluate_dataset(model, tokenizer, str(tmp_path), "qrecc", config, torch.device("cpu"))
    expected = brute_force_metrics(model, tokenizer, items, documents, config, lambda it: " || " + it.answers[0])
    assert {k: with_rule[k] for k in expected} == pytest.approx(expected)
    config.qrecc_answer_rule = False
    without = evaluate_dataset(model, tokenizer, str(tmp_path), "qrecc", config, torch.device("cpu"))
    assert {k: without[k] for k in expected} == pytest.approx(brute_force_metrics(model, tokenizer, items, documents, config))


@pytest.mark.slow
@pytest.mark.skipif(not DOC2DIAL_DEV.is_dir(), reason="../shared/data/doc2dial is not here")
def test_real_doc2dial_dev_matches_brute_force(saved_models):
    model, tokenizer = load_retriever(str(saved_models / "untied"))
    model.double()
    config = EvalConfig(query_max_len=64, passage_max_len=64, batch_size=32)
    got = evaluate_dataset(model, tokenizer, str(DOC2DIAL_DEV), "doc2dial", config, torch.device("cpu"))
    items, documents = load_chatrag(str(DOC2DIAL_DEV), "doc2dial")
    assert got["num_items"] == len(items) == 628
    expected = brute_force_metrics(model, tokenizer, items, documents, config)
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert 0 < expected["recall@20"] < 100


def test_script_end_to_end_and_bad_input(saved_models, tmp_path, capsys):
    write_set(tmp_path / "doc2dial", [item(i, gold=i % 8) for i in range(5)], DOCS)
    out = tmp_path / "r.json"
    assert evaluate.main(["--model_path", str(saved_models / "shared"), str(saved_models / "untied"),
                          "--data-folder", str(tmp_path), "--eval_dataset", "doc2dial", "--output-file", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| model |" in printed and "Doc2Dial R@1" in printed
    results = json.loads(out.read_text())["results"]
    assert set(results) == {str(saved_models / "shared"), str(saved_models / "untied")}
    assert results[str(saved_models / "shared")]["doc2dial"]["num_items"] == 5
    assert evaluate.main(["--model_path", str(saved_models / "shared"), "--data-folder", str(tmp_path),
                          "--eval-dataset", "doc2dial", "--precision", "bf16", "--output_file", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--data-folder", str(tmp_path / "nowhere"), "--eval-dataset", "quac"])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--eval-dataset", "msmarco"])
    assert exit_info.value.code == 2


def test_download_conversion_on_a_local_stand_in(tmp_path):
    """The download script's conversion, on files shaped like ChatRAG-Bench's (no network)."""
    import importlib.util

    script = Path(evaluate.__file__).parent / "data" / "download_chatrag.py"
    spec = importlib.util.spec_from_file_location("download_chatrag", script)
    download = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(download)
    raw = [dict(item(i, gold=i % 8), ctxs=[{"text": "x" * 100}], extra="dropped") for i in range(3)]
    raw[1]["document"] = "d"
    (tmp_path / "test.json").write_text(json.dumps(raw))
    (tmp_path / "documents.json").write_text(json.dumps(DOCS))
    assert download.convert(tmp_path / "test.json", tmp_path / "documents.json", tmp_path / "out" / "quac") == 3
    converted = json.loads((tmp_path / "out" / "quac" / "test.json").read_text())
    assert set(converted[0]) == {"id", "messages", "document", "ground_truth_ctx", "answers"}
    items, _ = load_chatrag(str(tmp_path / "out"), "quac")
    assert [it.gold_index for it in items] == [0, 1, 2]
    raw[0]["document"] = "elsewhere"
    (tmp_path / "test.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="elsewhere"):
        download.convert(tmp_path / "test.json", tmp_path / "documents.json", tmp_path / "out2")
    with pytest.raises(ValueError, match="item 0"):
        download.convert_item({"messages": []}, 0)


def test_copies_of_a_chunk_get_one_vector_and_are_the_gold(saved_models, tmp_path):
    """Doc2Dial's ssa repeats 44 chunks: a copy of the gold is the gold, never a rival that scores a
    hair higher because its batch was padded differently."""
    model, tokenizer = load_retriever(str(saved_models / "shared"))
    texts = [f"permit {i} fee" + " and the office is open" * i for i in range(6)]  # lengths differ: other padding
    copies = texts + [texts[1], texts[4], texts[1]]
    write_set(tmp_path / "doc2dial", [item(i, gold=i % 9) for i in range(9)], {"d": copies})
    seen = []
    forward = model.forward
    model.forward = lambda input_ids, attention_mask, side: (
        seen.append(len(input_ids)) or forward(input_ids, attention_mask, side))
    config = EvalConfig(query_max_len=64, passage_max_len=64, batch_size=2)
    got = evaluate_dataset(model, tokenizer, str(tmp_path), "doc2dial", config, torch.device("cpu"))
    assert sum(seen) == len(texts) + 9  # each distinct chunk encoded once, then the 9 queries
    ids = tokenize(tokenizer, copies, 64, "right")
    cpu = {"pad_token_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    vectors = encode(model, ids, "passage", batch_size=2, **cpu)
    assert torch.equal(vectors[1], vectors[6]) and torch.equal(vectors[1], vectors[8]) and torch.equal(vectors[4], vectors[7])
    # The case is built so that distinct chunks are far apart for every query (on any CPU, batched or
    # not): the brute force below then orders them the same way whatever the rounding.
    queries = encode(model, tokenize(tokenizer, [it.query for it in load_chatrag(str(tmp_path), "doc2dial")[0]], 64,
                                     "left"), "query", batch_size=1, **cpu)
    distinct = (queries @ vectors[: len(texts)].T).sort(dim=1).values  # (9, 6)
    assert (distinct.diff(dim=1) > 1e-4).all()
    items, documents = load_chatrag(str(tmp_path), "doc2dial")
    assert {k: got[k] for k in METRICS} == pytest.approx(brute_force_metrics(model, tokenizer, items, documents, config))
    assert got["recall@1"] < 100  # copies help their gold, not every query


def test_long_document_sets_are_also_scored_by_answer_position(saved_models, tmp_path, capsys):
    items = [dict(item(i, gold=i % 8), gold_start_token=[10, 600, 511, 512][i % 4]) for i in range(8)]
    write_set(tmp_path / "doc2dial", items, DOCS)
    model, tokenizer = load_retriever(str(saved_models / "shared"))
    config = EvalConfig(query_max_len=64, passage_max_len=64, batch_size=4)
    got = evaluate_dataset(model, tokenizer, str(tmp_path), "doc2dial", config, torch.device("cpu"))
    early, late = got["gold_start<512"], got["gold_start>=512"]
    assert early["num_items"] == late["num_items"] == 4
    assert (early["mrr@20"] * 4 + late["mrr@20"] * 4) / 8 == pytest.approx(got["mrr@20"])
    out = tmp_path / "r.json"
    assert evaluate.main(["--model_path", str(saved_models / "shared"), "--data-folder", str(tmp_path),
                          "--eval-dataset", "doc2dial", "--output_file", str(out)]) == 0
    assert "[doc2dial gold_start>=512, 4 items]" in capsys.readouterr().out
    items[0]["gold_start_token"] = "late"
    write_set(tmp_path / "doc2dial", items, DOCS)
    with pytest.raises(UserError, match="gold_start_token"):
        load_chatrag(str(tmp_path), "doc2dial")


def test_passage_window_rows_and_whole_against_windows(saved_models, tmp_path, capsys):
    long_docs = {"d": [" ".join(f"permit {i} fee is {j} and the office is open" for j in range(4)) for i in range(8)]}
    write_set(tmp_path / "doc2dial", [item(i, gold=i % 8) for i in range(8)], long_docs)
    out = tmp_path / "r.json"
    model = str(saved_models / "shared")
    argv = ["--model_path", model, "--data-folder", str(tmp_path), "--eval-dataset", "doc2dial",
            "--query_max_len", "32", "--output_file", str(out), "--bootstrap_samples", "200"]
    assert evaluate.main([*argv, "--passage_window", "64"]) == 0  # every chunk fits one window: MaxP is the chunk
    printed = capsys.readouterr().out
    assert "[doc2dial maxp@64, 8 items]" in printed and "Whole passages against MaxP windows" in printed
    saved = json.loads(out.read_text())
    same = saved["whole_vs_windows"][model]["doc2dial whole - maxp@64"]["all"]
    assert all(c["difference"] == 0 and c["p"] == 1 for c in same.values())
    assert saved["results"][model]["doc2dial"]["maxp@64"]["windows"] == 8
    assert evaluate.main([*argv, "--passage_window", "12"]) == 0  # several windows a chunk
    saved = json.loads(out.read_text())
    assert saved["results"][model]["doc2dial"]["maxp@12"]["windows"] > 8
    windowed = saved["whole_vs_windows"][model]["doc2dial whole - maxp@12"]["all"]
    assert any(c["difference"] != 0 for c in windowed.values())
    other = str(saved_models / "untied")  # whole passages also against another model's windows
    assert evaluate.main(["--model_path", model, other, *argv[2:], "--passage_window", "12", "--per_item"]) == 0
    saved = json.loads(out.read_text())
    mine, theirs = saved["results"][model]["doc2dial"], saved["results"][other]["doc2dial"]["maxp@12"]
    cross = saved["whole_vs_windows"][model][f"doc2dial whole - {other} maxp@12"]["all"]
    for metric, cell in cross.items():
        expected = np.mean(mine["per_item"][metric]) - np.mean(theirs["per_item"][metric])
        assert cell["difference"] == pytest.approx(expected)
    assert set(saved["whole_vs_windows"][other]) == {"doc2dial whole - maxp@12", f"doc2dial whole - {model} maxp@12"}


def test_late_chunking_equals_mean_token_states_of_one_whole_pass(saved_models, tmp_path, capsys):
    """late@W: each chunk read in consecutive passage_max_len-token segments by the transformer of
    sentence-transformers (shares no code with the evaluation), its token states averaged over
    W-token windows of each segment (first window from the segment's start, last to its end), the
    chunk scored as its best window. A chunk that fits one window scores as the whole chunk; the
    context changes the windows (late@W != maxp@W)."""
    from sentence_transformers import SentenceTransformer

    long_docs = {"d": [" ".join(f"permit {i} fee is {j} and the office is open" for j in range(4 + i % 3))
                       for i in range(8)]}
    long_docs["d"].insert(1, long_docs["d"][3])  # a copy: text index and distinct index part ways
    write_set(tmp_path / "doc2dial", [item(i, gold=i % 8) for i in range(8)], long_docs)
    folder = str(saved_models / "shared")
    model, tokenizer = load_retriever(folder)
    items, documents = load_chatrag(str(tmp_path), "doc2dial")
    config = EvalConfig(query_max_len=32, passage_max_len=64, batch_size=3, passage_window=12, late_chunking=True)
    got = evaluate_dataset(model, tokenizer, str(tmp_path), "doc2dial", config, torch.device("cpu"))

    reference = SentenceTransformer(folder, device="cpu")
    queries = reference.encode([i.query for i in items], normalize_embeddings=True)  # (Q, D)
    # each chunk read in consecutive 64-token segments ([CLS] + 62 text tokens + [SEP]) by the
    # transformer inside sentence-transformers, its token states averaged over 12-token windows
    transformer = reference[0].auto_model.eval()
    width = 12 - 2  # [CLS] and [SEP] wrap each window
    best = []
    for text in documents["d"]:
        ids = reference.tokenizer(text)["input_ids"]
        windows = []
        for start in range(1, len(ids) - 1, 62):
            segment = [ids[0], *ids[start: min(start + 62, len(ids) - 1)], ids[-1]]
            with torch.no_grad():
                states = transformer(input_ids=torch.tensor([segment])).last_hidden_state[0]  # (L, D)
            cuts = list(range(1, len(states) - 1, width))[1:]  # window starts after the first
            windows += [states[a:b].mean(0) for a, b in zip([0, *cuts], [*cuts, len(states)])]
        best.append(torch.nn.functional.normalize(torch.stack(windows), dim=-1).numpy())  # (k, D)
    expected = []
    for index, it in enumerate(items):
        scores = np.array([float((w @ queries[index]).max()) for w in best])  # (C,)
        gold, copies = scores[it.gold_index], [documents["d"][c] == documents["d"][it.gold_index] for c in range(len(scores))]
        higher = int(sum(s > gold + 1e-6 for s, copy in zip(scores, copies) if not copy))
        tied = int(sum(abs(s - gold) <= 1e-6 for s, copy in zip(scores, copies) if not copy))  # broken at random
        expected.append(100.0 * np.mean([1 / r for r in range(higher + 1, higher + tied + 2)]))
    from longcontrast.inference import late_chunk_embeddings
    from longcontrast.tokenization import window_spans
    ids = tokenize(tokenizer, documents["d"], 64, "right")
    vectors, owner, whole = late_chunk_embeddings(model, ids, window_spans(tokenizer, ids, 12), batch_size=3,
                                                  pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    first_segment = [len(window_spans(tokenizer, [one], 12)[0]) for one in ids]  # the windows of each first 64 tokens
    assert owner == [c for c, count in enumerate(first_segment) for _ in range(count)]
    assert vectors.numpy() == pytest.approx(np.concatenate([w[:n] for w, n in zip(best, first_segment)]), abs=1e-5)
    # the same pass gives the whole chunks' embeddings: the whole rows score as without late chunking
    assert whole.numpy() == pytest.approx(reference.encode(documents["d"], normalize_embeddings=True), abs=1e-5)
    assert sum(len(w) for w in best) > len(vectors)  # some chunks run past 64 tokens: more segments
    plain = evaluate_dataset(model, tokenizer, str(tmp_path), "doc2dial",
                             EvalConfig(query_max_len=32, passage_max_len=64, batch_size=3, passage_window=12),
                             torch.device("cpu"))
    assert "late@12" not in plain and plain["maxp@12"]["per_item"] == got["maxp@12"]["per_item"]
    for metric, values in plain["per_item"].items():
        assert got["per_item"][metric] == pytest.approx(values, abs=1e-6), metric
    late = got["late@12"]
    assert late["windows"] == sum(len(w) for w in best) > len(best)
    assert late["per_item"]["mrr@20"] == pytest.approx(expected, abs=1e-4)
    assert late["per_item"] != got["maxp@12"]["per_item"]

    one_window = evaluate_dataset(model, tokenizer, str(tmp_path), "doc2dial",
                                  EvalConfig(query_max_len=32, passage_max_len=64, batch_size=3, passage_window=64,
                                             late_chunking=True), torch.device("cpu"))
    # windows as long as the segments: each window is a segment read alone and mean-pooled, MaxP's own
    for metric, values in one_window["maxp@64"]["per_item"].items():
        assert one_window["late@64"]["per_item"][metric] == pytest.approx(values, abs=1e-6), metric

    out = tmp_path / "r.json"
    assert evaluate.main(["--model_path", folder, "--data-folder", str(tmp_path), "--eval-dataset", "doc2dial",
                          "--query_max_len", "32", "--passage_max_len", "64", "--passage_window", "12", "--late_chunking",
                          "--bootstrap_samples", "200", "--output_file", str(out)]) == 0
    assert "[doc2dial late@12, 8 items]" in capsys.readouterr().out
    assert "doc2dial late@12 - maxp@12" in json.loads(out.read_text())["whole_vs_windows"][folder]
    with pytest.raises(SystemExit):
        evaluate.main(["--data-folder", str(tmp_path), "--late_chunking"])
    assert "error: --late_chunking pools the token states over --passage_window" in capsys.readouterr().err

WORDS = ["permit", "fee", "office", "renew", "address", "proof", "library", "parking", "days", "cost"]


def keyword_set(folder, *, named_every: int, pages: int | None = None):
    """A Doc2Dial-shaped set whose queries share words with the chunks: 16 items over one document
    of 12 chunks; item i's last turn also names a chunk's tag unless i is a multiple of
    ``named_every``; with ``pages``, items spread over that many pages. Returns (records, chunks)."""
    chunks = [" ".join(WORDS[(i * 3 + j) % 10] for j in range(i % 4 + 2)) + f" item{i}" for i in range(12)]
    records = []
    for i in range(16):
        record = item(i, gold=i % 12)
        record["messages"][-1]["content"] = (f"{WORDS[i % 10]} {WORDS[(i * 7) % 10]}"
                                             + (f" item{i % 12}" if i % named_every else ""))
        if pages:
            record["source_doc_id"] = f"page {i % pages}"
        records.append(record)
    write_set(folder / "doc2dial", records, {"d": chunks})
    return records, chunks


def bm25s_scores(chunks: list[str], queries: list[str]) -> list:
    """Each query's (C,) scores from bm25s (Lucene BM25, k1 0.9, b 0.4), each distinct query word once."""
    bm25s = pytest.importorskip("bm25s")
    pattern = r"(?u)\b\w+\b"
    theirs = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    theirs.index(bm25s.tokenize(chunks, stopwords=None, token_pattern=pattern, show_progress=False), show_progress=False)
    return [theirs.get_scores(sorted(set(bm25s.tokenize([q], stopwords=None, token_pattern=pattern, show_progress=False,
                                                        return_ids=False)[0]))) for q in queries]


def test_bm25_ranks_like_bm25s_and_the_page_split_partitions_the_pages(tmp_path):
    """evaluate.py --model_path bm25 ranks each item's document by BM25: its per-item Recall@1 and
    MRR equal those of bm25s (a maintained Lucene-style BM25, same k1 and b) ranking the same
    chunks. --page_split puts every page in one half and every item in exactly one half."""
    pytest.importorskip("bm25s")
    from longcontrast.records import format_query

    records, chunks = keyword_set(tmp_path, named_every=2, pages=5)
    out = tmp_path / "bm25.json"
    assert evaluate.main(["--model_path", "bm25", "--data-folder", str(tmp_path), "--eval-dataset", "doc2dial",
                          "--page_split", "--per_item", "--output_file", str(out)]) == 0
    results = json.loads(out.read_text())["results"]["bm25"]["doc2dial"]

    recall, mrr = [], []
    for record, scores in zip(records, bm25s_scores(chunks, [format_query(r["messages"], 5) for r in records])):
        gold = scores[record["ground_truth_ctx"]["index"]]
        higher = int((scores > gold + 1e-6).sum())
        tied = int((abs(scores - gold) <= 1e-6).sum()) - 1
        ranks = range(higher + 1, higher + tied + 2)  # a tie broken at random: each of these equally likely
        recall.append(100.0 * sum(r == 1 for r in ranks) / len(ranks))
        mrr.append(100.0 * sum(1 / r for r in ranks if r <= 20) / len(ranks))
    assert results["per_item"]["recall@1"] == pytest.approx(recall)
    assert results["per_item"]["mrr@20"] == pytest.approx(mrr)
    assert 0 < sum(recall) < 100 * len(records)  # neither all found nor none

    halves = {name: results[f"split={name}"] for name in ("selection", "report")}
    assert sum(h["num_items"] for h in halves.values()) == len(records)
    assert abs(halves["selection"]["num_items"] - halves["report"]["num_items"]) <= 4  # the largest page: 4 items
    from longcontrast.retrieval_sets import load_chatrag, split_pages
    parts = split_pages(load_chatrag(str(tmp_path), "doc2dial")[0])
    assert set(parts) == {f"page {i}" for i in range(5)} and set(parts.values()) == {"selection", "report"}
    selected = [r for r, v in zip(records, results["per_item"]["recall@1"]) if parts[r["source_doc_id"]] == "selection"]
    assert len(selected) == halves["selection"]["num_items"]


def test_fuse_bm25_ranks_by_a_weighted_sum_of_z_scores(saved_models, tmp_path):
    """--fuse_bm25 W adds a row MODEL+bm25@W per weight whose per-item metrics are those of a brute
    force: the model's cosines (from sentence-transformers) and bm25s's scores each standardised over
    the query's chunks (scipy), summed with weights 1 - W and W, the gold's rank among ties taken in
    expectation. A bare --fuse_bm25 means the default weight."""
    pytest.importorskip("bm25s")
    from scipy.stats import zscore
    from sentence_transformers import SentenceTransformer

    from longcontrast.retrievers import DEFAULT_BM25_WEIGHT
    from longcontrast.records import format_query

    records, chunks = keyword_set(tmp_path, named_every=3)
    model, out = str(saved_models / "shared"), tmp_path / "fused.json"
    assert evaluate.main(["--model_path", "bm25", model, "--fuse_bm25", "0.2", "0.7", "--data-folder", str(tmp_path),
                          "--eval-dataset", "doc2dial", "--per_item", "--bootstrap_samples", "200",
                          "--output_file", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["bm25", model, model + "+bm25@0.2", model + "+bm25@0.7"]
    assert "recall@1" in saved["comparison"][model + "+bm25@0.7"]["doc2dial"]["all"]

    encoder = SentenceTransformer(model, device="cpu")
    queries = [format_query(r["messages"], 5) for r in records]
    cosines = encoder.encode(queries, normalize_embeddings=True) @ encoder.encode(chunks, normalize_embeddings=True).T
    keyword_scores = np.array(bm25s_scores(chunks, queries))

    def standardised(matrix):  # scipy's z-score of each query's row (population standard deviation)
        return zscore(np.asarray(matrix, dtype=np.float64), axis=1)

    rows = {}
    for weight in (0.2, 0.7):
        fused = (1 - weight) * standardised(cosines) + weight * standardised(keyword_scores)  # (Q, C)
        recall = []
        for record, scores in zip(records, fused):
            gold = scores[record["ground_truth_ctx"]["index"]]
            higher, tied = (scores > gold + 1e-9).sum(), (abs(scores - gold) <= 1e-9).sum()  # the gold among the tied
            recall.append(100.0 * (higher == 0) / tied)
        rows[weight] = saved["results"][f"{model}+bm25@{weight:g}"]["doc2dial"]["per_item"]["recall@1"]
        assert rows[weight] == pytest.approx(recall)
    for alone in ("bm25", model):  # the fusion is neither ranker alone
        assert all(saved["results"][alone]["doc2dial"]["per_item"]["recall@1"] != row for row in rows.values())
    assert rows[0.2] != rows[0.7]  # the weight matters

    bare = tmp_path / "bare.json"
    assert evaluate.main(["--model_path", model, "--fuse_bm25", "--data-folder", str(tmp_path), "--eval-dataset",
                          "doc2dial", "--output_file", str(bare)]) == 0
    assert list(json.loads(bare.read_text())["results"]) == [model, f"{model}+bm25@{DEFAULT_BM25_WEIGHT:g}"]


def test_fuse_bm25_weights_outside_0_1_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--fuse_bm25", "1.5", "--output_file", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2 and "error: --fuse_bm25" in capsys.readouterr().err


def test_truncate_dim_rows_equal_sentence_transformers_truncate_dim(saved_models, tmp_path, capsys, monkeypatch):
    """--truncate_dim D: a row MODEL@dimD whose per-item Recall@1 is that of sentence-transformers'
    own truncate_dim (the first D coordinates, cosine), from the same encodings as the whole row
    (every text encoded once); a D wider than the model is one error line."""
    from sentence_transformers import SentenceTransformer

    from longcontrast import retrievers
    from longcontrast.records import format_query

    records, chunks = keyword_set(tmp_path, named_every=3)
    model, out = str(saved_models / "shared"), tmp_path / "dims.json"
    encoded = []
    real_encode = retrievers.encode
    monkeypatch.setattr(retrievers, "encode", lambda model, ids, *a, **k: (encoded.append(len(ids)), real_encode(
        model, ids, *a, **k))[1])
    assert evaluate.main(["--model_path", model, "--truncate_dim", "8", "16", "--data-folder", str(tmp_path),
                          "--eval-dataset", "doc2dial", "--per_item", "--bootstrap_samples", "200",
                          "--output_file", str(out)]) == 0
    assert sorted(encoded) == sorted([len(chunks), len(records)])  # the chunks once, the queries once
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == [model, f"{model}@dim8", f"{model}@dim16"]
    queries = [format_query(r["messages"], 5) for r in records]
    rows = {}
    for dim in (8, 16):
        reference = SentenceTransformer(model, device="cpu", truncate_dim=dim)
        cosines = (reference.encode(queries, normalize_embeddings=True)
                   @ reference.encode(chunks, normalize_embeddings=True).T)  # (Q, C)
        recall = []
        for record, scores in zip(records, cosines):
            gold = scores[record["ground_truth_ctx"]["index"]]
            recall.append(100.0 * ((scores > gold + 1e-6).sum() == 0) / (abs(scores - gold) <= 1e-6).sum())
        rows[dim] = saved["results"][f"{model}@dim{dim}"]["doc2dial"]["per_item"]["recall@1"]
        assert rows[dim] == pytest.approx(recall)
    assert rows[8] != saved["results"][model]["doc2dial"]["per_item"]["recall@1"]  # truncation changes the ranking
    with pytest.raises(SystemExit):
        evaluate.main(["--model_path", model, "--truncate_dim", "64", "--data-folder", str(tmp_path),
                       "--eval-dataset", "doc2dial", "--output_file", str(tmp_path / "no.json")])
    assert "error: model " + model + ": --truncate_dim 64 is wider than its 32-dimensional vectors" in capsys.readouterr().err
