"""DINOv2 multi-crop augmentation, and the plain transform used for evaluation.

The recipe follows the official DINOv2 one: two global crops with different blur/solarize
settings (so the two teacher views are asymmetric) plus N small local crops seen only by the
student. Additions: a blur kernel that can shrink for tiny images, where the official fixed 9x9
kernel would be larger than the crop, and the blur probabilities as a parameter.

Blur probabilities: the DINOv2 paper gives 1.0 / 0.1 / 0.5 (global view 1, global view 2, local
views). The official code wraps its blur as ``RandomApply(p=1 - p)`` (dinov2/data/transforms.py,
``GaussianBlur``), and torchvision's RandomApply applies its transforms with probability ``p``,
so the released models saw 0.0 / 0.9 / 0.5: view 1 never blurred, view 2 blurred 90 % of the
time. `PAPER_BLUR_PROBABILITIES` and `OFFICIAL_CODE_BLUR_PROBABILITIES` name both; here a value
is always the probability that blur IS applied. Solarization (p=0.2, global view 2 only) is the
same in the paper and the code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image
from torchvision import transforms

from dinotrain.data.photometric import (Chain, ColourDistortion, RandomGaussianBlur, RandomSolarize, ToNormalizedTensor,
                                        ToPixelTensor)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BLUR_KERNEL = 9
# (global view 1, global view 2, local views): probability that Gaussian blur is applied
PAPER_BLUR_PROBABILITIES = (1.0, 0.1, 0.5)
OFFICIAL_CODE_BLUR_PROBABILITIES = (0.0, 0.9, 0.5)  # what the released DINOv2 models were trained with
OFFICIAL_COLOR_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (applied with p = 0.8)
_BICUBIC = transforms.InterpolationMode.BICUBIC


def _check_scale(name: str, scale) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (min, max) of numbers, got {scale!r}") from None
    if not 0 < low <= high <= 1:
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {scale!r}")
    return low, high


def _check_positive_int(name: str, value, allow_zero: bool = False) -> int:
    lowest = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
    return value


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple, tuple]:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need one value per RGB channel, got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std!r}")
    return mean, std


def _check_blur_probabilities(probabilities) -> tuple[float, float, float]:
    try:
        values = tuple(float(p) for p in probabilities)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(0.0 <= p <= 1.0 for p in values):
        raise ValueError(
            "blur_probabilities must be 3 probabilities in [0, 1] (global view 1, global view 2, local "
            f"views), e.g. {list(PAPER_BLUR_PROBABILITIES)} (paper) or {list(OFFICIAL_CODE_BLUR_PROBABILITIES)} "
            f"(official code); got {probabilities!r}"
        )
    return values  # type: ignore[return-value]


def blur_kernel_for(crop_size: int, kernel_size: Optional[int] = None) -> int:
    """Blur kernel for a crop: `kernel_size` (default 9), clipped to the largest odd size <= crop."""
    kernel = DEFAULT_BLUR_KERNEL if kernel_size is None else kernel_size
    largest_odd = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(kernel, largest_odd))


def random_gaussian_blur(p: float, crop_size: int, kernel_size: Optional[int] = None) -> RandomGaussianBlur:
    """Gaussian blur with sigma drawn from (0.1, 2.0), applied with probability `p`."""
    return RandomGaussianBlur(p, blur_kernel_for(crop_size, kernel_size), sigma=(0.1, 2.0))


def _check_colour(color_jitter, jitter_probability, grayscale_probability) -> tuple[tuple, float, float]:
    try:
        jitter = tuple(float(v) for v in color_jitter)
    except (TypeError, ValueError):
        jitter = ()
    if len(jitter) != 4 or not all(v >= 0 for v in jitter) or jitter[3] > 0.5:
        raise ValueError("color_jitter must be [brightness, contrast, saturation, hue] strengths >= 0 (hue <= 0.5), "
                         f"e.g. {list(OFFICIAL_COLOR_JITTER)} (official); got {color_jitter!r}")
    for name, p in (("color_jitter_probability", jitter_probability), ("grayscale_probability", grayscale_probability)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return jitter, float(jitter_probability), float(grayscale_probability)


class RandomResizedCropFlip:
    """`RandomResizedCrop(size, scale, bicubic)` then `RandomHorizontalFlip(0.5)` on a PIL image: torchvision's
    draws and Pillow's crop / resize / transpose, called directly (bit-identical, without the per-call checks)."""

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_probability: float = 0.5):
        self.size, self.scale, self.ratio, self.flip_probability = size, scale, ratio, flip_probability

    def __call__(self, img):
        top, left, height, width = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        img = img.crop((left, top, left + width, top + height))
        if img.size != (self.size, self.size):  # torchvision leaves a crop of the output size as it is
            img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        if float(torch.rand(1)) < self.flip_probability:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class SquareResize:
    """Bicubic resize of a PIL image to `size` x `size`, nothing when it has that side already (as the official
    dinov3 `v2.Resize` between a global crop and its Gram teacher crop, which is a no-op at the same size)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        return img if img.size == (self.size, self.size) else img.resize((self.size, self.size),
                                                                          Image.Resampling.BICUBIC)


class DataAugmentationDINO:
    """PIL image -> dict of normalised crop tensors for one DINOv2 / DINOv3 training sample.

    Returns ``{"global_crops": [g1, g2], "global_crops_teacher": [g1, g2],
    "local_crops": [l1, ..., lN], "offsets": ()}``; global crops are
    ``(3, global_crops_size, global_crops_size)``, local ones ``(3, local_crops_size, local_crops_size)``.
    Gaussian blur is applied with probabilities ``blur_probabilities`` = (global view 1, global
    view 2, local crops), by default the paper's (1.0, 0.1, 0.5) (see the module docstring for
    the official code's (0.0, 0.9, 0.5)); view 2 alone is solarized, with p=0.2. Every crop gets colour
    jitter (`color_jitter` strengths, with probability `color_jitter_probability`) and then grayscale
    (`grayscale_probability`), by default the official 0.4/0.4/0.2/0.1, 0.8 and 0.2. With
    ``normalize=False`` the crops are uint8 pixels, to be normalised later with `mean` / `std` by
    :func:`dinotrain.data.photometric.normalize_pixels` (the training loader does that on the device).

    DINOv3 (official dinov3/data/augmentations.py): with `gram_teacher_crops_size` the output also holds
    ``"gram_teacher_crops": [t1, t2]``, the very regions of the two global crops at that side, for the Gram
    teacher. As official, each global region is cropped once at the larger of the two sides and resized down;
    with `gram_teacher_no_distortions` the global crop is resized first and distorted at its own side while the
    Gram crop stays undistorted, else both are the distorted large crop, resized. Without it, nothing changes
    (not one random draw). `horizontal_flips=False` never flips a crop (the draw is still made, as torchvision's
    ``RandomHorizontalFlip(p=0)`` does).
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        blur_kernel_size: Optional[int] = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        blur_probabilities: Sequence[float] = PAPER_BLUR_PROBABILITIES,
        color_jitter: Sequence[float] = OFFICIAL_COLOR_JITTER,
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        normalize: bool = True,
        gram_teacher_crops_size: Optional[int] = None,
        gram_teacher_no_distortions: bool = False,
        horizontal_flips: bool = True,
    ):
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.local_crops_number = _check_positive_int("local_crops_number", local_crops_number, allow_zero=True)
        self.global_crops_size = _check_positive_int("global_crops_size", global_crops_size)
        self.local_crops_size = _check_positive_int("local_crops_size", local_crops_size)
        if blur_kernel_size is not None:
            _check_positive_int("blur_kernel_size", blur_kernel_size)
            if blur_kernel_size % 2 == 0:
                raise ValueError(f"blur_kernel_size must be odd (e.g. 9, 5 or 3), got {blur_kernel_size}")
        self.blur_kernel_size = blur_kernel_size
        self.blur_probabilities = _check_blur_probabilities(blur_probabilities)
        p_global_1, p_global_2, p_local = self.blur_probabilities
        mean, std = _check_mean_std(mean, std)

        gram = gram_teacher_crops_size
        self.gram_teacher_crops_size = None if gram is None else _check_positive_int("gram_teacher_crops_size", gram)
        self.gram_teacher_no_distortions = bool(gram_teacher_no_distortions)
        self.horizontal_flips = bool(horizontal_flips)
        flip = 0.5 if self.horizontal_flips else 0.0
        region_side = max(self.global_crops_size, gram or 0)  # one crop per region, resized to each side
        self.geometric_global = RandomResizedCropFlip(region_side, self.global_crops_scale, flip_probability=flip)
        self.geometric_local = RandomResizedCropFlip(self.local_crops_size, self.local_crops_scale,
                                                     flip_probability=flip)
        # The photometric steps draw their randomness exactly as torchvision's transforms do, and run
        # Pillow / OpenCV directly (dinotrain/data/photometric.py says what is bit-identical and what is not).
        colour = ColourDistortion(*_check_colour(color_jitter, color_jitter_probability, grayscale_probability))
        self.mean, self.std, self.normalize = mean, std, bool(normalize)
        to_tensor = ToNormalizedTensor(mean, std) if normalize else ToPixelTensor()
        # Where the global distortions run: the global side, or (Gram crops sharing them) the larger region side.
        g_size = region_side if gram is not None and not self.gram_teacher_no_distortions else self.global_crops_size
        finish = (to_tensor,) if gram is None else ()  # with Gram crops, `_global_view` resizes, then converts
        self.to_tensor = to_tensor
        self.resize_global = SquareResize(self.global_crops_size)
        self.resize_gram = None if gram is None else SquareResize(gram)
        self.global_transform_1 = Chain(colour, random_gaussian_blur(p_global_1, g_size, blur_kernel_size), *finish)
        self.global_transform_2 = Chain(
            colour,
            random_gaussian_blur(p_global_2, g_size, blur_kernel_size),
            RandomSolarize(threshold=128, p=0.2),
            *finish,
        )
        self.local_transform = Chain(
            colour, random_gaussian_blur(p_local, self.local_crops_size, blur_kernel_size), to_tensor
        )

    def _global_view(self, region, distort: Chain):
        """(global crop, Gram teacher crop or None) of one global region, cropped at the larger side."""
        if self.resize_gram is None:
            return distort(region), None
        if self.gram_teacher_no_distortions:
            return self.to_tensor(distort(self.resize_global(region))), self.to_tensor(self.resize_gram(region))
        distorted = distort(region)
        return self.to_tensor(self.resize_global(distorted)), self.to_tensor(self.resize_gram(distorted))

    def __call__(self, image) -> dict:
        global_1, gram_1 = self._global_view(self.geometric_global(image), self.global_transform_1)
        global_2, gram_2 = self._global_view(self.geometric_global(image), self.global_transform_2)
        local = [self.local_transform(self.geometric_local(image)) for _ in range(self.local_crops_number)]
        out = {
            "global_crops": [global_1, global_2],
            "global_crops_teacher": [global_1, global_2],
            "local_crops": local,
            "offsets": (),
        }
        if self.resize_gram is not None:
            out["gram_teacher_crops"] = [gram_1, gram_2]
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.global_crops_size}px scale={self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size}px scale={self.local_crops_scale}, "
            f"blur p={list(self.blur_probabilities)}"
            + ("" if self.gram_teacher_crops_size is None else f", gram={self.gram_teacher_crops_size}px"
               + (" undistorted" if self.gram_teacher_no_distortions else ""))
            + ("" if self.horizontal_flips else ", no flips") + ")"
        )


class MultiResolutionAugmentation:
    """The high-res stage's augmentation: one `DataAugmentationDINO` per (global, local, gram) size tuple.

    `select(i)` picks the sizes of the next images. The loader selects, before each sample, the tuple of the
    global batch that sample belongs to (`dinotrain.data.resolutions.ResolutionPlan`), so a batch has one size
    and which one is a function of the seed and the batch's position (the official code draws it per iteration
    from a generator that restarts at every resume).
    """

    def __init__(self, augmentations: Sequence[DataAugmentationDINO]):
        if not augmentations:
            raise ValueError("MultiResolutionAugmentation needs at least one augmentation")
        self.augmentations = list(augmentations)
        self.selected = 0

    def select(self, index: int) -> None:
        if not 0 <= index < len(self.augmentations):
            raise ValueError(f"resolution index must be in [0, {len(self.augmentations)}), got {index}")
        self.selected = index

    def __call__(self, image) -> dict:
        return self.augmentations[self.selected](image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.augmentations))})"


def make_eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Deterministic transform for feature extraction: bicubic resize, centre crop, normalise."""
    _check_positive_int("resize_size", resize_size)
    _check_positive_int("crop_size", crop_size)
    mean, std = _check_mean_std(mean, std)
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=_BICUBIC),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
