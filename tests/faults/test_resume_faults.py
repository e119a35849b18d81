"""Resume never silently starts over, never loses history, and tells what changed (real CLI runs).

One finished 6-iteration run (checkpoints at 3 and 6) is made once and copied for each fault.
"""

import json
import shutil

import pytest

from dinotrain.data.tiny import ensure_tiny_dataset
from dinotrain.distributed.checkpoint import complete_checkpoints
from trainruns import metrics, run_cli, train, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(run, ["train.max_iterations=6"])
    return run


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _resume(run, overrides=(), extra=()):
    return run_cli(train_args(run, overrides, extra), timeout=240)


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dinotrain train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_changed_param_groups_resume_instead_of_starting_over(run):
    """(a) optim.layerwise_decay changes the param-group layout: the optimizer state is matched by name."""
    proc = _resume(run, ["train.max_iterations=8", "optim.layerwise_decay=0.9"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(iteration 6)" in proc.stdout and "(from 6)" in proc.stdout
    assert "optim.layerwise_decay: 1.0 -> 0.9" in proc.stdout
    assert [r["iteration"] for r in metrics(run)] == list(range(1, 9))
    history = [json.loads(ln) for ln in (run / "resume_history.jsonl").read_text().splitlines()]
    assert history[-1]["iteration"] == 6 and history[-1]["changes"]["optim.layerwise_decay"] == [1.0, 0.9]


def test_truncated_checkpoints_stop_the_run_and_keep_its_history(run):
    """(b) every shard truncated: no silent restart from 0, nothing overwritten, the cause named."""
    before = (run / "metrics.jsonl").read_bytes()
    for shard in run.glob("checkpoints/*/*.distcp"):
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    line = _one_line_error(_resume(run, ["train.max_iterations=8"]))
    assert "truncated" in line and "--no-resume" in line
    assert (run / "metrics.jsonl").read_bytes() == before
    assert [int(c.name) for c in complete_checkpoints(run)] == [3, 6]


def test_unreadable_shards_name_dcp_inner_cause(run):
    """Shards of the right size but garbage content: the error is the inner failure, not `CheckpointException ranks`."""
    for shard in run.glob("checkpoints/*/*.distcp"):
        shard.write_bytes(b"\x00" * shard.stat().st_size)
    line = _one_line_error(_resume(run, ["train.max_iterations=8"]))
    assert "could not be read" in line and "CheckpointException" not in line and "ranks:" not in line
    assert "weights_only" not in line  # never advise unpickling an untrusted file
    assert "--no-resume" in line


def test_corrupt_extra_json_falls_back_to_previous_checkpoint(run):
    (run / "checkpoints" / "00000006" / "extra.json").write_text("{not json")
    proc = _resume(run, ["train.max_iterations=6"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreadable extra.json" in proc.stdout and "(iteration 3)" in proc.stdout
    assert [r["iteration"] for r in metrics(run)] == list(range(1, 7))


def test_partial_last_metrics_line_is_tolerated(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 7, "total_lo')
    proc = _resume(run, ["train.max_iterations=7"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in metrics(run)] == list(range(1, 8))


def test_no_resume_moves_history_aside(run):
    before = (run / "metrics.jsonl").read_bytes()
    proc = _resume(run, ["train.max_iterations=2"], extra=["--no-resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["iteration"] for r in metrics(run)] == [1, 2]
    (aside,) = run.glob("metrics.old-*.jsonl")
    assert aside.read_bytes() == before
    assert len(list(run.glob("checkpoints.old-*"))) == 1


@pytest.mark.parametrize("override,key", [
    (f"train.dataset_path={ensure_tiny_dataset() / 'val'}", "train.dataset_path"),
    ("train.centering=centering", "train.centering"),
])
def test_experiment_changing_keys_need_an_explicit_flag(run, override, key):
    line = _one_line_error(_resume(run, ["train.max_iterations=7", override]))
    assert key in line and "--allow-config-change" in line
    proc = _resume(run, ["train.max_iterations=7", override], extra=["--allow-config-change"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{key}:" in proc.stdout and "(from 6)" in proc.stdout


def test_every_changed_key_is_logged_and_layerscale_init_does_not_block(run):
    proc = _resume(run, ["train.max_iterations=7", "optim.base_lr=0.001", "crops.local_crops_number=3",
                         "train.batch_size_per_gpu=4", "student.layerscale=0.1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for needle in ("optim.base_lr: 0.004 -> 0.001", "crops.local_crops_number: 2 -> 3",
                   "train.batch_size_per_gpu: 8 -> 4", "student.layerscale: 1e-05 -> 0.1", "train.max_iterations: 6 -> 7"):
        assert needle in proc.stdout, needle
    assert "(from 6)" in proc.stdout


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def test_crafted_metadata_never_runs_code_on_resume(run, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    for meta in run.glob("checkpoints/*/.metadata"):
        meta.write_bytes(pickle.dumps(_RunsCode(marker)))
    line = _one_line_error(_resume(run, ["train.max_iterations=8"]))
    assert not marker.exists(), "unpickling the checkpoint metadata ran code"
    assert "forbidden global" in line and "builtins.exec" in line
