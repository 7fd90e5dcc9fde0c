"""``<models_dir>/<experiment>/<stage>/stage.json``: the record of a finished stage, and its lineage.

Every writer goes through :func:`update_stage_record`, which reads the record, replaces the top-level
keys it is given and writes it back atomically (temp file + ``os.replace``) under a file lock, so two
writers never lose each other's sections and a reader never sees half a file.

A record names the checkpoint it describes and the parent it started from, each with its sha256;
:func:`lineage_problems` and :func:`checked_record` compare those with the files on disk, so a
checkpoint replaced after its record was written (or a parent retrained after its child started) is
reported, never silently read as the same lineage. Here, at the bottom of the imports, because the
data, the model, the callbacks and the commands all read records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from datamodules.errors import LineageError, StagewiseError
from datamodules.shards import atomic_path

BEST_SUFFIX = "_model_best"
_SHA256: dict[tuple, str] = {}  # (path, inode, size, mtime) -> digest: one read per file version per process


def stage_record_path(models_dir: str | Path, stage: str) -> Path:
    """Where the record of ``stage`` lives: ``<models_dir>/<stage>/stage.json``."""
    return Path(models_dir) / stage / "stage.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file's bytes (read in chunks: checkpoints can be large; a file unchanged
    since it was last hashed in this process is not read again)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


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
    """``<dir>/<stage>_model_best.ckpt`` -> ``<stage>``; None for a checkpoint not named that way."""
    stem = Path(ckpt_path).stem
    return stem[: -len(BEST_SUFFIX)] if stem.endswith(BEST_SUFFIX) and len(stem) > len(BEST_SUFFIX) else None


def stage_record_for_checkpoint(ckpt_path: str | Path) -> dict | None:
    """The record that describes a checkpoint: ``<dir>/<stage>_model_best.ckpt`` -> ``<dir>/<stage>/stage.json``
    (``<dir>`` is an experiment's models directory).

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


# ----------------------------------------------------------------------------------------- lineage
def lineage_domains(record: dict | None) -> list[str]:
    """The domains a lineage has trained on up to and including the stage of ``record`` (its ``domains``;
    records written before that key existed: the domains it validated on). Empty without a record."""
    if not record:
        return []
    return list(record.get("domains") or ((record.get("losses") or {}).get("final") or {}))


def checkpoint_mismatch(record: dict, ckpt_path: str | Path | None = None) -> str | None:
    """Why ``record`` does not describe the checkpoint file (``ckpt_path``, default the one it names), or
    None when the file on disk has the sha256 the record gives."""
    checkpoint = record.get("checkpoint") or {}
    path = Path(ckpt_path or checkpoint.get("path") or "")
    recorded = checkpoint.get("sha256")
    if not recorded or not path.is_file():
        return None if recorded is None else f"{path} no longer exists"
    actual = file_sha256(path)
    if actual == recorded:
        return None
    return (f"{path} on disk (sha256 {actual[:12]}…) is not the checkpoint its record "
            f"{stage_record_path(path.parent, record.get('stage', '?'))} describes (sha256 {recorded[:12]}…)")


def parent_mismatch(record: dict) -> str | None:
    """Why the parent a stage started from is no longer the file at the parent's path (retrained or replaced
    since), or None when it still is (or the stage started from scratch)."""
    parent = record.get("parent") or {}
    path, recorded = parent.get("path"), parent.get("sha256")
    if not path or not recorded:
        return None
    if not Path(path).is_file():
        return f"its parent {path} no longer exists"
    actual = file_sha256(path)
    if actual == recorded:
        return None
    return (f"it started from {path} with sha256 {recorded[:12]}…, but that file now has sha256 "
            f"{actual[:12]}… (the parent was retrained or replaced after this stage started)")


def lineage_problems(record: dict) -> list[str]:
    """Every way the files on disk disagree with ``record``'s lineage (its own checkpoint, its parent)."""
    return [p for p in (checkpoint_mismatch(record), parent_mismatch(record)) if p]


def checked_record(ckpt_path: str | Path) -> dict | None:
    """The record of a checkpoint about to be trained from (:func:`stage_record_for_checkpoint`), after
    checking that it describes this very file; None when no record describes it. Raises LineageError when
    the file was replaced after its record was written: its tokens, domains and losses would be wrong."""
    record = stage_record_for_checkpoint(ckpt_path)
    problem = record and checkpoint_mismatch(record, ckpt_path)
    if problem:
        raise LineageError(
            f"broken lineage: {problem}. Its tokens, domains and losses would be another model's. Re-run stage "
            f"'{record.get('stage')}' so that its record and checkpoint agree (`--overwrite`), or restore the "
            "checkpoint the record describes"
        )
    return record
