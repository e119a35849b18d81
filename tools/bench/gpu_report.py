"""The figures of tools/bench/gpu_checks.sh as a BENCHMARKS.md section: measured beside planned.

    python tools/bench/gpu_report.py OUT_DIR      # prints the markdown (gpu_checks.sh appends it to BENCHMARKS.md)

A figure whose check failed or timed out is printed as "-" with the log to read, so a partial run still reports.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path


def _load(out: Path, name: str):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _step(bench: dict | None, impl: str = "dinotrain") -> dict:
    rows = (bench or {}).get("rows", [])
    return next((r for r in rows if r.get("impl") == impl), rows[0] if rows else {})


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def report(out: Path) -> str:
    gpu = (out / "gpu.txt").read_text().strip().replace("\n", "; ") if (out / "gpu.txt").exists() else "?"
    lines = [f"\n## GPU checks (`tools/bench/gpu_checks.sh`, {datetime.date.today().isoformat()})\n", f"Machine: {gpu}.\n",
             "| step | batch/GPU | images/s | MFU | peak GiB (measured) | peak GiB (planned) | planned / measured | "
             "TFLOP/image (planned) |", "|---|---|---|---|---|---|---|---|"]
    for name, label, batch in (("L", "ViT-L/14 recipe (bf16)", 32), ("g", "ViT-g/14, FSDP2 + act. ckpt (bf16)", 12)):
        row, plan = _step(_load(out, f"step-{name}.json")), _load(out, f"plan-{name}.json")
        planned = plan["profile"]["peak"] / 2**30 if plan else None
        measured = row.get("peak_gib")
        ratio = planned / measured if planned and measured else None
        tflop = plan["profile"]["flops"] / plan["profile"]["batch_size"] / 1e12 if plan else None
        lines.append(f"| {label} | {batch} | {_fmt(row.get('images_per_s'))} | {row.get('mfu', '-')} | "
                     f"{_fmt(measured, '.2f')} | {_fmt(planned, '.2f')} | {_fmt(ratio, '.3f')} | {_fmt(tflop, '.3f')} |")
    embed, serve = _load(out, "embed.json"), _load(out, "serve.json")
    lines += ["", f"embed: {json.dumps(embed) if embed else '- (see embed.log)'}",
              f"serve: {json.dumps(serve) if serve else '- (see serve.log)'}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
