"""DINOv3 pretraining with Gram anchoring through the one loop (real CLI runs of a few seconds).

One 8-iteration run of a 2-block DINOv3 with the Gram teacher loaded from the EMA teacher before iteration 4 and
refreshed before iteration 6 (0-based), checkpoints every 2 iterations, is shared by the checks: the losses, when
`gram_loss` is logged, the Gram teacher in each checkpoint against the EMA teacher of the checkpoint it must have
been copied from, and a kill -9 + resume that must end bitwise equal.
"""

import math
import signal
import subprocess
import sys

import pytest
import torch

from dinotrain.distributed.checkpoint_files import read_tensors
from trainruns import DINOV3_FAST, GRAM, REPO, dinov3_args, env, kill_tree, metrics, run_cli, wait_for

LOADED, REFRESHED = 4, 6  # the iterations (counted from 0) before whose forward the Gram teacher takes the EMA's


_args = dinov3_args


def _network(run_dir, it, name):
    return read_tensors(run_dir / "checkpoints" / f"{it:08d}", f"model.{name}.backbone.")


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def gram_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dinov3") / "run"
    proc = run_cli(_args(run), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


def test_a_dinov3_run_trains_and_logs_the_gram_loss_from_its_start(gram_run):
    records = metrics(gram_run)
    assert [r["iteration"] for r in records] == list(range(1, 9))
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("backprop_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"))
        active = r["iteration"] - 1 >= LOADED  # records are numbered by iterations done
        assert ("gram_loss" in r) == active, r
        if active:
            assert math.isfinite(r["gram_loss"]) and r["gram_loss"] > 0 and r["gram_loss_weight"] == 1.0
            assert r["backprop_loss"] == pytest.approx(sum(v for k, v in r.items() if k.endswith("_term")), rel=1e-5)
    # the DINOv3 backbone was trained: its RoPE periods and storage tokens are in the exported teacher
    teacher = torch.load(gram_run / "teacher_backbone.pth", weights_only=True)
    assert "rope_embed.periods" in teacher and teacher["storage_tokens"].shape[1] == 2 and "pos_embed" not in teacher


def test_the_gram_teacher_is_refreshed_exactly_at_the_scheduled_iterations(gram_run):
    """Checkpoint k holds the state before iteration k. The Gram teacher in checkpoint k must equal the EMA
    teacher of the checkpoint of its last refresh before k, and differ from the EMA teacher of any other."""
    ema = {it: _network(gram_run, it, "teacher") for it in (2, 4, 6, 8)}
    gram = {it: _network(gram_run, it, "gram_teacher") for it in (2, 4, 6, 8)}
    assert _equal(gram[2], gram[4])  # nothing copied before iteration 4
    assert not any(_equal(gram[4], ema[it]) for it in (2, 4))
    assert _equal(gram[6], ema[LOADED]) and not _equal(gram[6], ema[6])  # loaded before iteration 4, not 5
    assert _equal(gram[8], ema[REFRESHED]) and not _equal(gram[8], ema[8])  # refreshed before 6, not after


def test_kill_9_and_resume_with_gram_on_ends_bitwise_equal(gram_run, tmp_path):
    run = tmp_path / "run"
    proc = _start(run)
    wait_for(run / "checkpoints" / f"{LOADED + 2:08d}", proc, timeout=180)  # the Gram teacher is in use
    kill_tree(proc.pid)  # SIGKILL: no checkpoint at the stop, the run resumes from the last periodic one
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "teacher_backbone.pth").exists()  # killed before its end
    resumed = run_cli(_args(run), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "resume_history.jsonl").exists()  # it resumed from a checkpoint of the killed run
    final = torch.load(run / "teacher_backbone.pth", weights_only=True)
    assert _equal(final, torch.load(gram_run / "teacher_backbone.pth", weights_only=True))
    assert _equal(_network(run, 8, "gram_teacher"), _network(gram_run, 8, "gram_teacher"))
    assert _equal(_network(run, 8, "student"), _network(gram_run, 8, "student"))
    assert [r["iteration"] for r in metrics(run)] == list(range(1, 9))
    assert [r["backprop_loss"] for r in metrics(run)] == [r["backprop_loss"] for r in metrics(gram_run)]


def _start(run_dir):
    """The shared run's command in the background (its output in run_dir.log), to be killed mid-way."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(str(run_dir) + ".log", "w")
    return subprocess.Popen([sys.executable, "-m", "dinotrain", *_args(run_dir)], env=env(), stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def test_a_gram_start_after_the_last_iteration_is_one_cli_line(tmp_path):
    proc = run_cli(_args(tmp_path / "run", ["gram.it_load_ema_teacher=8"]), timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dinotrain train: error:")]
    assert len(errors) == 1 and "gram.it_load_ema_teacher' = 8 is after the run's last iteration 7" in errors[0]


@pytest.mark.parametrize("overrides, words", [
    (["student.pos_embed_type=learned"], "student.n_storage_tokens"),
    (["student.num_register_tokens=4"], "student.num_register_tokens"),
    (["student.ffn_layer=swiglufused"], "not a DINOv3 FFN"),
])
def test_backbone_family_mixups_are_one_line(overrides, words, tmp_path):
    from dinotrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words) as info:
        load_config("smoke/cpu_tiny", [*DINOV3_FAST, *overrides])
    assert "\n" not in str(info.value)


def test_gram_ckpt_weights_load_into_the_gram_teacher_and_a_misfit_is_one_line():
    from dinotrain.config import load_config
    from dinotrain.train.ssl import SSLMetaArch
    from dinotrain.weights.state_dict import WeightsError

    model = SSLMetaArch(load_config("smoke/cpu_tiny", [*DINOV3_FAST, *GRAM]), with_gram=True)
    gram = model.gram_teacher["backbone"]
    assert not gram.training and not any(p.requires_grad for p in gram.parameters())
    model.train()
    assert not gram.training  # official: the Gram teacher always runs in eval mode
    weights = {k: torch.randn_like(v) if v.is_floating_point() and k != "rope_embed.periods" else v
               for k, v in gram.state_dict().items()}
    model.load_gram_teacher(weights, "gram.pth")
    assert _equal(gram.state_dict(), weights)
    deeper = SSLMetaArch(load_config("smoke/cpu_tiny", [*DINOV3_FAST, "student.depth=3"]))
    with pytest.raises(WeightsError, match="'gram.ckpt' = gram.pth") as info:
        model.load_gram_teacher(deeper.teacher["backbone"].state_dict(), "gram.pth")
    assert "\n" not in str(info.value)


def test_a_high_res_stage_continues_the_first_stage_at_mixed_resolutions(gram_run, tmp_path):
    """The high-res stage (official `student.resume_from_teacher_chkpt`): student, teacher and heads start from the
    first-stage run's teacher; each batch draws one (global, local, Gram teacher) size tuple; the Gram teacher is
    that loaded teacher from iteration 0 and sees the larger Gram crops."""
    stage2 = tmp_path / "stage2"
    sizes = ["crops.global_crops_size=[64,80]", "crops.local_crops_size=[32,48]",
             "crops.gram_teacher_crops_size=[96,112]", "crops.global_local_crop_pairs_ratios=[0.5,0.5]"]
    proc = run_cli(_args(stage2, [f"student.resume_from_teacher_chkpt={gram_run}", "gram.it_load_ema_teacher=0",
                                  "gram.it_first_update=1000", "train.max_iterations=2", "optim.warmup_epochs=0",
                                  "checkpoint.period_iterations=1", *sizes]), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = read_tensors(gram_run / "checkpoints" / "00000008", "model.teacher.backbone.")
    # the Gram teacher is never updated in this stage: it is the first stage's teacher, as loaded
    assert _equal(_network(stage2, 1, "gram_teacher"), first)
    assert all(r["gram_loss"] >= 0 for r in metrics(stage2))


def test_a_high_res_stage_needs_its_first_stage(tmp_path):
    missing = run_cli(_args(tmp_path / "r", [f"student.resume_from_teacher_chkpt={tmp_path / 'nothing'}"]), timeout=60)
    assert missing.returncode == 2 and "student.resume_from_teacher_chkpt" in missing.stderr, missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_a_finished_run_is_read_with_its_own_norm_and_rope_settings(gram_run):
    """A run's `teacher_backbone.pth` (the official layout: tensors only) does not say the norm eps or the RoPE
    settings; read through its run directory they come from the run's config (here `norm_layer: layernorm`, eps 1e-6,
    where a bare file is read as the released models' `layernormbf16`, eps 1e-5)."""
    from dinotrain.weights.resolve import open_weights

    assert open_weights(gram_run).spec.norm_layer == "layernorm"
    assert open_weights(gram_run / "teacher_backbone.pth").spec.norm_layer == "layernormbf16"
