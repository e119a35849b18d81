"""What a resume changes: the config of the checkpoint against the config of the run that continues it.

Three kinds of differences:
* shape keys (architecture, head sizes, crop size): the checkpoint cannot be loaded -> error;
* keys that make the continued run a different experiment (dataset, centering) -> refused unless the
  user passes `--allow-config-change`;
* everything else (lr, batch size, crop count, schedules, ...) -> allowed, each logged, and the
  history is appended to the run directory's resume history (`RunDir.resume_history`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinotrain.config import ConfigError
from dinotrain.storage import writing
from dinotrain.train.rundir import RunDir

log = logging.getLogger("dinotrain.train")

# Keys that fix parameter shapes or which parameters are trained (a frozen prototype gain has no
# optimizer state): a resumed run must agree on them with its checkpoint.
ARCH_KEYS = ("student.arch", "student.depth", "student.patch_size", "student.ffn_layer",
             "student.num_register_tokens", "student.qkv_bias", "student.proj_bias", "student.ffn_bias",
             "crops.global_crops_size", "dino.head_n_prototypes", "dino.head_bottleneck_dim", "dino.head_nlayers",
             "dino.head_hidden_dim", "dino.norm_last_layer", "ibot.separate_head", "ibot.head_n_prototypes",
             "ibot.head_bottleneck_dim", "ibot.head_nlayers", "ibot.head_hidden_dim", "ibot.norm_last_layer",
             "student.pos_embed_type", "student.ffn_ratio", "student.n_storage_tokens", "student.mask_k_bias",
             "student.untie_cls_and_patch_norms", "student.untie_global_and_local_cls_norm",
             # what a checkpoint holds: a Gram teacher or not
             "gram.use_loss", "gram.ema_teacher")
# Keys whose change turns the continued run into another experiment.
GUARDED_KEYS = ("train.dataset_path", "train.centering")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """key -> (checkpoint value, this run's value) for every leaf that differs (keys new to either side too)."""
    old, new = _leaves(saved), _leaves(OmegaConf.to_container(cfg, resolve=True))
    missing = object()
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def check_resume(saved: dict, cfg: DictConfig, where: Path, allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume that cannot work or would be meaningless; returns the allowed changes (to log)."""
    changes = config_changes(saved, cfg)
    saved_keys = _leaves(saved)
    # a key new since the checkpoint was written (e.g. student.pos_embed_type) is not a change: its default is what
    # the older code did
    arch = [k for k in ARCH_KEYS if k in changes and k in saved_keys]
    diffs = [f"{k}: checkpoint has {changes[k][0]!r}, config has {changes[k][1]!r}" for k in arch]
    was, now = (bool(v) for v in changes.get("student.layerscale", (True, True)))
    if was != now:  # only on/off changes shapes; the init value does not matter on resume
        diffs.append(f"student.layerscale: LayerScale is {'on' if was else 'off'} in the checkpoint and "
                     f"{'on' if now else 'off'} in the config")
    if diffs:
        raise ConfigError(
            f"cannot resume from {where}: the architecture differs — " + "; ".join(diffs)
            + ". Use another --output-dir, or --no-resume to start over in this one."
        )
    guarded = [k for k in GUARDED_KEYS if k in changes]
    if guarded and not allow_change:
        listed = "; ".join(f"{k}: checkpoint has {changes[k][0]!r}, config has {changes[k][1]!r}" for k in guarded)
        raise ConfigError(
            f"resuming from {where} would continue the run as another experiment ({listed}). "
            "Pass --allow-config-change to continue anyway, use another --output-dir, or --no-resume to start over."
        )
    return changes


def log_changes(changes: dict[str, tuple[Any, Any]], iteration: int) -> None:
    if not changes:
        log.info("resuming at iteration %d with the checkpoint's config unchanged", iteration)
        return
    log.warning("resuming at iteration %d with %d config change(s) since the checkpoint:", iteration, len(changes))
    for key, (old, new) in changes.items():
        log.warning("  %s: %r -> %r", key, old, new)


def record_history(run_dir: Path, checkpoint: Path, iteration: int, world_size: int,
                   changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line per resume to the run's resume history: when, from where, what changed."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(checkpoint), "iteration": iteration,
             "world_size": world_size, "changes": {k: list(v) for k, v in changes.items()}}
    path = RunDir(run_dir).resume_history
    with writing(path, "the resume history", lambda: f"{checkpoint} (iteration {iteration})"), path.open("a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
