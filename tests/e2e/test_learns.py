"""It learns: the README's smoke pretraining beats a random init on k-NN, and the DINO loss goes down.

This is the main job of the README (minus the set-up) and takes ~8 minutes on 2 cores.
"""

import json
import statistics
import subprocess
import sys

import pytest

from trainruns import REPO, env, metrics


def _run(args):
    proc = subprocess.run([sys.executable, "-m", "dinotrain", *args], env=dict(env(), OMP_NUM_THREADS="2"), cwd=REPO,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_smoke_pretraining_learns(tmp_path):
    run = tmp_path / "smoke"
    _run(["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run)])
    _run(["eval", "knn", "--weights", str(run), "--tiny", "--baseline-random", "--output", str(run / "knn.json")])
    accs = json.loads((run / "knn.json").read_text())
    trained, random_init = accs["model"]["20"], accs["random_init"]["20"]
    print(f"k-NN k=20: trained {trained:.2f}%, random init {random_init:.2f}%")
    assert trained >= random_init + 5.0

    records = metrics(run)
    dino = [r["dino_global_crops_loss"] + r["dino_local_crops_loss"] for r in records]
    assert statistics.mean(dino[-4:]) < statistics.mean(dino[:4]), "the DINO loss did not go down"
