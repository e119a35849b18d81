"""It learns: the README's smoke pretraining beats a random init on k-NN by a wide margin and the DINO loss goes
down; a half-depth student distilled from it keeps >= 80 % of its k-NN through the teacher's own heads and
>= 90 % through heads warmed up on its backbone alone; continued pretraining from its backbone with warmed-up
heads keeps >= 85 % of it. Measured here: 86 %, 99 % and 91 % (floating-point rounding on another CPU moves such
short runs by a few points, hence the margins).

Raw pixels of the same view are reported beside it (they are still ahead on this data: docs/recipes.md).

One smoke pretraining (~8-9 minutes on 2 cores) is shared by every test of this module.
"""

import json
import statistics
import subprocess
import sys

import pytest

from trainruns import REPO, env, metrics

pytestmark = pytest.mark.slow
# Continued pretraining: 100 iterations of the smoke recipe after a 100-iteration head warm-up.
CONTINUE = ["train.max_iterations=100"]


def _run(args):
    proc = subprocess.run([sys.executable, "-m", "dinotrain", *args], env=dict(env(), OMP_NUM_THREADS="2"), cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _knn(weights, out, baseline=False) -> dict:
    _run(["eval", "knn", "--weights", str(weights), "--tiny", "--output", str(out),
          *(["--baseline-random", "--baseline-pixels"] if baseline else [])])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The README's smoke pretraining and the k-NN of its teacher (and of a random init)."""
    run = tmp_path_factory.mktemp("smoke") / "smoke"
    _run(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run)])
    return run, _knn(run, run / "knn.json", baseline=True)


def test_smoke_pretraining_learns(smoke):
    run, accs = smoke
    trained, random_init, pixels = accs["model"]["20"], accs["random_init"]["20"], accs["raw_pixels"]["20"]
    print(f"k-NN k=20: trained {trained:.2f}%, random init {random_init:.2f}%, raw pixels {pixels:.2f}%")
    assert trained >= random_init + 25.0  # the recipe's 44.9 % vs 12.5 % (the recipe before grey crops: 36.8 %)

    records = metrics(run)
    dino = [r["dino_global_crops_loss"] + r["dino_local_crops_loss"] for r in records]
    assert statistics.mean(dino[-4:]) < 0.98 * statistics.mean(dino[:4]), "the DINO loss did not go down"


@pytest.mark.parametrize("source", ["run", "backbone"], ids=["teacher-with-heads", "backbone-only-warmed-up-heads"])
def test_distilled_student_keeps_the_teachers_knn(smoke, tmp_path, source):
    run, accs = smoke
    teacher = run if source == "run" else run / "teacher_backbone.pth"
    out = tmp_path / "distill"
    _run(["distill", "--config", "smoke/distill_cpu_tiny", "--output-dir", str(out), f"distillation.teacher={teacher}"])
    student = _knn(out, out / "knn.json", baseline=True)
    got, teacher_acc, random_init = student["model"]["20"], accs["model"]["20"], student["random_init"]["20"]
    print(f"k-NN k=20 ({source}): student {got:.2f}%, teacher {teacher_acc:.2f}%, student at random init "
          f"{random_init:.2f}%")
    # The smoke teacher's own DINO head scores its 128 prototypes almost alike (docs/recipes.md: logits within
    # ~0.03), so its targets carry less than heads warmed up afresh on its backbone: 38.4 % vs 44.6 % measured
    # (teacher 44.9 %); the half-depth ViT trained by itself for that time reaches ~40 % (docs/recipes.md).
    assert got >= (0.8 if source == "run" else 0.9) * teacher_acc
    assert got >= random_init + 10.0


def test_continued_pretraining_from_a_backbone_with_warmed_up_heads_keeps_its_features(smoke, tmp_path):
    """dinov2 #204: continuing from released backbone weights with random heads wrecks the features; with
    the head warm-up the k-NN stays >= 85 % of the starting backbone's (91 % measured)."""
    run, accs = smoke
    out = tmp_path / "continued"
    _run(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(out), *CONTINUE,
          f"student.pretrained_weights={run / 'teacher_backbone.pth'}", "train.head_warmup_iterations=100"])
    assert (out / "head_warmup" / "teacher_full.safetensors").is_file()
    got, start = _knn(out, out / "knn.json")["model"]["20"], accs["model"]["20"]
    print(f"k-NN k=20 after continued pretraining with head warm-up: {got:.2f}% (start {start:.2f}%)")
    assert got >= 0.85 * start
