"""The config schema, declared once: every key's type, its choices and the values it accepts.

`configs/default.yaml` gives each key its default value and a one-line comment; this module says what
a value must be, and nothing else lists keys. `dinotrain.config` checks a config against it: unknown
keys, types (the annotations; `Optional` is the only way to allow null), choices (`Literal`), ranges
and other conditions (`key(rule)`), and the few rules that relate two keys (`RELATIONS`). A test keeps
the YAML and these classes to exactly the same keys, in the same order, with the same types.

Plain dataclasses read by our own check rather than `OmegaConf.structured`: OmegaConf converts values
('6' -> 6, 1 -> 1.0), which would accept a quoted number silently and change the saved config, and
its errors span several lines; here a wrong value stops with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

from dinotrain.train.gram_schedule import gram_start  # pure: imports nothing of dinotrain


# --- what a value may be -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Range:
    """A number within bounds (ge/gt below, le/lt above); `text` is how an error states it."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def holds(self, value: Any) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    @property
    def text(self) -> str:
        lo = self.ge if self.gt is None else self.gt
        hi = self.le if self.lt is None else self.lt
        if lo is not None and hi is not None:
            words = f"within {'[' if self.gt is None else '('}{lo:g}, {hi:g}{']' if self.lt is None else ')'}"
        elif lo is not None:
            words = f"{'>=' if self.gt is None else '>'} {lo:g}"
        else:
            words = f"{'<=' if self.lt is None else '<'} {hi:g}"
        return f"{words} ({self.note})" if self.note else words


@dataclass(frozen=True)
class Check:
    """Any other condition on one value, with the words an error uses for it."""

    holds: Callable[[Any], bool]
    text: str


@dataclass(frozen=True)
class Each:
    """Rules on the items of a list: one rule for every item, or one per position."""

    rules: tuple

    def holds(self, value: Any) -> bool:
        rules = self.rules * len(value) if len(self.rules) == 1 else self.rules
        return all(rule.holds(item) for rule, item in zip(rules, value))

    @property
    def text(self) -> str:
        return "a list whose items are " + ", ".join(rule.text for rule in self.rules)


VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2", "vit_so400m", "vit_huge2", "vit_7b")
STUDENT_ARCH_WORDS = (f"one of {', '.join(VIT_ARCHS)}, or timm/<name> or torchvision/<name> (a distillation "
                      "student of another architecture)")
STUDENT_ARCH = Check(lambda v: v in VIT_ARCHS or v.split("/", 1)[0] in ("timm", "torchvision") and "/" in v,
                     STUDENT_ARCH_WORDS)
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, le=1)
ORDERED_FRACTIONS = Check(lambda v: 0 <= v[0] <= v[1] <= 1, "[min, max] with 0 <= min <= max <= 1")
CROP_SIZES = Check(lambda v: all(s > 0 for s in v) and len(v) > 0 if isinstance(v, list) else v > 0,
                   "a positive int or a non-empty list of positive ints (one per resolution of the high-res stage)")


def key(rule: Range | Check | Each | None = None, *, must: str = "", if_null: str = "") -> Any:
    """A config key whose type is its annotation.

    rule: what a value of the right type must also satisfy. must: the words every error about this key
    uses for what it accepts (type or value), where the type and rule alone would say it badly.
    if_null: what to tell someone who left this required key null (default: give it a value).
    """
    return field(metadata={"rule": rule, "must": must, "if_null": if_null})


# --- the sections, in the order and with the names of configs/default.yaml -----------------------------------

@dataclass
class Dino:
    loss_weight: float = key(NON_NEGATIVE)
    head_n_prototypes: int = key(POSITIVE)
    head_bottleneck_dim: int = key()
    head_nlayers: int = key()
    head_hidden_dim: int = key()
    norm_last_layer: bool = key()
    koleo_loss_weight: float = key(NON_NEGATIVE)
    koleo_global: bool = key()


@dataclass
class Ibot:
    loss_weight: float = key(NON_NEGATIVE)
    mask_sample_probability: float = key(PROBABILITY)
    mask_ratio_min_max: tuple[float, float] = key(ORDERED_FRACTIONS)
    separate_head: bool = key()
    head_n_prototypes: int = key(POSITIVE)
    head_bottleneck_dim: int = key()
    head_nlayers: int = key()
    head_hidden_dim: int = key()
    norm_last_layer: bool = key()


@dataclass
class GramLossWeightSchedule:
    start: Optional[float] = key()
    peak: Optional[float] = key()
    end: Optional[float] = key()
    warmup_epochs: int = key(NON_NEGATIVE)
    cosine_epochs: Optional[int] = key(NON_NEGATIVE)


@dataclass
class Gram:
    use_loss: bool = key()
    compute_stats: bool = key()
    loss_weight: float = key(NON_NEGATIVE)
    ema_teacher: bool = key()
    ckpt: Optional[str] = key()
    it_load_ema_teacher: int = key(Range(ge=-1, note="-1: never"))
    rep_update: bool = key()
    update_frequency: int = key(POSITIVE)
    it_first_update: int = key(NON_NEGATIVE)
    max_updates: Optional[int] = key(NON_NEGATIVE)
    normalized: bool = key()
    img_level: bool = key()
    remove_neg: bool = key()
    remove_only_teacher_neg: bool = key()
    tokens_used: Literal["all", "masked", "unmasked"] = key()
    global_teacher_resize_method: Literal["bicubic", "bilinear"] = key()
    global_teacher_resize_antialias: bool = key()
    loss_weight_schedule: GramLossWeightSchedule


@dataclass
class Train:
    batch_size_per_gpu: int = key(POSITIVE)
    dataset_path: str = key(if_null="set it to your ImageFolder directory (or `tiny` / `tiny-shapes` for a built-in "
                                    "dataset): the full-scale recipes ship no dataset on purpose")
    output_dir: str = key(if_null="give --output-dir")
    saveckp_freq: int = key(NON_NEGATIVE)
    seed: int = key()
    num_workers: int = key(NON_NEGATIVE)
    OFFICIAL_EPOCH_LENGTH: int = key(POSITIVE)
    cache_dataset: bool = key()
    centering: Literal["centering", "sinkhorn_knopp"] = key()
    max_iterations: Optional[int] = key(POSITIVE)
    grad_accum_steps: int = key(POSITIVE)
    log_every: int = key(POSITIVE)
    nan_tolerance: int = key(NON_NEGATIVE)
    head_warmup_iterations: int = key(NON_NEGATIVE)


@dataclass
class Student:
    arch: str = key(STUDENT_ARCH, must=STUDENT_ARCH_WORDS)
    depth: Optional[int] = key(POSITIVE, must="null (the arch's own depth) or a positive int (number of "
                                              "transformer blocks)")
    patch_size: int = key(POSITIVE)
    drop_path_rate: float = key(Range(ge=0, lt=1))
    layerscale: float = key(Range(ge=0, note="0 disables LayerScale"))
    drop_path_uniform: bool = key()
    resume_from_teacher_chkpt: str = key(if_null="a high-res stage without a first-stage run: set it to the run "
                                                  "directory, checkpoint or full export of the stage it continues "
                                                  "('' for a first stage)")
    pretrained_weights: str = key()
    pretrained_strict: bool = key()
    ffn_layer: Literal["mlp", "swiglufused", "swiglu", "swiglu32", "swiglu64", "swiglu128"] = key()
    block_chunks: int = key()
    qkv_bias: bool = key()
    proj_bias: bool = key()
    ffn_bias: bool = key()
    num_register_tokens: int = key(NON_NEGATIVE)
    interpolate_antialias: bool = key()
    interpolate_offset: float = key()
    attn_impl: Literal["sdpa", "xformers"] = key()
    pos_embed_type: Literal["learned", "rope"] = key()
    ffn_ratio: Optional[float] = key(POSITIVE)
    norm_layer: Literal["layernorm", "layernormbf16"] = key()
    n_storage_tokens: int = key(NON_NEGATIVE)
    mask_k_bias: bool = key()
    untie_cls_and_patch_norms: bool = key()
    untie_global_and_local_cls_norm: bool = key()
    pos_embed_rope_base: Optional[float] = key(POSITIVE)
    pos_embed_rope_min_period: Optional[float] = key(POSITIVE)
    pos_embed_rope_max_period: Optional[float] = key(POSITIVE)
    pos_embed_rope_normalize_coords: Literal["separate", "min", "max"] = key()
    pos_embed_rope_shift_coords: Optional[float] = key(NON_NEGATIVE)
    pos_embed_rope_jitter_coords: Optional[float] = key(Range(ge=1))
    pos_embed_rope_rescale_coords: Optional[float] = key(Range(ge=1))
    pos_embed_rope_dtype: Literal["fp32", "bf16", "fp16"] = key()


@dataclass
class Teacher:
    momentum_teacher: float = key(PROBABILITY)
    final_momentum_teacher: float = key(PROBABILITY)
    warmup_teacher_temp: float = key(POSITIVE)
    teacher_temp: float = key(POSITIVE)
    warmup_teacher_temp_epochs: int = key(NON_NEGATIVE)


@dataclass
class Optim:
    epochs: int = key(POSITIVE)
    weight_decay: float = key(NON_NEGATIVE)
    weight_decay_end: float = key(NON_NEGATIVE)
    base_lr: float = key(POSITIVE)
    lr: float = key()
    warmup_epochs: int = key(NON_NEGATIVE)
    min_lr: float = key(NON_NEGATIVE)
    clip_grad: float = key(NON_NEGATIVE)
    freeze_last_layer_epochs: int = key(NON_NEGATIVE)
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_1024", "none"] = key()
    patch_embed_lr_mult: float = key(NON_NEGATIVE)
    layerwise_decay: float = key(PROBABILITY)
    adamw_beta1: float = key()
    adamw_beta2: float = key()


@dataclass
class Crops:
    global_crops_scale: tuple[float, float] = key(ORDERED_FRACTIONS)
    local_crops_number: int = key(NON_NEGATIVE)
    local_crops_scale: tuple[float, float] = key(ORDERED_FRACTIONS)
    global_crops_size: Union[int, list[int]] = key(CROP_SIZES)
    local_crops_size: Union[int, list[int]] = key(CROP_SIZES)
    global_local_crop_pairs_ratios: Union[float, list[float]] = key(
        Check(lambda v: all(r >= 0 for r in (v if isinstance(v, list) else [v])), "non-negative"),
        must="a number or a list of numbers >= 0 (one per crops.global_crops_size entry, summing to 1)")
    gram_teacher_crops_size: Optional[Union[int, list[int]]] = key(CROP_SIZES)
    gram_teacher_no_distortions: bool = key()
    horizontal_flips: bool = key()
    blur_kernel_size: int = key(Check(lambda k: k >= 1 and k % 2 == 1, "a positive odd number"))
    blur_probabilities: tuple[float, float, float] = key(
        Each((PROBABILITY,)), must="3 probabilities within [0, 1] (global view 1, global view 2, local views), "
                                   "e.g. [1.0, 0.1, 0.5] (paper) or [0.0, 0.9, 0.5] (official code)")
    color_jitter: tuple[float, float, float, float] = key(
        Each((NON_NEGATIVE, NON_NEGATIVE, NON_NEGATIVE, Range(ge=0, le=0.5))),
        must="[brightness, contrast, saturation, hue] strengths >= 0 with hue <= 0.5, e.g. [0.4, 0.4, 0.2, 0.1] "
             "(official)")
    color_jitter_probability: float = key(PROBABILITY)
    grayscale_probability: float = key(PROBABILITY)


@dataclass
class ComputePrecision:
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = key()
    grad_scaler: bool = key()
    tf32: bool = key()


@dataclass
class Fsdp:
    activation_checkpointing: bool = key()
    compile: bool = key()
    reshard_after_forward: bool = key()


@dataclass
class Checkpoint:
    period_iterations: Optional[int] = key(POSITIVE)
    keep_last: int = key(POSITIVE)
    stop_grace_s: Optional[float] = key(POSITIVE)


@dataclass
class Launch:
    max_requeues: int = key(NON_NEGATIVE)


@dataclass
class Evaluation:
    eval_period_iterations: int = key()


@dataclass
class StudentEntry:
    """One `distillation.students` entry: the sections a student may set over the top-level ones."""

    student: Student
    optim: Optim
    dino: Dino
    ibot: Ibot


@dataclass
class Distillation:
    teacher: str = key(if_null="set it to the teacher: a dinotrain run directory, a full export (.safetensors with "
                               "heads) or backbone weights (with train.head_warmup_iterations > 0), e.g. "
                               "distillation.teacher=runs/g14")
    # name -> entry; the only mapping of names in the schema (its keys are student names, not config keys)
    students: dict[str, Optional[StudentEntry]] = key()


@dataclass
class Config:
    dino: Dino
    ibot: Ibot
    gram: Gram
    train: Train
    student: Student
    teacher: Teacher
    optim: Optim
    crops: Crops
    compute_precision: ComputePrecision
    fsdp: Fsdp
    checkpoint: Checkpoint
    launch: Launch
    evaluation: Evaluation
    distillation: Distillation


def _no_checkpoint_period(cfg: dict) -> str | None:
    if cfg["train"]["saveckp_freq"] == 0 and cfg["checkpoint"]["period_iterations"] is None:
        return ("config key 'train.saveckp_freq' is 0 and checkpoint.period_iterations is null: the run would never "
                "save a checkpoint; set one of them")
    return None


def _crops_not_in_patches(cfg: dict) -> str | None:
    patch = cfg["student"]["patch_size"]
    # A DINOv3 (RoPE) backbone takes local crops of any side, its patch embedding dropping the rest, as official:
    # the high-res stage's 168-px local crops with patch 16 (dinov3_vit7b16_high_res_adapt.yaml).
    rope = cfg["student"].get("pos_embed_type") == "rope"
    for name in ("global_crops_size", "gram_teacher_crops_size") + (() if rope else ("local_crops_size",)):
        size = cfg["crops"][name]
        for one in size if isinstance(size, list) else [] if size is None else [size]:
            if one % patch:
                return f"config key 'crops.{name}' = {size} must be a multiple of student.patch_size = {patch}"
    return None


_DINOV3_ONLY_ARCHS = ("vit_so400m", "vit_huge2", "vit_7b")
_DINOV3_FFN = ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128")


def _backbone_family(cfg: dict) -> str | None:
    """Keys that belong to one backbone family only (`student.pos_embed_type`: learned = DINOv2, rope = DINOv3)."""
    s = cfg["student"]
    if s["pos_embed_type"] == "learned":
        if s["arch"] in _DINOV3_ONLY_ARCHS:
            return f"config key 'student.arch' = {s['arch']} is a DINOv3 size: set student.pos_embed_type=rope"
        if s["ffn_layer"] not in ("mlp", "swiglufused", "swiglu"):
            return (f"config key 'student.ffn_layer' = {s['ffn_layer']} is a DINOv3 FFN: set "
                    "student.pos_embed_type=rope (DINOv2: mlp or swiglufused)")
        if s["n_storage_tokens"]:
            return ("config key 'student.n_storage_tokens' is a DINOv3 key (student.pos_embed_type=rope); DINOv2 "
                    "backbones have student.num_register_tokens")
        return None
    if s["num_register_tokens"]:
        return ("config key 'student.num_register_tokens' is for DINOv2 backbones; with student.pos_embed_type=rope "
                "set student.n_storage_tokens")
    if s["ffn_layer"] not in _DINOV3_FFN:
        return (f"config key 'student.ffn_layer' = {s['ffn_layer']} is not a DINOv3 FFN: choose one of "
                f"{', '.join(_DINOV3_FFN)}")
    if s["attn_impl"] != "sdpa":
        return "config key 'student.attn_impl' = xformers: DINOv3 (student.pos_embed_type=rope) backbones use sdpa"
    if not s["drop_path_uniform"]:
        return ("config key 'student.drop_path_uniform' is false: DINOv3 (student.pos_embed_type=rope) uses the same "
                "drop path rate in every block (official); set it true")
    periods = (s["pos_embed_rope_min_period"], s["pos_embed_rope_max_period"])
    if s["pos_embed_rope_base"] is None and None in periods:
        return ("config key 'student.pos_embed_rope_base' is null: set both student.pos_embed_rope_min_period and "
                "pos_embed_rope_max_period (or a base)")
    if s["pos_embed_rope_base"] is not None and periods != (None, None):
        return ("config key 'student.pos_embed_rope_min_period' / max_period is set with pos_embed_rope_base: the "
                "periods come from one or the other; set pos_embed_rope_base=null to use min/max")
    return None


def run_iterations(cfg: Any) -> int:
    """The run's number of iterations: train.max_iterations, if set, caps optim.epochs * OFFICIAL_EPOCH_LENGTH
    (a mapping of sections: the plain values or the DictConfig)."""
    full = cfg["optim"]["epochs"] * cfg["train"]["OFFICIAL_EPOCH_LENGTH"]
    cap = cfg["train"]["max_iterations"]
    return min(full, cap) if cap else full


def _gram_options(cfg: dict) -> str | None:
    """The official Gram assertions (ssl_meta_arch.py), checked only with the Gram loss on as there."""
    gram = cfg["gram"]
    if not gram["use_loss"]:
        return None
    if gram["remove_neg"] and gram["remove_only_teacher_neg"]:
        return ("config key 'gram.remove_only_teacher_neg' is true with gram.remove_neg true: choose one "
                "(remove_neg removes the student's negative similarities too)")
    if gram["ema_teacher"] and gram["ckpt"]:
        return (f"config key 'gram.ckpt' = {gram['ckpt']!r} is set with gram.ema_teacher true: the EMA teacher is then "
                "the Gram teacher; set one of them")
    if gram["ema_teacher"] and gram["rep_update"]:
        return ("config key 'gram.rep_update' is true with gram.ema_teacher true: there is no separate Gram teacher "
                "to refresh; set gram.rep_update=false")
    if not gram["ema_teacher"] and not gram["ckpt"] and gram["it_load_ema_teacher"] < 0:
        return ("config key 'gram.use_loss' is true but the Gram teacher never gets weights: set "
                "gram.it_load_ema_teacher (the iteration the EMA teacher is copied into it), gram.ckpt or "
                "gram.ema_teacher=true")
    if gram["tokens_used"] != "all" and gram["img_level"]:
        return (f"config key 'gram.tokens_used' = {gram['tokens_used']!r} needs gram.img_level false (the selected "
                "patches are compared over the batch, as official)")
    return None


def _gram_starts_after_the_run(cfg: dict) -> str | None:
    start, last = gram_start(cfg), run_iterations(cfg) - 1
    if start is not None and start > last:
        return (f"config key 'gram.it_load_ema_teacher' = {start} is after the run's last iteration {last}: the Gram "
                "loss would never count; lower it or lengthen the run (optim.epochs, train.max_iterations)")
    return None


def _gram_weight_schedule(cfg: dict) -> str | None:
    sched = cfg["gram"]["loss_weight_schedule"]
    given = [name for name in ("start", "peak", "end") if sched[name] is not None]
    if given and len(given) < 3:
        return (f"config key 'gram.loss_weight_schedule' sets {', '.join(given)} but not all of start, peak and end: "
                "set all three (or none, for the constant gram.loss_weight)")
    length = sched["warmup_epochs"] + (sched["cosine_epochs"] or 0)
    if given and length > cfg["optim"]["epochs"]:
        return (f"config key 'gram.loss_weight_schedule' lasts {length} epochs (warmup_epochs + cosine_epochs), more "
                f"than optim.epochs = {cfg['optim']['epochs']}")
    return None


CROP_SIZE_LISTS = ("global_crops_size", "local_crops_size", "gram_teacher_crops_size",
                   "global_local_crop_pairs_ratios")


def _crop_size_lists(cfg: dict) -> str | None:
    """The high-res stage's resolutions (official `build_multi_resolution_data_loader_from_cfg`): one entry per
    (global, local, gram) size and its ratio; a single value stands for every entry."""
    crops = cfg["crops"]
    lengths = {name: len(crops[name]) for name in CROP_SIZE_LISTS if isinstance(crops[name], list)}
    if len(set(lengths.values())) > 1:
        said = ", ".join(f"crops.{name} has {n}" for name, n in lengths.items())
        return (f"config key 'crops.global_crops_size' and its companions list different numbers of resolutions "
                f"({said}): give each list one entry per (global, local, gram) size tuple, or a single value")
    ratios = crops["global_local_crop_pairs_ratios"]
    if not isinstance(ratios, list) and max(lengths.values(), default=1) > 1:
        return (f"config key 'crops.global_local_crop_pairs_ratios' = {ratios} must list one ratio per resolution "
                f"({max(lengths.values())} in crops.global_crops_size and its companions), summing to 1")
    if isinstance(ratios, list) and abs(sum(ratios) - 1.0) > 1e-6:
        return (f"config key 'crops.global_local_crop_pairs_ratios' = {crops['global_local_crop_pairs_ratios']} "
                f"must sum to 1 (the share of batches at each resolution); they sum to {sum(ratios):g}")
    return None


def _first_stage_missing(cfg: dict) -> str | None:
    """A continuation stage (the high-res adaptation, official `student.resume_from_teacher_chkpt`) needs the run
    of the stage before it; looked at by names and headers only, as the weights resolver does."""
    path = cfg["student"]["resume_from_teacher_chkpt"]
    if not path:
        return None
    where = f"config key 'student.resume_from_teacher_chkpt' = {path!r}"
    if cfg["student"]["pretrained_weights"]:
        return (f"{where} and student.pretrained_weights are both set: a continuation stage starts from its first-stage "
                "run alone; clear one of them")
    from dinotrain.weights.resolve import resolve  # only here: it imports torch, which loading a config need not

    try:
        resolve(path, heads=True)
    except (FileNotFoundError, ValueError) as exc:
        return (f"{where}: a high-res stage without a first-stage run ({str(exc).splitlines()[0]}); set it to the run "
                "directory, checkpoint or full export of the stage it continues")
    return None


# Rules over several keys, checked after every key passed on its own; each gives its error or None.
RELATIONS: tuple[Callable[[dict], str | None], ...] = (
    _no_checkpoint_period, _crops_not_in_patches, _backbone_family, _gram_options, _gram_starts_after_the_run,
    _gram_weight_schedule, _crop_size_lists, _first_stage_missing)


# --- reading the declaration ------------------------------------------------------------------------------------

def is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


@functools.cache
def section_fields(section: type) -> dict[str, Any]:
    """Key name -> annotation (resolved) of a section, in declaration order."""
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def is_entries(tp: Any) -> bool:
    """The annotation of a mapping of names to entries (`distillation.students`)."""
    return typing.get_origin(tp) is dict


def entry_section(tp: Any) -> type:
    """The dataclass of an entry of a mapping of names, e.g. `StudentEntry`."""
    (inner,) = [a for a in typing.get_args(typing.get_args(tp)[1]) if a is not type(None)]
    return inner


@dataclass(frozen=True)
class Leaf:
    """One key that holds a value: its dotted name, type and what it accepts."""

    key: str
    type: Any
    rule: Any
    must: str
    if_null: str

    @property
    def optional(self) -> bool:
        return typing.get_origin(self.type) is Union and type(None) in typing.get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without `Optional`."""
        if not self.optional:
            return self.type
        inner = tuple(a for a in typing.get_args(self.type) if a is not type(None))
        return inner[0] if len(inner) == 1 else Union[inner]


@functools.cache
def leaves(section: type = Config, prefix: str = "") -> tuple[Leaf, ...]:
    """Every value-holding key under `section` (mappings of names are not leaves: their entries are configs)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(section)}
    out: tuple[Leaf, ...] = ()
    for name, tp in section_fields(section).items():
        if is_section(tp):
            out += leaves(tp, f"{prefix}{name}.")
        elif not is_entries(tp):
            m = meta[name]
            out += (Leaf(f"{prefix}{name}", tp, m.get("rule"), m.get("must", ""), m.get("if_null", "")),)
    return out


# --- checking one value -----------------------------------------------------------------------------------------

def _is_type(tp: Any, value: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is fine where a float is expected
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        return isinstance(value, list) and len(value) == len(items) and all(map(_is_type, items, value))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is_type(item, v) for v in value)
    if typing.get_origin(tp) is Union:
        return any(_is_type(option, value) for option in typing.get_args(tp))
    raise TypeError(f"config schema: no check for the type {tp!r}")  # a schema bug, not a user error


def _type_words(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_type_words(option) for option in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}s"
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        return f"a list of {len(items)} {items[0].__name__}s"
    return tp.__name__


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def problem(leaf: Leaf, value: Any, default: Any) -> str | None:
    """The one-line error for `value` at `leaf` (None if it is fine); `default` is the YAML's, for the hint."""
    where = f"config key '{leaf.key}'"
    if value is None:
        if leaf.optional:
            return None
        return f"{where} is required but is null: {leaf.if_null or f'give it a value (default: {default!r})'}"
    base = leaf.base
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        return None if value in choices else f"{where} must be one of {', '.join(choices)}; got {value!r}"
    if not _is_type(base, value):
        if leaf.must:
            return f"{where} must be {leaf.must}; got {value!r} ({_type_name(value)})"
        return f"{where} expects {_type_words(base)}{' or null' if leaf.optional else ''}, got {value!r} " \
               f"({_type_name(value)})"
    if leaf.rule is not None and not leaf.rule.holds(value):
        return f"{where} must be {leaf.must or leaf.rule.text + (' or null' if leaf.optional else '')}; got {value!r}"
    return None
