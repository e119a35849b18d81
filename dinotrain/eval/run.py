"""`dinotrain eval knn|linear`: the data set-up both share, then one protocol, its report and JSON summary."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch


log = logging.getLogger("dinotrain.eval")


@dataclass
class EvalData:
    """Where the labelled images are, their shared classes, the view (resize, crop) and the device."""

    train_root: str
    val_root: str
    classes: list[str]
    resize: int
    crop: int
    device: torch.device


def eval_data(train: str | None, val: str | None, tiny: str | bool | None, image_size: int | None,
              device: str = "auto", threads: int | None = None) -> EvalData:
    """The train / val folders (or a built-in tiny dataset's split), checked before any work."""
    from dinotrain.eval.features import eval_sizes, pick_eval_device, shared_label_space

    resize, crop = eval_sizes(image_size, tiny=bool(tiny))
    where = pick_eval_device(device)
    train_root, val_root = train, val
    if tiny:
        from dinotrain.data.tiny import ensure_tiny_dataset

        root = ensure_tiny_dataset(kind=tiny if isinstance(tiny, str) else "digits")
        train_root, val_root = str(root / "train"), str(root / "val")
    if not train_root or not val_root:
        raise ValueError("give --train DIR and --val DIR (labelled ImageFolders), or --tiny for the built-in dataset")
    if threads:
        torch.set_num_threads(threads)
    classes = shared_label_space(train_root, val_root)  # val classes matched to train's by name
    return EvalData(train_root, val_root, classes, resize, crop, where)


def write_json(path: str | None, data) -> None:
    """The summary as JSON at `path` (if given), its folder created."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        print(f"written to {out}")


def run_knn(data: EvalData, weights: str | None, model: str | None, *, ks, temperature: float, batch_size: int,
            baseline_random: bool = False, baseline_pixels: bool = False, seed: int = 0,
            output: str | None = None, precision: str = "auto", runtime: str = "auto") -> dict:
    """Weighted k-NN of the backbone (and the asked-for baselines); prints one line per candidate. The backbone's
    features are computed as `precision` / `runtime` say (`dinotrain.inference`; the baselines in fp32 torch)."""
    from dinotrain.eval.knn import knn_line, knn_of_models
    from dinotrain.inference import open_features
    from dinotrain.models.presets import backbone_from_spec

    backbone = open_features(weights, model, data.device, precision, runtime)
    candidates = {"model": backbone}
    if baseline_random:
        torch.manual_seed(seed)
        candidates["random_init"] = backbone_from_spec(backbone.spec)
    if baseline_pixels:
        from dinotrain.eval.pixels import PixelFeatures

        candidates["raw_pixels"] = PixelFeatures()
        candidates["raw_pixels_centered"] = PixelFeatures(centered=True)
    log.info("k-NN on %s: resize %d bicubic, centre crop %d", data.device, data.resize, data.crop)
    results = knn_of_models(candidates, data.train_root, data.val_root, data.crop, data.resize, data.classes,
                            data.device, batch_size, ks=ks, temperature=temperature)
    for name, accs in results.items():
        print(knn_line(name, accs))
    write_json(output, {n: {str(k): v for k, v in a.items()} for n, a in results.items()})
    return results


AVGPOOL = {"both": (False, True), "yes": (True,), "no": (False,)}  # --avgpool -> the variants swept
OFFICIAL_N_LAST_BLOCKS, OFFICIAL_AVGPOOL = (1, 4), "both"


def linear_heads(spec, n_last_blocks, avgpool: str | None, weights: str | None) -> list:
    """The head variants swept: the official ones (or those asked for) on a ViT; the pooled features of a timm /
    torchvision backbone, which has no class token per block and whose pooled features already average its last
    map: asking for more is one line (a sweep silently without them would report heads nobody asked for)."""
    from dinotrain.eval.linear import POOLED, head_configs
    from dinotrain.models.any_student import AnySpec

    if isinstance(spec, AnySpec):
        if (n_last_blocks and set(n_last_blocks) != {1}) or avgpool not in (None, "no"):
            raise ValueError(f"--weights {weights}: a {spec.arch} backbone has no class tokens per block nor patch "
                             "tokens to average: its linear head reads its pooled features (head `pooled`); drop "
                             "--n-last-blocks / --avgpool")
        return [POOLED]
    n_last_blocks = n_last_blocks or OFFICIAL_N_LAST_BLOCKS
    return head_configs(n_last_blocks, AVGPOOL[avgpool or OFFICIAL_AVGPOOL], spec.depth)


def run_linear(data: EvalData, weights: str | None, model: str | None, *, n_last_blocks=None,
               avgpool: str | None = None,
               lrs=None, iterations: int, train_batch_size: int, batch_size: int, seed: int = 0,
               output: str | None = None, export_hf: str | None = None, precision: str = "auto",
               runtime: str = "auto") -> dict:
    """The official linear evaluation on cached features; optionally the best head as a transformers classifier
    (the caller refuses an existing `export_hf` first, `outputs.refuse_existing`, before the data set-up).
    `n_last_blocks` / `avgpool`: None for the official variants (`linear_heads`)."""
    from dinotrain.eval.linear import (OFFICIAL_LRS, best_head, export_best_classifier, extract_linear_features,
                                       linear_eval)
    from dinotrain.inference import TorchFeatures, choose
    from dinotrain.models.any_student import AnySpec
    from dinotrain.weights.backbone import open_backbone

    choice = choose(precision, runtime, data.device, weights)
    if choice.runtime != "torch":
        raise ValueError("eval linear reads the last blocks' class tokens, which the ONNX graph does not output: "
                         "use --runtime torch (and torch weights)")
    log.info("features: torch %s on %s (%s)", choice.precision, data.device, choice.why)
    backbone = open_backbone(weights, model).to(data.device)
    configs = linear_heads(backbone.spec, n_last_blocks, avgpool, weights)
    pooled = isinstance(backbone.spec, AnySpec)
    if pooled:
        log.info("%s backbone: one head variant, `pooled` (its pooled features, what its own classifier reads)",
                 backbone.spec.arch)
    features = TorchFeatures(backbone, choice.precision)
    classes = data.classes
    n_blocks = max(c.n_blocks for c in configs)
    log.info("linear evaluation on %s: resize %d bicubic, centre crop %d", data.device, data.resize, data.crop)
    train = extract_linear_features(features, data.train_root, data.crop, data.resize, n_blocks, batch_size,
                                    classes=classes, pooled=pooled)
    val = extract_linear_features(features, data.val_root, data.crop, data.resize, n_blocks, batch_size,
                                  classes=classes, pooled=pooled)
    lrs = tuple(lrs) if lrs else OFFICIAL_LRS
    results, heads = linear_eval(train, val, len(classes), configs, lrs=lrs, iterations=iterations,
                                 batch_size=train_batch_size, seed=seed, device=data.device)
    config, lr_index, acc = best_head(heads, val)
    for name, accs in results.items():
        lr, top = max(accs.items(), key=lambda kv: kv[1])
        print(f"linear top-1 ({name}): {top:.2f}% at lr {lr}")
    print(f"linear top-1 (best): {acc:.2f}% ({config.name}, lr {lrs[lr_index]:g}; {len(train.labels)} train / "
          f"{len(val.labels)} val images, {len(classes)} classes, {iterations} iterations)")
    summary = {"best": {"head": config.name, "lr": lrs[lr_index], "accuracy": acc}, "results": results,
               "classes": list(classes), "n_train": len(train.labels), "n_val": len(val.labels),
               "iterations": iterations, "batch_size": train_batch_size, "image_size": data.crop,
               "resize": data.resize}
    if export_hf:
        from dinotrain.eval.linear_classifier import export_linear_classifier
        from dinotrain.models.dinov3 import Dinov3Spec

        # transformers has no DINOv3 classifier class and none holds a timm / torchvision model: our format then
        # (eval/linear_classifier.py)
        ours = isinstance(backbone.spec, (Dinov3Spec, AnySpec))
        export = export_linear_classifier if ours else export_best_classifier
        out, trained, index, hf_acc = export(backbone, heads, val, classes, export_hf, data.resize, data.crop)
        lr = trained.lrs[index]
        summary["hf_classifier"] = {"path": str(out), "head": trained.config.name, "lr": lr, "accuracy": hf_acc,
                                    "format": "dinotrain" if ours else "transformers"}
        why = (f"no transformers classifier holds a {backbone.spec.arch}" if pooled else
               "transformers has no DINOv3 classifier class")
        how = (f"dinotrain.eval.linear_classifier.read_linear_classifier + backbone.safetensors; {why}" if ours
               else "transformers.AutoModelForImageClassification.from_pretrained")
        print(f"classifier ({trained.config.name}, lr {lr:g}, {hf_acc:.2f}%) -> {out} ({how})")
    write_json(output, summary)
    return summary

