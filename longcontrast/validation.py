"""Validation of the training scripts' input, in one place: the flags against each other before
anything loads (:func:`check_flags`), then the flags against the loaded encoder and data
(:func:`check_against_model`). Each problem raises :class:`UserError` naming the flag.
"""

from __future__ import annotations

import os

import torch

from . import UserError
from .late_interaction import read_projection
from .positions import position_offset, position_table


def check_flags(model_args, data_args, cache_args, training_args) -> None:
    if cache_args is not None and cache_args.mini_batch_size < 1:
        raise UserError(f"--mini_batch_size must be >= 1, got {cache_args.mini_batch_size}")
    if cache_args is not None and cache_args.mini_batch_tokens is not None and cache_args.mini_batch_tokens < 1:
        raise UserError(f"--mini_batch_tokens must be >= 1, got {cache_args.mini_batch_tokens}")
    validate_loss(model_args, data_args)
    for name in ("dropout", "attention_dropout"):
        value = getattr(model_args, name)
        if value is not None and not 0 <= value < 1:
            raise UserError(f"--{name} must be in [0, 1), got {value}")
    validate_lora(model_args, training_args)
    if data_args.num_hard_negatives < 0:
        raise UserError(f"--num_hard_negatives must be >= 0, got {data_args.num_hard_negatives}")
    if data_args.query_turns < 1:
        raise UserError(f"--query_turns must be >= 1, got {data_args.query_turns}")
    if model_args.max_position_embeddings is not None:
        validate_lengths(data_args, model_args.max_position_embeddings)
    if training_args.n_gpu > 1:  # the Trainer would wrap the model in nn.DataParallel
        raise UserError(
            f"{training_args.n_gpu} GPUs are visible but the run was not started by torchrun: launch "
            "`torchrun --nproc_per_node N ...`, or choose one GPU with CUDA_VISIBLE_DEVICES"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise UserError(f"launched as {launched} processes but the Trainer set up {training_args.world_size}; "
                        "check --ddp_backend and the launcher's environment")
    if training_args.per_device_train_batch_size < 1:
        raise UserError("--per_device_train_batch_size must be >= 1")
    if training_args.max_bad_steps < 1:
        raise UserError(f"--max_bad_steps must be >= 1, got {training_args.max_bad_steps}")
    if os.path.isfile(training_args.output_dir):
        raise UserError(f"--output_dir {training_args.output_dir} is a file")

def validate_loss(model_args, data_args) -> None:
    """The loss's flags (:class:`.arguments.LossArguments`) against each other."""
    for name in ("temperature", "teacher_temperature"):
        if not getattr(model_args, name) > 0:
            raise UserError(f"--{name} must be > 0, got {getattr(model_args, name)}")
    for name in ("contrastive_weight", "distill_weight"):
        if not getattr(model_args, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(model_args, name)}")
    if model_args.contrastive_weight == 0 and model_args.distill_weight == 0:
        raise UserError("--contrastive_weight 0 and --distill_weight 0 leave nothing to train")
    if model_args.distill_weight > 0 and data_args.num_hard_negatives < 1:
        raise UserError("--distill_weight distils the teacher's scores of each query's positive and hard negatives; "
                        "with --num_hard_negatives 0 there is nothing to compare: give it 1 or more")
    if model_args.colbert_dim < 0:
        raise UserError(f"--colbert_dim must be >= 0 (0: one vector per text), got {model_args.colbert_dim}")
    if model_args.colbert_dim and model_args.untie_encoders:
        raise UserError("--colbert_dim with --untie_encoders: a late-interaction model (PyLate's layout) has one "
                        "encoder and one projection for queries and passages; drop one of the two")
    dims, weights = model_args.matryoshka_dims or [], model_args.matryoshka_weights
    if any(d < 1 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:])):
        raise UserError(f"--matryoshka_dims must be positive and strictly decreasing, got {' '.join(map(str, dims))}")
    if weights is not None and (len(weights) != len(dims) or any(not w > 0 for w in weights)):
        raise UserError(f"--matryoshka_weights needs one positive weight per --matryoshka_dims ({len(dims)}), got "
                        f"{' '.join(map(str, weights))}")


def validate_lengths(data_args, positions: int) -> None:
    """Query and passage lengths must fit the model's positions (known once it is loaded); a passage
    read in segments (``--passage_segment_len``) reads the segment's positions."""
    segment = data_args.passage_segment_len
    if segment is not None and not 3 <= segment < data_args.passage_max_len:
        raise UserError(f"--passage_segment_len must be in [3, --passage_max_len {data_args.passage_max_len}), "
                        f"got {segment}")
    for name in ("query_max_len", "passage_max_len" if segment is None else "passage_segment_len"):
        value = getattr(data_args, name)
        if not 3 <= value <= positions:
            raise UserError(f"--{name} must be in [3, {positions}] (the positions the model reads; see "
                            f"--max_position_embeddings), got {value}")


def validate_segments(data_args, model_args, *, has_spans: bool) -> None:
    """``--passage_segment_len`` reads a passage as late interaction does (``--colbert_dim``, or the
    checkpoint's own projection): token vectors, no shifted positions, no pooling span."""
    if data_args.passage_segment_len is None:
        return
    if not model_args.colbert_dim and read_projection(model_args.model_name_or_path) is None:
        raise UserError("--passage_segment_len reads a passage in segments whose token vectors MaxSim scores together: "
                        "it needs late interaction (--colbert_dim)")
    for flag, on in (("--shift_positions", model_args.shift_positions), ("span records", has_spans)):
        if on:
            raise UserError(f"--passage_segment_len with {flag}: a passage read in segments is neither shifted nor "
                            "pooled over a span; drop one of the two")


def validate_lora(model_args, training_args) -> None:
    """LoRA's flags, half-precision weights and activation checkpointing, checked before loading."""
    lora = model_args.lora_r > 0
    if model_args.lora_r < 0:
        raise UserError(f"--lora_r must be >= 0, got {model_args.lora_r}")
    if not lora:
        given = [flag for flag, on in (("--lora_alpha", model_args.lora_alpha is not None),
                                       ("--lora_dropout", model_args.lora_dropout != 0.0),
                                       ("--lora_target_modules", model_args.lora_target_modules),
                                       ("--lora_modules_to_save", model_args.lora_modules_to_save),
                                       ("--merge_lora", model_args.merge_lora)) if on]
        if given:
            raise UserError(f"{', '.join(given)} without --lora_r: LoRA is off (give --lora_r 16, say)")
        if model_args.torch_dtype in ("bfloat16", "float16"):
            raise UserError(f"--torch_dtype {model_args.torch_dtype} would train the weights themselves in half "
                            "precision; full fine-tuning keeps float32 weights (use --bf16 or --fp16 for mixed "
                            "precision), or train LoRA adapters over half-precision weights with --lora_r")
        return
    if not 0 <= model_args.lora_dropout < 1:
        raise UserError(f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}")
    for flag, conflict in (("--trainable_parameters", model_args.trainable_parameters != "all"),
                           ("--untie_encoders", model_args.untie_encoders)):
        if conflict:
            raise UserError(f"--lora_r with {flag}: LoRA trains adapters on one shared encoder; drop {flag}, or "
                            "train without LoRA")
    if model_args.torch_dtype in ("bfloat16", "float16") and model_args.lora_modules_to_save and not (
            training_args.bf16 or training_args.fp16):
        raise UserError("--lora_modules_to_save trains whole modules in float32 over half-precision weights, "
                        "which needs mixed precision: add --bf16 (or --fp16), or use --torch_dtype float32")
    kwargs = training_args.activation_checkpointing_kwargs or {}
    if training_args.activation_checkpointing and kwargs.get("use_reentrant"):
        raise UserError("use_reentrant true: reentrant activation checkpointing gives LoRA adapters no gradient "
                        "behind frozen embeddings and breaks DDP; leave it out (non-reentrant is the default)")


def check_against_model(model_args, data_args, training_args, *, encoder, trained_rows: int | None, has_spans: bool,
                        pooling: str, lora: bool) -> None:
    """The flags against what loading found: the encoder's position table (``trained_rows``: its
    rows left as the checkpoint had them, None if it was not extended), its weights' dtype, the
    positions it reads, and span records' pooling."""
    if not model_args.colbert_dim and pooling not in ("mean", "max") and has_spans:
        raise UserError(f"the data has span records, whose vectors pool the span's tokens; pooling {pooling!r} "
                        "does not pool over tokens: use --pooling mean (or max)")
    width = model_args.colbert_dim or encoder.config.hidden_size
    if model_args.matryoshka_dims and model_args.matryoshka_dims[0] > width:
        raise UserError(f"--matryoshka_dims {model_args.matryoshka_dims[0]} is wider than the model's "
                        f"{width}-dimensional vectors")
    table = position_table(encoder)
    if lora and trained_rows is not None:
        raise UserError(f"--max_position_embeddings {model_args.max_position_embeddings} with --lora_r: the extended "
                        "position table is not part of the base model that the saved adapter names; train LoRA at the "
                        f"model's {trained_rows - position_offset(table)} positions, or extend without LoRA")
    dtype = next(encoder.parameters()).dtype
    if dtype != torch.float32 and not lora:
        raise UserError(f"--torch_dtype auto loaded {dtype} weights, which full fine-tuning would train in half "
                        "precision; use --torch_dtype float32 (with --bf16 for mixed precision), or --lora_r")
    validate_lengths(data_args, model_args.max_position_embeddings)
    asked = [flag for flag, on in (("--shift_positions", model_args.shift_positions),
                                   (f"--trainable_parameters {model_args.trainable_parameters}",
                                    model_args.trainable_parameters != "all")) if on]
    if asked and table is None:
        raise UserError(f"{' and '.join(asked)}: a learned position table is needed, which {type(encoder).__name__} "
                        f"does not have (rotary or relative positions)")
    if model_args.trainable_parameters == "new_positions":
        if trained_rows is None:
            raise UserError(f"--trainable_parameters new_positions trains the rows this run adds to the position "
                            f"table, but it was not extended (the model already reads {model_args.max_position_embeddings} "
                            f"positions); ask for more with --max_position_embeddings or use positions")
        if training_args.weight_decay:
            raise UserError("--trainable_parameters new_positions keeps the trained rows exact, which weight decay "
                            f"would shrink; use --weight_decay 0 (got {training_args.weight_decay})")
