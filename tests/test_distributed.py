"""Multi-process training on CPU (gloo, 2 processes, tiny model): exact global gradients with
cross-device negatives, one gradient all-reduce per step with GradCache, and torchrun runs of
both scripts."""

import json
import shutil

import pytest
import torch

import distributed_worker as worker
from conftest import conversation_records, write_jsonl
from longcontrast.collator import ContrastiveCollator
from longcontrast.loss import LossSettings
from longcontrast.step import contrastive_step
from helpers import common, update, weights
from helpers import WORLD, torchrun

pytestmark = pytest.mark.slow  # torchrun: several processes


@pytest.fixture(scope="module")
def worker_results(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("tests/distributed_worker.py", tiny_model_dir, out)
    return {name: torch.load(out / f"{name}.pt") for name in worker.CONFIGS}


def relative_error(grads: dict, reference: dict) -> float:
    assert grads.keys() == reference.keys()
    flat = torch.cat([grads[k].flatten() for k in reference])
    flat_reference = torch.cat([reference[k].flatten() for k in reference])
    return ((flat - flat_reference).norm() / flat_reference.norm()).item()


@pytest.mark.parametrize("name", [n for n in worker.CONFIGS if "without" not in n and "dropout" not in n])
def test_two_processes_give_the_gradient_of_the_concatenated_batch(name, worker_results, tiny_model_dir):
    """Batch B per process with cross-device negatives == one process with the batch 2B."""
    mini_batch_size, negatives, untied, _ = worker.CONFIGS[name]
    model, tokenizer = worker.build(tiny_model_dir, untied, name)
    batch = worker.shifted(worker.collator(tokenizer, negatives, name)(worker.rows(worker.PER_RANK * WORLD, name)), name)
    contrastive_step(model, batch, loss=worker.loss_settings(name), pad_token_id=tokenizer.pad_token_id, device="cpu",
                     mini_batch_size=mini_batch_size)
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert relative_error(worker_results[name]["grads"], reference) <= 1e-5


def test_fsdp2_with_dropout_gives_the_gradient_of_ddp_with_the_same_masks(worker_results):
    """Dropout on, GradCache replaying each mini-batch's masks: sharding changes no mask and no gradient."""
    ddp, fsdp2 = worker_results["efficient_neg2_dropout"]["grads"], worker_results["fsdp2_efficient_neg2_dropout"]["grads"]
    assert relative_error(fsdp2, ddp) <= 1e-5
    assert relative_error(worker_results["efficient_neg2"]["grads"], ddp) > 1e-3  # the masks matter


def test_fsdp2_shards_the_parameters(worker_results):
    """Under FSDP2 each of the 2 processes holds about half of every parameter (dim-0 shards)."""
    for name in (n for n in worker.CONFIGS if n.startswith("fsdp2_")):
        assert 0.45 < worker_results[name]["local_share"] < 0.55


def test_negative_control_local_negatives_only_differ(worker_results, tiny_model_dir):
    """Without the other process's passages the gradient is not the global one: the test can fail."""
    model, tokenizer = worker.build(tiny_model_dir, False)
    half = ContrastiveCollator(tokenizer, 32, 48, 2)(worker.rows(worker.PER_RANK * WORLD)[: worker.PER_RANK])
    contrastive_step(model, half, loss=LossSettings(worker.TEMPERATURE), pad_token_id=tokenizer.pad_token_id, device="cpu")
    local = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert relative_error(worker_results["origin_neg2"]["grads"], local) > 0.05
    # and without the known positives' mask the repeated queries' gradient differs too
    model, tokenizer = worker.build(tiny_model_dir, False)
    batch = worker.collator(tokenizer, 2, "")(worker.rows(worker.PER_RANK * WORLD, "origin_neg2_known"))
    contrastive_step(model, batch, loss=LossSettings(worker.TEMPERATURE), pad_token_id=tokenizer.pad_token_id, device="cpu")
    unmasked = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert relative_error(worker_results["origin_neg2_known"]["grads"], unmasked) > 1e-3


def test_negatives_cross_device_flag_spellings():
    from longcontrast.training import parse_arguments

    def parsed(*argv):
        return parse_arguments([*argv, "--output_dir", "unused"], True)[0].negatives_cross_device

    assert parsed() is None  # resolved to (world size > 1) by train()
    assert parsed("--negatives_cross_device") is True
    assert parsed("--negatives_cross_device", "false") is False


def buckets(logging_data: dict) -> int:
    sizes = logging_data["rebuilt_bucket_sizes"] if logging_data.get("has_rebuilt_buckets") else logging_data["bucket_sizes"]
    return len(str(sizes).split(","))


@pytest.mark.parametrize("name", [n for n in worker.CONFIGS if not n.startswith("fsdp2_")])
def test_one_gradient_all_reduce_per_bucket_per_step(name, worker_results):
    result = worker_results[name]
    count, bucket_count = result["allreduces"], buckets(result["logging"])
    assert bucket_count > 1  # bucket_cap_mb is small enough to make this a real count
    if "without_no_sync" in name:  # every replay all-reduces: 3 queries -> 2 mini-batches, 9 passages -> 5
        assert count == 7 * bucket_count
    else:
        assert count == bucket_count


@pytest.mark.parametrize("module, sharding", [("origin_train", []), ("efficient_train", []),
                                              ("efficient_train", ["--fsdp"]), ("efficient_train", ["--colbert_dim", "16"]),
                                              ("efficient_train", ["--fsdp", "--colbert_dim", "16"]),
                                              ("efficient_train", ["--colbert_dim", "16", "--passage_segment_len", "8"])],
                         ids=["origin", "efficient", "fsdp2", "colbert", "colbert_fsdp2", "colbert_segments"])
def test_torchrun_step_equals_one_process_with_the_global_batch(module, sharding, tiny_model_dir, tmp_path):
    """torchrun, 2 processes x batch 3 (cross-device negatives by default) make the same two SGD
    updates as one process with batch 6: the processes share one shuffle (random, and
    group_by_length) and split each global batch; with accumulation (efficient_train) the Trainer's
    no_sync and the replays' combine; the run logs and saves once. With --fsdp the model is sharded
    (FSDP2) and the saved model gathered from the shards."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    sgd = ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--weight_decay", "0",
           "--max_grad_norm", "0", "--dropout", "0", "--max_steps", "2"]
    extra = (["--mini_batch_size", "2", "--train_sampling_strategy", "group_by_length", "--gradient_accumulation_steps",
              "2"] if module == "efficient_train" else [])
    stderr = torchrun(f"{module}.py", *common(tiny_model_dir, data, tmp_path / "ddp", *sgd, *extra, *sharding,
                                             "--per_device_train_batch_size", "3"))
    assert "contrastive batch 3 x 2 device(s)" in stderr
    assert stderr.count("saved the model to") == 1
    arguments = json.loads((tmp_path / "ddp" / "training_args.json").read_text())
    assert arguments["negatives_cross_device"] is True and arguments["world_size"] == 2
    assert arguments["global_batch_size"] == 6
    assert arguments["fsdp"] == ({"reshard_after_forward": True, "bf16": False} if "--fsdp" in sharding else None)

    objective = [flag for flag in sharding if flag != "--fsdp"]  # one process, unsharded, the same objective
    __import__(module).main(common(tiny_model_dir, data, tmp_path / "one", *sgd, *extra, *objective,
                                   "--per_device_train_batch_size", "6"))
    update_one, update_ddp = update(tiny_model_dir, tmp_path / "one"), update(tiny_model_dir, tmp_path / "ddp")
    assert update_one.norm() > 0
    assert ((update_ddp - update_one).norm() / update_one.norm()).item() <= 1e-5
    if "--colbert_dim" in sharding:  # the token projection too (drawn from the same seed in both runs)
        from longcontrast.late_interaction import read_projection

        one, ddp = (read_projection(tmp_path / run).weight for run in ("one", "ddp"))
        assert ((ddp - one).norm() / one.norm()).item() <= 1e-5


def test_fsdp2_resumes_from_its_sharded_checkpoint_to_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """A run stopped after its sharded checkpoint-2 (model and AdamW states, each process's shards)
    and started again ends where the uninterrupted run does (dropout on: the RNG states resume too);
    the saved model is gathered and loads in sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    argv = ["--fsdp", "--max_steps", "4", "--per_device_train_batch_size", "3", "--mini_batch_size", "2", "--dropout",
            "0.1", "--optim", "adamw_torch", "--save_strategy", "steps", "--save_steps", "2"]
    torchrun("efficient_train.py", *common(tiny_model_dir, data, tmp_path / "whole", *argv))
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file() and not (checkpoint / "model.safetensors").exists()
    shutil.copytree(checkpoint, tmp_path / "stopped" / "checkpoint-2")
    stderr = torchrun("efficient_train.py", *common(tiny_model_dir, data, tmp_path / "stopped", *argv))
    assert f"resuming from {tmp_path / 'stopped' / 'checkpoint-2'}" in stderr
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "stopped")
    assert whole.keys() == resumed.keys()
    assert max(((whole[k] - resumed[k]).norm() / whole[k].norm()).item() for k in whole) <= 1e-6
    assert SentenceTransformer(str(tmp_path / "whole"), device="cpu").encode(["the office"]).shape == (1, 32)


def test_a_step_bad_in_one_process_is_skipped_by_all(tiny_model_dir, tmp_path):
    """Only process 1 sees a NaN loss (its gradients stay finite, local negatives): both processes
    must skip the step, or their weights drift apart without any error."""
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(24))
    out = tmp_path / "out"
    stderr = torchrun("tests/poisoned_train.py", tmp_path, *common(
        tiny_model_dir, data, out, "--max_steps", "3", "--per_device_train_batch_size", "3", "--mini_batch_size", "2",
        "--negatives_cross_device", "false"))
    assert stderr.count("step 2: non-finite loss; the optimizer step is skipped") == 2  # one warning per process
    assert (tmp_path / "weights_0.txt").read_text() == (tmp_path / "weights_1.txt").read_text()
