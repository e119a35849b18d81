"""The files of a DCP checkpoint, read safely: metadata without running code, shard checks, partial reads.

torch.distributed.checkpoint (DCP) trusts its files. In this torch version:
- `FileSystemReader.read_metadata` reads `.metadata` with plain `pickle.load`, so a crafted checkpoint
  runs any code it names on `dinotrain export` or on resume;
- non-tensor entries of the state dict (the optimizer's `param_groups`: lr, betas, `params`/`names` lists,
  ...) are stored as `torch.save` bytes and read back by `DefaultLoadPlanner.load_bytes` with
  `torch.load(weights_only=False)`: arbitrary unpickling again;
- tensor entries are read with `torch.load(weights_only=True)` (safe).

`read_metadata` unpickles `.metadata` with an allow-list of exactly the globals DCP metadata references;
`SafeFileSystemReader` uses it and re-reads every non-tensor entry with `torch.load(weights_only=True)`
before DCP's planner sees it; `validate_checkpoint` checks that every shard the metadata refers to exists
and is long enough, before anything is loaded in place. `read_tensors` loads only the tensors under a
prefix (the teacher backbone for export), reading only their byte ranges: the optimizer state and the
heads are never read. Every problem is a `CheckpointError` (defined here, the lowest of the two checkpoint
modules, so that `checkpoint.py` imports this one and not the other way round).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

METADATA = ".metadata"

# Exactly the globals a `.metadata` written by DCP references (listed from real checkpoints of this torch
# version, 1 and 2 processes, with pickletools); torch dtypes are added below. Each is a plain data class,
# an enum, torch.Size, a path, or the layout lookup torch registers for pickling `torch.layout`.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name -> torch.layout, a dictionary lookup
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"),
    ("pathlib._local", "PosixPath"),  # Python >= 3.13 module of the same classes
    ("pathlib._local", "WindowsPath"),
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (a function to call, a class to build) is refused."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata {self.source} references the forbidden global {module}.{name} "
                              "and will not be loaded (a checkpoint holds data, never code)")

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"checkpoint metadata {self.source} holds a persistent reference and will not be loaded")


def _load_metadata(stream, source: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(stream, source).load()
    except Exception as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint metadata {source} is unreadable ({type(exc).__name__}: {exc}): "
                              "the checkpoint is truncated or corrupt") from exc
    _check_structure(metadata, source)
    return metadata


def _check_structure(metadata: Any, source: str) -> None:
    """Types and shard names a filesystem checkpoint's metadata must have (allowed classes, wrong places)."""

    def bad(what: str) -> Exception:
        return CheckpointError(f"checkpoint metadata {source} is malformed: {what}")

    if not isinstance(metadata, Metadata):
        raise bad(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise bad("no state_dict_metadata")
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(fqn, str) or not isinstance(item, (TensorStorageMetadata, BytesStorageMetadata)):
            raise bad(f"entry {fqn!r} is a {type(item).__name__}")
        if isinstance(item, TensorStorageMetadata) and not isinstance(item.properties.dtype, torch.dtype):
            raise bad(f"tensor {fqn} has no dtype")
    if not isinstance(metadata.storage_data, dict):
        raise bad("no storage_data (not a filesystem checkpoint)")
    for index, info in metadata.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise bad(f"storage entry {index!r} is a {type(info).__name__}")
        name = info.relative_path
        if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name
                or (os.altsep and os.altsep in name) or os.path.isabs(name)):
            raise bad(f"storage entry {index.fqn} points outside the checkpoint directory ({name!r})")
        for field in ("offset", "length"):
            value = getattr(info, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(f"storage entry {index.fqn} has {field} {value!r}")
        descriptors = info.transform_descriptors
        if descriptors is not None and not all(isinstance(d, str) for d in descriptors):
            raise bad(f"storage entry {index.fqn} has transform descriptors {descriptors!r}")
    if metadata.storage_meta is not None and not isinstance(metadata.storage_meta, StorageMeta):
        raise bad(f"storage_meta is a {type(metadata.storage_meta).__name__}")


def read_metadata(ckpt_dir: str | Path, rank: int | None = None) -> Metadata:
    """The DCP `Metadata` of a checkpoint directory, unpickled without running code (see module doc).

    Raises CheckpointError for a missing, truncated, corrupt, malformed or code-carrying `.metadata`.
    `rank` reads the per-rank `__<rank>.metadata` DCP writes when saving without coordination.
    """
    path = Path(ckpt_dir) / (METADATA if rank is None else f"__{rank}{METADATA}")
    if not path.is_file():
        raise CheckpointError(f"{Path(ckpt_dir)} is not a dinotrain checkpoint directory (no {path.name})")
    with open(path, "rb") as stream:
        return _load_metadata(stream, str(path))


def _check_shards(ckpt_dir: Path, metadata: Metadata) -> None:
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name in sorted(needed):
        shard = ckpt_dir / name
        if not shard.is_file():
            raise CheckpointError(f"shard {name} of checkpoint {ckpt_dir} is missing: the checkpoint is incomplete")
        size = shard.stat().st_size
        if size < needed[name]:
            raise CheckpointError(f"shard {name} of checkpoint {ckpt_dir} is {size} bytes, metadata needs "
                                  f"{needed[name]}: the checkpoint is truncated")


def _volume(sizes) -> int:
    n = 1
    for d in sizes:
        n *= int(d)
    return n


def _check_coverage(ckpt_dir: Path, metadata: Metadata) -> None:
    """Every entry of the state dict is stored: each tensor exactly covered by in-bounds chunks (as DCP's
    save planner guarantees), each chunk stored with at least its raw bytes. Otherwise a reader would
    allocate what the metadata claims and leave part of it unread."""
    stored = metadata.storage_data

    def bad(what: str) -> Exception:
        return CheckpointError(f"checkpoint {ckpt_dir} {what}: its metadata is inconsistent")

    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            if MetadataIndex(fqn) not in stored:
                raise bad(f"has no data for {fqn}")
            continue
        size = tuple(int(d) for d in item.size)
        if any(d < 0 for d in size) or not item.chunks:
            raise bad(f"has no data for tensor {fqn} of size {list(size)}")
        covered = 0
        for chunk in item.chunks:
            offsets, sizes = tuple(int(d) for d in chunk.offsets), tuple(int(d) for d in chunk.sizes)
            if (len(offsets) != len(size) or len(sizes) != len(size)
                    or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, size))):
                raise bad(f"has a chunk of {fqn} outside its size {list(size)}")
            info = stored.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise bad(f"has no data for {fqn} (chunk at {list(offsets)})")
            raw = _volume(sizes) * item.properties.dtype.itemsize
            if not info.transform_descriptors and info.length < raw:
                raise bad(f"stores {info.length} bytes for a {raw}-byte chunk of {fqn}")
            covered += _volume(sizes)
        if covered != _volume(size):
            raise bad(f"covers {covered} of the {_volume(size)} elements of {fqn}")


def validate_checkpoint(ckpt_dir: str | Path) -> Metadata:
    """Safe `read_metadata` plus: every entry is stored, every shard exists and is long enough.

    Raises CheckpointError naming the first problem. Cheap (one stat per shard): call it before
    loading a checkpoint in place, so a damaged one is refused before any tensor is overwritten.
    """
    ckpt_dir = Path(ckpt_dir)
    metadata = read_metadata(ckpt_dir)
    _check_coverage(ckpt_dir, metadata)
    _check_shards(ckpt_dir, metadata)
    return metadata


class _SafeBytesPlanner:
    """Forwards to DCP's load planner; non-tensor entries are unpickled weights-only first.

    DCP's planner reads them with `torch.load(weights_only=False)`. Here they are loaded with
    `weights_only=True` (plain containers, numbers, strings, tensors only) and re-serialized by us, so the
    planner only ever unpickles bytes this process wrote from plain data.
    """

    def __init__(self, planner, source: str):
        self._planner = planner
        self._source = source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from dinotrain.weights.state_dict import unpickling_refusal

        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"entry {read_item.storage_index.fqn} of checkpoint {self._source} is not plain data "
                                  f"and will not be loaded ({unpickling_refusal(exc)})") from exc
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` that never unpickles arbitrary objects and refuses a truncated checkpoint.

    Use as `dcp.load(state, storage_reader=SafeFileSystemReader(ckpt_dir))`. `read_metadata` (called by
    DCP before any data is read) uses the allow-listed unpickler and checks the shards' sizes; non-tensor
    entries are read weights-only. DCP catches an error from `read_metadata` and reports it inside its own
    AssertionError, so call `validate_checkpoint` first for a clean CheckpointError.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _load_metadata(stream, str(path))
        _check_shards(Path(self.path), metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner) -> Future[None]:
        return super().read_data(plan, _SafeBytesPlanner(planner, str(self.path)))


def read_tensors(ckpt_dir: str | Path, prefix: str, *, what: str | None = None) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of the entries under `prefix`, keyed without it, in one process.

    Only those tensors are allocated and only their byte ranges are read: peak memory is about the
    returned tensors plus the largest one, whatever the size of the rest (optimizer, heads). Validates
    the checkpoint first; raises CheckpointError if it is damaged or holds no tensor under `prefix`
    (the message names `what`, default the prefix).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    ckpt_dir = Path(ckpt_dir)
    metadata = validate_checkpoint(ckpt_dir)
    state = {fqn: torch.empty(item.size, dtype=item.properties.dtype)
             for fqn, item in metadata.state_dict_metadata.items()
             if fqn.startswith(prefix) and isinstance(item, TensorStorageMetadata)}
    if not state:
        raise CheckpointError(f"{ckpt_dir} holds no {what or f'tensors under {prefix!r}'}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, storage_reader=SafeFileSystemReader(ckpt_dir), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
        if isinstance(exc, CheckpointError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be read: {type(exc).__name__}: {first}") from exc
    return {fqn[len(prefix):]: tensor for fqn, tensor in state.items()}
