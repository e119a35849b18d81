"""A finished run frees its process groups: no gloo thread may outlive `destroy_distributed`.

A gloo group still alive at interpreter shutdown aborts the process now and then (SIGABRT after a run that
succeeded, see `destroy_distributed`). FSDP2's device meshes keep the group alive after
`destroy_process_group`, so this checks the threads themselves, in a fresh process, and that freeing them
writes nothing to stderr.
"""

import subprocess
import sys

from trainruns import REPO, env

SCRIPT = """
import os, torch
from dinotrain.distributed.env import destroy_distributed, init_distributed
from dinotrain.distributed.fsdp import shard_module
from dinotrain.models.vision_transformer import build_vit

def gloo_threads():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]

init_distributed()
model = build_vit("vit_tiny", patch_size=4, img_size=16, depth=2)
shard_module(model, torch.float32)
model(torch.randn(2, 3, 16, 16)).sum().backward()
assert gloo_threads(), "the check needs a group with threads"
del model
destroy_distributed()
print("gloo threads after destroy:", gloo_threads())
"""


def test_no_gloo_thread_outlives_destroy_distributed():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gloo threads after destroy: []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    # and quietly: the walk over live objects must not trip deprecation warnings (a clean exit's stderr
    # is what users and the CLI tests read)
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
