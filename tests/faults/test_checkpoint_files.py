"""A checkpoint is data, never code; a damaged one is refused before anything is loaded; export reads
only the teacher backbone (dinotrain/distributed/checkpoint_files.py, `dinotrain export`)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from dinotrain.distributed.checkpoint import CheckpointError
from dinotrain.distributed.checkpoint_files import (
    SafeFileSystemReader,
    read_metadata,
    read_tensors,
    validate_checkpoint,
)

from trainruns import FAST, run_cli


def read_teacher_backbone(ckpt_dir):
    """The official-layout teacher backbone of a training checkpoint (what the hub export holds)."""
    return read_tensors(ckpt_dir, "model.teacher.backbone.", what="teacher backbone")


def build_training_checkpoint(ckpt: Path, overrides=()) -> dict:
    """A checkpoint as `Checkpointer.save_parts` writes it (one process): SSL meta-arch + AdamW with state,
    `{"model": ..., "optim": ...}` through DCP, plus extra.json. Returns the saved state."""
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dinotrain.config import load_config
    from dinotrain.train.optim import build_optimizer
    from dinotrain.train.ssl import SSLMetaArch

    cfg = load_config("smoke/cpu_tiny", [*FAST, *overrides])
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.student, cfg)
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    for p in model.student.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # exp_avg, exp_avg_sq, step
    with torch.no_grad():
        for p in model.teacher.parameters():
            p.add_(0.5)  # teacher != student, so a mix-up shows
    model_sd, optim_sd = get_state_dict(model, optimizer)
    ckpt.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "extra.json").write_text(json.dumps({"iteration": 3, "config": OmegaConf.to_container(cfg)}))
    return {"model": model_sd, "optim": optim_sd}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "00000003"
    build_training_checkpoint(path)
    return path


def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


class _Touch:
    """Unpickles to `Path(marker).touch()`: what a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


# ---- item 4: a checkpoint never runs code -------------------------------------------------------------
@pytest.mark.parametrize("payload", [_Touch, _Exec])
def test_crafted_metadata_is_refused_and_runs_nothing(ckpt, tmp_path, payload):
    bad = _copy(ckpt, tmp_path)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(payload(marker)))

    with pytest.raises(CheckpointError, match=r"forbidden global (pathlib\.Path\.touch|builtins\.exec)"):
        read_metadata(bad)
    with pytest.raises(CheckpointError, match="forbidden global"):
        validate_checkpoint(bad)
    with pytest.raises(CheckpointError, match="forbidden global"):
        read_teacher_backbone(bad)
    assert not marker.exists()

    proc = run_cli(["export", bad, tmp_path / "out.pth", "--to", "hub"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "forbidden global" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_control_stock_dcp_reader_runs_crafted_metadata(ckpt, tmp_path):
    """What the tests above guard against: DCP's own FileSystemReader executes the payload."""
    bad = _copy(ckpt, tmp_path)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    with pytest.raises(Exception):
        FileSystemReader(str(bad)).read_metadata()  # runs touch, then fails on the result
    assert marker.exists()


def test_crafted_metadata_is_refused_through_dcp_load(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(_Touch(marker)))
    with warnings.catch_warnings(), pytest.raises(BaseException, match="forbidden global"):
        warnings.simplefilter("ignore")
        dcp.load({"x": torch.empty(1)}, storage_reader=SafeFileSystemReader(bad), no_dist=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not_metadata"])
def test_damaged_metadata_is_a_clear_error(ckpt, tmp_path, damage):
    bad = _copy(ckpt, tmp_path)
    meta = bad / ".metadata"
    data = meta.read_bytes()
    meta.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b"",
                      "not_metadata": pickle.dumps({"a": [1, 2.0, "x"]})}[damage])
    with pytest.raises(CheckpointError, match="unreadable|malformed") as info:
        read_metadata(bad)
    assert str(bad / ".metadata") in str(info.value)


def test_valid_checkpoint_reads(ckpt):
    metadata = validate_checkpoint(ckpt)
    assert metadata == read_metadata(ckpt)
    assert metadata.state_dict_metadata.keys() == FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.keys()
    assert "model.teacher.backbone.blocks.0.attn.qkv.weight" in metadata.state_dict_metadata
    assert "optim.param_groups.0.lr" in metadata.state_dict_metadata  # non-tensor entries are there too


def test_metadata_pointing_outside_the_checkpoint_is_refused(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path)
    metadata = pickle.loads((bad / ".metadata").read_bytes())
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index].relative_path = "../../elsewhere.distcp"
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read_metadata(bad)


@pytest.mark.parametrize("damage", ["grown", "chunk_outside", "chunk_dropped", "short_storage"])
def test_metadata_claiming_more_than_is_stored_is_refused(ckpt, tmp_path, damage):
    """No reader allocates what the metadata claims and leaves part of it unread (or runs out of memory)."""
    import torch.distributed.checkpoint.metadata as md

    bad = _copy(ckpt, tmp_path)
    metadata = pickle.loads((bad / ".metadata").read_bytes())  # trusted: written by this test
    fqn = "model.teacher.backbone.blocks.0.attn.qkv.weight"
    item = metadata.state_dict_metadata[fqn]
    if damage == "grown":
        item.size = torch.Size([10 ** 6, 10 ** 6])
    elif damage == "chunk_outside":
        item.chunks[0] = md.ChunkStorageMetadata(item.chunks[0].offsets, torch.Size([10 ** 6, 10 ** 6]))
    elif damage == "chunk_dropped":
        metadata.storage_data.pop(md.MetadataIndex(fqn, item.chunks[0].offsets))
    else:
        metadata.storage_data[md.MetadataIndex(fqn, item.chunks[0].offsets)].length = 16
    (bad / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=f"{fqn}.*inconsistent|inconsistent"):
        read_teacher_backbone(bad)


def test_truncated_shards_are_named(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path)
    shards = sorted(bad.glob("*.distcp"))
    for shard in shards:
        os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=rf"shard {shards[0].name} of checkpoint .* is \d+ bytes, "
                                              r"metadata needs \d+: the checkpoint is truncated"):
        validate_checkpoint(bad)
    with pytest.raises(CheckpointError, match="truncated"):
        read_teacher_backbone(bad)

    proc = run_cli(["export", bad.parent.parent, tmp_path / "out.pth", "--to", "hub"])  # a run directory
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "truncated" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.pth").exists()


def test_missing_shard_is_named(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path)
    shard = sorted(bad.glob("*.distcp"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name} .* is missing"):
        validate_checkpoint(bad)


def test_non_tensor_entries_are_read_weights_only(tmp_path):
    """DCP reads non-tensor entries with torch.load(weights_only=False); the safe reader does not."""
    marker = tmp_path / "pwned"
    path = tmp_path / "ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"t": torch.ones(3), "evil": _Touch(marker), "lr": 0.1, "names": ["a", "b"]},
                 checkpoint_id=str(path), no_dist=True)
        validate_checkpoint(path)
        state = {"t": torch.zeros(3), "evil": None, "lr": None, "names": None}
        with pytest.raises(BaseException, match="evil.*not plain data") as info:
            dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
        assert not marker.exists()
        cause = next(str(e) for e in _chain(info.value) if isinstance(e, CheckpointError))
        assert "not plain data" in cause and "\n" not in cause
        assert "weights_only" not in cause and "safe_globals" not in cause  # never advise unpickling it
        state = {"t": torch.zeros(3), "lr": None, "names": None}  # plain data loads
        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
        assert state["lr"] == 0.1 and state["names"] == ["a", "b"] and torch.equal(state["t"], torch.ones(3))
        dcp.load({"evil": None}, checkpoint_id=str(path), no_dist=True)  # control: stock DCP runs it
    assert marker.exists()


def _chain(exc: BaseException):
    """The exception, its causes, and the per-rank failures DCP wraps them in."""
    seen = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return seen


def test_weights_file_refusal_gives_no_unsafe_advice(tmp_path):
    from dinotrain.weights.state_dict import WeightsError, read_state_dict

    marker = tmp_path / "pwned"
    torch.save({"cls_token": torch.zeros(1), "evil": _Touch(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError) as info:
        read_state_dict(tmp_path / "evil.pth")
    message = str(info.value)
    assert not marker.exists()
    assert "weights-only" in message and "references code" in message and "\n" not in message, message
    assert "weights_only" not in message and "safe_globals" not in message, message


def test_resume_state_loads_through_the_safe_reader(ckpt):
    """Model and optimizer state (param_groups are non-tensor entries) round-trip as the Checkpointer loads."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from dinotrain.config import load_config
    from dinotrain.train.optim import build_optimizer
    from dinotrain.train.ssl import SSLMetaArch

    cfg = load_config("smoke/cpu_tiny", FAST)
    torch.manual_seed(1)
    model = SSLMetaArch(cfg)
    optimizer = build_optimizer(model.student, cfg)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups)
    assert len(optimizer.state) == len([p for p in model.student.parameters() if p.requires_grad])
    teacher = read_teacher_backbone(ckpt)
    assert all(torch.equal(teacher[k], v) for k, v in model.teacher["backbone"].state_dict().items())


# ---- item 10: export reads only the teacher backbone ---------------------------------------------------
def _consolidated_teacher_backbone(ckpt, tmp_path):
    """Reference: the whole (trusted) checkpoint through DCP's own consolidation, then the teacher backbone."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    prefix = "teacher.backbone."
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def test_read_teacher_backbone_equals_full_consolidation(ckpt, tmp_path):
    new = read_teacher_backbone(ckpt)
    old = _consolidated_teacher_backbone(ckpt, tmp_path)
    assert list(new) == list(old)
    assert all(new[k].dtype == old[k].dtype and torch.equal(new[k], old[k]) for k in old)
    assert "blocks.0.attn.qkv.weight" in new and not any(k.startswith(("model.", "teacher.")) for k in new)


def test_read_tensors_other_prefix_and_missing_prefix(ckpt):
    head = read_tensors(ckpt, "model.student.dino_head.")
    assert "last_layer.weight_v" in head and "last_layer.weight_g" in head
    with pytest.raises(CheckpointError, match="holds no tensors under 'model.nothing.'"):
        read_tensors(ckpt, "model.nothing.")


def test_export_cli_writes_the_teacher_backbone(ckpt, tmp_path):
    proc = run_cli(["export", ckpt, tmp_path / "out.pth", "--to", "hub"])
    assert proc.returncode == 0, proc.stderr
    assert "(iteration 3)" in proc.stdout
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    expected = read_teacher_backbone(ckpt)
    assert exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
