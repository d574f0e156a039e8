"""The driver shared by both training scripts: parse, load, train, save (the Trainer:
:mod:`.trainer`; one step: :mod:`.step`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import warnings

import torch
from transformers import EarlyStoppingCallback, set_seed

from . import UserError, checkpoints, cli
from .arguments import DEFAULT_MAX_POSITIONS, parse_arguments
from .collator import ContrastiveCollator, check_spans
from .dev_evaluation import DevEvaluation, check_metric, load_dev_sets
from .distributed import shut_down
from .late_interaction import read_projection
from .lora import add_lora, merge
from .mixture import DatasetSpec, MixtureSampler, batch_counts, parse_train_data
from .modeling import DualEncoder, default_model_path, load_encoder, prepare_tokenizer, read_pooling
from .positions import freeze_rows, position_table, token_positions, unchanged_rows
from .sharding import gathered_state_dict, shard
from .trainer import CheckpointOnSignal, CollatorEpoch, ContrastiveTrainer, TrainingStopped
from .token_ids import with_token_ids
from .training_set import TrainingSet, training_set
from .validation import check_against_model, check_flags, validate_segments

logger = logging.getLogger(__name__)
# DDP's deprecation notice for broadcast_buffers=False, which is deliberate here (ddp_broadcast_buffers below).
warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)


def resolve_defaults(model_args, training_args, *, gradcache: bool) -> None:
    """Defaults that depend on other flags, resolved here so that the run record holds them."""
    if model_args.attention_dropout is None:
        model_args.attention_dropout = model_args.dropout if model_args.dropout is not None else 0.0
    if model_args.negatives_cross_device is None:
        model_args.negatives_cross_device = training_args.world_size > 1
    if training_args.data_seed is None:  # the shuffle, the same in every process (see build_trainer)
        training_args.data_seed = training_args.seed
    if training_args.ddp_find_unused_parameters is None:
        # Untied GradCache synchronises in the last passage replay, which the query encoder takes
        # no part in; everywhere else every trainable parameter is used, and the search is waste.
        training_args.ddp_find_unused_parameters = bool(gradcache and model_args.untie_encoders)
    if model_args.torch_dtype is None:
        model_args.torch_dtype = "auto" if model_args.lora_r > 0 else "float32"
    model_args.model_name_or_path = model_args.model_name_or_path or default_model_path()


def load(model_args, training_args):
    """The encoder (positions extended as asked), its tokenizer, and the position rows still as
    the checkpoint had them when the table was extended (:func:`.positions.unchanged_rows`), else None."""
    from transformers import AutoConfig

    set_seed(training_args.seed)  # before the model exists: the random position init draws from it
    lora = model_args.lora_r > 0
    encoder, tokenizer = load_encoder(
        # LoRA keeps the base model as it is, its position table included: no default extension
        model_args.model_name_or_path, model_args.max_position_embeddings or (None if lora else DEFAULT_MAX_POSITIONS),
        model_args.position_init, model_args.dropout, model_args.attention_dropout, model_args.trust_remote_code,
        strict_positions=model_args.max_position_embeddings is not None,
        prefer_flash_attention=torch.cuda.is_available() and (training_args.bf16 or training_args.fp16),
        dtype=model_args.torch_dtype if model_args.torch_dtype == "auto" else getattr(torch, model_args.torch_dtype),
    )
    checkpoint = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    return encoder, tokenizer, unchanged_rows(position_table(encoder), checkpoint.max_position_embeddings,
                                              model_args.position_init)


def dual_encoder(encoder, model_args, pooling: str, trained_rows: int | None) -> DualEncoder:
    """The model to train: the encoder with what is trainable chosen, LoRA adapters, untied or
    shared; ``trained_rows``: the position rows ``new_positions`` keeps frozen."""
    table = position_table(encoder)
    if model_args.trainable_parameters != "all":
        encoder.requires_grad_(False)
        table.weight.requires_grad_(True)
    if model_args.lora_r > 0:
        encoder = add_lora(encoder, base_path=model_args.model_name_or_path, r=model_args.lora_r,
                           alpha=model_args.lora_alpha or 2 * model_args.lora_r, dropout=model_args.lora_dropout,
                           target_modules=model_args.lora_target_modules,
                           modules_to_save=model_args.lora_modules_to_save)
    model = (DualEncoder.untied if model_args.untie_encoders else DualEncoder)(
        encoder, pooling, projection=projection(encoder, model_args))
    if model_args.trainable_parameters == "new_positions":
        for each in model.encoders():  # after untying: a gradient hook is not copied with its module
            freeze_rows(position_table(each), trained_rows)
    return model


def projection(encoder, model_args) -> torch.nn.Linear | None:
    """The late-interaction projection: the one the checkpoint holds (PyLate's ``1_Dense``), else a
    new ``--colbert_dim`` one (PyLate's: no bias, PyTorch's default init, drawn from the seed), else
    None; ``model_args.colbert_dim`` is set to its width, as resolved."""
    found = read_projection(model_args.model_name_or_path)
    if found is not None:
        if model_args.colbert_dim not in (0, found.out_features):
            raise UserError(f"{model_args.model_name_or_path} holds a {found.out_features}-dimensional token projection; "
                            f"--colbert_dim {model_args.colbert_dim} differs (leave it out to continue from it)")
        model_args.colbert_dim = found.out_features
        return found
    if not model_args.colbert_dim:
        return None
    return torch.nn.Linear(encoder.config.hidden_size, model_args.colbert_dim, bias=False,
                           device=next(encoder.parameters()).device)


def mixture_sampler(specs: list[DatasetSpec], data: TrainingSet, data_args, training_args) -> MixtureSampler | None:
    """The sampler drawing each global batch from one dataset (:mod:`.mixture`); None for one
    dataset or ``--mixed_batches``. Raises :class:`.UserError` where the mixture cannot be drawn."""
    weighted = [s.name for s in specs if s.weight != 1]
    if len(specs) < 2 or data_args.mixed_batches:
        if data_args.mixed_batches and (weighted or data_args.mixture != "proportional"):
            what = f"the weights of {', '.join(weighted)}" if weighted else f"--mixture {data_args.mixture}"
            raise UserError(f"--mixed_batches shuffles every example together: {what} need per-dataset batches "
                            "(leave out --mixed_batches)")
        return None
    if training_args.train_sampling_strategy != "random":
        raise UserError(f"--train_sampling_strategy {training_args.train_sampling_strategy} orders the whole data; with "
                        "several datasets each batch comes from one of them: leave it out, or give --mixed_batches")
    sizes = data.sizes
    batch = training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    drop_last = training_args.dataloader_drop_last
    counts = batch_counts(sizes, [s.weight for s in specs], names=[s.name for s in specs], policy=data_args.mixture,
                          temperature=data_args.mixture_temperature, batch=batch, drop_last=drop_last)
    logger.info("mixture (%s, %s last batches), global batches per epoch: %s", data_args.mixture,
                "dropped" if drop_last else "completed", ", ".join(
                    f"{s.name} {c} ({n} examples)" for s, c, n in zip(specs, counts, sizes)))
    return MixtureSampler(sizes, counts, batch=batch, drop_last=drop_last, round_robin=data_args.mixture == "round_robin",
                          seed=training_args.data_seed)


def query_prompts(specs: list[DatasetSpec], data_args) -> tuple[str, ...] | None:
    """Each dataset's query prompt (its own, else ``--query_prompt``), or None when no dataset has its own."""
    if all(s.prompt is None for s in specs):
        return None
    return tuple(data_args.query_prompt if s.prompt is None else s.prompt for s in specs)


def save_settings(tokenizer, specs, model_args, data_args) -> dict:
    """What :meth:`.DualEncoder.save` records with the model: lengths and prompts (a mixture's
    dataset prompts as the query prompt where one serves every dataset, else as named prompts)."""
    prompts = query_prompts(specs, data_args)
    one_prompt = prompts is not None and len(set(prompts)) == 1
    return dict(tokenizer=tokenizer, max_seq_length=data_args.passage_read_len,
                query_prompt=prompts[0] if one_prompt else data_args.query_prompt,
                passage_prompt=data_args.passage_prompt, trust_remote_code=model_args.trust_remote_code,
                query_max_length=data_args.query_max_len,
                prompts=None if one_prompt or prompts is None else {s.name: p for s, p in zip(specs, prompts)})


def build_trainer(model, tokenizer, data: TrainingSet, specs, model_args, data_args, cache_args, training_args, *,
                  gradcache: bool, callback: CheckpointOnSignal, sampler: MixtureSampler | None,
                  dev_sets: list | None) -> ContrastiveTrainer:
    negatives = [s.negatives for s in specs]
    collator = ContrastiveCollator(
        tokenizer, data_args.query_max_len, data_args.passage_max_len, data_args.num_hard_negatives,
        data_args.query_prompt, data_args.passage_prompt,
        model_args.max_position_embeddings if model_args.shift_positions else None,
        data.max_known_positives, seed=training_args.data_seed or training_args.seed,
        negative_sampling=data_args.negative_sampling, dataset_prompts=query_prompts(specs, data_args),
        dataset_negatives=None if negatives == [None] * len(specs) else tuple(
            data_args.num_hard_negatives if n is None else n for n in negatives), corpus=data.corpus,
        passage_segment_len=data_args.passage_segment_len)
    trainer = ContrastiveTrainer(
        model=model, args=training_args, train_dataset=data.rows,
        data_collator=collator, processing_class=tokenizer, loss=model_args.loss_settings(),
        mini_batch_size=cache_args.mini_batch_size if gradcache else None,
        mini_batch_tokens=cache_args.mini_batch_tokens if gradcache else None,
        deduplicate_texts=cache_args.deduplicate_texts if gradcache else False,
        negatives_cross_device=model_args.negatives_cross_device and training_args.world_size > 1,
        checkpoint_trainable_only=model_args.lora_r > 0, callbacks=[callback, CollatorEpoch(collator)] + (
            [EarlyStoppingCallback(training_args.early_stopping_patience)]
            if training_args.early_stopping_patience is not None else []),
        sharded=training_args.sharding is not None, sampler=sampler,
        dataset_names=[s.name for s in specs] if sampler is not None else None,
        # the Trainer wants an eval_dataset to evaluate at all; DevEvaluation reads the sets itself
        eval_dataset=dev_sets, dev_evaluation=None if dev_sets is None else DevEvaluation(
            dev_sets, tokenizer, query_max_len=data_args.query_max_len,
            passage_max_len=data_args.passage_read_len,
            query_prompt=data_args.query_prompt, passage_prompt=data_args.passage_prompt),
        export=None if dev_sets is None or training_args.sharding else functools.partial(
            export_model, settings=save_settings(tokenizer, specs, model_args, data_args)),
    )
    if training_args.world_size > 1:
        # The same seed everywhere up to here (the model); dropout must differ per process. The
        # data order must not: the samplers draw from their own generators (--data_seed).
        torch.manual_seed(training_args.seed + training_args.process_index)
    return trainer


def export_model(model: DualEncoder, folder: str, *, settings: dict) -> None:
    """A checkpoint's ``model/``: the model as the run saves it at the end (evaluate.py reads it)."""
    model.save(folder, **settings)


def save_run(trainer, model, tokenizer, specs, model_args, data_args, cache_args, training_args, *, gradcache: bool,
             pooling: str) -> None:
    """The model (AutoModel and sentence-transformers folder), the loss log and, last and
    atomically, the run record whose presence marks a finished run (:func:`.checkpoints.resolve_resume`)."""
    output_dir = training_args.output_dir
    save = save_settings(tokenizer, specs, model_args, data_args)
    if model_args.merge_lora:
        model.save(os.path.join(output_dir, "adapter"), **save)
        model.query_encoder = merge(model.query_encoder)
    model.save(output_dir, **save)
    arguments = {
        "script": "efficient_train.py" if gradcache else "origin_train.py",
        **{k: v for a in (model_args, data_args, cache_args) if a is not None for k, v in dataclasses.asdict(a).items()},
        "pooling": pooling,
        "world_size": training_args.world_size,
        "global_batch_size": training_args.per_device_train_batch_size * training_args.world_size,
        "fsdp": dataclasses.asdict(training_args.sharding) if training_args.sharding else None,
        "training": training_args.to_dict(),
    }
    with open(os.path.join(output_dir, "loss_log.jsonl"), "w") as handle:
        for entry in trainer.state.log_history:
            handle.write(json.dumps(entry) + "\n")
    finished = os.path.join(output_dir, checkpoints.FINISHED_MARKER)
    with open(finished + ".tmp", "w") as handle:
        json.dump(arguments, handle, indent=2, default=str)
    os.replace(finished + ".tmp", finished)
    logger.info("saved the model to %s", output_dir)


def train(argv=None, gradcache: bool = True) -> str:
    """Parse ``argv``, train, save; returns the output folder. Raises :class:`.UserError` on bad input."""
    # 1. arguments, checked and completed
    model_args, data_args, cache_args, training_args = parse_arguments(argv, gradcache)
    if not training_args.should_log:  # one process logs
        logging.getLogger(__package__).setLevel(logging.WARNING)
    check_flags(model_args, data_args, cache_args, training_args)
    checkpoints.resolve_resume(training_args)
    resolve_defaults(model_args, training_args, gradcache=gradcache)
    pooling = model_args.pooling or read_pooling(model_args.model_name_or_path) or "cls"
    # 2. the data: the datasets, their examples, and the sampler of a mixture
    specs = parse_train_data(data_args.train_data, data_args.train_corpus)
    data = training_set([s.path for s in specs], corpora=[s.corpus for s in specs], num_turns=data_args.query_turns,
                        scores=model_args.distill_weight > 0, cache_dir=data_args.data_cache_dir,
                        training_args=training_args)
    sampler = mixture_sampler(specs, data, data_args, training_args)
    validate_segments(data_args, model_args, has_spans=bool(data.span_rows))  # before the model loads
    dev_sets = load_dev_sets(training_args.eval_data, split=training_args.eval_split,
                             num_turns=data_args.query_turns) if training_args.eval_data else None
    if dev_sets:
        check_metric(dev_sets, training_args.metric_for_best_model)
    # 3. the encoder, checked against the flags and the data
    encoder, tokenizer, trained_rows = load(model_args, training_args)
    prepare_tokenizer(tokenizer, pooling)
    model_args.max_position_embeddings = token_positions(encoder)  # recorded as resolved
    check_against_model(model_args, data_args, training_args, encoder=encoder, trained_rows=trained_rows,
                        has_spans=bool(data.span_rows), pooling=pooling,
                        lora=model_args.lora_r > 0)
    check_spans(data.rows.select(data.span_rows), tokenizer, data_args.passage_max_len, data_args.passage_prompt)
    if data_args.cache_token_ids:
        with_token_ids(data, tokenizer, query_max_len=data_args.query_max_len,
                       passage_max_len=data_args.passage_max_len, passage_prompt=data_args.passage_prompt,
                       query_prompts=query_prompts(specs, data_args) or (data_args.query_prompt,) * len(specs),
                       training_args=training_args)
    # 4. the model (sharded with --fsdp) and its trainer
    model = dual_encoder(encoder, model_args, pooling, trained_rows)
    if training_args.sharding:
        shard(model, **training_args.sharding.fully_shard_kwargs())
    logger.info(
        "%s: %s (%s weights%s), %s, %d positions, %d examples, contrastive batch %d x %d device(s), %s",
        "efficient_train" if gradcache else "origin_train", model_args.model_name_or_path,
        str(next(encoder.parameters()).dtype).removeprefix("torch."),
        f", LoRA r={model_args.lora_r}" if model_args.lora_r > 0 else "",
        f"late interaction, {model_args.colbert_dim}-d token vectors" if model.projection is not None else f"pooling {pooling}",
        model_args.max_position_embeddings,
        len(data), training_args.per_device_train_batch_size, training_args.world_size,
        f"GradCache mini-batch {cache_args.mini_batch_size}" if gradcache else "plain step (the whole batch with autograd)")
    stop_on_signal = CheckpointOnSignal()
    trainer = build_trainer(model, tokenizer, data, specs, model_args, data_args, cache_args, training_args,
                            gradcache=gradcache, callback=stop_on_signal, sampler=sampler, dev_sets=dev_sets)
    # 5. training, stopped cleanly on SIGTERM
    if trainer.is_world_process_zero():
        checkpoints.clear_staging(training_args.output_dir)
    with stop_on_signal.installed():
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if stop_on_signal.stopped_at is not None:
        raise TrainingStopped(
            f"stopped on SIGTERM after step {stop_on_signal.stopped_at} and wrote "
            f"{os.path.join(training_args.output_dir, f'checkpoint-{stop_on_signal.stopped_at}')}; "
            "run the same command again to resume")
    # 6. the saved model (gathered from the shards into an unsharded twin) and run record
    if training_args.sharding:
        state = gathered_state_dict(model)  # every process takes part
        if trainer.is_world_process_zero():
            model = dual_encoder(load(model_args, training_args)[0], model_args, pooling, trained_rows)
            model.load_state_dict(state, assign=True)
    if trainer.is_world_process_zero():
        save_run(trainer, model, tokenizer, specs, model_args, data_args, cache_args, training_args, gradcache=gradcache,
                 pooling=pooling)
    return training_args.output_dir


def main(argv=None, gradcache: bool = True) -> int:
    """Entry point of both scripts (:func:`.cli.run`: a user error is one line on stderr and exit
    status 2); a run stopped by SIGTERM exits as a shell reports a SIGTERM'd command."""
    def run(args):
        try:
            train(args, gradcache)
        except TrainingStopped as err:
            shut_down()  # every process stopped at the same step
            if int(os.environ.get("RANK", "0")) == 0:  # one says so
                print(str(err), file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        shut_down()
    return cli.run(run, argv)
