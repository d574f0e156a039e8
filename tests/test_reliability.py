"""Kill-and-resume, atomic checkpoints, checkpoint rotation, non-finite steps (tiny model, CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import efficient_train
import origin_train
from conftest import conversation_records, write_jsonl
from longcontrast import checkpoints, trainer
from helpers import common, run_main, weights

ROOT = Path(__file__).resolve().parents[1]
# The scripts run as subprocesses here (conftest already made the environment offline); unbuffered,
# so their log lines arrive as they are written.
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)).item() for k in a)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_restart_ends_with_the_same_weights(tiny_model_dir, tmp_path):
    """A run killed with SIGKILL and started again with the same command (automatic resume from
    the newest checkpoint in --output_dir) ends with the weights of an uninterrupted run."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(60))  # 15 steps per epoch at batch 4
    argv = ["--max_steps", "18", "--per_device_train_batch_size", "4", "--dropout", "0.1", "--save_strategy",
            "steps", "--save_steps", "1", "--save_total_limit", "2", "--mini_batch_size", "3"]
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "reference", *argv))

    out = tmp_path / "killed"
    command = [sys.executable, "efficient_train.py", *common(tiny_model_dir, data, out, *argv)]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def reached(step):  # rotation keeps only the newest two, so look for any at or past the step
        return any((checkpoints.checkpoint_step(p) or 0) >= step for p in out.glob("checkpoint-*"))

    deadline = time.time() + 120
    while not reached(5) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / checkpoints.FINISHED_MARKER).exists()  # killed before the end
    survivors = [checkpoints.checkpoint_step(p) for p in checkpoints.complete_checkpoints(out)]
    assert survivors and max(survivors) < 15  # in the middle of the first epoch

    restart = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{max(survivors)}'}" in restart.stderr
    difference = max_relative_difference(weights(out), weights(tmp_path / "reference"))
    print(f"killed after checkpoint-{max(survivors)}; max relative difference {difference:.1e}")
    assert difference <= 1e-6, difference


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_stops_then_the_rerun_finishes_the_run(tiny_model_dir, tmp_path):
    """SIGTERM (pre-emption): the current step ends, a checkpoint is written, the process exits 143
    without a final model; the same command resumes and ends with an uninterrupted run's weights."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(60))
    argv = ["--max_steps", "16", "--per_device_train_batch_size", "4", "--dropout", "0.1", "--save_strategy", "no",
            "--mini_batch_size", "3", "--logging_steps", "1"]
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "reference", *argv))

    out = tmp_path / "stopped"
    command = [sys.executable, "efficient_train.py", *common(tiny_model_dir, data, out, *argv)]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the Trainer prints each logged step
        if "'loss'" in line:
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "stopped on SIGTERM after step" in stderr and "run the same command again to resume" in stderr
    written = checkpoints.complete_checkpoints(out)
    assert len(written) == 1 and checkpoints.checkpoint_step(written[0]) < 16  # stopped early, with a checkpoint
    assert not (out / checkpoints.FINISHED_MARKER).exists()

    restart = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-2000:]
    assert max_relative_difference(weights(out), weights(tmp_path / "reference")) <= 1e-6


@pytest.mark.slow  # a whole training run (or several): the full suite runs it
def test_an_interrupted_save_leaves_no_checkpoint_behind(tiny_model_dir, tiny_train_file, tmp_path, monkeypatch):
    argv = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1"]
    efficient_train.main(common(tiny_model_dir, tiny_train_file, tmp_path / "reference", *argv))

    out = tmp_path / "out"
    original = trainer.ContrastiveTrainer._save_rng_state

    def crash_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise KeyboardInterrupt("killed while saving")
        original(self, output_dir)

    monkeypatch.setattr(trainer.ContrastiveTrainer, "_save_rng_state", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        efficient_train.main(common(tiny_model_dir, tiny_train_file, out, *argv))
    monkeypatch.undo()
    assert (out / checkpoints.STAGING / "checkpoint-2").is_dir()  # the half-written one, out of sight
    assert [p.name for p in checkpoints.complete_checkpoints(out)] == ["checkpoint-1"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]

    assert efficient_train.main(common(tiny_model_dir, tiny_train_file, out, *argv)) == 0  # resumes from 1
    assert not (out / checkpoints.STAGING).exists() or not any((out / checkpoints.STAGING).iterdir())
    resumed, reference = weights(out), weights(tmp_path / "reference")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_rotation_keeps_the_newest_even_when_it_is_not_the_highest_step(tmp_path):
    for step in (1, 2, 7):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / checkpoints.TRAINER_STATE).write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # incomplete (no trainer state): not a checkpoint
    staged = tmp_path / checkpoints.STAGING / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / checkpoints.TRAINER_STATE).write_text("{}")
    final = checkpoints.publish(staged, tmp_path)
    checkpoints.rotate(tmp_path, 1, keep=[final])
    assert [p.name for p in checkpoints.complete_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert checkpoints.latest_checkpoint(tmp_path) == str(final)


def test_save_total_limit_during_a_run(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "out"
    origin_train.main(common(tiny_model_dir, tiny_train_file, out, "--max_steps", "3", "--per_device_train_batch_size",
                             "4", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert checkpoints.is_complete(out / "checkpoint-3")


def test_output_dir_rules(tiny_model_dir, tiny_train_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = common(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--per_device_train_batch_size", "4",
                  "--save_strategy", "steps", "--save_steps", "1")
    origin_train.main(argv)
    assert "holds a finished run" in run_main(origin_train, argv, capsys)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    err = run_main(origin_train, [*argv, "--resume_from_checkpoint", str(incomplete)], capsys)
    assert "not a complete checkpoint" in err
    # --overwrite_output_dir starts afresh: the earlier run's checkpoints cannot be resumed by mistake.
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / checkpoints.TRAINER_STATE).write_text("{}")
    assert origin_train.main([*argv, "--overwrite_output_dir", "--save_strategy", "no"]) == 0
    assert not list(out.glob("checkpoint-*"))


def poison_gradients(monkeypatch, bad_calls, what="gradient"):
    """Make the gradient (or only the loss) of the given (1-based) training steps NaN, as an overflow would."""
    original, calls = trainer.contrastive_step, []

    def poisoned(model, *args, **kwargs):
        output = original(model, *args, **kwargs)
        calls.append(1)
        if len(calls) in bad_calls and what == "gradient":
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
        if len(calls) in bad_calls and what == "loss":
            output = output._replace(loss=torch.tensor(float("nan")))
        return output

    monkeypatch.setattr(trainer, "contrastive_step", poisoned)


@pytest.mark.parametrize("what", ["gradient", "loss"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(what, tiny_model_dir, tiny_train_file, tmp_path, monkeypatch,
                                                          caplog):
    argv = ["--per_device_train_batch_size", "4", "--lr_scheduler_type", "constant", "--learning_rate", "1e-3"]
    efficient_train.main(common(tiny_model_dir, tiny_train_file, tmp_path / "one", *argv, "--max_steps", "1"))
    poison_gradients(monkeypatch, {2}, what)
    with caplog.at_level("WARNING"):
        efficient_train.main(common(tiny_model_dir, tiny_train_file, tmp_path / "two", *argv, "--max_steps", "2"))
    assert f"step 2: non-finite {what}; the optimizer step is skipped" in caplog.text
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert all(torch.equal(one[k], two[k]) for k in one)  # AdamW moved nothing, not even by momentum


def test_consecutive_non_finite_steps_stop_the_run_without_saving(tiny_model_dir, tiny_train_file, tmp_path,
                                                                  monkeypatch, capsys):
    poison_gradients(monkeypatch, {2, 3, 4})
    out = tmp_path / "out"
    err = run_main(efficient_train, common(tiny_model_dir, tiny_train_file, out, "--max_steps", "6", "--max_bad_steps",
                                           "3", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
                                           "--save_steps", "1"), capsys)
    assert "3 steps in a row (up to step 4) had a non-finite loss or gradient" in err
    assert f"resume from {out / 'checkpoint-3'}" in err  # skipped steps leave the weights as they were
    assert not (out / "model.safetensors").exists() and not (out / checkpoints.FINISHED_MARKER).exists()
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-3" / "model.safetensors").values())
