"""Checkpoints that are either complete or absent.

The Trainer writes ``checkpoint-<step>/`` file by file; a run killed during a save would leave a
folder that looks like a checkpoint but lacks its optimizer or RNG states. Here a checkpoint is
written into ``<output_dir>/.checkpoint-staging/`` and renamed into place once every file is on
disk (a rename within one file system is atomic), so every ``checkpoint-<step>/`` is complete.
Old checkpoints are removed the same way (renamed out first, then deleted), never the newest.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from . import UserError

logger = logging.getLogger(__name__)

STAGING = ".checkpoint-staging"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Written by the Trainer after the model, optimizer, scheduler and RNG states.
TRAINER_STATE = "trainer_state.json"
# Written by training.train after the final model: its presence marks a finished run.
FINISHED_MARKER = "training_args.json"
# --fsdp: the model and optimizer states, each process's shards (torch.distributed.checkpoint), and the scheduler's
SHARDED = "sharded"
SCHEDULER = "scheduler.pt"


def save_sharded(folder: str, model, optimizer) -> None:
    """Model and optimizer states of an FSDP2 model as each process holds them (a collective):
    ``torch.distributed.checkpoint`` files that any number of processes can load again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, unwrapped(optimizer))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)


def load_sharded(folder: str, model, optimizer) -> None:
    """Load what :func:`save_sharded` wrote into the sharded model and its optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, unwrapped(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, unwrapped(optimizer), model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def unwrapped(optimizer):
    """The torch optimizer inside Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / TRAINER_STATE).is_file()


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete ``checkpoint-<step>`` folders of ``output_dir``, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    found = complete_checkpoints(output_dir)
    return str(found[-1]) if found else None


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def remove(folder: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Delete a checkpoint of ``output_dir`` so that a kill midway never leaves a half-deleted
    checkpoint in place: it is renamed into the staging folder first."""
    folder, staging = Path(folder), Path(output_dir) / STAGING
    staging.mkdir(exist_ok=True)
    trash = staging / f"deleting-{folder.name}"
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(folder, trash)
    shutil.rmtree(trash)


def publish(staged: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Move a fully written ``staged`` checkpoint into ``output_dir`` under its own name, atomically.

    An older checkpoint of the same step (a run resumed from an earlier one) is replaced.
    """
    staged, output_dir = Path(staged), Path(output_dir)
    _fsync_tree(staged)
    final = output_dir / staged.name
    if final.exists():
        remove(final, output_dir)
    os.rename(staged, final)
    _fsync_dir(output_dir)
    return final


def rotate(output_dir: str | os.PathLike, limit: int | None, keep: list[str | os.PathLike]) -> None:
    """Delete the oldest complete checkpoints beyond ``limit``; ``keep`` (the newest, and the best
    while a metric chooses one) always stays."""
    if not limit or limit <= 0:
        return
    keep = {Path(k).resolve() for k in keep}
    others = [p for p in complete_checkpoints(output_dir) if p.resolve() not in keep]
    for folder in others[: max(0, len(others) - (limit - len(keep)))]:
        logger.info("deleting %s (--save_total_limit %d)", folder, limit)
        remove(folder, output_dir)


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove what an interrupted save or deletion left in the staging folder."""
    staging = Path(output_dir) / STAGING
    if not staging.exists():
        return
    left = sorted(p.name for p in staging.iterdir())
    if left:  # empty after every completed save or deletion
        logger.warning("removing %s from %s: left by an interrupted save or deletion", ", ".join(left), staging)
    shutil.rmtree(staging)


def resolve_resume(training_args) -> None:
    """Decide how to use an existing ``--output_dir``; sets ``resume_from_checkpoint`` when resuming.

    - ``--resume_from_checkpoint DIR``: DIR must be a complete checkpoint.
    - ``--overwrite_output_dir``: start afresh; checkpoints of the earlier run are deleted (a later
      automatic resume must not pick them up).
    - A folder holding checkpoints of an unfinished run: resume from the newest complete one, as
      the transformers examples do, so restarting a killed command just continues it.
    - Otherwise a non-empty folder is refused: nothing is ever written over it unasked.
    """
    output_dir = training_args.output_dir
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise UserError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder")
        if not is_complete(checkpoint):
            raise UserError(f"--resume_from_checkpoint {checkpoint}: not a complete checkpoint "
                            f"(no {TRAINER_STATE})")
        return
    contents = set(os.listdir(output_dir)) - {STAGING} if os.path.isdir(output_dir) else set()
    if not contents:
        return
    if training_args.overwrite_output_dir:
        if training_args.should_save:
            for folder in complete_checkpoints(output_dir):
                logger.warning("--overwrite_output_dir: deleting %s of the earlier run", folder)
                remove(folder, output_dir)
        return
    latest = latest_checkpoint(output_dir)
    if FINISHED_MARKER in contents or latest is None:
        what = "holds a finished run" if FINISHED_MARKER in contents else "exists and is not empty"
        raise UserError(f"--output_dir {output_dir} {what}; choose another folder or pass --overwrite_output_dir")
    if training_args.should_log:
        logger.warning("resuming from %s, the newest checkpoint in --output_dir (pass --overwrite_output_dir to "
                       "start over)", latest)
    training_args.resume_from_checkpoint = latest
