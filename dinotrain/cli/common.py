"""Arguments several commands share: a run's (config, run directory, resume, overrides), a backbone's, and how
its features are computed (runtime and precision, `dinotrain/inference.py`)."""

from __future__ import annotations

import argparse


def add_run_arguments(parser: argparse.ArgumentParser, config_help: str, output_help: str) -> None:
    """What `train`, `distill` and `submit train|distill` share: config, run directory, resume, overrides."""
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--output-dir", help=output_help)
    parser.add_argument("--no-resume", action="store_true",
                        help="start over: existing checkpoints and metrics of the run directory are moved aside")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even though train.dataset_path or train.centering differ from the checkpoint's")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.base_lr=1e-3")


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """--weights / --model / --device of every command that runs a backbone."""
    parser.add_argument("--weights", help="backbone weights (DINOv2, DINO v1 or DINOv3): hub .pth, .safetensors, "
                                          "Hugging Face directory, timm dinov3 weights, full export, or a run / "
                                          "checkpoint directory (finished or not)")
    parser.add_argument("--model", help="a named backbone at random init when no --weights, e.g. dinov2_vits14 or "
                                        "dinov3_vits16 (with --weights: the weights must fit it)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the backbone runs (default: the GPU when torch sees one, else the CPU)")


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """--precision / --runtime of the commands that compute features (embed, eval, serve): `dinotrain.inference`."""
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default="auto",
                        help="auto (default): bf16 autocast on a CPU with AMX (native bf16 matmul), fp32 otherwise "
                             "(measured: without native bf16, bf16 is ~6x slower); fp32; bf16 (autocast; needs "
                             "amx_bf16 / avx512_bf16 or a bf16 GPU); int8 (onnxruntime dynamic quantization of the "
                             "MLPs, CPU; measured worst CLS cosine 0.9989, below the 0.999 auto allows)")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="auto (default): onnx for an .onnx --weights file or --precision int8, torch otherwise; "
                             "onnx: onnxruntime on the CPU (other weights are exported to ONNX in memory first)")


def inference_options(args: argparse.Namespace) -> dict:
    """{precision, runtime} of parsed arguments (auto where a caller's namespace lacks them)."""
    return {"precision": getattr(args, "precision", "auto"), "runtime": getattr(args, "runtime", "auto")}
