"""The Gram anchoring schedule (dinotrain/train/gram_schedule.py) against the official training loop's own
bookkeeping, re-typed here as a simulation (dinov3/train/train.py: a load at `it_load_ema_teacher`, updates
after iterations with a running counter), and the weight against official `linear_warmup_cosine_decay`
re-typed with numpy arrays (dinov3/train/cosine_lr_scheduler.py).

Measured once against the official function itself (imported from a copy under /tmp, not kept) on the official
gram_anchor schedule (1.2M iterations), the high_res_adapt one and two others: bitwise equal at every iteration."""

import copy
import itertools
import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from dinotrain.config import load_config
from dinotrain.train.gram_schedule import gram_at, gram_refreshes, gram_start, gram_weight

DEFAULTS = OmegaConf.to_container(load_config())


def _cfg(epoch_len=10, epochs=4, **gram):
    cfg = copy.deepcopy(DEFAULTS)
    cfg["train"]["OFFICIAL_EPOCH_LENGTH"], cfg["optim"]["epochs"] = epoch_len, epochs
    schedule = gram.pop("loss_weight_schedule", None)
    cfg["gram"].update({"use_loss": True, **gram})
    if schedule:
        cfg["gram"]["loss_weight_schedule"].update(schedule)
    return cfg


def official_refreshes(gram: dict, total: int) -> set[int]:
    """Iterations before whose forward the official loop has just copied the EMA teacher into the Gram teacher."""
    if not gram["use_loss"] or gram["ema_teacher"]:  # no separate Gram teacher: load / update are no-ops
        return set()
    out, num_gram_updates = set(), 0
    for it in range(total):
        if gram["it_load_ema_teacher"] == it:  # before the forward of `it`
            out.add(it)
        # ... forward, backward, optimizer step, EMA update ...
        if (gram["rep_update"] and (it + 1) >= gram["it_first_update"] and (it + 1) % gram["update_frequency"] == 0
                and (gram["max_updates"] is None or num_gram_updates < gram["max_updates"])):
            out.add(it + 1)  # after `it` = before `it + 1`
            num_gram_updates += 1
    return {it for it in out if it < total}


GRID = list(itertools.product((-1, 0, 7), (True, False), (0, 1, 5, 10, 12), (1, 4, 5), (None, 0, 2)))


@pytest.mark.parametrize("load,rep,first,freq,max_updates", GRID)
def test_refreshes_as_the_official_loop(load, rep, first, freq, max_updates):
    cfg = _cfg(it_load_ema_teacher=load, rep_update=rep, it_first_update=first, update_frequency=freq,
               max_updates=max_updates)
    total = 40
    ours = {it for it in range(total) if gram_refreshes(cfg, it)}
    assert ours == official_refreshes(cfg["gram"], total)


def test_no_refresh_without_a_separate_gram_teacher_or_without_the_loss():
    for cfg in (_cfg(ema_teacher=True, rep_update=False, it_load_ema_teacher=3, update_frequency=2),
                _cfg(use_loss=False, it_load_ema_teacher=3, update_frequency=2)):
        assert not any(gram_refreshes(cfg, it) for it in range(40))


def test_official_gram_anchor_stage_refreshes_three_times():
    """dinov3_vit7b16_gram_anchor.yaml: first update at 1,010,000, every 10,000, at most 3 (of a 1.2M run)."""
    cfg = _cfg(epoch_len=1000, epochs=1200, ckpt="gram_teacher.pth", it_load_ema_teacher=-1, rep_update=True,
               update_frequency=10000, it_first_update=1010000, max_updates=3)
    points = range(0, 1_200_000, 10_000)  # refreshes can only fall on multiples of update_frequency
    assert [it for it in points if gram_refreshes(cfg, it)] == [1_010_000, 1_020_000, 1_030_000]
    assert not gram_refreshes(cfg, 1_010_001)


@pytest.mark.parametrize("first,freq", [(0, 5), (10, 5), (20, 4), (7, 5)])
def test_update_count_on_resume_is_the_official_one_when_first_update_is_a_multiple(first, freq):
    """Official resume recomputes its counter (which only serves max_updates) as
    ceil((start + 1 - it_first_update) / update_frequency); ours needs no counter. That formula counts the updates
    made before `start` when it_first_update is a positive multiple of update_frequency (the official
    Gram-anchoring config: 1,010,000 and 10,000); otherwise it does not (why ours is pure)."""
    cfg = _cfg(it_load_ema_teacher=-1, ckpt="x", update_frequency=freq, it_first_update=first, max_updates=None)
    agree = []
    for start in range(max(first, 1), 40):
        done = sum(gram_refreshes(cfg, it) for it in range(start + 1))  # refreshes up to start's forward
        agree.append(done == math.ceil((start + 1 - first) / freq))
    assert all(agree) if first > 0 and first % freq == 0 else not all(agree)


def test_gram_loss_is_active_from_its_start():
    assert gram_start(_cfg(use_loss=False, it_load_ema_teacher=5)) is None
    assert gram_start(_cfg(it_load_ema_teacher=-1)) is None  # no teacher ever (a config error)
    assert gram_start(_cfg(it_load_ema_teacher=5)) == 5
    assert gram_start(_cfg(it_load_ema_teacher=5, ckpt="teacher.pth")) == 0
    assert gram_start(_cfg(ema_teacher=True, rep_update=False)) == 0
    cfg = _cfg(it_load_ema_teacher=5, update_frequency=10, it_first_update=10, max_updates=1)
    steps = [gram_at(cfg, it) for it in range(25)]
    assert [s.active for s in steps] == [False] * 5 + [True] * 20
    assert [it for it, s in enumerate(steps) if s.refresh] == [5, 10]
    assert {s.weight for s in steps} == {1.0}


def official_weight_schedule(start, peak, end, warmup_epochs, cosine_epochs, epoch_len, epochs):
    """official linear_warmup_cosine_decay, as ssl_meta_arch.py builds it from gram.loss_weight_schedule."""
    total, warmup = epoch_len * epochs, epoch_len * warmup_epochs
    cosine = epoch_len * cosine_epochs if cosine_epochs is not None else total - warmup
    linear = np.linspace(start, peak, warmup, endpoint=False)
    cos = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
    return np.concatenate([linear, (peak - end) * cos + end, np.full(total - cosine - warmup, end)])


@pytest.mark.parametrize("schedule,epoch_len,epochs", [
    (dict(start=0.0, peak=0.0, end=2.0, warmup_epochs=100, cosine_epochs=1), 10, 120),  # gram_anchor, scaled
    (dict(start=1.5, peak=1.5, end=1.5, warmup_epochs=0, cosine_epochs=0), 10, 30),     # high_res_adapt
    (dict(start=0.5, peak=1.0, end=0.2, warmup_epochs=3, cosine_epochs=None), 7, 10),
    (dict(start=1.0, peak=3.0, end=0.0, warmup_epochs=0, cosine_epochs=None), 7, 10),
    (dict(start=0.0, peak=2.0, end=1.0, warmup_epochs=2, cosine_epochs=5), 9, 10),
])
def test_weight_schedule_is_the_official_one(schedule, epoch_len, epochs):
    cfg = _cfg(epoch_len=epoch_len, epochs=epochs, loss_weight_schedule=schedule, it_load_ema_teacher=0)
    expected = official_weight_schedule(**schedule, epoch_len=epoch_len, epochs=epochs)
    ours = np.array([gram_weight(cfg, it) for it in range(len(expected))])
    np.testing.assert_allclose(ours, expected, rtol=1e-14, atol=1e-15)
    assert gram_weight(cfg, len(expected) + 5) == schedule["end"]  # past the end (official: out of range): end


def test_without_a_schedule_the_weight_is_loss_weight():
    cfg = _cfg(loss_weight=0.7, it_load_ema_teacher=0)
    assert {gram_weight(cfg, it) for it in (0, 1, 39, 1000)} == {0.7}
