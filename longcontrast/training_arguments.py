"""The Trainer's arguments as the training scripts take them: contrastive defaults, the flags that
cannot apply refused at start-up, FSDP2 read from ``--fsdp``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .sharding import settings_from_flags

# The Trainer's flags that cannot do here what they say, and why: refused at start-up, hidden from --help.
REFUSED_TRAINER_FLAGS = {
    "do_eval": (lambda a: a.do_eval, "the Trainer does not read it: --eval_data evaluates during training"),
    "do_predict": (lambda a: a.do_predict, "there is nothing to predict; run evaluate.py on the saved model"),
    "label_smoothing_factor": (lambda a: a.label_smoothing_factor != 0,
                               "the contrastive loss does not use the Trainer's label smoothing"),
    "neftune_noise_alpha": (lambda a: a.neftune_noise_alpha is not None,
                            "NEFTune adds noise to a language model's input embeddings for instruction tuning; "
                            "the dual encoder has no such hook"),
    "auto_find_batch_size": (lambda a: a.auto_find_batch_size,
                             "it would shrink the contrastive batch (and its in-batch negatives) on an out-of-memory "
                             "error without telling; lower --mini_batch_size or --mini_batch_tokens instead"),
    "push_to_hub": (lambda a: a.push_to_hub,
                    "the Trainer would push its checkpoint layout, not the saved model; upload --output_dir yourself "
                    "(huggingface-cli upload) once training ends"),
}


@dataclass
class ContrastiveTrainingArguments(TrainingArguments):
    """``transformers.TrainingArguments`` with defaults for contrastive fine-tuning, and the project's
    flags: skipped non-finite steps, FSDP2, evaluation on a development set during training."""

    _argument_group_name = "training (transformers.TrainingArguments; flags that cannot apply are refused)"

    output_dir: str | None = field(
        default=None, metadata={"help": "Where the model, its checkpoints and logs go (default: a new folder "
                                "under outputs/)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an existing, non-empty --output_dir."})
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Linear warm-up over this fraction of the training steps (sets --warmup_steps)."})
    per_device_train_batch_size: int = field(
        default=16, metadata={"help": "The contrastive batch per device: queries scored against each other's "
                              "positives and hard negatives."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Whole contrastive batches whose gradients are added before each optimizer "
                             "step. This does NOT enlarge the pool of in-batch negatives."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the training data."})
    logging_steps: float = field(default=1, metadata={"help": "Log loss and in-batch accuracy every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False (custom batches)."})
    dataloader_pin_memory: bool = field(
        default_factory=torch.cuda.is_available, metadata={"help": "Pin batches in memory (default: on CUDA only)."})
    ddp_broadcast_buffers: bool | None = field(
        default=False, metadata={"help": "DDP: broadcast buffers at every forward. Off: the encoder's buffers are "
                                 "constants, and GradCache runs a different number of forwards per process."})
    max_bad_steps: int = field(
        default=3, metadata={"help": "A step whose loss or gradient is NaN or inf is skipped (the parameters and "
                             "optimizer state stay as they were; with --fp16 the loss scaler skips it instead); "
                             "this many in a row stop the run with an error instead of saving a broken model."})
    fsdp: str | None = field(
        default=None, metadata={"nargs": "?", "const": "full_shard", "help": (
            "Shard parameters, gradients and optimizer states over the processes with FSDP2 (fully_shard, one unit "
            "per transformer block), for a model too large to hold whole on every GPU; launch with torchrun. "
            "full_shard (the bare flag) frees each block's gathered parameters after its forward, shard_grad_op keeps "
            "them until its backward. Checkpoints are sharded (torch.distributed.checkpoint); the saved model is "
            "gathered, as without it.")})
    eval_data: str | None = field(
        default=None, metadata={"metavar": "DIR", "help": (
            "Evaluate during training on this development set (a BEIR folder, a ChatRAG set with test.json and "
            "documents.json, or a folder of them), as evaluate.py scores the saved model (its whole reading, the "
            "training's lengths and prompts): every --eval_steps steps (--eval_strategy steps, the default when "
            "--eval_steps is given) or at each epoch's end. Metrics are logged as eval_<metric> (e.g. eval_ndcg@10); "
            "--metric_for_best_model picks the best checkpoint, --load_best_model_at_end saves it as the model. Each "
            "checkpoint then also holds model/, the model as saved at the end (evaluate.py and AutoModel read it).")})
    eval_split: str = field(default="test", metadata={"help": "--eval_data as BEIR: its qrels split."})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations in a row without a better "
                                "--metric_for_best_model (transformers' EarlyStoppingCallback)."})
    fsdp_config: str | None = field(
        default=None, metadata={"help": "A JSON file (or dict) for --fsdp: version (2) and reshard_after_forward."})

    def _check_evaluation(self) -> None:
        """The evaluation flags against each other, before the Trainer's own checks: an evaluation
        needs --eval_data, a best model needs a metric, a sharded checkpoint has no best model to load."""
        strategy = str(getattr(self.eval_strategy, "value", self.eval_strategy))
        if not self.eval_data:
            for flag, given in (("eval_strategy", strategy != "no"), ("load_best_model_at_end", self.load_best_model_at_end),
                                ("early_stopping_patience", self.early_stopping_patience is not None),
                                ("metric_for_best_model", self.metric_for_best_model is not None)):
                if given:
                    raise ValueError(f"--{flag} needs a development set to evaluate on: give --eval_data")
            return
        if strategy == "no":
            self.eval_strategy = "steps" if self.eval_steps else "epoch"
        if (self.load_best_model_at_end or self.early_stopping_patience is not None) and not self.metric_for_best_model:
            raise ValueError("--load_best_model_at_end and --early_stopping_patience compare evaluations by "
                             "--metric_for_best_model: give one (e.g. ndcg@10 for a BEIR folder, recall@1 for ChatRAG)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"--early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if self.load_best_model_at_end and self.fsdp:
            raise ValueError("--load_best_model_at_end reads a checkpoint's whole model; --fsdp checkpoints are sharded")

    def __post_init__(self):
        for flag, (given, why) in REFUSED_TRAINER_FLAGS.items():
            if given(self):
                raise ValueError(f"--{flag} is not supported: {why}")
        self._check_evaluation()
        # FSDP2 is applied by longcontrast.sharding, not by Accelerate (which shards on GPUs only and
        # would, on CPUs, silently replicate the model instead)
        self.sharding = None
        if self.fsdp:
            if int(os.environ.get("WORLD_SIZE", "1")) < 2:
                raise ValueError("--fsdp shards the model over processes: launch with torchrun --nproc_per_node N "
                                 "(N >= 2)")
            if self.deepspeed:
                raise ValueError("--fsdp and --deepspeed both shard the model: give one")
            self.sharding = settings_from_flags(self.fsdp, self.fsdp_config, bf16=bool(self.bf16))
        self.fsdp, self.fsdp_config = None, None
        if self.output_dir is None:
            self.output_dir = os.path.join("outputs", time.strftime("run-%Y%m%d-%H%M%S"))
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        self.remove_unused_columns = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Under torchrun without GPUs accelerate only sets up gloo DDP when told to use the CPU;
            # otherwise every process would silently train its own copy.
            self.use_cpu = True
        super().__post_init__()


@dataclass
class GradCacheTrainingArguments(ContrastiveTrainingArguments):
    """efficient_train.py's training arguments: those of :class:`ContrastiveTrainingArguments`, with
    the engines GradCache cannot run under refused before anything starts."""

    def __post_init__(self):
        # DeepSpeed steps its engine inside every backward at the step boundary: each GradCache replay
        # would make one optimizer step on a mini-batch's partial gradient, not the full-batch one.
        if self.deepspeed:
            raise ValueError(
                "--deepspeed is not supported by efficient_train.py: DeepSpeed steps its optimizer inside each "
                "backward, and GradCache runs one backward per mini-batch, so one contrastive batch would not get its "
                "full-batch gradient. To shard a model too large for one GPU, use --fsdp (FSDP2, exact with GradCache); "
                "on one GPU, --lora_r with --torch_dtype bfloat16 and --activation_checkpointing")
        super().__post_init__()
