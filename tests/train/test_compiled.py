"""`fsdp.compile=true` (inductor on CPU): the compiled steps equal the eager ones within a measured tolerance, a
compiled run resumes exactly (also with compilation toggled), and a compile failure is one line naming the option.

The runs are in this process: dynamo then compiles the block graphs once (10-20 s with a warm inductor cache in
/tmp/torchinductor_$USER, ~2 min cold on 2 cores) and every later compiled run reuses them.
"""

import shutil

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dinotrain.cli import main
from dinotrain.distributed.checkpoint_files import validate_checkpoint
from trainruns import FAST, dinov3_args, max_abs_diff, metrics, teacher

pytestmark = pytest.mark.slow

K = 6  # iterations; FAST checkpoints every 3
# LayerScale 0.1 instead of cpu_tiny's 1e-5: at 1e-5 the first CLS tokens of all images agree to ~1e-5, so KoLeo's
# nearest neighbours would be picked by float rounding, which inductor orders differently (a 1e-3 jump in KoLeo).
# Stochastic depth 0.2 in every block: the official subset path (branches on the kept samples only) runs compiled.
# Its torch.randperm is not lowered by inductor (torch 2.14), so compiled steps drop the same samples as eager ones.
# Activation checkpointing on: the student's blocks are compiled with torch.utils.checkpoint inside (ViT-g's setting).
SETTINGS = ["student.layerscale=0.1", "student.drop_path_rate=0.2", "fsdp.activation_checkpointing=true",
            "train.num_workers=0"]
COMPILED = ["fsdp.compile=true"]
LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss")
# Measured on this 2-core EPYC, torch 2.14.1 (6 iterations of ViT-Tiny/4 on 16-px crops): compiled vs eager losses
# within 2.2e-7 relative, teacher weights within 3.4e-7 absolute (also after the toggled resume). Inductor fuses and
# reorders float ops, so not bitwise.
RTOL_LOSS, ATOL_WEIGHTS = 1e-5, 1e-5


def _train(run, *overrides, expect: int = 0) -> None:
    args = ["train", "--config", "smoke/cpu_tiny", "--output-dir", str(run), *FAST, *SETTINGS, *overrides]
    assert main(args) == expect


@pytest.fixture(scope="module", autouse=True)
def _compile_settings():
    """Compiled graphs and the dynamo settings of `compile_blocks` stay with this module. One thread, as the
    subprocess runs of trainruns.py: inductor's OpenMP kernels on 2 threads of 2 busy cores took 10 s per iteration
    instead of 0.3 s."""
    config = torch._dynamo.config
    limit, specialize_float, threads = config.recompile_limit, config.specialize_float, torch.get_num_threads()
    torch._dynamo.reset()
    torch.set_num_threads(1)
    yield
    torch._dynamo.reset()
    config.specialize_float = specialize_float
    config.recompile_limit = limit
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """K iterations eager and compiled, and how many graphs the compiled run made."""
    root = tmp_path_factory.mktemp("compiled")
    _train(root / "eager", f"train.max_iterations={K}")
    counters.clear()
    _train(root / "compiled", f"train.max_iterations={K}", *COMPILED)
    return root, dict(counters["stats"]), dict(counters["graph_break"])



def _checkpoint_keys(run, iteration: int) -> set[str]:
    return set(validate_checkpoint(run / "checkpoints" / f"{iteration:08d}").state_dict_metadata)


def _assert_close(run, reference) -> None:
    for a, b in zip(metrics(reference), metrics(run), strict=True):
        for key in LOSSES:
            assert b[key] == pytest.approx(a[key], rel=RTOL_LOSS), (a["iteration"], key)
    assert max_abs_diff(teacher(reference), teacher(run)) < ATOL_WEIGHTS


# Inductor compiles C++ on a CPU: without a compiler only the failure's one line can be checked (pytest -ra says so).
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="no C++ compiler (g++): inductor cannot compile on this CPU; apt install g++")


@needs_cxx
def test_compiled_steps_equal_eager_within_tolerance(runs):
    root, stats, graph_breaks = runs
    # the blocks really ran compiled: student and teacher, all crops and the last block's rows, no graph break
    assert stats.get("unique_graphs") == 4, stats
    assert graph_breaks == {}
    _assert_close(root / "compiled", root / "eager")
    # same names with and without compilation (no `_orig_mod.`): checkpoints and exports load either way
    assert _checkpoint_keys(root / "compiled", K) == _checkpoint_keys(root / "eager", K)
    assert teacher(root / "compiled").keys() == teacher(root / "eager").keys()


@needs_cxx
def test_compiled_run_resumes_exactly_and_with_compilation_toggled(runs, tmp_path):
    root, _, _ = runs
    _train(tmp_path / "half", f"train.max_iterations={K // 2}", *COMPILED)
    for name, more in (("compiled", COMPILED), ("eager", [])):
        shutil.copytree(tmp_path / "half", tmp_path / name)
        _train(tmp_path / name, f"train.max_iterations={K}", *more)
    # compiled -> compiled: bitwise the uninterrupted compiled run (same kernels, same RNG stream)
    resumed, reference = metrics(tmp_path / "compiled"), metrics(root / "compiled")
    assert [{k: r[k] for k in LOSSES} for r in resumed] == [{k: r[k] for k in LOSSES} for r in reference]
    ref_t, run_t = teacher(root / "compiled"), teacher(tmp_path / "compiled")
    assert all(torch.equal(ref_t[k], run_t[k]) for k in ref_t), "teacher weights differ after a compiled resume"
    # compiled checkpoint -> eager: loads (same keys) and continues within the compiled-vs-eager tolerance
    _assert_close(tmp_path / "eager", root / "eager")


def test_a_compile_failure_is_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    import torch._inductor.config as inductor

    torch._dynamo.reset()  # nothing compiled, and an empty kernel cache: the C++ compiler has to run
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    capsys.readouterr()
    # inductor's own patch: monkeypatch's undo deletes a config entry (`cpp.cxx does not exist` for later tests)
    with inductor.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        _train(tmp_path / "run", "train.max_iterations=1", *COMPILED, expect=2)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("dinotrain")]
    assert len(ours) == 1 and ours[0].startswith("dinotrain train: error: torch.compile failed ("), err
    assert "fsdp.compile=false" in ours[0] and "Traceback" not in err


# DINOv3 (RoPE, storage tokens, masked key bias) with Gram anchoring, as the 7B recipe runs it: compiled blocks with
# activation checkpointing, stochastic depth (DINOV3_FAST: 0.1), the Gram teacher in use from iteration 2.
# Measured on this 2-core EPYC, torch 2.14.1 (4 iterations of the 2-block ViT-Tiny/16 on 64-px crops): compiled vs
# eager losses within 3.3e-7 relative (the Gram loss 7.8e-8), teacher weights within 1.2e-8 absolute; 3 graphs
# (student with grad, EMA teacher without, the Gram teacher in eval mode), no graph break; the compiled run takes
# ~2 min with a cold inductor cache, ~15 s warm (eager: 4 s).
DINOV3_STEPS = ["student.layerscale=0.1", "fsdp.activation_checkpointing=true", "train.max_iterations=4",
                "gram.it_load_ema_teacher=2", "gram.it_first_update=1000"]


@needs_cxx
def test_dinov3_compiled_steps_with_gram_anchoring_equal_eager_within_tolerance(tmp_path):
    assert main(dinov3_args(tmp_path / "eager", DINOV3_STEPS)) == 0
    counters.clear()
    assert main(dinov3_args(tmp_path / "compiled", [*DINOV3_STEPS, *COMPILED])) == 0
    assert counters["stats"].get("unique_graphs") == 3, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    assert "gram_loss" in metrics(tmp_path / "compiled")[-1]
    for a, b in zip(metrics(tmp_path / "eager"), metrics(tmp_path / "compiled"), strict=True):
        for key in (*LOSSES, "gram_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=RTOL_LOSS), (a["iteration"], key)
    assert max_abs_diff(teacher(tmp_path / "eager"), teacher(tmp_path / "compiled")) < ATOL_WEIGHTS
