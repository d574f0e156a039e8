"""The driver shared by both training scripts: parse, load, train, save (the Trainer:
:mod:`.trainer`; one step: :mod:`.step`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import warnings

import torch
from transformers import set_seed

from . import UserError, checkpoints
from .arguments import DEFAULT_MAX_POSITIONS, parse_arguments, validate, validate_lengths
from .collator import ContrastiveCollator, check_spans, make_dataset, max_known_positives
from .distributed import shut_down
from .lora import add_lora, merge
from .modeling import DualEncoder, default_model_path, load_encoder, prepare_tokenizer, read_pooling
from .positions import freeze_rows, position_offset, position_table, token_positions
from .records import load_examples
from .trainer import CheckpointOnSignal, CollatorEpoch, ContrastiveTrainer, TrainingStopped

logger = logging.getLogger(__name__)
# DDP's deprecation notice for broadcast_buffers=False, which is deliberate here (ddp_broadcast_buffers below).
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def train(argv=None, gradcache: bool = True) -> str:
    """Parse ``argv``, train, save; returns the output folder. Raises ``UserError`` on bad input."""
    model_args, data_args, cache_args, training_args = parse_arguments(argv, gradcache)
    if not training_args.should_log:  # one process logs
        logging.getLogger(__package__).setLevel(logging.WARNING)
    validate(model_args, data_args, cache_args, training_args)
    checkpoints.resolve_resume(training_args)
    model_path = model_args.model_name_or_path or default_model_path()
    pooling = model_args.pooling or read_pooling(model_path) or "cls"
    examples = load_examples(data_args.train_data, data_args.query_turns)
    if pooling not in ("mean", "max") and any(e.positive_span or e.negative_spans for e in examples):
        raise UserError(f"the data has span records, whose vectors pool the span's tokens; pooling {pooling!r} "
                        "does not pool over tokens: use --pooling mean (or max)")

    # Defaults resolved here so training_args.json records them.
    if model_args.attention_dropout is None:
        model_args.attention_dropout = model_args.dropout if model_args.dropout is not None else 0.0
    distributed = training_args.world_size > 1
    if model_args.negatives_cross_device is None:
        model_args.negatives_cross_device = distributed
    if training_args.data_seed is None:  # the shuffle, the same in every process (see below)
        training_args.data_seed = training_args.seed
    if training_args.ddp_find_unused_parameters is None:
        # Untied GradCache synchronises in the last passage replay, which the query encoder takes
        # no part in; everywhere else every trainable parameter is used, and the search is waste.
        training_args.ddp_find_unused_parameters = bool(gradcache and model_args.untie_encoders)
    lora = model_args.lora_r > 0
    if model_args.torch_dtype is None:
        model_args.torch_dtype = "auto" if lora else "float32"
    set_seed(training_args.seed)  # before the model exists: the random position init draws from it
    encoder, tokenizer = load_encoder(
        # LoRA keeps the base model as it is, its position table included: no default extension
        model_path, model_args.max_position_embeddings or (None if lora else DEFAULT_MAX_POSITIONS),
        model_args.position_init, model_args.dropout, model_args.attention_dropout, model_args.trust_remote_code,
        strict_positions=model_args.max_position_embeddings is not None,
        prefer_flash_attention=torch.cuda.is_available() and (training_args.bf16 or training_args.fp16),
        dtype=model_args.torch_dtype if model_args.torch_dtype == "auto" else getattr(torch, model_args.torch_dtype),
    )
    if lora and getattr(position_table(encoder), "trained_rows", None) is not None:
        raise UserError(f"--max_position_embeddings {model_args.max_position_embeddings} with --lora_r: the extended "
                        "position table is not part of the base model that the saved adapter names; train LoRA at the "
                        f"model's {position_table(encoder).trained_rows - position_offset(position_table(encoder))} "
                        "positions, or extend without LoRA")
    dtype = next(encoder.parameters()).dtype
    if dtype != torch.float32 and not lora:
        raise UserError(f"--torch_dtype auto loaded {dtype} weights, which full fine-tuning would train in half "
                        "precision; use --torch_dtype float32 (with --bf16 for mixed precision), or --lora_r")
    prepare_tokenizer(tokenizer, pooling)
    model_args.max_position_embeddings = token_positions(encoder)  # recorded as resolved
    validate_lengths(data_args, model_args.max_position_embeddings)
    check_spans(examples, tokenizer, data_args.passage_max_len, data_args.passage_instruction)
    table = position_table(encoder)
    asked = [flag for flag, on in (("--shift_positions", model_args.shift_positions),
                                   (f"--trainable_parameters {model_args.trainable_parameters}",
                                    model_args.trainable_parameters != "all")) if on]
    if asked and table is None:
        raise UserError(f"{' and '.join(asked)}: a learned position table is needed, which {type(encoder).__name__} "
                        f"does not have (rotary or relative positions)")
    if model_args.trainable_parameters != "all":
        encoder.requires_grad_(False)
        table.weight.requires_grad_(True)
    if model_args.trainable_parameters == "new_positions":
        if getattr(table, "trained_rows", None) is None:
            raise UserError(f"--trainable_parameters new_positions trains the rows this run adds to the position "
                            f"table, but it was not extended (the model already reads {model_args.max_position_embeddings} "
                            f"positions); ask for more with --max_position_embeddings or use positions")
        if training_args.weight_decay:
            raise UserError("--trainable_parameters new_positions keeps the trained rows exact, which weight decay "
                            f"would shrink; use --weight_decay 0 (got {training_args.weight_decay})")
    if lora:
        encoder = add_lora(encoder, base_path=model_path, r=model_args.lora_r,
                           alpha=model_args.lora_alpha or 2 * model_args.lora_r, dropout=model_args.lora_dropout,
                           target_modules=model_args.lora_target_modules,
                           modules_to_save=model_args.lora_modules_to_save)
    model = (DualEncoder.untied if model_args.untie_encoders else DualEncoder)(encoder, pooling)
    if model_args.trainable_parameters == "new_positions":
        for each in model.encoders():  # after untying: a gradient hook is not copied with its module
            freeze_rows(position_table(each), table.trained_rows)
    logger.info(
        "%s: %s (%s weights%s), pooling %s, %d positions, %d examples, contrastive batch %d x %d device(s), %s",
        "efficient_train" if gradcache else "origin_train", model_path, str(dtype).removeprefix("torch."),
        f", LoRA r={model_args.lora_r}" if lora else "", pooling,
        model_args.max_position_embeddings, len(examples), training_args.per_device_train_batch_size,
        training_args.world_size, f"GradCache mini-batch {cache_args.mini_batch_size}" if gradcache else "full batch",
    )
    stop_on_signal = CheckpointOnSignal()
    collator = ContrastiveCollator(
        tokenizer, data_args.query_max_len, data_args.passage_max_len, data_args.num_hard_negatives,
        data_args.query_instruction, data_args.passage_instruction,
        model_args.max_position_embeddings if model_args.shift_positions else None,
        max_known_positives(examples), seed=training_args.data_seed or training_args.seed)
    trainer = ContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=make_dataset(examples),
        data_collator=collator,
        processing_class=tokenizer,
        temperature=model_args.temperature,
        mini_batch_size=cache_args.mini_batch_size if gradcache else None,
        mini_batch_tokens=cache_args.mini_batch_tokens if gradcache else None,
        deduplicate_texts=cache_args.deduplicate_texts if gradcache else False,
        negatives_cross_device=model_args.negatives_cross_device and distributed,
        checkpoint_trainable_only=lora,
        callbacks=[stop_on_signal, CollatorEpoch(collator)],
    )
    if distributed:
        # The same seed everywhere up to here (the model); dropout must differ per process. The
        # data order must not: the samplers draw from their own generators (--data_seed).
        torch.manual_seed(training_args.seed + training_args.process_index)
    if trainer.is_world_process_zero():
        checkpoints.clear_staging(training_args.output_dir)
    with stop_on_signal.installed():
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stop_on_signal.stopped_at is not None:
        raise TrainingStopped(
            f"stopped on SIGTERM after step {stop_on_signal.stopped_at} and wrote "
            f"{os.path.join(training_args.output_dir, f'checkpoint-{stop_on_signal.stopped_at}')}; "
            "run the same command again to resume"
        )

    output_dir = training_args.output_dir
    if trainer.is_world_process_zero():
        save = dict(tokenizer=tokenizer, max_seq_length=data_args.passage_max_len, query_prompt=data_args.query_instruction,
                    passage_prompt=data_args.passage_instruction, trust_remote_code=model_args.trust_remote_code)
        if model_args.merge_lora:
            model.save(os.path.join(output_dir, "adapter"), **save)
            model.query_encoder = merge(model.query_encoder)
        model.save(output_dir, **save)
        arguments = {
            "script": "efficient_train.py" if gradcache else "origin_train.py",
            **{k: v for a in (model_args, data_args, cache_args) if a is not None for k, v in dataclasses.asdict(a).items()},
            "model_name_or_path": model_path,  # resolved defaults
            "pooling": pooling,
            "world_size": training_args.world_size,
            "global_batch_size": training_args.per_device_train_batch_size * training_args.world_size,
            "training": training_args.to_dict(),
        }
        with open(os.path.join(output_dir, "loss_log.jsonl"), "w") as handle:
            for entry in trainer.state.log_history:
                handle.write(json.dumps(entry) + "\n")
        # Written last, and atomically: its presence marks a finished run (see checkpoints.resolve_resume).
        finished = os.path.join(output_dir, checkpoints.FINISHED_MARKER)
        with open(finished + ".tmp", "w") as handle:
            json.dump(arguments, handle, indent=2, default=str)
        os.replace(finished + ".tmp", finished)
        logger.info("saved the model to %s", output_dir)
    return output_dir


def main(argv=None, gradcache: bool = True) -> int:
    """Entry point of both scripts: user errors become one line on stderr and exit status 2."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        train(argv, gradcache)
        shut_down()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as err:
        shut_down()  # every process stopped at the same step
        if int(os.environ.get("RANK", "0")) == 0:  # one says so
            print(str(err), file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None  # what a shell reports for a SIGTERM'd command
    return 0
