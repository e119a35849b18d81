"""FSDP2 training with real processes: 1 vs 2 processes, exact resume after SIGKILL, resume onto
another world size, crashes during checkpoint writes, corrupted checkpoints, mixed precision (bf16: runs, resumes
bitwise, and stays within a measured tolerance of the fp32 run)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from dinotrain.distributed.checkpoint import complete_checkpoints
from trainruns import REPO, env, kill_tree, max_abs_diff, metrics, start, teacher, train, wait_for

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

K = 6
# KoLeo over the global batch and no drop path: a step then does not depend on how the batch is split.
# LayerScale 0.1 instead of 1e-5: at 1e-5 the initial CLS tokens of all images agree to ~1e-5, so KoLeo's
# nearest neighbours would be decided by float rounding, which differs between the two reductions.
SAME_STEPS = ["dino.koleo_global=true", "student.drop_path_rate=0.0", "student.layerscale=0.1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 1-process run of K iterations (checkpoints at K/2 and K)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    train(run, [f"train.max_iterations={K}", *SAME_STEPS])
    return run



def test_two_processes_take_the_same_steps_as_one(reference, tmp_path):
    run = tmp_path / "run2"
    train(run, [f"train.max_iterations={K}", "train.batch_size_per_gpu=4", *SAME_STEPS], nproc=2)
    one, two = metrics(reference), metrics(run)
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two]
    for a, b in zip(one, two):
        for key in ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["iteration"], key)
    assert max_abs_diff(teacher(reference), teacher(run)) < 1e-5


def test_exact_resume_after_sigkill(reference, tmp_path):
    run = tmp_path / "run"
    proc = start(run, ["train.max_iterations=1000", *SAME_STEPS])  # would run long: we kill it mid-way
    try:
        wait_for(run / "checkpoints" / f"{K // 2:08d}" / "extra.json", proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]
    resumed = train(run, [f"train.max_iterations={K}", *SAME_STEPS])
    assert f"iteration {K // 2}" in resumed.stdout
    assert _without_speed(metrics(run)) == _without_speed(metrics(reference))  # bitwise-equal losses
    ref_t, run_t = teacher(reference), teacher(run)
    assert all(torch.equal(ref_t[k], run_t[k]) for k in ref_t), "teacher weights differ after resume"


def _without_speed(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_resume_onto_another_world_size(reference, tmp_path, first, second):
    run = tmp_path / "run"
    train(run, [f"train.max_iterations={K // 2}", f"train.batch_size_per_gpu={8 // first}", *SAME_STEPS], nproc=first)
    train(run, [f"train.max_iterations={K}", f"train.batch_size_per_gpu={8 // second}", *SAME_STEPS], nproc=second)
    ref, got = metrics(reference), metrics(run)
    assert [r["iteration"] for r in got] == list(range(1, K + 1))
    for a, b in zip(ref, got):
        assert b["total_loss"] == pytest.approx(a["total_loss"], abs=1e-5, rel=1e-5), a["iteration"]
    assert max_abs_diff(teacher(reference), teacher(run)) < 1e-5


CRASH_IN_SAVE = """
import os, signal, sys
import torch.distributed.checkpoint as dcp
from dinotrain.distributed import checkpoint as ck
original = dcp.save
def save_then_die(state, checkpoint_id):
    original(state, checkpoint_id=checkpoint_id)
    if checkpoint_id.endswith("{iteration:08d}"):
        os.kill(os.getpid(), signal.SIGKILL)   # shards written, checkpoint not yet complete
ck.dcp.save = save_then_die
from dinotrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_leaves_previous_usable(reference, tmp_path):
    from trainruns import FAST

    run = tmp_path / "run"
    args = ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run), *FAST, f"train.max_iterations={K}", *SAME_STEPS]
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE.format(iteration=K), *args], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / f".tmp-{K:08d}").is_dir()  # the partial one is there ...
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]  # ... and ignored
    train(run, [f"train.max_iterations={K}", *SAME_STEPS])
    ref_t, run_t = teacher(reference), teacher(run)
    assert all(torch.equal(ref_t[k], run_t[k]) for k in ref_t)
    assert not (run / "checkpoints" / f".tmp-{K:08d}").exists()


def test_corrupted_checkpoint_is_reported_and_previous_used(reference, tmp_path):
    run = tmp_path / "run"
    train(run, [f"train.max_iterations={K}", *SAME_STEPS])
    newest = complete_checkpoints(run)[-1]
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(b"garbage" * 10)
    proc = train(run, [f"train.max_iterations={K}", *SAME_STEPS])
    assert "truncated" in proc.stdout and "trying the previous checkpoint" in proc.stdout
    assert f"iteration {K // 2}" in proc.stdout
    ref_t, run_t = teacher(reference), teacher(run)
    assert all(torch.equal(ref_t[k], run_t[k]) for k in ref_t)


def test_resume_with_another_architecture_names_the_mismatch(reference, tmp_path):
    run = tmp_path / "run"
    train(run, ["train.max_iterations=2"])
    proc = subprocess.run(
        [sys.executable, "-m", "dinotrain", "train", "--config", "smoke/cpu_tiny", "--output-dir", str(run),
         "student.arch=vit_small"], env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "student.arch" in proc.stderr and "vit_tiny" in proc.stderr and "vit_small" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("dtype", ["fp16"])  # bf16: test_bf16_two_processes_run (6 iterations, the same checks)
def test_mixed_precision_trains_on_two_processes(tmp_path, dtype):
    run = tmp_path / "run"
    train(run, ["train.max_iterations=3", "train.batch_size_per_gpu=4", f"compute_precision.dtype={dtype}"], nproc=2)
    records = metrics(run)
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)
    if dtype == "fp16":
        assert "grad_scale" in records[-1]


# ---- bf16: FSDP2 mixed precision (bf16 parameters and compute, fp32 weights, optimizer and gradient reduction) ----
BF16 = ["compute_precision.dtype=bf16", "train.batch_size_per_gpu=4", *SAME_STEPS]
LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
# Measured on a 2-core AMD EPYC (avx512_bf16, no AMX), torch 2.14.1, against `reference` (fp32, 1 process; 2 fp32
# processes are 6e-8 from it): per logged iteration the DINO, iBOT and total losses within 8.1e-4 relative, KoLeo
# within 6.6e-3; the teacher backbone 7.5e-5 away in relative L2 over all its weights at once (a max of |difference|
# would be ruled by the attention's key biases, whose gradient is pure rounding noise that AdamW turns into full
# steps). The bounds are ~4-7x those. Deliberate breaks: the weights left in bf16 for the optimizer put the teacher
# 3.3e-3 away (fails the teacher bound, and test_bf16_two_processes_run's fp32 check of the saved weights);
# reduce_dtype=bf16 stays within the bounds
# (2 ranks add 2 bf16 gradients: an error the size of the bf16 gradients' own) and a missing cast of the inputs
# crashes the run; test_fsdp_units' bf16 test fails for all three.
BF16_LOSS_RTOL = {"koleo_loss": 3e-2}
BF16_LOSS_RTOL_OTHERS = 3e-3
BF16_TEACHER_RTOL = 5e-4


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """An uninterrupted 2-process bf16 run of K iterations (checkpoints at K/2 and K)."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    train(run, [f"train.max_iterations={K}", *BF16], nproc=2)
    return run


def test_bf16_two_processes_run(bf16_run):
    assert "compute dtype torch.bfloat16" in (bf16_run / "log.txt").read_text()
    records = metrics(bf16_run)
    assert [r["iteration"] for r in records] == list(range(1, K + 1))
    assert all(torch.isfinite(torch.tensor([r[k] for k in LOSSES])).all() for r in records)
    assert all(v.dtype == torch.float32 for v in teacher(bf16_run).values()), "weights are saved in fp32"


def test_bf16_exact_resume_after_sigkill(bf16_run, tmp_path):
    run = tmp_path / "run"
    proc = start(run, ["train.max_iterations=1000", *BF16], nproc=2)  # would run long: we kill it mid-way
    try:
        wait_for(run / "checkpoints" / f"{K // 2:08d}" / "extra.json", proc)
    finally:
        kill_tree(proc.pid)  # torchrun and both ranks, SIGKILL
        proc.wait(30)
    assert [int(c.name) for c in complete_checkpoints(run)] == [K // 2]
    resumed = train(run, [f"train.max_iterations={K}", *BF16], nproc=2)
    assert f"iteration {K // 2}" in resumed.stdout + resumed.stderr
    assert _without_speed(metrics(run)) == _without_speed(metrics(bf16_run))  # bitwise-equal losses
    ref_t, run_t = teacher(bf16_run), teacher(run)
    assert all(torch.equal(ref_t[k], run_t[k]) for k in ref_t), "teacher weights differ after resume"


def test_bf16_stays_within_the_measured_tolerance_of_fp32(reference, bf16_run):
    fp32, bf16 = metrics(reference), metrics(bf16_run)
    assert [r["iteration"] for r in fp32] == [r["iteration"] for r in bf16]
    for a, b in zip(fp32, bf16):
        for key in LOSSES:
            rtol = BF16_LOSS_RTOL.get(key, BF16_LOSS_RTOL_OTHERS)
            assert b[key] == pytest.approx(a[key], rel=rtol), (a["iteration"], key)
    ref_t, run_t = teacher(reference), teacher(bf16_run)
    assert ref_t.keys() == run_t.keys()
    diff = torch.sqrt(sum((run_t[k].float() - ref_t[k].float()).pow(2).sum() for k in ref_t))
    relative = float(diff / torch.sqrt(sum(ref_t[k].float().pow(2).sum() for k in ref_t)))
    assert relative < BF16_TEACHER_RTOL, f"teacher {relative:.2e} (relative L2) from the fp32 run"
    assert relative > 1e-5, "as close as fp32 runs are to each other (~6e-8): was the run computed in bf16?"
