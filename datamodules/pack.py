"""`stagewise pack` / `stagewise unpack`: move a prepared data dir in compressed pieces of at most N MB.

A GPU machine often takes only small uploads and has neither the corpora's packages nor a network, so the
prepared data travels instead of its sources: the tokenizer, the shards and the manifests (the document
caches under ``.cache/`` stay behind; ``fit``, ``evaluate`` and ``pipeline`` do not need them)::

    stagewise pack   --data_dir data/gpu --out packs/ --max_mb 60   # packs/gpu.tar.xz.000, .001, ..., gpu.pack.json
    stagewise unpack --pack packs/gpu.pack.json --into data/          # checks every piece, then extracts data/gpu/

The pieces are one xz-compressed tar stream cut into parts, so plain tools unpack them too:
``cat packs/gpu.tar.xz.* | tar -xJ -C data/``. ``gpu.pack.json`` lists the pieces with their sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

from datamodules.errors import StagewiseError

MB = 1_000_000


class _Pieces(io.RawIOBase):
    """A write-only stream that cuts what it is given into files of at most ``limit`` bytes."""

    def __init__(self, prefix: Path, limit: int):
        self.prefix, self.limit = prefix, limit
        self.pieces: list[dict] = []
        self._file = None
        self._hash = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._file.tell() >= self.limit:
                self._next()
            n = min(len(view), self.limit - self._file.tell())
            self._file.write(view[:n])
            self._hash.update(view[:n])
            view = view[n:]
        return len(data)

    def _next(self) -> None:
        self._finish_piece()
        path = self.prefix.with_name(f"{self.prefix.name}.{len(self.pieces):03d}")
        self._file, self._hash = open(path, "wb"), hashlib.sha256()
        self.pieces.append({"file": path.name})

    def _finish_piece(self) -> None:
        if self._file is not None:
            self.pieces[-1].update(bytes=self._file.tell(), sha256=self._hash.hexdigest())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._finish_piece()
        super().close()


class _Joined(io.RawIOBase):
    """A read-only stream over the pieces of a pack, in order."""

    def __init__(self, paths: list[Path]):
        self.paths, self._file = list(paths), None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            if self._file is None:
                if not self.paths:
                    return 0
                self._file = open(self.paths.pop(0), "rb")
            n = self._file.readinto(buffer)
            if n:
                return n
            self._file.close()
            self._file = None


def pack(data_dir: str, out: str = "packs", max_mb: float = 60.0, preset: int = 6) -> dict:
    """Pack a prepared data dir (tokenizer, shards, manifests) into xz-compressed pieces of at most ``max_mb`` MB.

    Args:
        data_dir: The prepared data dir (e.g. ``data/gpu``).
        out: Directory for the pieces and ``<name>.pack.json``.
        max_mb: Largest piece, in MB (10^6 bytes).
        preset: xz compression level (0-9; 6 is xz's default).

    Returns:
        The pack's index: its pieces (file, bytes, sha256), their total and the data dir's size unpacked.
    """
    root = Path(data_dir)
    if not (root / "tokenizer" / "tokenizer.json").exists() or not list(root.glob("*/manifest.json")):
        raise StagewiseError(f"{root}/ holds no prepared data (a tokenizer/ and <corpus>/manifest.json); run "
                             "`stagewise prepare` for it first")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts
                   and not p.name.endswith((".tmp", ".old")))
    pieces = _Pieces(out_dir / f"{root.name}.tar.xz", int(max_mb * MB))
    with lzma.open(pieces, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w|") as tar:
        for path in files:
            tar.add(path, arcname=str(Path(root.name) / path.relative_to(root)), recursive=False)
    pieces.close()
    index = {"data_dir": root.name, "files": len(files), "unpacked_bytes": sum(p.stat().st_size for p in files),
             "packed_bytes": sum(p["bytes"] for p in pieces.pieces), "max_mb": max_mb, "pieces": pieces.pieces}
    (out_dir / f"{root.name}.pack.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"packed {root}/ ({index['unpacked_bytes'] / MB:.1f} MB, {len(files)} files) into {len(pieces.pieces)} "
          f"piece(s) of at most {max_mb:g} MB, {index['packed_bytes'] / MB:.1f} MB in all -> {out_dir}/")
    return index


def unpack(pack: str, into: str = "data") -> Path:
    """Check every piece of a pack against its sha256, then extract the data dir under ``into``.

    Args:
        pack: The pack's index, ``<name>.pack.json`` (its pieces lie beside it).
        into: The directory that receives ``<name>/``.

    Returns:
        The unpacked data dir.
    """
    index_path = Path(pack)
    if not index_path.is_file():
        raise StagewiseError(f"no pack index at {index_path}; pass the <name>.pack.json that `stagewise pack` wrote")
    index = json.loads(index_path.read_text())
    paths = []
    for piece in index["pieces"]:
        path = index_path.with_name(piece["file"])
        if not path.is_file():
            raise StagewiseError(f"piece {path} of {index_path} is missing; copy all {len(index['pieces'])} pieces")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != piece["sha256"]:
            raise StagewiseError(f"piece {path} is damaged (sha256 {digest[:12]}…, expected {piece['sha256'][:12]}…); "
                                 "copy it again")
        paths.append(path)
    target = Path(into)
    target.mkdir(parents=True, exist_ok=True)
    with lzma.open(_Joined(paths), "rb") as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(target, filter="data")
    print(f"unpacked {index['files']} files into {target / index['data_dir']}/")
    return target / index["data_dir"]


def main_pack(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise pack --data_dir DIR [--out packs] [--max_mb 60]``."""
    from datamodules.command import run_function

    run_function(pack, args, "stagewise pack")


def main_unpack(args: list[str] | None = None) -> None:
    """Entry point of ``stagewise unpack --pack packs/<name>.pack.json [--into data]``."""
    from datamodules.command import run_function

    run_function(unpack, args, "stagewise unpack")
