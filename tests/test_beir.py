"""BEIR-format evaluation: metrics against a brute force of trec_eval's definitions, the layout's
rules, the run file, the embedding cache, MaxP windows; and broken models (constant, NaN) that
must score at chance or stop."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate
from longcontrast import UserError
from longcontrast.readers import load_beir
from helpers import EvalConfig, evaluate_beir, evaluate_dataset
from longcontrast.inference import load_retriever
from longcontrast.metrics import BEIR_METRICS, beir_metrics
from longcontrast.modeling import DualEncoder, load_encoder
from helpers import write_beir

WORDS = "permit fee office days document proof address renew library parking apply cost".split()


def generated_set(n_docs=40, n_queries=12, seed=0):
    rng = random.Random(seed)
    corpus = [{"_id": f"d{i}", "title": rng.choice(WORDS) if i % 3 else "",
               "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))} for i in range(n_docs)]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(WORDS) for _ in range(4))} for i in range(n_queries)]
    qrels = []
    for i in range(n_queries):
        *relevant, judged = rng.sample(range(n_docs), 4)
        qrels += [(f"q{i}", f"d{j}", rng.choice([1, 1, 2])) for j in relevant]
        qrels.append((f"q{i}", f"d{judged}", 0))  # judged non-relevant
    return corpus, queries, qrels


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("beir_model") / "m"
    encoder, tokenizer = load_encoder(tiny_model_dir, dropout=0.0)
    DualEncoder(encoder, "mean").save(folder, tokenizer, max_seq_length=64)
    return str(folder)


def brute_force_metrics(grades: dict[str, int], ranked: list[str]) -> dict[str, float]:
    """trec_eval's definitions, written out: linear gains (gain = grade), the ideal ranking from
    every judged document, relevant = grade > 0; MAP@100 divides by every relevant document."""
    relevant = {d for d, g in grades.items() if g > 0}
    dcg = sum(grades.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(grades.values(), reverse=True)[:10]))
    hits = [i for i, d in enumerate(ranked[:100]) if d in relevant]  # 0-based ranks of relevant documents
    out = {"ndcg@10": dcg / ideal, "mrr@10": next((1 / (i + 1) for i in hits if i < 10), 0.0),
           "map@100": sum((n + 1) / (i + 1) for n, i in enumerate(hits)) / len(relevant)}
    out.update({f"recall@{k}": sum(i < k for i in hits) / len(relevant) for k in (1, 5, 10, 20, 100)})
    return out


def test_metrics_equal_a_brute_force_on_graded_multi_relevant_runs():
    rng = random.Random(1)
    qrels = {f"q{i}": {f"d{j}": rng.choice([0, 1, 2, 3]) for j in rng.sample(range(300), rng.randint(1, 12))}
             for i in range(40)}
    qrels = {q: docs for q, docs in qrels.items() if any(docs.values())}
    run = {q: rng.sample([f"d{j}" for j in range(300)], 100) for q in qrels}
    for q in list(run)[::3]:  # some queries find their relevant documents early
        relevant = [d for d, g in qrels[q].items() if g > 0]
        run[q] = relevant + [d for d in run[q] if d not in relevant][: 100 - len(relevant)]
    ours = beir_metrics(qrels, run)
    for q in qrels:
        expected = brute_force_metrics(qrels[q], run[q])
        for metric in BEIR_METRICS:
            assert ours[metric][q] == pytest.approx(expected[metric], abs=1e-6), (metric, q)
    assert 0 < sum(ours["ndcg@10"].values()) < len(qrels)  # neither all perfect nor all zero


def test_metrics_by_hand():
    qrels = {"q": {"a": 1, "b": 2, "z": 0}}
    m = {k: v["q"] for k, v in beir_metrics(qrels, {"q": ["x", "b", "y", "z", "a"]}).items()}
    dcg = 2 / math.log2(3) + 1 / math.log2(6)
    ideal = 2 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / ideal)
    assert m["mrr@10"] == pytest.approx(0.5) and m["recall@1"] == 0 and m["recall@5"] == 1
    assert m["map@100"] == pytest.approx((1 / 2 + 2 / 5) / 2)


def test_loading_rules_and_errors(tmp_path):
    corpus = [{"_id": "d1", "title": "Fees", "text": "the fee is 5"}, {"_id": "d2", "title": "", "text": "open days"}]
    folder = write_beir(tmp_path / "ok", corpus, [{"_id": "q1", "text": "fee"}, {"_id": "q2", "text": "days"}],
                        [("q1", "d1", 1), ("q2", "d1", 0)])
    data = load_beir(folder)
    assert data.passages == ["Fees the fee is 5", "open days"]  # title + " " + text, as BEIR joins them
    assert data.query_ids == ["q1"]  # q2 has no relevant document: nothing to find
    for qrels, message in [([("q9", "d1", 1)], "query 'q9' is not in queries.jsonl"),
                           ([("q1", "d9", 1)], "document 'd9' is not in corpus.jsonl"),
                           ([("q1", "d1", "x")], "is not an integer"), ([("q1", "d1", 0)], "no query has a relevant"),
                           ([("q1", "d1", 1), ("q1", "d1", 0)], "judged twice, 1 and 0")]:
        bad = write_beir(tmp_path / "bad", corpus, [{"_id": "q1", "text": "fee"}], qrels)
        with pytest.raises(UserError, match=message):
            load_beir(bad)
    with pytest.raises(UserError, match="splits here: test"):
        load_beir(folder, "dev")
    (tmp_path / "bad" / "corpus.jsonl").write_text('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n')
    with pytest.raises(UserError, match="corpus.jsonl:2: document id 'd1' repeats"):
        load_beir(str(tmp_path / "bad"))


def test_script_end_to_end_run_file_and_comparison(model_dir, tmp_path, capsys):
    corpus, queries, qrels = generated_set()
    corpus.append({"_id": "q3", "text": queries[3]["text"]})  # a query that is also a document: dropped
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    out, run_file = tmp_path / "r.json", tmp_path / "run.trec"
    assert evaluate.main(["--model_path", model_dir, "default", "--beir", folder, "--run_file", str(run_file),
                          "--output_file", str(out), "--bootstrap_samples", "500"]) == 0
    printed = capsys.readouterr().out
    assert "| model | queries | nDCG@10 |" in printed and "Difference to" in printed
    results = json.loads(out.read_text())
    ours = results["results"][model_dir]["beir"]
    assert ours["num_items"] == 12 and "per_item" not in ours
    lines = [line.split() for line in run_file.read_text().splitlines()]
    assert all(len(x) == 6 and x[1] == "Q0" for x in lines) and not any(x[0] == x[2] == "q3" for x in lines)
    run = {}
    for q, _, doc, rank, score, _ in lines:
        run.setdefault(q, {})[doc] = 1000.0 - int(rank)
    grades = {}
    for q, d, s in qrels:
        grades.setdefault(q, {})[d] = s
    for metric in ("ndcg@10", "recall@100", "mrr@10"):  # the run file reproduces the reported metrics
        expected = [brute_force_metrics(grades[q], sorted(run[q], key=lambda d: -run[q][d]))[metric] for q in run]
        assert ours[metric] == pytest.approx(100 * sum(expected) / len(expected), abs=1e-4), metric
    assert (tmp_path / "run-2.trec").is_file()  # the second model's run
    comparison = results["comparison"]["default"]["beir"]["all"]
    assert set(comparison) == set(BEIR_METRICS) and comparison["ndcg@10"]["low"] <= comparison["ndcg@10"]["high"]


def test_bm25_on_a_beir_corpus_scores_like_bm25s(model_dir, tmp_path, capsys):
    """--model_path bm25 --beir: each query's run holds exactly the documents bm25s (Lucene BM25,
    k1 0.9, b 0.4) scores above 0, best first, with bm25s's scores (ours are Lucene's times
    k1 + 1), cut at 100; the reported metrics are those of that run; a model compares with it."""
    bm25s = pytest.importorskip("bm25s")
    rng = random.Random(3)
    vocabulary = [f"{w}{i}" for w in WORDS for i in range(12)]
    corpus = [{"_id": f"d{i}", "title": rng.choice(vocabulary) if i % 2 else "",
               "text": " ".join(rng.choice(vocabulary) for _ in range(rng.randint(2, 40)))} for i in range(160)]
    queries = [{"_id": f"q{i}", "text": " ".join(rng.choice(vocabulary) for _ in range(3))} for i in range(10)]
    queries.append({"_id": "q10", "text": "nothing known"})  # no word in the corpus: nothing retrieved
    corpus.append({"_id": "q3", "text": queries[3]["text"]})  # a query that is also a document: dropped
    qrels = [(f"q{i}", f"d{rng.randrange(160)}", 1) for i in range(11)]
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    out, run_file = tmp_path / "r.json", tmp_path / "bm25.trec"
    assert evaluate.main(["--model_path", "bm25", model_dir, "--beir", folder, "--run_file", str(run_file),
                          "--per_item", "--output_file", str(out), "--bootstrap_samples", "200"]) == 0
    assert "| bm25 | 11 |" in capsys.readouterr().out

    pattern = r"(?u)\b\w+\b"
    passages = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    theirs = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    theirs.index(bm25s.tokenize(passages, stopwords=None, token_pattern=pattern, show_progress=False),
                 show_progress=False)
    run = {}
    for line in run_file.read_text().splitlines():
        q, _, doc, _, score, _ = line.split()
        run.setdefault(q, []).append((doc, float(score)))
    for query in queries:
        words = sorted(set(bm25s.tokenize([query["text"].lower()], stopwords=None, token_pattern=pattern,
                                          show_progress=False, return_ids=False)[0]))
        expected = {corpus[i]["_id"]: float(s) for i, s in enumerate(theirs.get_scores(words))
                    if s > 0 and corpus[i]["_id"] != query["_id"]}
        got = run.get(query["_id"], [])
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)  # best first
        assert len(got) == min(len(expected), 100)
        assert all(expected[doc] * 1.9 == pytest.approx(score, abs=1e-5) for doc, score in got)  # k1 + 1 = 1.9
        assert not got or min(s for _, s in got) >= 1.9 * sorted(expected.values())[-len(got)] - 1e-5  # the best kept
    assert "q10" not in run and 0 < len(run["q3"]) and all(doc != "q3" for doc, _ in run["q3"])
    results = json.loads(out.read_text())
    reported = results["results"]["bm25"]["beir"]
    expected = beir_metrics({q: {d: 1} for q, d, _ in qrels}, {q: [d for d, _ in run.get(q, [])] for q, _, _ in qrels})
    assert reported["per_item"]["ndcg@10"] == pytest.approx([100 * expected["ndcg@10"][q] for q, _, _ in qrels])
    assert 0 < reported["recall@100"] < 100
    assert set(results["comparison"][model_dir]["beir"]["all"]) == set(BEIR_METRICS)
    assert (tmp_path / "bm25-2.trec").is_file()  # the model's run, second
    from longcontrast.bm25 import BM25
    index, texts = BM25(passages), [q["text"] for q in queries]
    blocked = index.top_k(texts, 7, block=2 * len(passages))  # two queries per sparse product
    for (found, scores), (one_found, one_scores) in zip(index.top_k(texts, 7), blocked, strict=True):
        assert found.tolist() == one_found.tolist() and scores.tolist() == one_scores.tolist()

class Constant(torch.nn.Module):
    """A collapsed model: every text maps to the same unit vector."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask, side):
        return torch.nn.functional.normalize(torch.ones(len(input_ids), 8), dim=1)


def test_a_constant_model_scores_at_chance_on_beir_and_chatrag(model_dir, tmp_path, caplog):
    model, tokenizer = load_retriever(model_dir)
    constant = Constant(model)
    constant.paths, constant.pooling = model.paths, model.pooling
    corpus = [{"_id": f"d{i}", "text": f"passage {i} " + "fee " * (i % 7)} for i in range(60)]
    queries = [{"_id": f"q{i}", "text": f"question {i}"} for i in range(60)]
    data = load_beir(write_beir(tmp_path / "set", corpus, queries, [(f"q{i}", f"d{i}", 1) for i in range(60)]))
    config = EvalConfig(query_max_len=32, passage_max_len=32, batch_size=8)
    got = evaluate_beir(constant, tokenizer, data, config, torch.device("cpu"))
    assert got["recall@1"] <= 10 and got["ndcg@10"] < 30  # chance: 1 in 60 at rank 1, not 100
    assert got["degenerate_queries"] == 60 and "MODEL COLLAPSE" in caplog.text
    # ChatRAG layout (the generated sample): Recall@1 is exactly the mean of 1 / distinct candidates
    from longcontrast.retrieval_sets import load_chatrag

    sample = str(Path(__file__).resolve().parents[1] / "data" / "chatrag_sample")
    got = evaluate_dataset(constant, tokenizer, sample, "doc2dial", config, torch.device("cpu"))
    items, documents = load_chatrag(sample, "doc2dial")
    chance = [1 / (1 + sum(c != documents[it.document][it.gold_index] for c in documents[it.document])) for it in items]
    assert got["recall@1"] == pytest.approx(100 * sum(chance) / len(chance))
    assert got["degenerate_queries"] == len(items)


def test_a_nan_model_stops_with_one_error_line(model_dir, tmp_path, capsys):
    broken = tmp_path / "nan"
    encoder, tokenizer = load_encoder(model_dir, dropout=0.0)
    with torch.no_grad():
        encoder.embeddings.word_embeddings.weight.fill_(float("nan"))
    DualEncoder(encoder, "mean").save(broken, tokenizer, max_seq_length=64)
    corpus, queries, qrels = generated_set()
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    for extra in (["--beir", folder], ["--eval-dataset", "doc2dial"]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(["--model_path", str(broken), "--output_file", str(tmp_path / "r.json"), *extra])
        err = capsys.readouterr().err
        (line,) = [x for x in err.splitlines() if x.startswith("error:")]  # weight-loading bars aside
        assert exit_info.value.code == 2 and line.startswith(f"error: model {broken}") and "non-finite embedding" in line
        assert "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_corpus_embeddings_are_cached_and_refused_when_settings_differ(model_dir, tmp_path):
    corpus, queries, qrels = generated_set()
    data = load_beir(write_beir(tmp_path / "set", corpus, queries, qrels))
    model, tokenizer = load_retriever(model_dir)
    calls = []
    forward = model.forward
    model.forward = lambda input_ids, attention_mask, side: calls.append(side) or forward(input_ids, attention_mask, side)
    cache = str(tmp_path / "cache.pt")
    config = EvalConfig(query_max_len=32, passage_max_len=48, batch_size=8)
    first = evaluate_beir(model, tokenizer, data, config, torch.device("cpu"), cache=cache)
    assert "passage" in calls
    calls.clear()
    again = evaluate_beir(model, tokenizer, data, config, torch.device("cpu"), cache=cache)
    assert "passage" not in calls and again["ndcg@10"] == first["ndcg@10"]
    with pytest.raises(UserError, match="another passage_max_len"):
        evaluate_beir(model, tokenizer, data, EvalConfig(query_max_len=32, passage_max_len=32, batch_size=8),
                      torch.device("cpu"), cache=cache)


def test_maxp_windows_equal_a_brute_force(model_dir, tmp_path):
    """Each long passage scores as the best of its windows, each embedded alone; short ones as themselves."""
    from longcontrast.batching import pad
    from longcontrast.tokenization import tokenize
    from longcontrast.tokenization import split_windows

    corpus, queries, qrels = generated_set(n_docs=15, n_queries=6)
    data = load_beir(write_beir(tmp_path / "set", corpus, queries, qrels))
    model, tokenizer = load_retriever(model_dir)
    config = EvalConfig(query_max_len=32, passage_max_len=64, batch_size=4, passage_window=16)
    got = evaluate_beir(model, tokenizer, data, config, torch.device("cpu"))
    assert got["windows"] > len(corpus)

    def one(ids, side):
        with torch.no_grad():
            return model(**pad([ids], tokenizer.pad_token_id), side=side)[0]

    run, mean_run = {}, {}
    for q, text in zip(data.query_ids, data.queries):
        query = one(tokenize(tokenizer, [text], 32, "right")[0], "query")
        best, mean = {}, {}
        for doc, passage in zip(data.doc_ids, data.passages):
            pieces, _ = split_windows(tokenizer, tokenize(tokenizer, [passage], 10**9, "right"), 16)
            vectors = torch.stack([one(p, "passage") for p in pieces])  # (k, D)
            best[doc] = float((vectors @ query).max())
            mean[doc] = float(torch.nn.functional.normalize(vectors.mean(0), dim=0) @ query)  # LongEmbed's chunk mean
        run[q] = sorted(best, key=lambda d: -best[d])
        mean_run[q] = sorted(mean, key=lambda d: -mean[d])
    expected = beir_metrics(data.qrels, run)
    for metric in BEIR_METRICS:
        assert got[metric] == pytest.approx(100 * sum(expected[metric].values()) / len(run), abs=1e-6), metric
    from longcontrast.evaluation import evaluate as harness
    from longcontrast.retrieval_sets import CorpusSet
    readings = harness(config.retriever(model, tokenizer, use_faiss=False), CorpusSet(str(tmp_path / "set")))
    expected = beir_metrics(data.qrels, mean_run)
    for metric in BEIR_METRICS:
        assert readings["mean@16"].metrics[metric] == pytest.approx(
            100 * sum(expected[metric].values()) / len(mean_run), abs=1e-6), metric
    assert readings["mean@16"].per_item != readings["maxp@16"].per_item


def test_faiss_search_gives_the_same_metrics(model_dir, tmp_path):
    pytest.importorskip("faiss")
    corpus, queries, qrels = generated_set()
    data = load_beir(write_beir(tmp_path / "set", corpus, queries, qrels))
    model, tokenizer = load_retriever(model_dir)
    config = EvalConfig(query_max_len=32, passage_max_len=48, batch_size=8)
    built_in = evaluate_beir(model, tokenizer, data, config, torch.device("cpu"))
    with_faiss = evaluate_beir(model, tokenizer, data, config, torch.device("cpu"), use_faiss=True)
    assert {m: with_faiss[m] for m in BEIR_METRICS} == pytest.approx({m: built_in[m] for m in BEIR_METRICS}, abs=1e-9)
    with pytest.raises(UserError, match="does not combine with --passage_window"):
        evaluate_beir(model, tokenizer, data, EvalConfig(passage_window=16), torch.device("cpu"), use_faiss=True)


def test_fusion_on_a_corpus_equals_z_scores_over_every_document(model_dir, tmp_path):
    """--fuse_bm25 on a BEIR folder of fewer than 100 documents: both rankers return every document
    they score (BM25 leaves out only those scoring 0, which the rule fills with 0), so the hybrid's
    ranking equals a brute force over the whole corpus: sentence-transformers' cosines and bm25s's
    scores, each standardised with scipy, fused with weights 0.6 / 0.4."""
    bm25s = pytest.importorskip("bm25s")
    from scipy.stats import zscore
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels = generated_set(n_docs=40, n_queries=12)
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    out, run_file = tmp_path / "r.json", tmp_path / "run.trec"
    assert evaluate.main(["--model_path", model_dir, "--beir", folder, "--fuse_bm25", "0.4", "--per_item",
                          "--run_file", str(run_file), "--bootstrap_samples", "200", "--output_file", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == [model_dir, f"{model_dir}+bm25@0.4"]
    passages = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    encoder = SentenceTransformer(model_dir, device="cpu")
    cosines = encoder.encode([q["text"] for q in queries], normalize_embeddings=True) @ encoder.encode(
        passages, normalize_embeddings=True).T  # (Q, N)
    pattern = r"(?u)\b\w+\b"
    index = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
    index.index(bm25s.tokenize(passages, stopwords=None, token_pattern=pattern, show_progress=False), show_progress=False)
    keyword = np.array([index.get_scores(sorted(set(bm25s.tokenize([q["text"].lower()], stopwords=None,
                       token_pattern=pattern, show_progress=False, return_ids=False)[0]))) for q in queries])
    fused = 0.6 * zscore(cosines.astype(np.float64), axis=1) + 0.4 * zscore(keyword, axis=1)  # (Q, N)
    relevant = {}
    for q, d, grade in qrels:
        if grade > 0:
            relevant.setdefault(q, set()).add(d)
    recall = []
    for query, scores in zip(queries, fused):
        best = max(scores)
        tied = [corpus[i]["_id"] for i in range(len(corpus)) if scores[i] >= best - 1e-6]
        assert len(tied) == 1  # no ties at the top: the ranking is well defined
        recall.append(100.0 * (tied[0] in relevant.get(query["_id"], set())) / max(1, len(relevant.get(query["_id"], ()))))
    assert results[f"{model_dir}+bm25@0.4"]["beir"]["per_item"]["recall@1"] == pytest.approx(recall)
    assert results[f"{model_dir}+bm25@0.4"]["beir"]["per_item"]["recall@1"] != results[model_dir]["beir"]["per_item"][
        "recall@1"]  # the fusion is not the model alone


def test_fusion_fills_what_a_ranker_did_not_return_with_its_lowest_score():
    """fuse on top-k runs: a document only BM25 found takes the dense run's lowest score, one only the
    dense run found takes BM25's lowest (k returned) or 0 (fewer than k: BM25 scored it 0)."""
    import torch

    from longcontrast.results import Run
    from longcontrast.retrievers import fuse

    dense = Run([torch.tensor([0, 1, 2])], [torch.tensor([0.9, 0.5, 0.1])])
    keyword = Run([torch.tensor([3, 0, 1])], [torch.tensor([6.0, 4.0, 2.0])])
    got = fuse(dense, keyword, weight=0.5, depth=3)
    union = [0, 1, 2, 3]
    dense_scores = np.array([0.9, 0.5, 0.1, 0.1])  # 3: the dense run's lowest
    keyword_scores = np.array([4.0, 2.0, 2.0, 6.0])  # 2: BM25 returned k = 3, so its lowest
    from scipy.stats import zscore
    expected = 0.5 * zscore(dense_scores) + 0.5 * zscore(keyword_scores)
    order = np.argsort(-expected, kind="stable")[:3]
    assert got.candidates[0].tolist() == [union[i] for i in order]
    assert got.scores[0].numpy() == pytest.approx(expected[order])
    fewer = Run([torch.tensor([3, 0])], [torch.tensor([6.0, 4.0])])  # fewer than k: the rest scored 0
    got = fuse(dense, fewer, weight=0.5, depth=3)
    expected = 0.5 * zscore(np.array([0.9, 0.5, 0.1, 0.1])) + 0.5 * zscore(np.array([4.0, 0.0, 0.0, 6.0]))
    assert got.scores[0].numpy() == pytest.approx(np.sort(expected)[::-1][:3])


def test_late_chunking_on_a_corpus_ranks_documents_by_their_best_late_chunk(model_dir, tmp_path, capsys):
    """--late_chunking --passage_window W on a BEIR folder: each document read once, whole, by
    sentence-transformers (token embeddings), averaged over W-token windows (first from the start,
    last to the end), the document scored as its best window; the run's best document per query is
    that brute force's. The whole row is unchanged by the option; a corpus cache does not combine."""
    from sentence_transformers import SentenceTransformer

    corpus, queries, qrels = generated_set(n_docs=30, n_queries=10, seed=3)
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    run_file = tmp_path / "run.trec"
    common = ["--model_path", model_dir, "--beir", folder, "--passage_max_len", "64", "--bootstrap_samples", "200"]
    assert evaluate.main([*common, "--passage_window", "12", "--late_chunking", "--per_item", "--run_file",
                          str(run_file), "--output_file", str(tmp_path / "late.json")]) == 0
    assert evaluate.main([*common, "--per_item", "--output_file", str(tmp_path / "whole.json")]) == 0
    late = json.loads((tmp_path / "late.json").read_text())["results"][model_dir]["beir"]
    whole = json.loads((tmp_path / "whole.json").read_text())["results"][model_dir]["beir"]
    assert late["per_item"] == whole["per_item"]  # the whole reading from the late pass is the plain one
    reference = SentenceTransformer(model_dir, device="cpu")
    passages = [(d.get("title", "") + " " + d["text"]).strip() for d in corpus]
    tokens = reference.encode(passages, output_value="token_embeddings", convert_to_numpy=False)  # [(L, D)]
    query_vectors = reference.encode([q["text"] for q in queries], normalize_embeddings=True)  # (Q, D)
    width = 12 - 2  # [CLS] and [SEP] wrap each window
    best = []
    for states in tokens:
        cuts = list(range(1, len(states) - 1, width))[1:]
        pieces = [states[a:b].mean(0) for a, b in zip([0, *cuts], [*cuts, len(states)])]
        best.append(torch.nn.functional.normalize(torch.stack(pieces), dim=-1).numpy())  # (k, D)
    ranked = {}
    for line in Path(str(run_file).replace(".trec", ".late12.trec")).read_text().splitlines():
        query, _, doc, rank, _, _ = line.split()
        ranked.setdefault(query, []).append(doc)
    for query, vector in zip(queries, query_vectors):
        scores = np.array([float((w @ vector).max()) for w in best])
        assert ranked[query["_id"]][0] == corpus[int(scores.argmax())]["_id"]
    assert late["late@12"]["windows"] == sum(len(w) for w in best) > len(best)
    with pytest.raises(SystemExit):
        evaluate.main([*common, "--passage_window", "12", "--late_chunking", "--corpus_embeddings", str(tmp_path / "c.pt")])
    assert "error: --late_chunking embeds the corpus in one pass" in capsys.readouterr().err


def test_page_split_on_a_corpus_keeps_each_documents_queries_in_one_half(tmp_path):
    """--page_split on a BEIR folder: queries go to halves by their relevant document of smallest id, so 7
    queries about d0 and 5 about d1 make halves of exactly 7 and 5 (a split by query would not),
    each half's metrics the mean of its own queries' values."""
    corpus, queries, _ = generated_set(n_docs=40, n_queries=12)
    qrels = [(f"q{i}", "d0" if i < 7 else "d1", 1) for i in range(12)] + [("q3", "d5", 1), ("q9", "d7", 2)]
    folder = write_beir(tmp_path / "set", corpus, queries, qrels)
    out = tmp_path / "r.json"
    assert evaluate.main(["--model_path", "bm25", "--beir", folder, "--page_split", "--per_item",
                          "--output_file", str(out)]) == 0
    result = json.loads(out.read_text())["results"]["bm25"]["beir"]
    halves = [result[f"split={name}"] for name in ("selection", "report")]
    assert sorted(h["num_items"] for h in halves) == [5, 7] and result["num_items"] == 12
    for half in halves:
        assert half["ndcg@10"] == pytest.approx(np.mean(half["per_item"]["ndcg@10"]))
    assert sorted(halves[0]["per_item"]["ndcg@10"] + halves[1]["per_item"]["ndcg@10"]) == pytest.approx(
        sorted(result["per_item"]["ndcg@10"]))
