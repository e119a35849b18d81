"""Ten geometric shapes drawn at random scale, position, rotation and colours: the second built-in dataset.

A recipe tuned on the digits alone could be tuned to them; this set is generated differently (vector
shapes drawn with PIL, no scanned strokes) so a recipe can be checked on two datasets. Each shape is
drawn 4x larger and downsampled (anti-aliased edges), rotated by at most 20 degrees (so `plus` and
`cross`, 45 degrees apart, stay two classes) and painted like the digits: a light shape on a dark
background, both with a mild random tint, so colour says nothing about the class.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "ring", "square", "square_outline", "triangle", "triangle_outline", "plus", "cross", "star",
           "hexagon")
_SUPERSAMPLE = 4
_SCALE_RANGE = (0.45, 0.9)  # shape side as a fraction of the canvas side
_MAX_ROTATION = 20.0  # degrees


def _polygon(n: int, radius: float, cx: float, cy: float, angle: float, inner: float | None = None) -> list:
    """Vertices of a regular n-gon (or, with `inner`, an n-pointed star) centred on (cx, cy)."""
    points = []
    steps = 2 * n if inner is not None else n
    for i in range(steps):
        r = radius if inner is None or i % 2 == 0 else radius * inner
        a = angle + 2 * math.pi * i / steps - math.pi / 2
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _bar_cross(radius: float, cx: float, cy: float, angle: float, width: float) -> list[list]:
    """Two perpendicular bars through the centre, rotated by `angle` (a plus; a cross at +45 degrees)."""
    bars = []
    for base in (angle, angle + math.pi / 2):
        c, s = math.cos(base), math.sin(base)
        corners = [(-radius, -width), (radius, -width), (radius, width), (-radius, width)]
        bars.append([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners])
    return bars


def shape_mask(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float coverage in [0, 1] of shape `label` at a random scale, position and rotation."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"shape label must be in [0, {len(CLASSES)}), got {label}")
    big = size * _SUPERSAMPLE
    side = big * rng.uniform(*_SCALE_RANGE)
    radius = side / 2
    cx, cy = rng.uniform(radius, big - radius, size=2)
    angle = math.radians(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    stroke = max(2, int(round(radius * 0.25)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    name = CLASSES[label]
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if name == "circle":
        draw.ellipse(box, fill=255)
    elif name == "ring":
        draw.ellipse(box, outline=255, width=stroke)
    elif name in ("square", "square_outline", "triangle", "triangle_outline", "hexagon"):
        n = {"square": 4, "square_outline": 4, "triangle": 3, "triangle_outline": 3, "hexagon": 6}[name]
        turn = math.pi / 4 if n == 4 else 0.0  # squares axis-aligned at angle 0
        points = _polygon(n, radius, cx, cy, angle + turn)
        if name.endswith("_outline"):
            draw.line(points + points[:1], fill=255, width=stroke, joint="curve")
        else:
            draw.polygon(points, fill=255)
    elif name in ("plus", "cross"):
        for bar in _bar_cross(radius, cx, cy, angle + (math.pi / 4 if name == "cross" else 0.0), stroke / 1.5):
            draw.polygon(bar, fill=255)
    else:  # star
        draw.polygon(_polygon(5, radius, cx, cy, angle, inner=0.45), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render_shape(label: int, size: int, rng: np.random.Generator, fg: np.ndarray, bg: np.ndarray) -> Image.Image:
    """Shape `label` as a `size` x `size` RGB image, foreground `fg` on background `bg` (RGB 0-255)."""
    alpha = shape_mask(label, size, rng)
    pixels = bg + alpha[..., None] * (fg - bg)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
