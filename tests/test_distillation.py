"""Teacher scores, from the records that carry them to the scripts that write and train on them:
every format's score fields, the collator's candidates, data/score_with_teacher.py against
sentence-transformers, bm25s and scipy, and efficient_train.py's distillation and Matryoshka flags."""

import json

import numpy as np
import pytest
import torch

import efficient_train
from conftest import conversation_records, write_jsonl
from longcontrast import UserError
from longcontrast.collator import ContrastiveCollator, make_dataset
from longcontrast.records import load_examples, parse_record
from longcontrast.training import train

SCORED = [  # one record of each format, with its teacher scores: positive 2.0, negatives 1.0, 0.5
    {"query": "q", "pos": ["p"], "neg": ["a", "b"], "pos_scores": [2.0], "neg_scores": [1.0, 0.5]},
    {"anchor": "q", "positive": "p", "negative_1": "a", "negative_2": "b", "scores": [2.0, 1.0, 0.5]},
    {"query": "q", "positive": "p", "negatives": ["a", "b"], "positive_scores": 2.0, "negative_scores": [1, 0.5]},
    {"messages": [{"role": "user", "content": "q"}], "positive": "p", "hard_negatives": ["a", "b"],
     "positive_scores": [2.0], "negative_scores": [1.0, 0.5]},
    {"query": "q", "positive_passages": [{"docid": "1", "title": "", "text": "p"}],
     "negative_passages": [{"docid": "2", "text": "a"}, {"docid": "3", "text": "b"}],
     "positive_scores": [2.0], "negative_scores": [1.0, 0.5]},
]


@pytest.mark.parametrize("record", SCORED, ids=["flagembedding", "sentence-transformers", "plain", "conversation",
                                                "tevatron"])
def test_every_format_carries_teacher_scores(record):
    example = parse_record(record, "f:1")
    assert example.negatives == ["a", "b"]
    assert (example.positive_scores, example.negative_scores) == ([2.0], [1.0, 0.5])


@pytest.mark.parametrize("change, message", [
    ({"neg_scores": None}, "'pos_scores' without 'neg_scores'"),
    ({"neg_scores": [1.0]}, "'neg_scores' must be a list of 2 numbers"),
    ({"neg_scores": [1.0, float("nan")]}, "non-finite"),
    ({"neg_scores": [1.0, "high"]}, "must be a list of 2 numbers"),
    ({"pos_scores": [True]}, "must be a list of 1 numbers"),
])
def test_bad_scores_name_the_record(change, message):
    with pytest.raises(UserError, match=f"f:7: .*{message}"):
        parse_record({**SCORED[0], **change}, "f:7")


def test_distillation_without_scores_stops_with_one_error_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    records = conversation_records(4)
    records[0] |= {"positive_scores": [1.0], "negative_scores": [0.0, 0.0]}  # the others carry none
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        efficient_train.main(["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir", str(out),
                              "--distill_weight", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {data}:2: no teacher scores, which --distill_weight needs in every record "
                   "(data/score_with_teacher.py writes them)"]
    assert not out.exists()
    assert load_examples([data])[1].positive_scores is None  # without --distill_weight they train as before


def test_candidates_point_at_each_querys_own_passages_with_their_scores(tiny_model_dir):
    """Rows with 2, 0 and 3 negatives (2 kept): each candidate index holds the text its score was
    given for; the drawn positive's score follows the draw."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [{"query": f"q{i}", "pos": [f"p{i} one", f"p{i} two"], "neg": [f"n{i} {j}" for j in range(k)],
                "pos_scores": [10.0 * i + 1, 10.0 * i + 2], "neg_scores": [10.0 * i + 3 + j for j in range(k)]}
               for i, k in enumerate((2, 0, 3))]
    rows = make_dataset([parse_record(r, "r") for r in records], teacher_scores=True)
    batch = ContrastiveCollator(tokenizer, 16, 16, num_hard_negatives=2)(list(rows))
    assert batch["candidate_passages"].shape == batch["teacher_scores"].shape == (3, 3)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in batch["passage_ids"]]
    score_of = {t.replace(" ", ""): s for r in records for t, s in zip(r["pos"] + r["neg"], r["pos_scores"] + r["neg_scores"])}
    for row, (indices, scores) in enumerate(zip(batch["candidate_passages"].tolist(), batch["teacher_scores"].tolist())):
        assert indices[0] == row  # the positive, drawn among the two
        kept = [i for i in indices if i >= 0]
        assert len(kept) == 1 + min(2, len(records[row]["neg"]))
        for index, score in zip(kept, scores):
            assert score_of[texts[index]] == score


def write_cross_encoder(folder, tiny_model_dir):
    """A tiny BERT ranking head (num_labels 1) saved as a sentence-transformers CrossEncoder."""
    from sentence_transformers import CrossEncoder
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(3)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    CrossEncoder(str(folder), device="cpu").save(str(folder))
    return str(folder)


@pytest.fixture
def scored_inputs(tmp_path):
    records = conversation_records(6, negatives=3)
    for i, record in enumerate(records):
        record["document"] = "d" if i % 2 else "e"
    corpus = tmp_path / "documents.json"
    corpus.write_text(json.dumps({"d": [r["positive"] for r in records] + ["the office address proof"],
                                  "e": [n for r in records for n in r["hard_negatives"]]}))
    return write_jsonl(tmp_path / "train.jsonl", records), str(corpus), records


def score(*argv):
    from longcontrast.teacher import TeacherArguments, run

    from longcontrast import cli
    (args,) = cli.parser_for(TeacherArguments).parse_args_into_dataclasses(args=list(argv))
    return run(args)


def test_cross_encoder_teacher_writes_its_scores_in_the_records_format(scored_inputs, tiny_model_dir, tmp_path):
    from sentence_transformers import CrossEncoder

    data, _, records = scored_inputs
    folder = write_cross_encoder(tmp_path / "reranker", tiny_model_dir)
    out = tmp_path / "scored.jsonl"
    summary = score("--input", data, "--cross_encoder", folder, "--output", str(out))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["records"] == len(written) == 6
    reference = CrossEncoder(folder, device="cpu")
    for record, saved in zip(records, written):
        example = parse_record(record, "r")
        expected = reference.predict([(example.query, p) for p in [example.positive, *example.negatives]])
        assert saved["positive_scores"] + saved["negative_scores"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert {k: v for k, v in saved.items() if "scores" not in k} == record  # nothing else changed
    example = load_examples([str(out)], require_scores=True)[0]  # and training reads them back
    assert len(example.negative_scores) == 3


def test_hybrid_teacher_equals_z_scored_cosines_and_bm25s(scored_inputs, tiny_model_dir, tmp_path):
    """--fuse_bm25 W --per_document: per record (1 - W) z(cosine) + W z(BM25) over its document's chunks and
    its records' passages, then its own passages' values; the cosines of sentence-transformers and bm25s's
    scores (z-scores are blind to BM25's scale, so Lucene's and ours agree), standardised with scipy."""
    bm25s = pytest.importorskip("bm25s")
    from scipy.stats import zscore
    from sentence_transformers import SentenceTransformer

    from longcontrast.modeling import DualEncoder, load_encoder

    data, corpus, records = scored_inputs
    encoder, tokenizer = load_encoder(tiny_model_dir, dropout=0.0)
    DualEncoder(encoder, "mean").save(tmp_path / "model", tokenizer, max_seq_length=64)
    out = tmp_path / "hybrid.jsonl"
    score("--input", data, "--model_name_or_path", str(tmp_path / "model"), "--fuse_bm25", "0.3", "--corpus", corpus,
          "--per_document", "--output", str(out))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    model = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    documents = json.loads(open(corpus).read())
    pattern = r"(?u)\b\w+\b"
    for record, saved in zip(records, written):
        example = parse_record(record, "r")
        passages = [example.positive, *example.negatives]
        # the document's chunks, then the passages of its records that it lacks
        chunks = list(dict.fromkeys(documents[record["document"]] + [
            t for other in records if other["document"] == record["document"]
            for t in [other["positive"], *other["hard_negatives"]]]))
        index = bm25s.BM25(k1=0.9, b=0.4, method="lucene", idf_method="lucene")
        index.index(bm25s.tokenize(chunks, stopwords=None, token_pattern=pattern, show_progress=False), show_progress=False)
        words = sorted(set(bm25s.tokenize([example.query], stopwords=None, token_pattern=pattern, show_progress=False,
                                          return_ids=False)[0]))
        keyword = index.get_scores(words)
        cosines = model.encode(chunks, normalize_embeddings=True) @ model.encode(example.query, normalize_embeddings=True)
        fused = 0.7 * zscore(cosines.astype(np.float64)) + 0.3 * zscore(keyword.astype(np.float64))
        expected = fused[[chunks.index(p) for p in passages]]
        assert saved["positive_scores"] + saved["negative_scores"] == pytest.approx(expected.tolist(), abs=1e-4)


def test_late_interaction_teacher_is_maxsim_over_every_segment(scored_inputs, tiny_model_dir, tmp_path):
    """A late-interaction folder as the teacher: each passage's score is MaxSim against its token
    vectors read in consecutive 8-token segments, against a brute force from AutoModel and the
    saved 1_Dense matrix (each segment's text tokens wrapped in [CLS] .. [SEP] by hand)."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from longcontrast.modeling import DualEncoder, load_encoder

    data, _, records = scored_inputs
    encoder, tokenizer = load_encoder(tiny_model_dir, dropout=0.0)
    torch.manual_seed(0)
    projection = torch.nn.Linear(encoder.config.hidden_size, 16, bias=False)
    DualEncoder(encoder, "mean", projection=projection).save(tmp_path / "li", tokenizer, max_seq_length=64)
    out = tmp_path / "li.jsonl"
    score("--input", data, "--model_name_or_path", str(tmp_path / "li"), "--passage_max_len", "8", "--output", str(out))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    model, words = AutoModel.from_pretrained(tmp_path / "li").eval(), AutoTokenizer.from_pretrained(tmp_path / "li")
    matrix = load_file(tmp_path / "li" / "1_Dense" / "model.safetensors")["linear.weight"]  # (16, H)

    def vectors(ids):  # (L, 16) unit token vectors of one token sequence
        with torch.no_grad():
            return F.normalize(model(input_ids=torch.tensor([ids])).last_hidden_state[0] @ matrix.T, dim=-1)

    longest = 0
    for record, saved in zip(records, written):
        example = parse_record(record, "r")
        query = vectors(words(example.query)["input_ids"])  # (Lq, 16)
        expected = []
        for passage in [example.positive, *example.negatives]:
            tokens = words(passage, add_special_tokens=False)["input_ids"]
            segments = [[words.cls_token_id, *tokens[i: i + 6], words.sep_token_id] for i in range(0, len(tokens), 6)]
            longest = max(longest, len(segments))
            passage_vectors = torch.cat([vectors(s) for s in segments])  # (Lp, 16) every segment's tokens
            expected.append((query @ passage_vectors.T).max(dim=1).values.sum().item())
        # passages' token vectors are kept in float16, as the evaluation's index keeps them
        assert saved["positive_scores"] + saved["negative_scores"] == pytest.approx(expected, rel=5e-4)
    assert longest > 1  # passages were read in several segments


@pytest.mark.parametrize("argv, message", [
    ([], "give one teacher"),
    (["--model_name_or_path", "default", "--fuse_bm25", "1.5"], "strictly between 0 and 1"),
    (["--model_name_or_path", "default", "--per_document"], "only --fuse_bm25 uses"),
])
def test_teacher_flags_are_checked_before_anything_loads(scored_inputs, tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        score("--input", scored_inputs[0], "--output", str(tmp_path / "x.jsonl"), *argv)
    assert not (tmp_path / "x.jsonl").exists()


def test_distillation_and_matryoshka_train_and_are_recorded(tiny_model_dir, tmp_path):
    """efficient_train.py with teacher scores, --distill_weight and --matryoshka_dims: it logs both
    terms and records the dimensions; bad dimensions stop it before loading."""
    records = conversation_records(8)
    for i, record in enumerate(records):
        record |= {"positive_scores": [2.0], "negative_scores": [float(i % 3), -1.0]}
    data, out = write_jsonl(tmp_path / "train.jsonl", records), tmp_path / "out"
    efficient_train.main(["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir", str(out),
                          "--max_position_embeddings", "128", "--query_max_len", "32", "--passage_max_len", "48",
                          "--num_hard_negatives", "2",
                          "--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1",
                          "--save_strategy", "no", "--distill_weight", "0.5", "--teacher_temperature", "0.5",
                          "--matryoshka_dims", "32", "16", "--disable_tqdm", "true"])
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert {"contrastive_loss", "distill_loss"} <= set(log[0])
    assert json.loads((out / "training_args.json").read_text())["matryoshka_dims"] == [32, 16]
    for dims, message in ((["16", "32"], "strictly decreasing"), (["64"], "wider than the model's 32")):
        with pytest.raises(UserError, match=message):
            train(["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir",
                                   str(tmp_path / "bad"), "--max_position_embeddings", "128", "--query_max_len", "32",
                                   "--passage_max_len", "48",
                                   "--matryoshka_dims", *dims])


@pytest.mark.parametrize("flags, message", [
    (["--distill_weight", "0", "--contrastive_weight", "0"], "leave nothing to train"),
    (["--distill_weight", "1", "--num_hard_negatives", "0"], "with --num_hard_negatives 0 there is nothing"),
    (["--teacher_temperature", "0"], "--teacher_temperature must be > 0"),
    (["--matryoshka_dims", "32", "16", "--matryoshka_weights", "1"], "one positive weight per --matryoshka_dims"),
    (["--distill_loss", "mse"], "invalid choice"),
])
def test_loss_flags_are_checked_before_anything_loads(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        efficient_train.main(["--train_data", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "o"), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "o").exists()
