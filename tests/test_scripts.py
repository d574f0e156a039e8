"""The two entry scripts end to end on a tiny model: smoke runs, one-step equivalence, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import efficient_train
import origin_train

from conftest import conversation_records, write_jsonl
from helpers import common, run_main, update, weights
from longcontrast import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_origin_smoke_saves_a_loadable_model(tiny_model_dir, tiny_train_file, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    out = tmp_path / "origin"
    assert origin_train.main(common(tiny_model_dir, tiny_train_file, out, "--max_steps", "2")) == 0
    model = AutoModel.from_pretrained(out)
    assert model.config.max_position_embeddings == 128
    assert SentenceTransformer(str(out), device="cpu").encode(["hello"]).shape == (1, 32)
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2]
    assert all(0 <= entry["accuracy"] <= 1 for entry in log if "loss" in entry)
    arguments = json.loads((out / "training_args.json").read_text())
    assert arguments["script"] == "origin_train.py" and arguments["pooling"] == "cls"
    assert arguments["attention_dropout"] == 0.0 and arguments["dropout"] is None  # defaults resolved
    assert model.config.attention_probs_dropout_prob == 0.0 and model.config.hidden_dropout_prob == 0.1
    assert (out / "tokenizer_config.json").is_file()


def test_efficient_smoke_untied_with_accumulation(tiny_model_dir, tiny_train_file, tmp_path):
    out = tmp_path / "efficient"
    argv = common(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--mini_batch_size", "4",
                  "--untie_encoders", "--gradient_accumulation_steps", "2", "--pooling", "mean",
                  "--query_prompt", "query: ", "--train_sampling_strategy", "group_by_length",
                  "--mini_batch_tokens", "100")
    assert efficient_train.main(argv) == 0
    for name in ("query_encoder", "passage_encoder"):
        assert (out / name / "model.safetensors").is_file()
    query = load_file(out / "query_encoder" / "model.safetensors")
    context = load_file(out / "passage_encoder" / "model.safetensors")
    assert any(not torch.equal(query[k], context[k]) for k in query)  # trained apart
    arguments = json.loads((out / "training_args.json").read_text())
    assert arguments["mini_batch_tokens"] == 100 and arguments["training"]["gradient_accumulation_steps"] == 2


OBJECTIVES = {"infonce": [], "distill_matryoshka": ["--distill_weight", "1", "--teacher_temperature", "0.5",
                                                    "--matryoshka_dims", "32", "12"]}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_one_sgd_step_gives_the_same_update(tiny_model_dir, tmp_path, objective):
    """origin_train and efficient_train (uneven mini-batches) make the same SGD update in float32,
    with InfoNCE alone and with distillation from teacher scores on Matryoshka prefixes."""
    records = conversation_records(7)
    for i, record in enumerate(records):
        record |= {"positive_scores": [1.0 + i % 2], "negative_scores": [0.5 * i % 3, -0.5]}
    data = write_jsonl(tmp_path / "d.jsonl", records)
    sgd = ["--optim", "sgd", "--learning_rate", "1", "--lr_scheduler_type", "constant", "--weight_decay", "0",
           "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "1", "--per_device_train_batch_size", "7",
           *OBJECTIVES[objective]]
    origin_train.main(common(tiny_model_dir, data, tmp_path / "o", *sgd))
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "e", *sgd, "--mini_batch_size", "3"))
    efficient_train.main(common(tiny_model_dir, data, tmp_path / "t", *sgd, "--mini_batch_tokens", "150"))
    origin = weights(tmp_path / "o")
    update_o = update(tiny_model_dir, tmp_path / "o")
    assert update_o.norm() > 0
    for run in ("e", "t"):
        efficient = weights(tmp_path / run)
        update_e = update(tiny_model_dir, tmp_path / run)
        assert ((update_e - update_o).norm() / update_o.norm()).item() <= 1e-5
        table_o, table_e = origin["embeddings.position_embeddings.weight"], efficient["embeddings.position_embeddings.weight"]
        assert ((table_e - table_o).norm() / table_o.norm()).item() <= 1e-6


def test_span_records_train_and_bad_ones_stop_before_training(tiny_model_dir, tmp_path, capsys):
    """positive_span records (the evidence pooled inside its page) train with both scripts; a span
    the passage cut leaves out, or a pooling that cannot pool a span, is one error line before training."""
    records = conversation_records(12)
    for record in records[::2]:
        record["positive"] = "the library is open. " + record["positive"]
        record["positive_span"] = [len("the library is open. "), len(record["positive"])]
    data = write_jsonl(tmp_path / "spans.jsonl", records)
    for module, extra in ((efficient_train, ["--mini_batch_size", "4"]), (origin_train, [])):
        out = tmp_path / module.__name__
        assert module.main(common(tiny_model_dir, data, out, "--max_steps", "2", "--pooling", "mean", *extra)) == 0
        assert (out / "model.safetensors").is_file()
    err = run_main(efficient_train, common(tiny_model_dir, data, tmp_path / "cls", "--pooling", "cls"), capsys)
    assert "pooling 'cls' does not pool over tokens" in err
    records[0]["positive"] = "the library is open. " * 20 + records[0]["positive"][len("the library is open. "):]
    records[0]["positive_span"] = [len(records[0]["positive"]) - 10, len(records[0]["positive"])]
    late = write_jsonl(tmp_path / "late.jsonl", records)
    err = run_main(efficient_train, common(tiny_model_dir, late, tmp_path / "late", "--pooling", "mean"), capsys)
    assert "lies past the first 48 tokens" in err and not (tmp_path / "late").exists()


@pytest.mark.parametrize("module", [origin_train, efficient_train])
def test_bad_input_one_message_and_exit_2(module, tiny_model_dir, tiny_train_file, tmp_path, capsys):
    out = tmp_path / "out"
    missing = run_main(module, common(tiny_model_dir, str(tmp_path / "nope.jsonl"), out), capsys)
    assert "not found" in missing and "nope.jsonl" in missing
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(conversation_records(1)[0]) + "\n{oops\n")
    assert "bad.jsonl:2" in run_main(module, common(tiny_model_dir, str(bad), out), capsys)
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in run_main(module, common(tiny_model_dir, str(tmp_path / "empty.jsonl"), out), capsys)
    no_positive = write_jsonl(tmp_path / "np.jsonl", [{"query": "q"}])
    assert "no 'positive'" in run_main(module, common(tiny_model_dir, no_positive, out), capsys)
    no_query = write_jsonl(tmp_path / "nq.jsonl", [{"positive": "p"}])
    assert "no query" in run_main(module, common(tiny_model_dir, no_query, out), capsys)
    both = run_main(module, common(tiny_model_dir, tiny_train_file, out, "--bf16", "--fp16"), capsys)
    assert "error:" in both
    assert not out.exists()  # nothing was written by any failed run


def test_mini_batch_size_below_one(tiny_model_dir, tiny_train_file, tmp_path, capsys):
    err = run_main(efficient_train, common(tiny_model_dir, tiny_train_file, tmp_path / "o", "--mini_batch_size", "0"), capsys)
    assert "--mini_batch_size must be >= 1" in err


def test_existing_output_dir_is_not_overwritten(tiny_model_dir, tiny_train_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    err = run_main(origin_train, common(tiny_model_dir, tiny_train_file, out, "--max_steps", "1"), capsys)
    assert "--overwrite_output_dir" in err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert origin_train.main(common(tiny_model_dir, tiny_train_file, out, "--max_steps", "1", "--overwrite_output_dir")) == 0
    assert (out / "model.safetensors").is_file() and (out / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["origin_train.py", "efficient_train.py"])
def test_help(script):
    result = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--per_device_train_batch_size", "--gradient_accumulation_steps", "--temperature",
                 "--max_position_embeddings", "--overwrite_output_dir", "--warmup_ratio", "--train_data",
                 "--max_bad_steps", "--negatives_cross_device", "--resume_from_checkpoint", "--passage_prompt",
                 "--trust_remote_code", "--eval_data", "--load_best_model_at_end", "--mixture", "--data_cache_dir"):
        assert flag in result.stdout
    assert ("--mini_batch_size" in result.stdout) == (script == "efficient_train.py")
    out = result.stdout
    groups = [out.index(f"\n{title}") for title in ("model:", "positions (long context):", "LoRA (peft):", "data:")]
    assert groups == sorted(groups) and groups[-1] < out.index("\ntraining (transformers.TrainingArguments")
    assert out.startswith(f"usage: python {script} [--flag value ...]")  # not 100 flags in the usage line
    assert "(default: None)" not in out  # the help says what None resolves to
    assert os.path.dirname(ROOT) not in out  # no machine's absolute path
    for refused in ("--label_smoothing_factor", "--neftune_noise_alpha", "--auto_find_batch_size", "--push_to_hub"):
        assert refused not in out
    pooling = " ".join(out[out.index("--pooling {"):out.index("--temperature")].split())
    assert all(mode in pooling for mode in ("cls (", "mean (", "max (", "lasttoken ("))  # every choice explained


@pytest.mark.parametrize("flag, value", [
    ("--label_smoothing_factor", "0.1"), ("--do_eval", None), ("--neftune_noise_alpha", "5"), ("--auto_find_batch_size", None),
    ("--push_to_hub", None), ("--do_predict", None)])
@pytest.mark.parametrize("module", [origin_train, efficient_train])
def test_trainer_flags_that_cannot_apply_are_refused(module, flag, value, tiny_model_dir, tiny_train_file, tmp_path,
                                                     capsys):
    out = tmp_path / "o"
    err = run_main(module, common(tiny_model_dir, tiny_train_file, out, flag, *([value] if value else [])), capsys)
    assert err.startswith(f"error: {flag} is not supported: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("module", [origin_train, efficient_train])
def test_same_seed_gives_bit_identical_weights(module, tiny_model_dir, tiny_train_file, tmp_path):
    def run(out):
        module.main(common(tiny_model_dir, tiny_train_file, out, "--max_steps", "2", "--dropout", "0.1"))
        return weights(out)

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow  # a whole training run (or several): the full suite runs it
@pytest.mark.parametrize("sampling, extra", [("random", []), ("group_by_length", []),
                                             ("random", ["--shift_positions", "--mini_batch_size", "3"])])
def test_resume_from_checkpoint_ends_with_the_same_weights(sampling, extra, tiny_model_dir, tiny_train_file, tmp_path):
    """Resumed in its second epoch (12 examples, batch 4: 3 steps per epoch) from an explicit
    checkpoint; with shifted positions the resumed run draws the same shifts."""
    argv = ["--max_steps", "7", "--dropout", "0.1", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "10", "--train_sampling_strategy", sampling, *extra]
    assert_resume_is_exact(tiny_model_dir, tiny_train_file, tmp_path, argv, "checkpoint-4")


def assert_resume_is_exact(model_dir, data, tmp_path, argv, checkpoint: str) -> None:
    """A run resumed from ``checkpoint`` of an uninterrupted one ends with bit-identical weights."""
    import shutil

    efficient_train.main(common(model_dir, data, tmp_path / "full", *argv))
    shutil.copytree(tmp_path / "full" / checkpoint, tmp_path / "resumed" / checkpoint)
    efficient_train.main(common(model_dir, data, tmp_path / "resumed", *argv,
                                "--resume_from_checkpoint", str(tmp_path / "resumed" / checkpoint)))
    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_the_package_imports_from_another_folder(tmp_path):
    """pip install -e . (requirements-dev.txt) makes longcontrast importable anywhere, from this checkout."""
    result = subprocess.run([sys.executable, "-c", "import longcontrast; print(longcontrast.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == Path(ROOT, "longcontrast", "__init__.py").resolve()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("bench/*.py"), *ROOT.glob("data/*.py")]
                                          if p.name != "common.py"))
def test_every_bench_and_data_script_answers_help_and_writes_nothing(script, tmp_path):
    """``--help`` prints usage and exits 0, and writes no file (a script that took it for an output
    folder once wrote three 90 MB models into the working tree)."""
    done = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "bench")})
    assert done.returncode == 0 and "usage" in done.stdout.lower(), done.stderr[-500:]
    assert not any(tmp_path.iterdir())


def test_old_flag_spellings_still_work():
    """--query_instruction / --passage_instruction are the old names of --query_prompt / --passage_prompt."""
    from longcontrast.arguments import parse_arguments

    _, data, _, _ = parse_arguments(["--query_instruction", "query: ", "--passage_instruction", "passage: ",
                                     "--output_dir", "unused"], True)
    assert (data.query_prompt, data.passage_prompt) == ("query: ", "passage: ")


def test_paired_averages_rows_joined_by_ampersand_query_by_query(tmp_path):
    """Seeds read as one row: "x & y" is the per-query mean of x and y, so against a row holding
    those means the difference is 0 with a zero-width interval; rows of other lengths are refused."""
    import paired

    def row(values):
        return {"beir": {"num_items": len(values), "per_item": {"ndcg@10": values}}}

    results = {"x": row([1.0, 0.0, 1.0, 0.0]), "y": row([0.0, 1.0, 1.0, 0.0]), "mean": row([0.5, 0.5, 1.0, 0.0]),
               "ones": row([1.0, 1.0, 1.0, 1.0]), "short": row([1.0, 0.0])}
    (tmp_path / "r.json").write_text(json.dumps({"results": results}))
    assert paired.main([str(tmp_path / "r.json"), "--pairs", "mean", "x & y", "x & y", "ones",
                        "--output", str(tmp_path / "p.json")]) == 0
    same, below = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert below["a_mean"] == 0.5 and below["difference"] == 0.5
    with pytest.raises(UserError, match="different numbers of queries"):
        paired.main([str(tmp_path / "r.json"), "--pairs", "x & short", "ones"])
    with pytest.raises(UserError, match="no metric 'recall@1'"):
        paired.main([str(tmp_path / "r.json"), "--pairs", "x", "ones", "--metric", "recall@1"])
