"""Several datasets in one run (longcontrast.mixture): the batches each policy gives, global batches
from one dataset on every process, per-dataset prompts and negatives, logs, resume, bad input."""

import json
import shutil
from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

import efficient_train
import origin_train
from conftest import conversation_records, write_jsonl
from helpers import common, run_main, torchrun, weights
from longcontrast import UserError
from longcontrast.mixture import MixtureSampler, batch_counts, epoch_plan, parse_train_data

SIZES = [10, 25, 7]  # none a multiple of the global batch


@pytest.mark.parametrize("policy, drop_last, expected", [
    ("proportional", True, [2, 6, 1]),  # size // 4
    ("proportional", False, [3, 7, 2]),  # ceil(size / 4)
    ("round_robin", False, [2, 2, 2]),  # the smallest's
    # total 9 split as sqrt(10) : sqrt(25) : sqrt(7) = 2.63 : 4.16 : 2.20; floors 2, 4, 2, the one left to 0.63
    ("temperature", True, [3, 4, 2]),
])
def test_batches_per_epoch_follow_the_policy(policy, drop_last, expected):
    counts = batch_counts(SIZES, [1.0] * 3, policy=policy, temperature=2.0, batch=4, drop_last=drop_last)
    assert counts == expected


def test_weights_scale_the_share():
    assert batch_counts(SIZES, [2.0, 0.5, 0.0], policy="proportional", temperature=1, batch=4, drop_last=True) == [4, 3, 0]
    with pytest.raises(UserError, match="round_robin gives every dataset the same"):
        batch_counts(SIZES, [2.0, 1, 1], policy="round_robin", temperature=1, batch=4, drop_last=True)


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("policy", ["proportional", "round_robin", "temperature"])
def test_each_batch_is_one_dataset_without_repeats_and_the_counts_match(policy, drop_last):
    counts = batch_counts(SIZES, [1.0] * 3, policy=policy, temperature=2.0, batch=4, drop_last=drop_last)
    plan = epoch_plan(SIZES, counts, batch=4, drop_last=drop_last, round_robin=policy == "round_robin", seed=3, epoch=0)
    assert Counter(d for d, _ in plan) == Counter({d: c for d, c in enumerate(counts) if c})
    for dataset, indices in plan:
        assert len(indices) == 4 and len(set(indices)) == 4
        assert all(0 <= i < SIZES[dataset] for i in indices)
    for dataset, size in enumerate(SIZES):  # within one pass every example once before any repeats
        drawn = [i for d, indices in plan if d == dataset for i in indices]
        first_pass = drawn[: size - size % 4] if drop_last else drawn[:size]
        assert len(set(first_pass)) == len(first_pass)
    if policy == "round_robin":
        assert [d for d, _ in plan] == [0, 1, 2] * counts[0]
    same = epoch_plan(SIZES, counts, batch=4, drop_last=drop_last, round_robin=policy == "round_robin", seed=3, epoch=0)
    other = epoch_plan(SIZES, counts, batch=4, drop_last=drop_last, round_robin=policy == "round_robin", seed=3, epoch=1)
    assert same == plan and other != plan


def test_two_processes_with_accumulation_take_every_step_from_one_dataset():
    """Accelerate gives process p the p-th of every 2 per-device batches: with batch 2 per device,
    2 processes and 2 accumulation steps, each optimizer step's 4 micro-batches (8 examples) come
    from one dataset, and together they are the plan's global batch."""
    sampler = MixtureSampler(SIZES, [3, 7, 2], batch=8, drop_last=False, round_robin=False, seed=0)
    sampler.set_epoch(2)
    shards = [list(BatchSamplerShard(BatchSampler(sampler, 2, drop_last=False), num_processes=2, process_index=p))
              for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == 12 * 2  # 12 global batches, 2 micro-batches each per process
    owner = [d for d, size in enumerate(SIZES) for _ in range(size)]
    for step, (dataset, indices) in enumerate(sampler.plan()):
        taken = [i for p in range(2) for micro in shards[p][2 * step: 2 * step + 2] for i in micro]
        assert {owner[i] for i in taken} == {dataset}
        assert sorted(taken) == sorted(sampler.offsets[dataset] + i for i in indices)


def datasets(tmp_path, sizes=(13, 8, 11)):
    """Three small conversation datasets, told apart by their queries' wording."""
    paths = []
    for number, size in enumerate(sizes):
        records = conversation_records(size)
        for record in records:
            record["messages"][-1]["content"] = f"source {number}: " + record["messages"][-1]["content"]
        paths.append(write_jsonl(tmp_path / f"set{number}.jsonl", records))
    return paths


def test_a_run_logs_each_steps_dataset_and_saves_the_prompts(tiny_model_dir, tmp_path):
    a, b, c = datasets(tmp_path)
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"datasets:\n  - {{name: alpha, path: {a}, prompt: 'query: '}}\n"
                       f"  - {{name: beta, path: {b}, negatives: 0}}\n  - {{path: {c}, prompt: 'question: '}}\n")
    out = tmp_path / "out"
    efficient_train.main(common(tiny_model_dir, str(mixture), out, "--per_device_train_batch_size", "4",
                                "--num_train_epochs", "2", "--logging_steps", "1", "--mini_batch_size", "3"))
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    steps = [entry for entry in log if "loss" in entry]
    assert len(steps) == 2 * (4 + 2 + 3)  # ceil(13/4) + ceil(8/4) + ceil(11/4) a epoch
    assert Counter(entry["dataset"] for entry in steps) == {"alpha": 8, "beta": 4, "set2": 6}
    for entry in steps:
        assert entry[f"loss/{entry['dataset']}"] == pytest.approx(entry["loss"], abs=1e-3)
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "", "document": "", "alpha": "query: ", "beta": "", "set2": "question: "}
    record = json.loads((out / "training_args.json").read_text())
    assert record["mixture"] == "proportional"


def test_the_collator_gives_each_dataset_its_prompt_and_negatives(tiny_model_dir):
    from transformers import AutoTokenizer

    from longcontrast.collator import ContrastiveCollator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"query": "where", "positive": "here", "negatives": ["a", "b"], "dataset": d} for d in (0, 1)]
    collator = ContrastiveCollator(tokenizer, 16, 16, num_hard_negatives=2, dataset_prompts=("query: ", ""),
                                   dataset_negatives=(2, 0))
    batch = collator(rows)
    with_prompt, without = (tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["query_ids"])
    assert with_prompt == "query : where" and without == "where"
    assert len(batch["passage_ids"]) == 2 + 2 and batch["dataset"] == -1
    assert collator(rows[:1])["dataset"] == 0


def test_one_prompt_for_every_dataset_is_the_models_query_prompt(tiny_model_dir, tmp_path):
    a, b, _ = datasets(tmp_path)
    out = tmp_path / "out"
    origin_train.main(common(tiny_model_dir, f"first={a}", out, "--train_data", f"first={a}", f"second={b}",
                             "--query_prompt", "query: ", "--per_device_train_batch_size", "4", "--max_steps", "2"))
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "document": ""}


def test_resume_mid_run_ends_at_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    """A mixture run (dropout on, an epoch of 6 steps) resumed from checkpoint-4 and from checkpoint-8
    (the second epoch's plan) ends bit for bit where the uninterrupted run does."""
    paths = datasets(tmp_path)
    argv = ["--train_data", *paths, "--mixture", "temperature", "--per_device_train_batch_size", "4", "--max_steps",
            "10", "--dropout", "0.1", "--save_strategy", "steps", "--save_steps", "4", "--save_total_limit", "3",
            "--mini_batch_size", "3", "--dataloader_drop_last", "true"]
    efficient_train.main(common(tiny_model_dir, paths[0], tmp_path / "whole", *argv))
    reference = weights(tmp_path / "whole")
    for step in (4, 8):
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", tmp_path / f"from{step}" / f"checkpoint-{step}")
        efficient_train.main(common(tiny_model_dir, paths[0], tmp_path / f"from{step}", *argv))
        resumed = weights(tmp_path / f"from{step}")
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), step


def test_torchrun_draws_each_global_batch_from_one_dataset(tiny_model_dir, tmp_path):
    """2 processes, 3 datasets of 13, 8 and 11 examples, global batch 4: the steps per dataset are
    the proportional counts (4, 2, 3) and the run ends without a process waiting for a batch."""
    paths = datasets(tmp_path)
    stderr = torchrun("efficient_train.py", *common(tiny_model_dir, paths[0], tmp_path / "ddp", "--train_data", *paths,
                                                    "--per_device_train_batch_size", "2", "--mini_batch_size", "2",
                                                    "--logging_steps", "1"))
    assert "set0 4 (13 examples), set1 2 (8 examples), set2 3 (11 examples)" in stderr
    log = [json.loads(line) for line in (tmp_path / "ddp" / "loss_log.jsonl").read_text().splitlines()]
    assert Counter(entry["dataset"] for entry in log if "loss" in entry) == {"set0": 4, "set1": 2, "set2": 3}


def test_mixed_batches_keep_one_shuffle(tiny_model_dir, tmp_path):
    paths = datasets(tmp_path)
    out = tmp_path / "mixed"
    origin_train.main(common(tiny_model_dir, paths[0], out, "--train_data", *paths, "--mixed_batches",
                             "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1"))
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert all("dataset" not in entry for entry in log)


def test_names_from_paths_and_name_equals_path(tmp_path):
    a, b, c = datasets(tmp_path)
    (tmp_path / "x").mkdir()
    again = shutil.copy(a, tmp_path / "x" / "set0.jsonl")
    specs = parse_train_data([a, f"mine={b}", str(again)])
    assert [s.name for s in specs] == ["set0", "mine", "set0_2"]
    assert parse_train_data([c])[0].path == c


@pytest.mark.parametrize("entries, flags, message", [
    (["mixture.yaml:datasets: [{path: nope.jsonl}]"], [], "nope.jsonl: not found"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, weight: -1}]"], [], "the weight must be a finite number >= 0"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, weight: 0}, {path: set1.jsonl, weight: 0}]"], [], "every weight is 0"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, size: 3}]"], [], "unknown keys ['size']"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, name: a b}]"], [], "dataset name 'a b' must be"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, name: a}, {path: set1.jsonl, name: a}]"], [], "'a' is given twice"),
    (["mixture.yaml:datasets: [oops"], [], "malformed YAML"),
    (["set0.jsonl", "set1.jsonl"], ["--mixture", "zipf"], "invalid choice: 'zipf'"),
    (["set0.jsonl", "set1.jsonl"], ["--per_device_train_batch_size", "9"], "dataset set1 has 8 examples, fewer than one"),
    (["set0.jsonl", "set1.jsonl"], ["--mixed_batches", "--mixture", "round_robin"], "--mixture round_robin need per"),
    (["set0.jsonl", "set1.jsonl"], ["--train_sampling_strategy", "group_by_length"], "orders the whole data"),
    (["mixture.yaml:datasets: [{path: set0.jsonl, corpus: none.jsonl}]"], [], "none.jsonl: not found"),
    (["mixture.yaml:datasets: [{path: set0.jsonl}]"], ["--train_corpus", "README.md"], "give each dataset its 'corpus'"),
    (["ids.jsonl:{\"query\": \"q\", \"positive_document_ids\": [\"d1\"]}\n"], [], "ids.jsonl:1: this record names"),
])
def test_bad_mixtures_are_one_error_line(entries, flags, message, tiny_model_dir, tmp_path, capsys):
    datasets(tmp_path)
    data = []
    for entry in entries:
        name, _, content = entry.partition(":")
        if content:
            (tmp_path / name).write_text(content.replace("\\n", "\n"))
        data.append(str(tmp_path / name))
    err = run_main(origin_train, common(tiny_model_dir, data[0], tmp_path / "out", "--train_data", *data, *flags), capsys)
    assert message in err and err.count("\n") == 1, err
