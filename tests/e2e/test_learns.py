"""It learns: a short smoke pretraining beats a random init on k-NN by a wide margin and the DINO loss goes
down; a half-depth student distilled from it reaches >= 60 % of its k-NN and 5 points above its own random init,
through the teacher's own heads and through heads warmed up on its backbone alone; continued pretraining from its
backbone with warmed-up heads keeps >= 85 % of it. The exact objective is pinned by tests/train/test_golden_losses.py; these runs show that it learns.

The smoke recipe (`smoke/cpu_tiny`) at 12 "epochs" of 5 iterations (60, not the README's 300: the same schedule
shapes in 20 % of the time), one run shared by every test of this module; the three runs that start from it go side
by side, 30 distillation iterations each (after a 15-iteration head warm-up for the backbone alone), 10 + 10 for the
continued pretraining. Measured on an AMD EPYC (2026-12-06, one thread per run), k-NN at k=20: teacher 25.4 % vs
12.5 % at random init (84 iterations: 28.1-30.1 %; 120: 32.6 %; the README's 300: 42.9 %; raw pixels 78.0 %, still
ahead on this data, docs/recipes.md); students 22.0 % (teacher's heads) and 23.7 % (warmed-up heads) vs 14.2 % at
random init, i.e. 87 % and 93 % of the teacher, 7.8 and 9.5 points above random init (40 iterations after 84: 97 %
and 94 %, 13 and 12 points); continued pretraining 26.5 % (104 %). These runs cost ~390 CPU-seconds (~530 with the
earlier 84 / 40 / 25 / 15 iterations). Floating-point rounding on another CPU moves such short runs by a few
points, hence the margins; the exact objective is what the golden-loss test pins.
"""

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trainruns import REPO, env, metrics, threads

pytestmark = pytest.mark.slow
SHORT = ["train.OFFICIAL_EPOCH_LENGTH=5"]  # 12 "epochs" of 5 iterations (the recipe's schedules, compressed)
# Distillation: 5 "epochs" of 6 iterations (after a 15-iteration head warm-up for a backbone alone); continued
# pretraining: 10 iterations after a 10-iteration head warm-up.
DISTILL = ["train.OFFICIAL_EPOCH_LENGTH=6", "optim.epochs=5"]
CONTINUE = ["train.OFFICIAL_EPOCH_LENGTH=10", "train.max_iterations=10", "train.head_warmup_iterations=10"]
WARMUP = "train.head_warmup_iterations=15"


def _run(args):
    proc = subprocess.run([sys.executable, "-m", "dinotrain", *args], env=dict(env(), OMP_NUM_THREADS=str(threads())), cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _knn(weights, out, baseline=False) -> dict:
    _run(["eval", "knn", "--weights", str(weights), "--tiny", "--output", str(out),
          *(["--baseline-random", "--baseline-pixels"] if baseline else [])])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The short smoke pretraining and the k-NN of its teacher (and of a random init)."""
    run = tmp_path_factory.mktemp("smoke") / "smoke"
    _run(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run), *SHORT])
    return run, _knn(run, run / "knn.json", baseline=True)


def test_smoke_pretraining_learns(smoke):
    run, accs = smoke
    trained, random_init, pixels = accs["model"]["20"], accs["random_init"]["20"], accs["raw_pixels"]["20"]
    print(f"k-NN k=20: trained {trained:.2f}%, random init {random_init:.2f}%, raw pixels {pixels:.2f}%")
    # 25.4 % vs 12.5 % measured (84 iterations: 28.1-30.1 %; the full 300-iteration recipe: 42.9 %); a run that
    # learns nothing stays at its random init
    assert trained >= random_init + 8.0

    records = metrics(run)
    dino = [r["dino_global_crops_loss"] + r["dino_local_crops_loss"] for r in records]
    # the last 4 logged values 0.69 % below the first 4 measured (0.84 % after 84 iterations, 2.4 % over the full
    # 300-iteration recipe): with Sinkhorn-Knopp targets over 128 prototypes the loss sits near their entropy,
    # log(128) = 4.85, and moves little; a run that learns nothing keeps it flat
    assert statistics.mean(dino[-4:]) < 0.997 * statistics.mean(dino[:4]), "the DINO loss did not go down"


def _job(args: list[str], out, knn_flags: list[str], log) -> dict:
    """One downstream run with one thread, then the k-NN of what it leaves (`out`): its k-NN results."""
    for cmd in (args, ["eval", "knn", "--weights", str(out), "--tiny", "--output", str(out / "knn.json"), *knn_flags]):
        code = subprocess.run([sys.executable, "-m", "dinotrain", *cmd], env=dict(env(), OMP_NUM_THREADS="1"), cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT, timeout=1800).returncode
        assert code == 0, f"{cmd[0]} of {out.name} failed:\n" + Path(log.name).read_text()[-4000:]
    return json.loads((out / "knn.json").read_text())


@pytest.fixture(scope="module")
def downstream(smoke, tmp_path_factory):
    """The three runs that start from the smoke teacher (two distillations, one continued pretraining) and their
    k-NN, side by side with one thread each: two 1-thread runs on 2 cores do 1.3x the work of one 2-thread run
    (measured). name -> (run directory, its k-NN results)."""
    run, _ = smoke
    base = tmp_path_factory.mktemp("downstream")
    outs = {name: base / name for name in ("run", "backbone", "continued")}
    jobs = {
        "run": (["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(outs["run"]), *DISTILL,
                 f"distillation.teacher={run}"], ["--baseline-random"]),
        "backbone": (["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(outs["backbone"]), *DISTILL,
                      f"distillation.teacher={run / 'teacher_backbone.pth'}", WARMUP], []),
        "continued": (["train", "--config", "smoke/cpu_tiny", "--output-dir", str(outs["continued"]), *CONTINUE,
                       f"student.pretrained_weights={run / 'teacher_backbone.pth'}"], []),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        logs = {name: open(base / f"{name}.log", "w") for name in jobs}
        futures = {name: pool.submit(_job, args, outs[name], flags, logs[name]) for name, (args, flags) in jobs.items()}
        try:
            return {name: (outs[name], future.result()) for name, future in futures.items()}
        finally:
            for log in logs.values():
                log.close()


@pytest.mark.parametrize("source", ["run", "backbone"], ids=["teacher-with-heads", "backbone-only-warmed-up-heads"])
def test_distilled_student_keeps_the_teachers_knn(smoke, downstream, source):
    run, accs = smoke
    _, student = downstream[source]
    # both students share the architecture and the seed, so one random-init k-NN (the first run's) serves both
    got, teacher_acc, random_init = student["model"]["20"], accs["model"]["20"], downstream["run"][1]["random_init"]["20"]
    print(f"k-NN k=20 ({source}): student {got:.2f}%, teacher {teacher_acc:.2f}%, student at random init "
          f"{random_init:.2f}%")
    # measured 87 % (teacher's heads) and 93 % (warmed-up heads) of the teacher, 7.8 and 9.5 points above the
    # random init; a student that learns nothing stays at its random init (14.2 %), below both bounds
    assert got >= 0.6 * teacher_acc
    assert got >= random_init + 5.0


def test_continued_pretraining_from_a_backbone_with_warmed_up_heads_keeps_its_features(smoke, downstream):
    """dinov2 #204: continuing from released backbone weights with random heads wrecks the features; with
    the head warm-up the k-NN stays >= 85 % of the starting backbone's (104 % measured)."""
    run, accs = smoke
    out, knn = downstream["continued"]
    assert (out / "head_warmup" / "teacher_full.safetensors").is_file()
    got, start = knn["model"]["20"], accs["model"]["20"]
    print(f"k-NN k=20 after continued pretraining with head warm-up: {got:.2f}% (start {start:.2f}%)")
    assert got >= 0.85 * start
