"""The contrastive Trainer and the driver shared by both training scripts."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import warnings

import torch
from torch.nn.parallel import DistributedDataParallel
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import UserError, checkpoints
from .arguments import DEFAULT_MAX_POSITIONS, parse_arguments, validate, validate_lengths
from .data import ContrastiveCollator, length_sorted_mini_batches, make_dataset, max_known_positives, pad, unique_sequences
from .records import load_examples
from .distributed import any_process, gather_batch, shut_down, world_size
from .gradcache import grad_cache_step
from .loss import LossOutput, contrastive_loss
from .lora import add_lora, merge
from .modeling import DualEncoder, default_model_path, load_encoder, prepare_tokenizer, read_pooling
from .positions import freeze_rows, position_offset, position_table, token_positions

logger = logging.getLogger(__name__)
# DDP's deprecation notice for broadcast_buffers=False, which is deliberate here (ddp_broadcast_buffers below).
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


class ContrastiveTrainer(Trainer):
    """A ``Trainer`` whose ``training_step`` runs the contrastive forward/backward.

    ``mini_batch_size=None``: the whole batch is encoded with autograd (origin_train.py). Otherwise
    GradCache in mini-batches of that size (efficient_train.py). Scheduling, mixed precision,
    clipping, the optimizer step, checkpoints and logging are the Trainer's.
    """

    def __init__(self, *args, temperature: float, mini_batch_size: int | None = None,
                 mini_batch_tokens: int | None = None, deduplicate_texts: bool = True,
                 negatives_cross_device: bool = False, checkpoint_trainable_only: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        # LoRA: checkpoints hold the trained parameters only (the frozen base is the model folder's)
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.temperature = temperature
        self.negatives_cross_device = negatives_cross_device
        self.mini_batch_size = mini_batch_size
        self.mini_batch_tokens = mini_batch_tokens
        self.deduplicate_texts = deduplicate_texts
        self._accuracy_sum, self._accuracy_count = 0.0, 0
        self._non_finite_loss = False  # in any micro-batch of the current optimizer step
        self._bad_steps_in_a_row = 0
        self._staging = False

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        # Trainer divides the loss by the accumulation steps; it sums the gradients of whole batches.
        scale = 1.0 / self.current_gradient_accumulation_steps
        output = contrastive_step(
            model, inputs, self.temperature, self.processing_class.pad_token_id, self.args.device,
            self.mini_batch_size, self.mini_batch_tokens, scale, self.accelerator.backward,
            self.negatives_cross_device, self.deduplicate_texts,
        )
        self._non_finite_loss |= not torch.isfinite(output.loss).item()
        if self.accelerator.sync_gradients:  # the last micro-batch: the optimizer step comes next
            self._skip_step_if_not_finite(model)
        self._accuracy_sum += output.accuracy.item()
        self._accuracy_count += 1
        return output.loss.detach() * scale

    def _skip_step_if_not_finite(self, model) -> None:
        """Turn a step with a NaN/inf loss or gradient into a no-op; stop after ``max_bad_steps`` in a row.

        Dropping every ``.grad`` makes PyTorch's optimizers leave each parameter and its state
        (moments, step count) untouched. With fp16 the gradient scaler already skips overflowing
        steps and lowers its scale, which is the expected behaviour there.
        """
        bad_loss, self._non_finite_loss = self._non_finite_loss, False
        if self.args.fp16:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad_grad = bool(grads) and not torch.stack([g.isfinite().all() for g in grads]).all().item()
        # All processes skip together, or their weights would drift apart.
        bad_loss, bad_grad = any_process([bad_loss, bad_grad], self.args.device)
        if not (bad_loss or bad_grad):
            self._bad_steps_in_a_row = 0
            return
        model.zero_grad(set_to_none=True)
        self._bad_steps_in_a_row += 1
        step = self.state.global_step + 1
        logger.warning("step %d: non-finite %s; the optimizer step is skipped (%d in a row, --max_bad_steps %d)",
                       step, "loss" if bad_loss else "gradient", self._bad_steps_in_a_row, self.args.max_bad_steps)
        if self._bad_steps_in_a_row >= self.args.max_bad_steps:
            latest = checkpoints.latest_checkpoint(self.args.output_dir)
            raise UserError(
                f"{self._bad_steps_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
                "stopped without saving the model. Lower --learning_rate, check the data"
                + (f", or resume from {latest}" if latest else "")
            )

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # Group by what one optimizer step consumes across all processes (the Trainer uses one
            # process's share), so that N processes draw the order one process would.
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSeededLengthGroupedSampler(batch, lengths=sampler.lengths, seed=seed)
        return sampler

    def _get_output_dir(self, trial) -> str:
        if self._staging:  # see _save_checkpoint
            return os.path.join(self.args.output_dir, checkpoints.STAGING)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written to a staging folder and renamed into place when complete."""
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            staged = os.path.join(self.args.output_dir, checkpoints.STAGING, f"checkpoint-{self.state.global_step}")
            final = checkpoints.publish(staged, self.args.output_dir)
            checkpoints.rotate(self.args.output_dir, self.args.save_total_limit, keep=final)
        self.accelerator.wait_for_everyone()

    def _trained_names(self) -> set[str]:
        return {name for name, p in self.accelerator.unwrap_model(self.model).named_parameters() if p.requires_grad}

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.checkpoint_trainable_only and state_dict is None:
            trained = self._trained_names()
            state_dict = {k: v for k, v in self.accelerator.unwrap_model(self.model).state_dict().items() if k in trained}
        super()._save(output_dir, state_dict)

    def _issue_warnings_after_load(self, load_result) -> None:
        if not self.checkpoint_trainable_only:
            return super()._issue_warnings_after_load(load_result)
        missing = self._trained_names() & set(load_result.missing_keys)
        if missing or load_result.unexpected_keys:
            raise UserError(f"the checkpoint does not match the LoRA model: missing {sorted(missing)[:5]}, "
                            f"unexpected {sorted(load_result.unexpected_keys)[:5]}")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._accuracy_count:
            logs["accuracy"] = round(self._accuracy_sum / self._accuracy_count, 4)
            self._accuracy_sum, self._accuracy_count = 0.0, 0
        super().log(logs, start_time)


class TrainingStopped(Exception):
    """The run stopped early on a signal, after writing a checkpoint."""


class CheckpointOnSignal(TrainerCallback):
    """On SIGTERM (what a scheduler or a pre-empted cloud machine sends before killing): finish the
    current step, write a checkpoint, stop. All processes agree on the step (one all-reduce of a
    flag per step when distributed). :meth:`installed` scopes the handler to the training loop."""

    def __init__(self):
        self.received = False
        self.stopped_at: int | None = None

    @contextlib.contextmanager
    def installed(self):
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        (stop,) = any_process([self.received], args.device)
        if stop:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class CollatorEpoch(TrainerCallback):
    """Tells the collator which epoch starts, so that its draw of each query's positive changes
    per epoch and a resumed run (its state's epoch restored) draws what an uninterrupted one did."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)  # 0 at the start; e exactly after e epochs
        return control


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """``--train_sampling_strategy group_by_length`` drawing from its own generator, seeded with
    ``seed + epoch``: every process draws the same order whatever its dropout seed, and a resumed
    run draws what an uninterrupted one would (the Trainer's own draws from the global RNG)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer at each epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def contrastive_step(
    model, inputs: dict, temperature: float, pad_token_id: int, device,
    mini_batch_size: int | None = None, mini_batch_tokens: int | None = None,
    scale: float = 1.0, backward=torch.Tensor.backward, cross_device: bool = False, deduplicate: bool = True,
) -> LossOutput:
    """Forward and backward of one contrastive batch from :class:`ContrastiveCollator`; gradients
    are left in ``.grad`` (the optimizer step is the caller's).

    ``mini_batch_size=None``: the plain step, the whole batch encoded with autograd. Otherwise
    GradCache over mini-batches of at most ``mini_batch_size`` texts and ``mini_batch_tokens``
    padded tokens, cut from length-sorted texts (less padding); the loss sees the embeddings back
    in batch order. ``scale`` multiplies the loss before differentiation. ``deduplicate``: GradCache
    encodes each distinct token sequence of a side once and the loss sees it at every row holding a
    copy (autograd adds the copies' gradients); the plain step encodes every copy.

    ``cross_device``: the loss spans the batches of all processes (:mod:`.distributed`); the
    backward runs on ``world_size * scale * loss`` so that DDP's averaging yields the gradient of
    the global loss. A ``DistributedDataParallel`` ``model`` synchronises gradients once, in the
    last GradCache replay.
    """
    text_ids = inputs["passage_text_ids"].to(device)  # (P,)
    known = inputs.get("query_positive_ids")  # (B, M) every positive of each query, or None
    known = known.to(device) if known is not None else None
    shifts = inputs.get("passage_position_shifts")  # P ints (shifted position ids) or None

    def loss_fn(queries, passages):  # (B, D), (P, D) in batch order
        if cross_device:
            queries, passages, targets, ids, all_known = gather_batch(queries, passages, text_ids, known)
            return contrastive_loss(queries, passages, temperature, targets, ids, all_known)
        return contrastive_loss(queries, passages, temperature, passage_text_ids=text_ids, query_positive_ids=known)

    if cross_device:
        scale = scale * world_size()
    if mini_batch_size is None:
        queries = pad(inputs["query_ids"], pad_token_id, device)
        passages = pad(inputs["passage_ids"], pad_token_id, device, shifts)
        return full_batch_step(model, queries, passages, loss_fn, scale, backward)

    def mini_batches(sequences, shifts=None):
        """Length-sorted mini-batches of the (distinct) sequences, and for each input row the row of
        its embedding among theirs. Copies share their shift (see ContrastiveCollator)."""
        unique, copy_of = unique_sequences(sequences) if deduplicate else (sequences, list(range(len(sequences))))
        if shifts is not None:
            shift_of = dict(zip(copy_of, shifts))  # distinct text -> its shift
            shifts = [shift_of[u] for u in range(len(unique))]
        batches, order = length_sorted_mini_batches(unique, mini_batch_size, mini_batch_tokens, pad_token_id, device,
                                                    shifts)
        return batches, inverse_permutation(order)[torch.tensor(copy_of, dtype=torch.long)]

    queries, query_restore = mini_batches(inputs["query_ids"])
    passages, passage_restore = mini_batches(inputs["passage_ids"], shifts)
    sync_context = None
    if isinstance(model, DistributedDataParallel):
        sync_context = lambda is_last: contextlib.nullcontext() if is_last else model.no_sync()  # noqa: E731
    return grad_cache_step(
        lambda batch, side: model(**batch, side=side),
        queries, passages,
        lambda q, p: loss_fn(q[query_restore], p[passage_restore]),
        device, scale, backward, sync_context,
    )


def inverse_permutation(order: list[int]) -> torch.Tensor:
    """``restore`` with ``sorted_rows[restore] == rows`` when ``sorted_rows = rows[order]``."""
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return restore


def full_batch_step(model, queries: dict, passages: dict, loss_fn, scale: float, backward) -> LossOutput:
    """The plain step: encode the whole batch with autograd, one backward through everything."""
    output = loss_fn(model(**queries, side="query"), model(**passages, side="passage"))  # (B, D), (P, D)
    backward(output.loss * scale)
    return LossOutput(output.loss.detach(), output.accuracy)


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
