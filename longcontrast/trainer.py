"""The contrastive ``Trainer``: its training step (:mod:`.step`), skipped non-finite steps,
atomic checkpoints, and the callbacks and sampler that make runs resumable and distributed runs
draw one order."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from . import UserError, checkpoints
from .distributed import any_process
from .loss import LossSettings
from .step import contrastive_step

logger = logging.getLogger(__name__)


class ContrastiveTrainer(Trainer):
    """A ``Trainer`` whose ``training_step`` runs the contrastive forward/backward.

    ``mini_batch_size=None``: the whole batch is encoded with autograd (origin_train.py). Otherwise
    GradCache in mini-batches of that size (efficient_train.py). Scheduling, mixed precision,
    clipping, the optimizer step, checkpoints and logging are the Trainer's.
    """

    def __init__(self, *args, loss: LossSettings, mini_batch_size: int | None = None,
                 mini_batch_tokens: int | None = None, deduplicate_texts: bool = True,
                 negatives_cross_device: bool = False, checkpoint_trainable_only: bool = False, sharded: bool = False,
                 sampler: torch.utils.data.Sampler | None = None, dataset_names: list[str] | None = None,
                 dev_evaluation: Callable[[torch.nn.Module], dict[str, float]] | None = None,
                 export: Callable[[torch.nn.Module, str], None] | None = None, **kwargs):
        # A model sharded with FSDP2 before the Trainer sees it (--fsdp: longcontrast.sharding) is one the
        # Trainer knows as "sharded at load time": not wrapped in DDP, not moved. The Trainer refuses
        # checkpoints of such a model, whose optimizer state it cannot write; this class writes model
        # and optimizer states together, sharded (torch.distributed.checkpoint).
        self.sharded = sharded
        if sharded:
            kwargs["model"].is_distributed_loading_by_transformers = True
            save_only_model, kwargs["args"].save_only_model = kwargs["args"].save_only_model, True
        try:
            super().__init__(*args, **kwargs)
        finally:
            if sharded:
                self.args.save_only_model = save_only_model
        # LoRA: checkpoints hold the trained parameters only (the frozen base is the model folder's)
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.loss = loss
        self.negatives_cross_device = negatives_cross_device
        self.mini_batch_size = mini_batch_size
        self.mini_batch_tokens = mini_batch_tokens
        self.deduplicate_texts = deduplicate_texts
        self._accuracy_sum, self._accuracy_count = 0.0, 0
        self._part_sums: dict[str, float] = {}  # the loss's named terms since the last log
        self.sampler = sampler  # a mixture's (longcontrast.mixture), else the Trainer's own
        self.dev_evaluation = dev_evaluation  # --eval_data (longcontrast.dev_evaluation)
        self.export = export  # writes the model as saved at the end into a checkpoint's model/ folder
        # several datasets: each logged step names its batches' and gives each one's loss since the last log
        self.dataset_names = dataset_names if dataset_names and len(dataset_names) > 1 else None
        self._dataset_losses: dict[str, list[float]] = {}
        self._non_finite_loss = False  # in any micro-batch of the current optimizer step
        self._bad_steps_in_a_row = 0
        self._staging = False

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        dataset = inputs.pop("dataset", -1)
        # Trainer divides the loss by the accumulation steps; it sums the gradients of whole batches.
        scale = 1.0 / self.current_gradient_accumulation_steps
        output = contrastive_step(
            model, inputs, loss=self.loss, pad_token_id=self.processing_class.pad_token_id,
            device=self.args.device, mini_batch_size=self.mini_batch_size, mini_batch_tokens=self.mini_batch_tokens,
            scale=scale, backward=self.accelerator.backward, cross_device=self.negatives_cross_device,
            deduplicate=self.deduplicate_texts,
        )
        self._non_finite_loss |= not torch.isfinite(output.loss).item()
        if self.accelerator.sync_gradients:  # the last micro-batch: the optimizer step comes next
            self._skip_step_if_not_finite(model)
        self._accuracy_sum += output.accuracy.item()
        self._accuracy_count += 1
        if self.dataset_names:
            name = self.dataset_names[dataset] if dataset >= 0 else "mixed"
            self._dataset_losses.setdefault(name, []).append(output.loss.item())
        if len(output.parts) > 1:  # the terms, when there is more than one
            for name, value in output.parts.items():
                self._part_sums[name] = self._part_sums.get(name, 0.0) + value.item()
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
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]  # this process's shards
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
        if self.sampler is not None:
            return self.sampler
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            # Group by what one optimizer step consumes across all processes (the Trainer uses one
            # process's share), so that N processes draw the order one process would.
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochSeededLengthGroupedSampler(batch, lengths=sampler.lengths, seed=seed)
        return sampler

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The development set's metrics (``eval_<metric>``), logged and passed to the callbacks
        (early stopping); the Trainer's ``metric_for_best_model`` reads them."""
        started = time.perf_counter()
        metrics = self.dev_evaluation(self.accelerator.unwrap_model(self.model))
        metrics = {f"{metric_key_prefix}_{name}": round(value, 6) for name, value in metrics.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.perf_counter() - started, 2)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

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
            if self.export is not None:
                self.export(self.accelerator.unwrap_model(self.model), os.path.join(staged, "model"))
            best = self._name_the_best_checkpoint(staged)
            final = checkpoints.publish(staged, self.args.output_dir)
            checkpoints.rotate(self.args.output_dir, self.args.save_total_limit, keep=[final, *best])
        self.accelerator.wait_for_everyone()

    def _name_the_best_checkpoint(self, staged: str) -> list[str]:
        """The Trainer looks for the best step's checkpoint beside the one it writes (here the staging
        folder): point its state, and the state the checkpoint records, at where the best one lives."""
        if not self.state.best_global_step:
            return []
        best = os.path.join(self.args.output_dir, f"checkpoint-{self.state.best_global_step}")
        if self.state.best_global_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        return [best]

    # --fsdp: model and optimizer in one sharded checkpoint, each process writing and reading its shards
    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        yield  # gradients reduce-scatter at every backward and stay sharded (see longcontrast.sharding)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.sharded and _internal_call:
            return  # a checkpoint's weights are in its sharded state (_save_optimizer_and_scheduler)
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        checkpoints.save_sharded(os.path.join(output_dir, checkpoints.SHARDED), self.model, self.optimizer)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, checkpoints.SCHEDULER))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.sharded:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        # sharded: the weights come with the optimizer state (_load_optimizer_and_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        checkpoints.load_sharded(os.path.join(checkpoint, checkpoints.SHARDED), self.model, self.optimizer)
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, checkpoints.SCHEDULER), weights_only=True))

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
            logs.update({f"{name}_loss": round(total / self._accuracy_count, 4) for name, total in self._part_sums.items()})
            self._accuracy_sum, self._accuracy_count, self._part_sums = 0.0, 0, {}
            if self._dataset_losses:
                logs["dataset"] = ",".join(self._dataset_losses)  # one name when every step had one dataset
                logs.update({f"loss/{name}": round(sum(v) / len(v), 4) for name, v in self._dataset_losses.items()})
                self._dataset_losses = {}
        super().log(logs, start_time)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard of a DTensor (FSDP2), else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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
