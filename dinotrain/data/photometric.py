"""The photometric half of the DINOv2 crops, fast enough that data workers keep ahead of the GPU.

The official pipeline spends most of a worker's time in two places: torchvision's Gaussian blur on a
PIL image (a dense 9x9 float convolution over a tensor copy) and the hue jitter (PIL's RGB -> HSV ->
RGB conversions); the rest is per-call overhead of nested transform objects. Here:

* every random draw is torchvision's, in torchvision's order (`torch.rand`, `ColorJitter.get_params`,
  `GaussianBlur.get_params`), so a seed gives the same decisions and factors as the official
  `RandomApply(ColorJitter) -> RandomGrayscale -> RandomApply(GaussianBlur) -> RandomSolarize` chain;
* brightness, contrast, saturation, grayscale and solarize are Pillow's own operations, exactly as
  torchvision runs them on PIL images (bit-identical; brightness and contrast as lookup tables that
  Pillow's blend itself computes);
* the blur is the same Gaussian kernel (torchvision's formula) applied separably by OpenCV in float32
  with the same reflect border, then rounded: equal up to summation order (rarely one grey level);
* the hue shift is the same uint8 rotation of H in OpenCV's 256-step HSV instead of Pillow's (12x
  faster): the two 8-bit round trips round differently, about one grey level apart on average and up to
  ~14 on a few saturated pixels (Pillow's own round trip moves such pixels by up to 6);
  tests/data/test_photometric.py measures it;
* ToTensor + Normalize keep their arithmetic (bit-identical); the training loader ships uint8 crops and
  normalises them on the device (`normalize_pixels`), so workers pass and GPUs receive a quarter of the bytes.

tools/bench/data_pipeline.py measures the whole pipeline against the official-style one.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, ImageStat
from torchvision import transforms
from torchvision.transforms import functional as TF

cv2.setNumThreads(1)  # one data worker per core: OpenCV's own thread pool would oversubscribe them

__all__ = ["Chain", "ColourDistortion", "RandomGaussianBlur", "RandomSolarize", "ToNormalizedTensor", "ToPixelTensor",
           "gaussian_kernel", "normalize_pixels"]


def _applies(p: float) -> bool:
    """torchvision's `RandomApply` draw: applied unless `p < torch.rand(1)` (one draw, also for p 0 or 1)."""
    return not p < float(torch.rand(1))


_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))


def _blend_table(constant: int, factor: float) -> np.ndarray:
    """What Pillow's `Image.blend(constant image, img, factor)` makes of each value 0..255, computed by that
    very function: an exact lookup table (the blend is per pixel)."""
    return np.frombuffer(Image.blend(Image.new("L", (256, 1), constant), _RAMP, factor).tobytes(), dtype=np.uint8)


def _lookup(img: Image.Image, table: np.ndarray) -> Image.Image:
    # OpenCV applies the table to every channel (Pillow's `point` would first round 768 Python numbers)
    return Image.fromarray(cv2.LUT(np.asarray(img), table))


_FAST_MODES = ("RGB", "L")  # other modes (alpha, palettes, 16-bit) take Pillow's / torchvision's own path


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """`ImageEnhance.Brightness(img).enhance(factor)` (a blend with black) as one table lookup."""
    if img.mode not in _FAST_MODES:
        return ImageEnhance.Brightness(img).enhance(factor)
    return _lookup(img, _blend_table(0, factor))


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """`ImageEnhance.Contrast(img).enhance(factor)` (a blend with the rounded mean grey) as one table lookup."""
    if img.mode not in _FAST_MODES:
        return ImageEnhance.Contrast(img).enhance(factor)
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return _lookup(img, _blend_table(mean, factor))


def shift_hue(img: Image.Image, factor: float) -> Image.Image:
    """Rotate the hue by `factor` of a turn (-0.5..0.5) as torchvision's PIL path does: H is 8-bit and
    the shift `int(factor * 255)` wraps around."""
    if img.mode != "RGB":  # grey images have no hue (torchvision returns them as they are); others: its own path
        return img if img.mode == "L" else TF.adjust_hue(img, factor)
    hsv = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.int32(factor * 255).astype(np.uint8)  # uint8 arithmetic: wraps, as in torchvision
    return Image.fromarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL))


class ColourDistortion:
    """`RandomApply([ColorJitter(*jitter)], p=jitter_probability)` then `RandomGrayscale(grayscale_probability)`."""

    def __init__(self, jitter: Sequence[float], jitter_probability: float, grayscale_probability: float):
        self.jitter = transforms.ColorJitter(*jitter)  # torchvision's checked ranges (None for a strength of 0)
        self.jitter_probability = float(jitter_probability)
        self.grayscale_probability = float(grayscale_probability)

    def __call__(self, img: Image.Image) -> Image.Image:
        if _applies(self.jitter_probability):
            r = self.jitter
            order, b, c, s, h = r.get_params(r.brightness, r.contrast, r.saturation, r.hue)
            for fn in order.tolist():
                if fn == 0 and b is not None:
                    img = adjust_brightness(img, b)
                elif fn == 1 and c is not None:
                    img = adjust_contrast(img, c)
                elif fn == 2 and s is not None:
                    img = ImageEnhance.Color(img).enhance(s)
                elif fn == 3 and h is not None:
                    img = shift_hue(img, h)
        if float(torch.rand(1)) < self.grayscale_probability:  # as many channels as the input, as torchvision
            img = img.convert("L") if img.mode == "L" else img.convert("L").convert("RGB")
        return img


def gaussian_kernel(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision's 1-D Gaussian kernel (float32): exp(-x^2 / 2 sigma^2) on integer offsets, normalised."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).numpy()


class RandomGaussianBlur:
    """`RandomApply([GaussianBlur(kernel_size, sigma=(0.1, 2.0))], p)`, separable, in float32."""

    def __init__(self, p: float, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.kernel_size, self.sigma = float(p), int(kernel_size), (float(sigma[0]), float(sigma[1]))

    def __call__(self, img: Image.Image) -> Image.Image:
        if not _applies(self.p):
            return img
        return self.blur(img, transforms.GaussianBlur.get_params(*self.sigma))

    def blur(self, img: Image.Image, sigma: float) -> Image.Image:
        kernel = gaussian_kernel(self.kernel_size, sigma)
        blurred = cv2.sepFilter2D(np.asarray(img, dtype=np.float32), cv2.CV_32F, kernel, kernel,
                                  borderType=cv2.BORDER_REFLECT_101)  # torch's "reflect" padding
        return Image.fromarray(np.rint(blurred, out=blurred).astype(np.uint8), mode=img.mode)


class RandomSolarize:
    """`RandomSolarize(threshold, p)`: invert the pixels at or above the threshold."""

    def __init__(self, threshold: int = 128, p: float = 0.2):
        self.threshold, self.p = threshold, float(p)

    def __call__(self, img: Image.Image) -> Image.Image:
        if float(torch.rand(1)) < self.p:
            return ImageOps.solarize(img, self.threshold)
        return img


class ToPixelTensor:
    """PIL image -> contiguous (C, H, W) uint8 tensor: the crop as the training loader ships it (a quarter of
    the bytes of float32), normalised on the device by `normalize_pixels`."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        if pixels.ndim == 2:
            pixels = pixels.unsqueeze(-1)
        return pixels.permute(2, 0, 1).contiguous()


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., C, H, W) -> float32 with `ToTensor()` + `Normalize(mean, std)`'s arithmetic, bit for bit:
    `(x / 255 - mean) / std`, on the tensor's device."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(-1, 1, 1)
    return pixels.float().div_(255).sub_(mean_t).div_(std_t)


class ToNormalizedTensor:
    """`ToTensor()` then `Normalize(mean, std)`, same arithmetic (bit-identical)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return normalize_pixels(ToPixelTensor()(img), self.mean, self.std)


class Chain:
    """Apply `transforms` in order: torchvision's Compose without its per-call bookkeeping (picklable, so
    data workers can be spawned)."""

    def __init__(self, *transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for transform in self.transforms:
            img = transform(img)
        return img
