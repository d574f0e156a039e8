"""Several training datasets in one run: their names, weights and prompts (``--train_data`` entries
or a mixture file), how many global batches each gives an epoch (``--mixture``), and the sampler
that draws every global contrastive batch from one dataset, so that in-batch negatives share a domain.

Policies, with ``b_i`` the global batches in one pass over dataset i (``size_i // G`` with
``--dataloader_drop_last``, else ``ceil(size_i / G)``: the last batch completed with the start of the
same pass) and ``w_i`` its weight:

- ``proportional`` (sentence-transformers' PROPORTIONAL, weighted): ``round(w_i * b_i)`` batches;
- ``round_robin`` (sentence-transformers' ROUND_ROBIN): ``min_j b_j`` batches each, datasets in turn;
- ``temperature`` (multilingual and multi-task training): the proportional total split in shares
  ``(w_i * size_i) ** (1 / T)``, largest remainders first, so small datasets are drawn more often.

A dataset drawn past one pass starts another, reshuffled; a batch never spans two passes, so it
never holds one example twice. The order depends on the seed and the epoch only: every process
draws the same, and a resumed run draws what an uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

import torch

from . import UserError
from .readers import read_json

POLICIES = ("proportional", "round_robin", "temperature")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MIXTURE_SUFFIXES = (".yaml", ".yml", ".json")
MIXTURE_KEYS = {"name", "path", "weight", "prompt", "negatives", "corpus"}


@dataclass(frozen=True)
class DatasetSpec:
    """One training dataset: a file or folder in any supported format, with its name (logged with
    each step), weight (a multiplier of its share), query prompt and hard negatives per query (None:
    ``--query_prompt`` and ``--num_hard_negatives``)."""

    name: str
    path: str
    weight: float = 1.0
    prompt: str | None = None
    negatives: int | None = None
    corpus: str | None = None  # where records that name passages by id find them (tevatron's layout)


def parse_train_data(entries: list[str], corpus: str | None = None) -> list[DatasetSpec]:
    """``--train_data`` as datasets: each entry a path (named after its file or folder) or
    ``NAME=PATH``, or a single mixture file (:func:`read_mixture_file`); ``corpus``
    (``--train_corpus``): the corpus of every dataset but a mixture file's. Raises :class:`UserError`
    on a missing path, a bad or repeated name."""
    if corpus is not None and not os.path.exists(corpus):
        raise UserError(f"--train_corpus {corpus}: not found")
    if len(entries) == 1 and is_mixture_file(entries[0]):
        if corpus is not None:
            raise UserError("--train_corpus with a mixture file: give each dataset its 'corpus' in the file")
        return read_mixture_file(entries[0])
    named = [entry.split("=", 1) if not os.path.exists(entry) and "=" in entry else (None, entry) for entry in entries]
    taken, specs = {name for name, _ in named}, []
    for entry, (name, path) in zip(entries, named):
        if name is None:  # named after the file, told apart from the others by a number
            base = name = _default_name(path)
            for number in range(2, len(entries) + 2):
                if name not in taken:
                    break
                name = f"{base}_{number}"
            taken.add(name)
        specs.append(_checked(DatasetSpec(name, path, corpus=corpus), "--train_data"))
    return _unique(specs, "--train_data")


def is_mixture_file(path: str) -> bool:
    """A YAML file, or a small JSON object with a ``datasets`` list (a JSON file of records is data)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".yaml", ".yml"):
        return True
    if suffix != ".json" or not os.path.isfile(path) or os.path.getsize(path) > 1 << 20:
        return False
    with open(path, "rb") as handle:
        if handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":
            return False
    try:
        content = read_json(path)
    except UserError:
        return False
    return isinstance(content, dict) and "datasets" in content


def read_mixture_file(path: str) -> list[DatasetSpec]:
    """A mixture file: ``datasets:``, a list of ``{name, path, weight, prompt, negatives, corpus}``
    (only ``path`` required; a relative path is relative to the file's folder), in YAML or JSON."""
    if path.lower().endswith(".json"):
        content = read_json(path)
    else:
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                content = yaml.safe_load(handle)
        except FileNotFoundError:
            raise UserError(f"{path}: not found") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: malformed YAML ({str(err).splitlines()[0]})") from None
    items = content.get("datasets") if isinstance(content, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: a mixture file holds 'datasets': a non-empty list of {{name, path, weight, prompt, "
                        "negatives, corpus}}")
    folder, specs = os.path.dirname(os.path.abspath(path)), []
    for number, item in enumerate(items, start=1):
        where = f"{path}: dataset {number}"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise UserError(f"{where}: needs a 'path' (a file or folder)")
        if set(item) - MIXTURE_KEYS:
            raise UserError(f"{where}: unknown keys {sorted(set(item) - MIXTURE_KEYS)} (known: {sorted(MIXTURE_KEYS)})")
        weight, negatives, prompt = item.get("weight", 1.0), item.get("negatives"), item.get("prompt")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise UserError(f"{where}: 'weight' must be a number, got {weight!r}")
        if negatives is not None and (not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 0):
            raise UserError(f"{where}: 'negatives' must be a whole number >= 0, got {negatives!r}")
        if prompt is not None and not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' must be a string, got {prompt!r}")
        if item.get("corpus") is not None and not isinstance(item["corpus"], str):
            raise UserError(f"{where}: 'corpus' must be a path, got {item['corpus']!r}")
        corpus = item.get("corpus") and os.path.join(folder, os.path.expanduser(item["corpus"]))
        if corpus and not os.path.exists(corpus):
            raise UserError(f"{where}: corpus {corpus}: not found")
        item_path = os.path.join(folder, os.path.expanduser(item["path"]))
        name = item.get("name", _default_name(item["path"]))
        specs.append(_checked(DatasetSpec(str(name), item_path, float(weight), prompt, negatives, corpus or None), where))
    return _unique(specs, path)


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in (".jsonl", ".json", ".parquet"):
        base = base.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base) or "data"


def _checked(spec: DatasetSpec, where: str) -> DatasetSpec:
    if not NAME.fullmatch(spec.name):
        raise UserError(f"{where}: dataset name {spec.name!r} must be letters, digits, '_', '.' or '-'")
    if not os.path.exists(spec.path):
        raise UserError(f"{where}: {spec.path}: not found")
    if not math.isfinite(spec.weight) or spec.weight < 0:
        raise UserError(f"{where}: the weight must be a finite number >= 0, got {spec.weight}")
    return spec


def _unique(specs: list[DatasetSpec], where: str) -> list[DatasetSpec]:
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{where}: dataset name {repeated[0]!r} is given twice: name each dataset (NAME=PATH)")
    if all(s.weight == 0 for s in specs):
        raise UserError(f"{where}: every weight is 0: nothing to train on")
    return specs


def batch_counts(sizes: list[int], weights: list[float], *, policy: str, temperature: float, batch: int,
                 drop_last: bool, names: list[str] | None = None) -> list[int]:
    """The global batches each dataset gives one epoch (see the module's docstring); ``batch``:
    examples per global batch (all processes and accumulation steps together). Raises
    :class:`UserError` for a dataset smaller than one batch, or an epoch with no batch."""
    for number, size in enumerate(sizes):
        if size < batch:
            raise UserError(f"dataset {names[number] if names else number + 1} has {size} examples, fewer than one "
                            f"global batch ({batch}): lower --per_device_train_batch_size, leave it out, or give "
                            "--mixed_batches")
    passes = [size // batch if drop_last else -(-size // batch) for size in sizes]
    if policy == "round_robin":
        if any(w != 1 for w in weights):
            raise UserError("--mixture round_robin gives every dataset the same number of batches: weights other "
                            "than 1 need --mixture proportional or temperature")
        return [min(passes)] * len(sizes)
    proportional = [round(w * b) for w, b in zip(weights, passes)]
    if policy == "proportional":
        counts = proportional
    elif policy == "temperature":
        if not temperature > 0:
            raise UserError(f"--mixture_temperature must be > 0, got {temperature}")
        shares = [(w * s) ** (1 / temperature) if w > 0 else 0.0 for w, s in zip(weights, sizes)]
        exact = [sum(proportional) * share / sum(shares) for share in shares]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: sum(proportional) - sum(counts)]:
            counts[i] += 1
    else:
        raise UserError(f"--mixture {policy!r} is not one of {', '.join(POLICIES)}")
    if not sum(counts):
        raise UserError("the mixture's weights give no batch in an epoch: raise them")
    return counts


def epoch_plan(sizes: list[int], counts: list[int], *, batch: int, drop_last: bool, round_robin: bool, seed: int,
               epoch: int) -> list[tuple[int, list[int]]]:
    """``(dataset, indices within it)`` of each global batch of one epoch, in order."""
    generator = torch.Generator()
    streams = []
    for dataset, (size, count) in enumerate(zip(sizes, counts)):
        batches, run = [], 0
        while len(batches) < count:  # passes, each a fresh permutation
            generator.manual_seed(_seed(seed, epoch, dataset, run))
            order = torch.randperm(size, generator=generator).tolist()
            full = size // batch
            batches += [order[k * batch:(k + 1) * batch] for k in range(full)]
            if size % batch and not drop_last:  # completed with the start of the same pass: no repeat in a batch
                batches.append(order[full * batch:] + order[: batch - size % batch])
            run += 1
        streams.append(iter(batches[:count]))
    if round_robin:
        labels = [dataset for _ in range(counts[0]) for dataset in range(len(sizes))]
    else:
        labels = [dataset for dataset, count in enumerate(counts) for _ in range(count)]
        generator.manual_seed(_seed(seed, epoch, -1, 0))
        labels = [labels[i] for i in torch.randperm(len(labels), generator=generator).tolist()]
    return [(dataset, next(streams[dataset])) for dataset in labels]


def _seed(*parts: int) -> int:
    key = ",".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class MixtureSampler(torch.utils.data.Sampler):
    """Indices into the concatenated datasets (dataset i at ``offsets[i]``), global batch after global
    batch, each from one dataset (:func:`epoch_plan`). The Trainer cuts them into per-device batches
    and Accelerate gives process p the p-th of every ``world_size`` of them, so each optimizer step's
    batches on all processes come from one dataset; ``set_epoch`` is the Trainer's call at each epoch."""

    def __init__(self, sizes: list[int], counts: list[int], *, batch: int, drop_last: bool, round_robin: bool,
                 seed: int):
        super().__init__()
        self.sizes, self.counts, self.batch = sizes, counts, batch
        self.drop_last, self.round_robin, self.seed, self.epoch = drop_last, round_robin, seed, 0
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[tuple[int, list[int]]]:
        return epoch_plan(self.sizes, self.counts, batch=self.batch, drop_last=self.drop_last,
                          round_robin=self.round_robin, seed=self.seed, epoch=self.epoch)

    def __iter__(self):
        for dataset, indices in self.plan():
            yield from (self.offsets[dataset] + i for i in indices)

    def __len__(self) -> int:
        return sum(self.counts) * self.batch
