"""``models/<stage>/stage.json``: the record of a finished stage, merged by several callbacks.

Every writer goes through :func:`update_stage_record`, which reads the record, replaces the top-level
keys it is given and writes it back atomically (temp file + ``os.replace``) under a file lock, so two
writers never lose each other's sections and a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from datamodules.errors import StagewiseError
from datamodules.shards import atomic_path, file_sha256  # noqa: F401  (file_sha256: imported from here too)

BEST_SUFFIX = "_model_best"


def stage_record_path(models_dir: str | Path, stage: str) -> Path:
    """Where the record of ``stage`` lives: ``<models_dir>/<stage>/stage.json``."""
    return Path(models_dir) / stage / "stage.json"


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StagewiseError(f"{path} is not valid JSON ({err}); delete it and re-run the stage") from None
    if not isinstance(record, dict):
        raise StagewiseError(f"{path} must hold a JSON object; delete it and re-run the stage")
    return record


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Lock the stage's directory itself: no lock file is left behind.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_checkpoint(path: str | Path, hint: str, prefix: str = "") -> dict[str, Any]:
    """A Lightning checkpoint's contents (CPU, memory-mapped), or a StagewiseError saying what is wrong
    (missing, unreadable, or without a ``state_dict``) followed by ``hint``; messages start with ``prefix``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise StagewiseError(f"{prefix}no checkpoint at {path}; {hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:
        raise StagewiseError(f"{prefix}{path} is not a readable checkpoint ({err}); {hint}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise StagewiseError(f"{prefix}{path} is not a Lightning checkpoint (no 'state_dict'); {hint}")
    return ckpt


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_stage_record(models_dir: str | Path, stage: str) -> dict | None:
    """The record of ``stage`` under ``models_dir``, or None if the stage has not written one."""
    return _load(stage_record_path(models_dir, stage))


def update_stage_record(models_dir: str | Path, stage: str, updates: dict) -> dict:
    """Merge ``updates`` into the stage's record (top-level keys replaced) and return the new record."""
    path = stage_record_path(models_dir, stage)
    with _locked(path):
        record = _load(path) or {"stage": stage}
        record.update(updates)
        write_json_atomic(path, record)
    return record


def stage_of_checkpoint(ckpt_path: str | Path) -> str | None:
    """``models/<stage>_model_best.ckpt`` -> ``<stage>``; None for a checkpoint not named that way."""
    stem = Path(ckpt_path).stem
    return stem[: -len(BEST_SUFFIX)] if stem.endswith(BEST_SUFFIX) and len(stem) > len(BEST_SUFFIX) else None


def stage_record_for_checkpoint(ckpt_path: str | Path) -> dict | None:
    """The record that describes a checkpoint: ``models/<stage>_model_best.ckpt`` -> ``models/<stage>/stage.json``.

    A checkpoint named otherwise (a copy, ``last.ckpt``) is matched against the ``checkpoint.path`` of the
    records beside it. None when no record describes it.
    """
    ckpt = Path(ckpt_path)
    stage = stage_of_checkpoint(ckpt)
    if stage is not None:
        record = read_stage_record(ckpt.parent, stage)
        if record is not None:
            return record
    if ckpt.parent.is_dir():
        target = ckpt.resolve()
        for path in sorted(ckpt.parent.glob("*/stage.json")):
            record = _load(path) or {}
            recorded = (record.get("checkpoint") or {}).get("path")
            if recorded and Path(recorded).resolve() == target:
                return record
    return None
