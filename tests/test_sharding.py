"""--fsdp read as FSDP2 settings, and what it refuses (one process, no torchrun: the runs are in
test_distributed.py and test_llm.py)."""

import json

import pytest
import torch

import efficient_train
import origin_train
from conftest import conversation_records, write_jsonl
from helpers import run_main
from longcontrast.sharding import ShardingSettings, settings_from_flags


@pytest.mark.parametrize("fsdp, config, expected", [
    ("full_shard", None, ShardingSettings(reshard_after_forward=True)),
    ("full_shard", {"fsdp_version": 2}, ShardingSettings(reshard_after_forward=True)),
    ("shard_grad_op auto_wrap", None, ShardingSettings(reshard_after_forward=False)),
    ("full_shard", {"reshard_after_forward": False}, ShardingSettings(reshard_after_forward=False)),
])
def test_fsdp_flags_read_as_fsdp2_settings(fsdp, config, expected):
    assert settings_from_flags(fsdp, config, bf16=False) == expected


def test_bf16_computes_in_bf16_and_reduces_in_float32():
    policy = ShardingSettings(bf16=True).fully_shard_kwargs()["mp_policy"]
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert "mp_policy" not in ShardingSettings().fully_shard_kwargs()


@pytest.mark.parametrize("extra, message", [
    (["--fsdp", "full_shard offload"], "--fsdp offload is not supported"),
    (["--fsdp", "hybrid_shard"], "--fsdp hybrid_shard is not supported"),
    (["--fsdp", "--fsdp_config", "CONFIG_V1"], "version 1 is not supported"),
    (["--fsdp", "--fsdp_config", "CONFIG_KEYS"], "keys ['cpu_offload'] are not supported"),
    (["--fsdp", "--deepspeed", "ds.json"], "--fsdp and --deepspeed both shard the model"),
])
@pytest.mark.parametrize("script", [origin_train, efficient_train], ids=["origin", "efficient"])
def test_what_fsdp_does_not_do_is_one_error_line(script, extra, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the checks come before any process group
    (tmp_path / "v1.json").write_text(json.dumps({"fsdp_version": 1}))
    (tmp_path / "keys.json").write_text(json.dumps({"cpu_offload": True}))
    extra = [{"CONFIG_V1": str(tmp_path / "v1.json"), "CONFIG_KEYS": str(tmp_path / "keys.json")}.get(e, e) for e in extra]
    data = write_jsonl(tmp_path / "d.jsonl", conversation_records(4))
    err = run_main(script, ["--model_name_or_path", tiny_model_dir, "--train_data", data, "--output_dir",
                            str(tmp_path / "o"), *extra], capsys)
    if script is efficient_train and "--deepspeed" in extra:
        message = "--deepspeed is not supported by efficient_train.py"
    assert message in err and not (tmp_path / "o").exists()
