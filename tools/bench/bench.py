"""dinotrain's benchmark harness: named cases, each measured beside its peer in one run, a table printed last.

    python tools/bench/bench.py --list
    python tools/bench/bench.py                                   # CPU defaults: step-S, data, inference-S
    python tools/bench/bench.py --cases step-S --batch 4 --steps 3 --json bench.json
    python tools/bench/bench.py --cases step-L step-g inference-L distill --device cuda --dtype bf16 --batch 32
    python tools/bench/bench.py --cases step-S --precisions fp32 bf16 --batch 8 --threads 2   # 4 steps side by side

Cases (ours vs the peer, timed interleaved in one process so machine noise hits both alike):
  step-S|B|L|g   full SSL training step: student on 2 global + 8 local crops, EMA teacher, DINO + iBOT heads
                 with the official prototype counts, DINO + iBOT + KoLeo, backward, clipping, AdamW, EMA.
                 Peer: the same step built from lightly's losses and heads on a timm ViT (tools/bench/peer_lightly.py).
                 g runs with FSDP2 + activation checkpointing (peer: timm gradient checkpointing).
                 --precisions fp32 bf16: ours and the peer in each dtype, all four interleaved (ours in bf16: FSDP2
                 mixed precision; the peer: autocast over fp32 weights).
  last-block     ours only: the step-S with the last block on the rows the losses read (now) vs every token (before).
  head-ce        the step-S head's last layer + DINO/iBOT cross-entropies alone: one call against target segments
                 (now) vs split logits (before).
  one-ce         ours only: the step-S with the shared head's rows in one cross-entropy against target segments
                 (now) vs split logits and one cross-entropy per loss (before).
  head-ops       ours only: the step-S with the head's fused weight norm and the cross-entropies' in-place
                 log-sum-exp (now) vs the same formulas as separate ops (before).
  alone-plain    ours only: the step-S on one process in fp32 with plain modules (now) vs FSDP2 on one rank (before).
  compile-S|B|L|g  ours only: the step eager vs `fsdp.compile=true` (inductor on each block); the first call (the
                 cold compilation) in its own column.
  ce-grad        ours only: the step-S with the head cross-entropy's gradient written into the logits' memory
                 (now) vs a new tensor (before).
  distill        distillation step (frozen ViT teacher -> student), no peer (the official code ships none).
  inference-S..  forward only, ours vs timm's ViT of the same shape.
  data           decode + multi-crop + iBOT masks + collate on ImageNet-sized JPEGs, images/s per CPU core:
                 ours (uint8 crops; also with their normalisation on the same core) vs the official-style PIL
                 pipeline (tools/bench/data_pipeline.py).
  masks          iBOT masks of one rank at global batch 1,024 over 32 ranks: per-rank (now) vs whole batch (before).
  sinkhorn       Sinkhorn-Knopp on 2,048 x 32,768: in place (now) vs out of place (before), with bytes allocated.
  ibot-loss      iBOT cross-entropy over 65,536 prototypes for 1,024 tokens, forward + backward: block-wise
                 (now) vs the log-softmax expression (before), with bytes allocated.

FLOPs are counted once per implementation with torch's FlopCounterMode under the math attention backend;
MFU is achieved FLOP/s over this machine's matmul rate in the row's dtype, measured at the end of the same run;
peak memory is reported on CUDA.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from inference import cpu_name, sync  # noqa: E402
from train_step import count_flops, matmul_rate  # noqa: E402

from dinotrain.distributed.fsdp import DTYPES  # noqa: E402

ARCHS = {"S": "vit_small", "B": "vit_base", "L": "vit_large", "g": "vit_giant2"}
# Official prototype counts: ViT-S/B (ssl_default_config) 65,536 with the head shared by DINO and iBOT;
# ViT-L/g (train/vitl14, train/vitg14) 131,072 with a separate iBOT head and a 384-d bottleneck.
HEADS = {
    "S": {"n_prototypes": 65536, "bottleneck": 256, "separate_ibot_head": False},
    "B": {"n_prototypes": 65536, "bottleneck": 256, "separate_ibot_head": False},
    "L": {"n_prototypes": 131072, "bottleneck": 384, "separate_ibot_head": True},
    "g": {"n_prototypes": 131072, "bottleneck": 384, "separate_ibot_head": True},
}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def interleaved(runners: dict[str, Callable[[], object]], steps: int, warmup: int, device) -> dict[str, dict]:
    """Median seconds per call, seconds of the first call (a compiled one compiles there) and peak CUDA memory of
    each runner, alternating their order every round."""
    names = list(runners)
    peak, first = {}, {}
    for name in names:  # warm-up (and each one's peak memory, measured alone)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(max(warmup, 1)):
            sync(device)
            t = time.perf_counter()
            runners[name]()
            sync(device)
            if i == 0:
                first[name] = time.perf_counter() - t
        peak[name] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    times = {name: [] for name in names}
    for i in range(steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync(device)
            t = time.perf_counter()
            runners[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: {"seconds": statistics.median(times[name]), "first_s": first[name], "peak_gib": peak[name]}
            for name in names}


# ---- full SSL step -------------------------------------------------------------------------------------
def ssl_config(size: str, args):
    from dinotrain.config import load_config

    h = HEADS[size]
    overrides = [
        f"student.arch={ARCHS[size]}", "student.patch_size=14", "student.drop_path_rate=0.0",
        "student.ffn_layer=" + ("swiglufused" if size == "g" else "mlp"),
        "crops.global_crops_size=224", "crops.local_crops_size=98", "crops.local_crops_number=8",
        f"dino.head_n_prototypes={h['n_prototypes']}", f"dino.head_bottleneck_dim={h['bottleneck']}",
        f"ibot.separate_head={str(h['separate_ibot_head']).lower()}", f"ibot.head_n_prototypes={h['n_prototypes']}",
        f"ibot.head_bottleneck_dim={h['bottleneck']}", f"compute_precision.dtype={args.dtype}",
        f"fsdp.activation_checkpointing={str(size == 'g').lower()}", f"fsdp.compile={str(args.compile).lower()}",
        f"train.batch_size_per_gpu={args.batch}", f"train.centering={args.centering}",
    ]
    return load_config(None, overrides)


def _our_step(size: str, args, device, plain_if_unneeded: bool = True):
    """Our SSL meta-arch, sharded (plain modules alone in fp32, as training does), its optimizer, the config and
    one synthetic batch on `device`."""
    from train_step import synthetic_batch

    from dinotrain.train.optim import apply_schedules, build_optimizer
    from dinotrain.train.ssl import SSLMetaArch

    cfg = ssl_config(size, args)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(device)
    model.shard(DTYPES[args.dtype], plain_if_unneeded=plain_if_unneeded)
    optimizer = build_optimizer(model.student, cfg)
    apply_schedules(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(cfg, args.batch).items()}
    return model, optimizer, cfg, batch


def case_step(size: str, args, device) -> list[dict]:
    """Ours and the peer in `--dtype`, or in each of `--precisions` (all timed interleaved in one run).

    Ours in bf16 is what training runs: FSDP2 mixed precision (bf16 parameters gathered for compute, the fp32
    parameters the optimizer's, gradients reduced in fp32). The peer's equivalent is torch.autocast in bf16 over
    fp32 weights (`build_peer(dtype=...)`): bf16 matmuls, fp32 master weights and AdamW state, as timm's own
    `--amp-dtype bfloat16` trains; timm weights cast to bf16 would leave the optimizer bf16 weights to update."""
    from functools import partial

    from peer_lightly import build_peer, peer_inputs, peer_step
    from train_step import step

    precisions = args.precisions or [args.dtype]
    named = (lambda impl, p: f"{impl} {p}") if args.precisions else (lambda impl, p: impl)
    runners, dtypes, batch = {}, {}, None
    for p in precisions:  # the work of train.loop.train_step, on the same synthetic batch in every precision
        model, optimizer, cfg, batch = _our_step(size, argparse.Namespace(**{**vars(args), "dtype": p}), device)
        runners[named("dinotrain", p)], dtypes[named("dinotrain", p)] = partial(step, model, optimizer, cfg, batch), p
    if not args.no_peer:
        h = HEADS[size]
        crops = peer_inputs(batch, device)
        for p in precisions:
            torch.manual_seed(0)
            peer = build_peer(ARCHS[size], 14, 224, n_prototypes=h["n_prototypes"], bottleneck=h["bottleneck"],
                              device=device, shared_head=not h["separate_ibot_head"], dtype=DTYPES[p],
                              grad_checkpointing=size == "g")
            runners[named("lightly+timm", p)], dtypes[named("lightly+timm", p)] = partial(peer_step, peer, *crops), p
    rows = measure(f"step-{size}", runners, args, device, images=args.batch)
    for row in rows:
        row["dtype"] = dtypes[row["impl"]]
    return rows


def case_previous(patch: str, case: str, now: str, before: str):
    """Our ViT-S/14 step as it is (now) vs with one piece swapped for the implementation it replaced (before: the
    context manager `patch` of tools/bench/previous.py), same model and batch."""
    def run_case(args, device) -> list[dict]:
        import previous
        from train_step import step

        model, optimizer, cfg, batch = _our_step("S", args, device)

        def swapped():
            with getattr(previous, patch)():
                step(model, optimizer, cfg, batch)

        return measure(case, {now: lambda: step(model, optimizer, cfg, batch), before: swapped}, args, device,
                       images=args.batch)
    return run_case


def case_alone_plain(args, device) -> list[dict]:
    """Our ViT-S/14 step on one process in fp32: plain modules (now) vs FSDP2 on one rank (before), which copies
    every parameter into fresh unsharded buffers at each gather and every gradient at each reduction."""
    from train_step import step

    plain = _our_step("S", args, device)
    fsdp = _our_step("S", args, device, plain_if_unneeded=False)
    return measure("step-S, one process", {"plain modules (now)": lambda: step(*plain),
                                           "FSDP2 on one rank (before)": lambda: step(*fsdp)},
                   args, device, images=args.batch)


def case_compile(size: str, args, device) -> list[dict]:
    """Our step eager vs with `fsdp.compile=true` (inductor on each block), same weights and batch, interleaved. The
    first call is reported apart: for the compiled step it holds the compilation, cold (inductor's on-disk cache is
    off here, as on a machine's first run). FLOPs are counted on the eager step (the same work for both)."""
    import torch._inductor.config as inductor
    from train_step import step

    eager = _our_step(size, argparse.Namespace(**{**vars(args), "compile": False}), device)
    compiled = _our_step(size, argparse.Namespace(**{**vars(args), "compile": True}), device)
    flops = count_flops(lambda: step(*eager)) if args.flops else None
    no_flops = argparse.Namespace(**{**vars(args), "flops": False})
    with inductor.patch(force_disable_caches=True):
        rows = measure(f"step-{size}, fsdp.compile", {"eager": lambda: step(*eager),
                                                      "compiled (inductor)": lambda: step(*compiled)},
                       no_flops, device, images=args.batch)
    for row in rows:
        row["gflop"] = flops / 1e9 if flops else None
    return rows


def measure(case: str, runners: dict, args, device, images: int) -> list[dict]:
    flops = {name: (count_flops(fn) if args.flops else None) for name, fn in runners.items()}
    timed = interleaved(runners, args.steps, args.warmup, device)
    rows = []
    for name, t in timed.items():
        row = {"case": case, "impl": name, "images_per_s": images / t["seconds"], "ms": 1000 * t["seconds"],
               "first_call_s": t["first_s"], "gflop": flops[name] / 1e9 if flops[name] else None,
               "peak_gib": t["peak_gib"]}
        rows.append(row)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_first"] = row["images_per_s"] / base
    return rows


# ---- distillation, inference, data -----------------------------------------------------------------------
def case_distill(args, device) -> list[dict]:
    import distill_step

    ns = argparse.Namespace(teacher=args.distill_teacher, teacher_depth=0, students=["vit_small"], student_depth=0,
                            image=224, local=98, n_local=8, patch=14, prototypes=65536, dtype=args.dtype)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    teacher = distill_step._teacher(ns, device, dtype)
    student = distill_step._student(ns, "vit_small", device, dtype)
    from train_step import synthetic_batch

    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_batch(student[0].cfg, args.batch).items()}
    return measure(f"distill-{args.distill_teacher}->S", {"dinotrain": lambda: distill_step.step(teacher, [student], batch)},
                   args, device, images=args.batch)


def case_inference(size: str, args, device) -> list[dict]:
    import timm

    from dinotrain.models.vision_transformer import build_vit

    dtype = DTYPES[args.dtype]
    ffn = "swiglufused" if size == "g" else "mlp"
    ours = build_vit(ARCHS[size], patch_size=14, img_size=224, ffn_layer=ffn).to(device, dtype).eval()
    from peer_lightly import TIMM_NAMES

    theirs = timm.create_model(TIMM_NAMES[ARCHS[size]], pretrained=False, img_size=224, num_classes=0).to(device, dtype).eval()
    x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype)

    def run(model):
        def call():
            with torch.inference_mode():
                return model(x)
        return call

    return measure(f"inference-{size}", {"dinotrain": run(ours), "timm": run(theirs)}, args, device, images=args.batch)


def case_data(args, device) -> list[dict]:
    from data_pipeline import compare_pipelines

    return compare_pipelines(batch=args.data_batch, batches=args.data_batches)


def case_masks(args, device) -> list[dict]:
    """iBOT masks of one rank's crops at global batch 1,024 over 32 ranks (ViT-L/14 grid 16x16): the collator
    now draws the whole batch's plan but only its own 64 masks; before, every rank drew all 2,048."""
    import random

    from dinotrain.data.collate import GlobalMaskCollator, mask_counts
    from dinotrain.data.masking import MaskingGenerator

    global_batch, world, grid = 1024, 32, 16
    collator = GlobalMaskCollator(global_batch, grid * grid, grid, (0.1, 0.5), 0.5, seed=0)
    sample = ({"global_crops": [torch.zeros(3, 2, 2)] * 2, "local_crops": []}, 0)
    items = [(p, sample, 0) for p in range(3, global_batch, world)]  # rank 3's 32 images
    generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)

    def whole_batch_masks(rng):  # before: every rank drew the block masks of all 2 x global_batch crops
        counts = mask_counts(2 * global_batch, (0.1, 0.5), 0.5, grid * grid, rng)
        return torch.stack([torch.from_numpy(generator(c, rng=rng)).flatten() for c in counts])

    runners = {
        "per-rank masks (now)": lambda: collator(items),
        "whole-batch masks (before)": lambda: whole_batch_masks(random.Random(0)),
    }
    return measure("masks (1 rank of 32, batch 1024)", runners, argparse.Namespace(**{**vars(args), "flops": False}),
                   torch.device("cpu"), images=global_batch // world)


def case_sinkhorn(args, device) -> list[dict]:
    """Sinkhorn-Knopp on 2,048 x 32,768 logits: in place now vs one new tensor per operation before; the extra
    memory each needs is counted as the bytes of the (B, K) tensors it allocates."""
    from dinotrain.losses.centering import sinkhorn_knopp

    logits = torch.randn(2048, 32768, device=device)

    def out_of_place(t, temp=0.07, n_iterations=3):
        q = torch.exp(t / temp - (t / temp).max()).t()
        b, k = float(t.shape[0]), t.shape[1]
        q = q / q.sum()
        for _ in range(n_iterations):
            q = q / q.sum(dim=1, keepdim=True) / k
            q = q / q.sum(dim=0, keepdim=True) / b
        return (q * b).t()

    rows = measure("sinkhorn 2048x32768", {"in place (now)": lambda: sinkhorn_knopp(logits, 0.07),
                                           "out of place (before)": lambda: out_of_place(logits)},
                   argparse.Namespace(**{**vars(args), "flops": False}), device, images=2048)
    for row, fn in zip(rows, (lambda: sinkhorn_knopp(logits, 0.07), lambda: out_of_place(logits))):
        row["allocated_gib"] = allocated_bytes(fn, logits.numel()) / 2 ** 30
    return rows


def allocated_bytes(fn, min_numel: int) -> int:
    """Total bytes of the new tensors of at least `min_numel` elements that one call of `fn` makes (outputs
    written into an input's storage are not new); none is counted as freed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocated(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            ins = {a.untyped_storage().data_ptr() for a in flat}
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.numel() >= min_numel and o.untyped_storage().data_ptr() not in ins:
                    self.total += o.untyped_storage().nbytes()
            return out

    with Allocated() as counter:
        fn()
    return counter.total


def case_ibot_loss(args, device) -> list[dict]:
    """The iBOT cross-entropy over 65,536 prototypes, forward + backward, for 1,024 masked tokens: the block-wise
    soft_cross_entropy now vs the log-softmax expression before (which keeps an (M, K) log-softmax for the
    backward and sweeps (M, K) blocks through memory ~14 times)."""
    import torch.nn.functional as F

    from dinotrain.losses.cross_entropy import soft_cross_entropy

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1024, 65536, device=device, generator=g)
    targets = torch.softmax(torch.randn(1024, 65536, device=device, generator=g) / 0.05, dim=-1)
    weights = torch.rand(1024, device=device, generator=g)

    def fused():
        x = logits.detach().requires_grad_()
        (soft_cross_entropy(x, targets, 0.1) * weights).sum().backward()

    def textbook():
        x = logits.detach().requires_grad_()
        (-(targets * F.log_softmax(x / 0.1, dim=-1)).sum(dim=-1) * weights).sum().backward()

    rows = measure("iBOT loss 1024x65536 fwd+bwd", {"block-wise (now)": fused, "log-softmax (before)": textbook},
                   argparse.Namespace(**{**vars(args), "flops": False}), device, images=1024)
    for row, fn in zip(rows, (fused, textbook)):
        row["allocated_gib"] = allocated_bytes(fn, logits.numel()) / 2 ** 30
    return rows


def case_head_ce(args, device) -> list[dict]:
    """The step-S head's last layer and its three cross-entropies at batch 8 (64 local + 16 global CLS rows + 60
    masked patches, 65,536 prototypes), forward + backward: one call against target segments (now) vs split logits
    and one call per loss (before)."""
    import torch.nn.functional as F

    from dinotrain.losses.cross_entropy import soft_cross_entropy
    from dinotrain.losses.dino import dino_crossview_losses, dino_crossview_targets

    b, k, n_local, n_masked = 8, 65536, 8, 60
    g = torch.Generator(device=device).manual_seed(0)
    rows = torch.randn(n_local * b + 2 * b + n_masked, 256, device=device, generator=g)
    prototypes = torch.randn(k, 256, device=device, generator=g) * 0.1
    teacher = F.softmax(torch.randn(2 * b, k, device=device, generator=g) / 0.05, dim=-1)
    teacher_patch = F.softmax(torch.randn(n_masked, k, device=device, generator=g) / 0.05, dim=-1)
    n_l, n_g = n_local * b, 2 * b

    def split():
        x = rows.clone().requires_grad_()
        local, glob, patch = torch.split(x @ prototypes.T, [n_l, n_g, n_masked])
        dino_g, dino_l = dino_crossview_losses(glob, local, teacher, 2)
        (dino_g + dino_l + soft_cross_entropy(patch, teacher_patch, 0.1).sum()).backward()

    def segments():
        x = rows.clone().requires_grad_()
        local_t, global_t, denom = dino_crossview_targets(teacher, 2, n_local)
        ce = soft_cross_entropy(x @ prototypes.T, [*local_t, *global_t, teacher_patch], 0.1)
        (ce[:n_l].sum() / (b * denom) + ce[n_l:n_l + n_g].sum() / (b * denom) + ce[n_l + n_g:].sum()).backward()

    return measure("step-S head + cross-entropies fwd+bwd", {"one call, segments (now)": segments,
                                                             "split logits (before)": split},
                   argparse.Namespace(**{**vars(args), "flops": False}), device, images=b)


CASES = {
    **{f"step-{s}": (lambda s: lambda a, d: case_step(s, a, d))(s) for s in ARCHS},
    "fast-paths": case_previous("every_token_and_split_logits", "step-S, last block + head cross-entropies",
                                "rows read, one call (now)", "every token, split logits (before)"),
    "head-ops": case_previous("separate_op_weight_norm_and_logsumexp", "step-S, head ops",
                              "fused weight norm, in-place lse (now)", "separate ops (before)"),
    "alone-plain": case_alone_plain,
    **{f"compile-{s}": (lambda s: lambda a, d: case_compile(s, a, d))(s) for s in ARCHS},
    "ce-grad": case_previous("cross_entropy_gradient_in_a_new_tensor", "step-S, cross-entropy gradient",
                             "into the logits (now)", "new tensor (before)"),
    "distill": case_distill,
    **{f"inference-{s}": (lambda s: lambda a, d: case_inference(s, a, d))(s) for s in ARCHS},
    "data": case_data,
    "masks": case_masks,
    "sinkhorn": case_sinkhorn,
    "ibot-loss": case_ibot_loss,
    "head-ce": case_head_ce,
}


def table(rows: list[dict], mfu_rates: dict[str, float]) -> str:
    """Markdown table; MFU of each row against the matmul rate of its dtype (`mfu_rates`, GFLOP/s by dtype name)."""
    lines = ["| case | implementation | images/s | ms/step | ratio to first | 1st call s | GFLOP/step | MFU | peak GiB | "
             "new (B,K) tensors GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gflop, ms, peak, alloc = r.get("gflop"), r.get("ms"), r.get("peak_gib"), r.get("allocated_gib")
        mfu_rate = mfu_rates.get(r.get("dtype"))
        mfu = f"{100 * gflop / (ms / 1000) / mfu_rate:.1f} %" if gflop and ms and mfu_rate else ""
        first = r.get("first_call_s")
        lines.append(f"| {r['case']} | {r['impl']} | {r['images_per_s']:.2f} | {ms or 0:.0f} | {r['ratio_to_first']:.2f}x | "
                     f"{'' if first is None else f'{first:.1f}'} | "
                     f"{gflop or 0:.1f} | {mfu} | {'' if peak is None else f'{peak:.1f}'} | "
                     f"{'' if alloc is None else f'{alloc:.2f}'} |")
    return "\n".join(lines)


def _version(package: str) -> str | None:
    """The peers' versions for the header; None where a run needed no peer and it is not installed."""
    try:
        return __import__(package).__version__
    except ImportError:
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--cases", nargs="+", default=["step-S", "data", "inference-S"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--precisions", nargs="+", choices=sorted(DTYPES),
                   help="step cases: ours and the peer in each of these dtypes, all timed side by side in one run "
                        "(e.g. fp32 bf16); default: --dtype only")
    p.add_argument("--batch", type=int, default=4, help="images per step (official: 32 per GPU for L, 12 for g)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--centering", default="sinkhorn_knopp", choices=("sinkhorn_knopp", "centering"),
                   help="ours: Sinkhorn-Knopp (DINOv2 default) or softmax centering (the peer's only option)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each block")
    p.add_argument("--no-peer", action="store_true", help="skip the lightly + timm peer of the step cases")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip FLOP counting (and MFU)")
    p.add_argument("--distill-teacher", default="vit_base", help="teacher arch of the distill case")
    p.add_argument("--data-batch", type=int, default=32)
    p.add_argument("--data-batches", type=int, default=4)
    p.add_argument("--json", help="also write the rows and the machine description here")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; --list shows them")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda" and args.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
    from dinotrain.distributed.env import destroy_distributed, init_distributed

    init_distributed()
    rows = []
    try:
        for case in args.cases:
            print(f"== {case}", flush=True)
            rows += [{"dtype": args.dtype, **row} for row in CASES[case](args, device)]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # the practical peak MFU is measured against, per dtype of the rows: at a GPU-sized n on CUDA
        rates = {d: matmul_rate(8192 if device.type == "cuda" else 2048, device=device, dtype=DTYPES[d])
                 for d in dict.fromkeys(row["dtype"] for row in rows)}
    finally:
        destroy_distributed()
    header = {"date": time.strftime("%Y-%m-%d"), "machine": machine(device), "device": str(device),
              "dtype": "+".join(args.precisions or [args.dtype]), "batch": args.batch, "torch": torch.__version__,
              "timm": _version("timm"), "lightly": _version("lightly"), "python": platform.python_version(),
              **{f"matmul_gflops_{d}": round(r, 1) for d, r in rates.items()}}
    print("\n# " + ", ".join(f"{k} {v}" for k, v in header.items()))
    print(table(rows, rates))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
