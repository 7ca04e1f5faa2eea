"""Procedural drawing of the demo world's images: a textured background, distractors, 1-3 class objects.

Every image comes from its own generator (``image_rng``), so an image's pixels depend only on the
world seed, its stream, its class and its index: never on which other images were drawn before it.
Objects are rendered at a multiple of the output resolution and box-downsampled, for antialiasing.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlmdistill.demo.classes import BACKGROUNDS, COLOURS, ClassSpec, pick

OFF_HABITAT_PROB = 0.15
# Streams of the per-image generators, so dataset images, corpus images, splits and the unlabelled pools
# (all classes; ID classes only) never share draws.
STREAM_IMAGES, STREAM_CORPUS, STREAM_SPLIT = 0, 1, 2
STREAM_UNLABELED, STREAM_UNLABELED_ID = 3, 4

# Object diameter as a fraction of the image side, by habitat size; extra copies shrink the objects.
_SIZE_RANGE = {"small": (0.28, 0.38), "large": (0.5, 0.64)}
_COPY_SHRINK = 0.82
_MAX_ANGLE = math.radians(40)
_COUNT_PROBS = (0.5, 0.3, 0.2)
_WHITE = np.array((240.0, 240.0, 236.0))
_BG_BASE = {
    "dark": (28, 30, 40),
    "light": (226, 224, 214),
    "grass": (68, 128, 52),
    "sand": (212, 184, 128),
    "water": (44, 98, 172),
}
# (low-frequency amplitude, per-pixel grain) of each background's luminance noise.
_BG_NOISE = {"dark": (6, 4), "light": (8, 4), "grass": (22, 14), "sand": (12, 10), "water": (10, 4)}


def _regular(n: int, radius: float, phase: float = -math.pi / 2, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """A regular n-gon (a circle for large n) of the given radius around (dx, dy)."""
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([dx + radius * np.cos(t), dy + radius * np.sin(t)], axis=1)


def _star() -> np.ndarray:
    pts = _regular(10, 1.0)
    pts[1::2] *= 0.42
    return pts


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return np.stack([x, -y - 2.5], axis=1) / 17.5


def _cross() -> np.ndarray:
    """A plus sign: the top arm's three outline points, turned a quarter at a time."""
    arm = np.array([(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3)])
    quarters = [arm]
    for _ in range(3):
        quarters.append(np.stack([-quarters[-1][:, 1], quarters[-1][:, 0]], axis=1))
    return np.concatenate(quarters)


_ARROW = np.array([(-0.95, -0.2), (0.1, -0.2), (0.1, -0.6), (0.95, 0.0), (0.1, 0.6), (0.1, 0.2), (-0.95, 0.2)])

# Each shape is polygons in unit coordinates (y down, inside the unit disc) drawn in order with a fill.
_GEOMETRY: dict[str, tuple[tuple[np.ndarray, int], ...]] = {
    "circle": ((_regular(40, 0.95), 255),),
    "square": ((_regular(4, 0.98, -math.pi / 4), 255),),
    "triangle": ((_regular(3, 1.0, dy=0.15), 255),),
    "star": ((_star(), 255),),
    "cross": ((_cross(), 255),),
    "diamond": ((np.array([(0.0, -1.0), (0.55, 0.0), (0.0, 1.0), (-0.55, 0.0)]), 255),),
    "hexagon": ((_regular(6, 0.95, 0.0), 255),),
    "crescent": ((_regular(40, 0.95), 255), (_regular(40, 0.78, dx=0.42, dy=-0.05), 0)),
    "arrow": ((_ARROW, 255),),
    "heart": ((_heart(), 255),),
}


@dataclass(frozen=True)
class _Object:
    """One thing to draw: a shape of a given diameter (output pixels) at an integer top-left corner."""

    shape: str
    pattern: str
    rgb: np.ndarray
    size: int
    angle: float
    x0: int
    y0: int
    phase: float


@dataclass(frozen=True)
class _Blob:
    """A small distractor disc, drawn directly at output resolution (centre and radius in pixels)."""

    rgb: np.ndarray
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """What one image shows; captions describe the drawn count and background, not the class habitat."""

    background: str
    count: int
    blobs: tuple[_Blob, ...]
    objects: tuple[_Object, ...]


def image_rng(seed: int, stream: int, class_index: int, image_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, class_index, image_index])


def _smooth_noise(rng: np.random.Generator, n: int, cells: int) -> np.ndarray:
    """Bilinearly interpolated coarse Gaussian noise: cheap low-frequency texture."""
    grid = rng.normal(size=(cells + 1, cells + 1))
    t = np.arange(n) * (cells / n)
    i = t.astype(int)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _background(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    """An (n, n, 3) float canvas with the texture of the given background kind."""
    low, grain = _BG_NOISE[kind]
    lum = low * _smooth_noise(rng, n, 3) + rng.normal(0.0, grain, (n, n))
    if kind == "water":
        t = np.arange(n) / n
        waves = t[:, None] * rng.uniform(4, 6) + 0.15 * np.sin(2 * math.pi * (t[None, :] * 2 + rng.random()))
        lum += 24 * np.sin(2 * math.pi * (waves + rng.random()))
    elif kind == "grass":
        blades = rng.normal(0.0, 16, (n // 3 + 1, n))
        lum += np.repeat(blades, 3, axis=0)[:n]
    base = np.array(_BG_BASE[kind], dtype=float) * rng.uniform(0.9, 1.1)
    return base + lum[..., None] * (base / base.mean())


def _shape_mask(shape: str, side: int, angle: float) -> np.ndarray:
    """Boolean (side, side) mask of the rotated shape filling the square."""
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, s], [-s, c]])
    half = side / 2
    for polygon, fill in _GEOMETRY[shape]:
        draw.polygon((polygon @ rotation * half + half).ravel().tolist(), fill=fill)
    return np.asarray(img) > 127


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion by ``steps`` 4-neighbour steps (outside the patch counts as empty)."""
    out = mask.copy()
    for _ in range(steps):
        prev = out.copy()
        out[1:] &= prev[:-1]
        out[:-1] &= prev[1:]
        out[:, 1:] &= prev[:, :-1]
        out[:, :-1] &= prev[:, 1:]
        out[[0, -1]] = False
        out[:, [0, -1]] = False
    return out


def _white_mask(obj: _Object, side: int, k: int) -> np.ndarray:
    """Where the pattern shows white, in output-pixel units so the texture scales with the object."""
    coord = (np.arange(side) + 0.5) / k - obj.size / 2
    c, s = math.cos(obj.angle + math.pi / 4), math.sin(obj.angle + math.pi / 4)
    u = coord[None, :] * c + coord[:, None] * s + obj.phase
    v = coord[:, None] * c - coord[None, :] * s + obj.phase
    period = max(3.0, 0.28 * obj.size)
    if obj.pattern == "striped":
        return (u / period) % 1.0 < 0.45
    if obj.pattern == "dotted":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return du**2 + dv**2 < 0.09
    if obj.pattern == "checkered":
        cell = 0.55 * period
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    raise ValueError(f"pattern {obj.pattern!r} has no white texture")


def _draw(canvas: np.ndarray, obj: _Object, k: int) -> None:
    """Composite one object onto the canvas, rendered at k-times resolution and box-downsampled."""
    side = obj.size * k
    alpha = _shape_mask(obj.shape, side, obj.angle)
    if obj.pattern == "hollow":
        alpha &= ~_erode(alpha, max(1, round(max(1.2, 0.15 * obj.size) * k)))
    layer = np.empty((side, side, 4), dtype=np.float32)
    layer[..., :3] = obj.rgb
    if obj.pattern in ("striped", "dotted", "checkered"):
        layer[_white_mask(obj, side, k), :3] = _WHITE
    layer[..., 3] = 1.0
    layer[~alpha] = 0.0
    small = layer.reshape(obj.size, k, obj.size, k, 4).sum(axis=(1, 3)) / (k * k)
    region = canvas[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size]
    region *= 1.0 - small[..., 3:]
    region += small[..., :3]


def _draw_blob(canvas: np.ndarray, blob: _Blob) -> None:
    """An antialiased disc: coverage falls off linearly over the pixel at its rim."""
    n = canvas.shape[0]
    x0, x1 = max(0, int(blob.cx - blob.radius - 1)), min(n, int(blob.cx + blob.radius + 2))
    y0, y1 = max(0, int(blob.cy - blob.radius - 1)), min(n, int(blob.cy + blob.radius + 2))
    dx = np.arange(x0, x1) + 0.5 - blob.cx
    dy = np.arange(y0, y1) + 0.5 - blob.cy
    dist = np.sqrt(dx[None, :] ** 2 + dy[:, None] ** 2)
    cover = np.clip(blob.radius + 0.5 - dist, 0.0, 1.0)[..., None]
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - cover
    region += cover * blob.rgb


def _place(rng: np.random.Generator, n: int, spec: ClassSpec, rgb: np.ndarray, size: int) -> _Object:
    """One copy of the class object: jittered rotation and a random position fully inside the image."""
    size = int(min(max(size, 3), n))
    angle = float(rng.uniform(-_MAX_ANGLE, _MAX_ANGLE))
    x0, y0 = (int(v) for v in rng.integers(0, n - size + 1, 2))
    return _Object(spec.shape, spec.pattern, rgb, size, angle, x0, y0, float(rng.uniform(0, 10)))


def _jittered(rng: np.random.Generator, colour: str) -> np.ndarray:
    return np.array(COLOURS[colour], dtype=float) * rng.uniform(0.88, 1.08) + rng.normal(0.0, 8.0, 3)


def _plan(rng: np.random.Generator, spec: ClassSpec, n: int) -> Scene:
    """Random per-image decisions: background, distractors, and 1-3 copies of the class object."""
    background = spec.background
    if rng.random() < OFF_HABITAT_PROB:
        background = pick(rng, [b for b in BACKGROUNDS if b != spec.background])
    others = [c for c in COLOURS if c != spec.colour]
    blobs = tuple(
        _Blob(_jittered(rng, pick(rng, others)), *(rng.uniform(0, n, 2)), n * rng.uniform(0.035, 0.065))
        for _ in range(int(rng.integers(0, 4)))
    )
    count = int(rng.choice(3, p=_COUNT_PROBS)) + 1
    rgb = _jittered(rng, spec.colour)
    lo, hi = _SIZE_RANGE[spec.size]
    objects = tuple(
        _place(rng, n, spec, rgb, round(n * rng.uniform(lo, hi) * _COPY_SHRINK ** (count - 1))) for _ in range(count)
    )
    return Scene(background, count, blobs, objects)


def _render(rng: np.random.Generator, scene: Scene, n: int) -> Image.Image:
    k = max(2, round(96 / n))
    canvas = _background(rng, scene.background, n)
    for blob in scene.blobs:
        _draw_blob(canvas, blob)
    for obj in scene.objects:
        _draw(canvas, obj, k)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def render_class_image(spec: ClassSpec, rng: np.random.Generator, image_size: int) -> tuple[Image.Image, Scene]:
    """One random image of a class, and the scene it shows (for captions that describe it)."""
    scene = _plan(rng, spec, image_size)
    return _render(rng, scene, image_size), scene


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file's bytes, encoded in memory: one write afterwards is faster than PIL writing the file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
