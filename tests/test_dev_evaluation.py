"""Evaluation during training (--eval_data): the logged metric is evaluate.py's on the checkpoint,
the best checkpoint is kept and loaded, early stopping, resume, two processes, bad flags."""

import json
import shutil

import pytest
import torch

import efficient_train
import evaluate
import origin_train
from conftest import conversation_records, write_jsonl
from helpers import DOCS, common, item, run_main, torchrun, weights, write_beir, write_set
from longcontrast.dev_evaluation import DevEvaluation
from longcontrast.trainer import ContrastiveTrainer


def dev_beir(tmp_path):
    corpus = [{"_id": f"p{i}", "title": "", "text": f"the permit {i} fee is {i} and the office is open {i} days."}
              for i in range(20)]
    queries = [{"_id": f"q{i}", "text": f"what does permit {i} cost?"} for i in range(20)]
    return write_beir(tmp_path / "dev", corpus, queries, [(f"q{i}", f"p{i}", 1) for i in range(20)])


def log_of(folder):
    return [json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()]


def test_the_logged_metric_is_evaluate_py_on_the_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    dev, out = dev_beir(tmp_path), tmp_path / "out"
    efficient_train.main(common(tiny_model_dir, data, out, "--max_steps", "4", "--learning_rate", "5e-3",
                                "--eval_data", dev, "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
                                "--mini_batch_size", "4"))
    logged = {entry["step"]: entry for entry in log_of(out) if "eval_ndcg@10" in entry}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        result = tmp_path / f"eval{step}.json"
        evaluate.main(["--model_path", str(out / f"checkpoint-{step}" / "model"), "--beir", dev, "--query_max_len", "32",
                       "--passage_max_len", "48", "--output_file", str(result)])
        metrics = json.loads(result.read_text())["results"][str(out / f"checkpoint-{step}" / "model")]["beir"]
        for name in ("ndcg@10", "recall@1", "mrr@10"):
            assert abs(logged[step][f"eval_{name}"] - metrics[name]) <= 1e-6, (step, name)
    assert logged[2]["eval_ndcg@10"] != logged[4]["eval_ndcg@10"]  # the weights moved: a test that can fail


SCRIPT = {1: 50.0, 2: 70.0, 3: 60.0, 4: 65.0, 5: 55.0, 6: 52.0}


@pytest.fixture
def scripted(monkeypatch):
    """The evaluation returns SCRIPT[step] for every metric (the step read from the trainer)."""
    step = {}
    original = ContrastiveTrainer.evaluate

    def evaluate_at(self, *args, **kwargs):
        step["now"] = self.state.global_step
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContrastiveTrainer, "evaluate", evaluate_at)
    monkeypatch.setattr(DevEvaluation, "__call__", lambda self, model: {
        name: SCRIPT[step["now"]] for name in self.sets[0].metric_names})


def every_step(dev, *extra):
    return ["--eval_data", dev, "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
            "--metric_for_best_model", "ndcg@10", "--learning_rate", "1e-3", "--dropout", "0.1", *extra]


def test_the_best_checkpoint_is_kept_and_becomes_the_model(scripted, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(36))
    dev, out = dev_beir(tmp_path), tmp_path / "out"
    origin_train.main(common(tiny_model_dir, data, out, "--max_steps", "5", "--load_best_model_at_end",
                             "--save_total_limit", "2", *every_step(dev)))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]  # best, newest
    final, best, last = weights(out), weights(out / "checkpoint-2" / "model"), weights(out / "checkpoint-5" / "model")
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)


def test_early_stopping_after_patience_evaluations_without_a_better_one(scripted, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(36))
    out = tmp_path / "out"
    origin_train.main(common(tiny_model_dir, data, out, "--max_steps", "6", "--early_stopping_patience", "2",
                             *every_step(dev_beir(tmp_path))))
    steps = [entry["step"] for entry in log_of(out) if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # 70 at step 2, then 60 and 65: two without improvement


def test_a_resumed_run_keeps_the_best_so_far(scripted, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(36))
    dev = dev_beir(tmp_path)
    argv = ["--max_steps", "5", "--load_best_model_at_end", "--save_total_limit", "2", *every_step(dev)]
    origin_train.main(common(tiny_model_dir, data, tmp_path / "whole", *argv))
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    origin_train.main(common(tiny_model_dir, data, tmp_path / "resumed", *argv))
    state = json.loads((tmp_path / "resumed" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["best_global_step"] == 2 and state["best_model_checkpoint"] == str(tmp_path / "resumed" / "checkpoint-2")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_chatrag_sets_and_two_processes(tiny_model_dir, tmp_path):
    """A folder of ChatRAG sets is averaged (with each set's metrics beside); under torchrun both
    processes evaluate and the run ends."""
    write_set(tmp_path / "sets" / "doc2dial", [item(i, gold=i) for i in range(6)], DOCS)
    write_set(tmp_path / "sets" / "quac", [item(i, gold=7 - i) for i in range(6)], DOCS)
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    torchrun("efficient_train.py", *common(tiny_model_dir, data, tmp_path / "ddp", "--max_steps", "2",
                                           "--per_device_train_batch_size", "3", "--mini_batch_size", "2",
                                           "--eval_data", str(tmp_path / "sets"), "--eval_steps", "2"))
    (entry,) = [e for e in log_of(tmp_path / "ddp") if "eval_recall@1" in e]
    assert entry["eval_recall@1"] == pytest.approx((entry["eval_doc2dial_recall@1"] + entry["eval_quac_recall@1"]) / 2)


@pytest.mark.parametrize("flags, message", [
    (["--eval_strategy", "steps"], "--eval_strategy needs a development set to evaluate on: give --eval_data"),
    (["--load_best_model_at_end"], "--load_best_model_at_end needs a development set"),
    (["--eval_data", "DEV", "--load_best_model_at_end"], "compare evaluations by --metric_for_best_model: give one"),
    (["--eval_data", "DEV", "--metric_for_best_model", "ndcg@20"], "--metric_for_best_model ndcg@20: the evaluation "
     "set reports ndcg@10"),
    (["--eval_data", "NOWHERE"], "neither a BEIR folder"),
    (["--eval_data", "DEV", "--early_stopping_patience", "0", "--metric_for_best_model", "ndcg@10"], "must be >= 1"),
])
def test_bad_evaluation_flags_are_one_error_line(flags, message, tiny_model_dir, tiny_train_file, tmp_path, capsys):
    dev = dev_beir(tmp_path)
    flags = [dev if f == "DEV" else str(tmp_path / "nowhere") if f == "NOWHERE" else f for f in flags]
    err = run_main(origin_train, common(tiny_model_dir, tiny_train_file, tmp_path / "out", *flags), capsys)
    assert message in err and err.count("\n") == 1, err
