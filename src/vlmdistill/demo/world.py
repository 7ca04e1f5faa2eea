"""A procedural open-vocabulary "demo world" that stands in for the paper's datasets offline.

No CLIP weights or real datasets are reachable here, so this module draws a deterministic world whose
classes are combinations of visual attributes (shape x colour x pattern). Each class also has a habitat
(typical background and size) that its name lacks but its description states, as ChatGPT descriptions
add cues to bare class names. The generator picks the ID/OOD class split so that every OOD class is a
new combination of attribute values seen in ID, with a few values rare in ID but common in OOD.

It writes the paper's exact dataset formats (``label2text.txt``, ``chatgpt.txt``, the three list files
over a raw ``images/<class_dir>/<file>`` tree) plus a separate captioned corpus (``corpus/``) of other
images from the same world on which a tiny CLIP teacher can be trained. ``world.json`` is written last,
so a folder with a ``world.json`` matching the parameters is a complete world.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1
MIN_CLASSES = 24
MIN_ID_CLASSES = 12
MIN_OOD_CLASSES = 8
TRAIN_FRACTION = 0.7
OFF_HABITAT_PROB = 0.15
WORLD_JSON = "world.json"
LIST_FILES = {"train": "train_data.txt", "val_on_train": "val_on_train_data.txt", "val": "val_data.txt"}

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "crescent", "arrow", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (40, 190, 60),
    "cyan": (35, 205, 215),
    "blue": (35, 70, 225),
    "purple": (140, 50, 205),
    "pink": (245, 115, 185),
}
PATTERNS = ("solid", "striped", "dotted", "checkered", "hollow")
BACKGROUNDS = ("dark", "light", "grass", "sand", "water")
SIZES = ("small", "large")

_SHAPE_WORDS = {
    "circle": "round circle",
    "square": "square",
    "triangle": "triangle",
    "star": "five-pointed star",
    "cross": "plus-shaped cross",
    "diamond": "narrow diamond",
    "hexagon": "six-sided hexagon",
    "crescent": "crescent",
    "arrow": "arrow",
    "heart": "heart",
}
_PATTERN_WORDS = {
    "solid": "filled with one solid colour",
    "striped": "covered in thin diagonal white stripes",
    "dotted": "sprinkled with small white dots",
    "checkered": "patterned with a tiny white checkerboard",
    "hollow": "drawn as a thick outline with an empty middle",
}
_WHERE = {
    "dark": "against a dark background",
    "light": "on a pale background",
    "grass": "on green grass",
    "sand": "on sandy ground",
    "water": "on rippling blue water",
}
_DESCRIPTION_TEMPLATES = (
    "{A} {colour} {shape} {pattern}, usually {size} and found {where}.",
    "This {size} {colour} {shape} is {pattern} and typically sits {where}.",
    "{A_size} {shape} in {colour}, {pattern}, most often seen {where}.",
    "Usually seen {where}, this {colour} {shape} is {size} and {pattern}.",
    "{A} {colour} {shape} that is {pattern}; it tends to be {size} and appears {where}.",
)
_COUNT_WORDS = {2: "two", 3: "three"}

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

# Streams of the per-image generators, so dataset images, corpus images and splits never share draws.
_STREAM_IMAGES, _STREAM_CORPUS, _STREAM_SPLIT = 0, 1, 2


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
class ClassSpec:
    """One class: its attributes, its habitat (in the description only) and whether it is ID."""

    shape: str
    colour: str
    pattern: str
    background: str
    size: str
    description: str
    is_id: bool

    @property
    def name(self) -> str:
        return f"{self.colour} {self.pattern} {self.shape}"

    @property
    def class_dir(self) -> str:
        return self.name.replace(" ", "_")


@dataclass(frozen=True)
class WorldInfo:
    """What a caller needs from a generated world; class order is the label2text order (ids 1..n)."""

    root: Path
    class_dirs: tuple[str, ...]
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    id_classes: tuple[str, ...]
    ood_classes: tuple[str, ...]
    rare_values: dict[str, str]


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
class _Scene:
    """What one image shows; captions describe the drawn count and background, not the class habitat."""

    background: str
    count: int
    blobs: tuple[_Blob, ...]
    objects: tuple[_Object, ...]


def _params(
    seed: int, n_classes: int, images_per_class: int, corpus_per_class: int, image_size: int, id_fraction: float
) -> dict[str, Any]:
    """Validated parameters, as stored in world.json; the split sizes must fit the split's guarantees."""
    n_max = len(SHAPES) * len(COLOURS) * len(PATTERNS)
    if not MIN_CLASSES <= n_classes <= n_max:
        raise ValueError(f"n_classes must be in [{MIN_CLASSES}, {n_max}], got {n_classes}")
    n_id = round(n_classes * id_fraction)
    if n_id < MIN_ID_CLASSES or n_classes - n_id < MIN_OOD_CLASSES:
        raise ValueError(
            f"id_fraction={id_fraction} gives {n_id} ID and {n_classes - n_id} OOD classes; "
            f"need at least {MIN_ID_CLASSES} ID and {MIN_OOD_CLASSES} OOD"
        )
    if images_per_class < 2:
        raise ValueError(f"images_per_class must be >= 2 (train and val_on_train), got {images_per_class}")
    if corpus_per_class < 2:
        raise ValueError(f"corpus_per_class must be >= 2 (name and description captions), got {corpus_per_class}")
    if not 16 <= image_size <= 256:
        raise ValueError(f"image_size must be in [16, 256], got {image_size}")
    return {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "n_classes": n_classes,
        "images_per_class": images_per_class,
        "corpus_per_class": corpus_per_class,
        "image_size": image_size,
        "id_fraction": float(id_fraction),
    }


# ---------------------------------------------------------------- classes and the ID/OOD split


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith(("s", "x", "sh", "ch")) else f"{shape}s"


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _split_combos(
    rng: np.random.Generator, n_id: int, n_ood: int, rare: dict[str, str]
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(shape, colour, pattern) combos for ID and OOD: ID covers every value, rare values 1-2 times."""
    shapes = [s for s in SHAPES if s != rare["shape"]]
    colours = [c for c in COLOURS if c != rare["colour"]]
    patterns = list(PATTERNS)
    for values in (shapes, colours, patterns):
        rng.shuffle(values)
    cover = [(shapes[i], colours[i % len(colours)], patterns[i % len(patterns)]) for i in range(len(shapes))]
    n_rare = 1 if n_id < 40 else 2
    rare_id = [(_pick(rng, shapes), rare["colour"], _pick(rng, patterns)) for _ in range(n_rare)]
    rare_id += [(rare["shape"], _pick(rng, colours), _pick(rng, patterns)) for _ in range(n_rare)]
    chosen = list(dict.fromkeys(cover + rare_id))
    common = [c for c in product(shapes, colours, patterns) if c not in chosen]
    if n_id > len(chosen) + len(common):
        raise ValueError(f"{n_id} ID classes cannot keep {rare} rare in ID; lower n_classes or id_fraction")
    order = rng.permutation(len(common))
    id_combos = chosen + [common[i] for i in order[: n_id - len(chosen)]]

    rest = [c for c in product(SHAPES, COLOURS, PATTERNS) if c not in set(id_combos)]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    quota = max(3, round(0.2 * n_ood))
    ood = [c for c in rest if c[1] == rare["colour"]][:quota]
    ood += [c for c in rest if c[0] == rare["shape"] and c not in ood][:quota]
    ood += [c for c in rest if c not in set(ood)][: n_ood - len(ood)]
    return id_combos, ood


def _describe(rng: np.random.Generator, shape: str, colour: str, pattern: str, background: str, size: str) -> str:
    """One appearance sentence from a random template, so descriptions do not all read alike."""
    template = _pick(rng, list(_DESCRIPTION_TEMPLATES))
    words = {
        "colour": colour,
        "shape": _SHAPE_WORDS[shape],
        "pattern": _PATTERN_WORDS[pattern],
        "where": _WHERE[background],
        "size": size,
        "A": "An" if colour[0] in "aeiou" else "A",
        "A_size": _with_article(size).capitalize(),
    }
    return template.format(**words)


def _make_classes(rng: np.random.Generator, n_id: int, n_ood: int) -> tuple[list[ClassSpec], dict[str, str]]:
    """The world's classes in label order (sorted class dirs) and its rare attribute values."""
    rare = {"shape": _pick(rng, list(SHAPES)), "colour": _pick(rng, list(COLOURS))}
    id_combos, ood_combos = _split_combos(rng, n_id, n_ood, rare)
    flagged = [(c, True) for c in id_combos] + [(c, False) for c in ood_combos]
    flagged.sort(key=lambda item: "_".join((item[0][1], item[0][2], item[0][0])))  # = sorted class dirs
    specs = []
    for (shape, colour, pattern), is_id in flagged:
        background, size = _pick(rng, list(BACKGROUNDS)), _pick(rng, list(SIZES))
        description = _describe(rng, shape, colour, pattern, background, size)
        specs.append(ClassSpec(shape, colour, pattern, background, size, description, is_id))
    return specs, rare


# ---------------------------------------------------------------- drawing


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


def _plan(rng: np.random.Generator, spec: ClassSpec, n: int) -> _Scene:
    """Random per-image decisions: background, distractors, and 1-3 copies of the class object."""
    background = spec.background
    if rng.random() < OFF_HABITAT_PROB:
        background = _pick(rng, [b for b in BACKGROUNDS if b != spec.background])
    others = [c for c in COLOURS if c != spec.colour]
    blobs = tuple(
        _Blob(_jittered(rng, _pick(rng, others)), *(rng.uniform(0, n, 2)), n * rng.uniform(0.035, 0.065))
        for _ in range(int(rng.integers(0, 4)))
    )
    count = int(rng.choice(3, p=_COUNT_PROBS)) + 1
    rgb = _jittered(rng, spec.colour)
    lo, hi = _SIZE_RANGE[spec.size]
    objects = tuple(
        _place(rng, n, spec, rgb, round(n * rng.uniform(lo, hi) * _COPY_SHRINK ** (count - 1))) for _ in range(count)
    )
    return _Scene(background, count, blobs, objects)


def _render(rng: np.random.Generator, scene: _Scene, n: int) -> Image.Image:
    k = max(2, round(96 / n))
    canvas = _background(rng, scene.background, n)
    for blob in scene.blobs:
        _draw_blob(canvas, blob)
    for obj in scene.objects:
        _draw(canvas, obj, k)
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


def _render_class_image(spec: ClassSpec, rng: np.random.Generator, image_size: int) -> tuple[Image.Image, _Scene]:
    """One random image of a class, and the scene it shows (for captions that describe it)."""
    scene = _plan(rng, spec, image_size)
    return _render(rng, scene, image_size), scene


# ---------------------------------------------------------------- captions


def _things(spec: ClassSpec, count: int, adjective: str = "", noun: str = "") -> str:
    """'a small red striped star' / 'two small red striped stars'."""
    words = " ".join(w for w in (adjective, noun or f"{spec.colour} {spec.pattern}") if w)
    if count == 1:
        return _with_article(f"{words} {spec.shape}")
    return f"{_COUNT_WORDS[count]} {words} {_plural(spec.shape)}"


def _caption(rng: np.random.Generator, spec: ClassSpec, scene: _Scene, index: int) -> str:
    """Image 0 of a class gets the name prompt, image 1 the description, the rest a random template."""
    where = _WHERE[scene.background]
    things = _things(spec, scene.count)
    sized = _things(spec, scene.count, adjective=spec.size)
    options = (
        f"a photo of {_with_article(spec.name)}.",
        spec.description,
        f"a photo of {things}.",
        f"{sized.capitalize()} {where}.",
        f"a photo of {sized} {where}.",
        f"{spec.description} This picture shows {things} {where}.",
        spec.name,
        f"{_things(spec, scene.count, spec.size, spec.colour)}, {_PATTERN_WORDS[spec.pattern]}, {where}.",
    )
    return options[index] if index < 2 else options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------- files


def _save_png(image: Image.Image, path: Path) -> None:
    """Encode in memory, then one write: noticeably faster than PIL writing to the file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _image_name(class_dir: str, index: int) -> str:
    return f"{class_dir}_{index:04d}.png"


def _image_rng(seed: int, stream: int, class_index: int, image_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, class_index, image_index])


def _write_images(root: Path, specs: list[ClassSpec], params: dict[str, Any]) -> None:
    n, seed = params["image_size"], params["seed"]
    for ci, spec in enumerate(specs):
        folder = root / "images" / spec.class_dir
        folder.mkdir(parents=True)
        for i in range(params["images_per_class"]):
            image, _ = _render_class_image(spec, _image_rng(seed, _STREAM_IMAGES, ci, i), n)
            _save_png(image, folder / _image_name(spec.class_dir, i))


def _write_corpus(root: Path, specs: list[ClassSpec], params: dict[str, Any]) -> None:
    n, seed = params["image_size"], params["seed"]
    lines = []
    for ci, spec in enumerate(specs):
        folder = root / "corpus" / "images" / spec.class_dir
        folder.mkdir(parents=True)
        for i in range(params["corpus_per_class"]):
            rng = _image_rng(seed, _STREAM_CORPUS, ci, i)
            image, scene = _render_class_image(spec, rng, n)
            name = _image_name(spec.class_dir, i)
            _save_png(image, folder / name)
            record = {"path": f"images/{spec.class_dir}/{name}", "caption": _caption(rng, spec, scene, i)}
            lines.append(json.dumps(record))
    _write_text(root / "corpus" / "captions.jsonl", lines)


def _split_lists(specs: list[ClassSpec], params: dict[str, Any]) -> dict[str, list[str]]:
    """The paper's rule: ceil(0.7 n) random train images per ID class, the rest val_on_train; OOD -> val."""
    n = params["images_per_class"]
    n_train = math.ceil(TRAIN_FRACTION * n)
    lists: dict[str, list[str]] = {split: [] for split in LIST_FILES}
    for ci, spec in enumerate(specs):
        names = [_image_name(spec.class_dir, i) for i in range(n)]
        if not spec.is_id:
            lists["val"] += [f"val/{spec.class_dir}/{f}" for f in names]
            continue
        train = set(_image_rng(params["seed"], _STREAM_SPLIT, ci, 0).permutation(n)[:n_train].tolist())
        for i, f in enumerate(names):
            split = "train" if i in train else "val_on_train"
            lists[split].append(f"{split}/{spec.class_dir}/{f}")
    return lists


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _write_label_files(root: Path, specs: list[ClassSpec], params: dict[str, Any]) -> None:
    _write_text(root / "label2text.txt", [f"{s.class_dir} {i} {s.class_dir}" for i, s in enumerate(specs, 1)])
    _write_text(root / "chatgpt.txt", [s.description for s in specs])
    for split, lines in _split_lists(specs, params).items():
        _write_text(root / LIST_FILES[split], lines)


def _write_world_json(root: Path, specs: list[ClassSpec], rare: dict[str, str], params: dict[str, Any]) -> None:
    """Written last and atomically: its presence marks the world as complete."""
    world = {
        **params,
        "vocabulary": {
            "shape": list(SHAPES),
            "colour": {c: list(rgb) for c, rgb in COLOURS.items()},
            "pattern": list(PATTERNS),
            "background": list(BACKGROUNDS),
            "size": list(SIZES),
        },
        "classes": [
            {
                "id": i,
                "class_dir": s.class_dir,
                "name": s.name,
                "description": s.description,
                "shape": s.shape,
                "colour": s.colour,
                "pattern": s.pattern,
                "background": s.background,
                "size": s.size,
                "split": "id" if s.is_id else "ood",
            }
            for i, s in enumerate(specs, 1)
        ],
        "id_classes": [s.class_dir for s in specs if s.is_id],
        "ood_classes": [s.class_dir for s in specs if not s.is_id],
        "rare_values": rare,
    }
    tmp = root / f".{WORLD_JSON}.tmp"
    tmp.write_text(json.dumps(world, indent=1), encoding="utf-8")
    os.replace(tmp, root / WORLD_JSON)


# ---------------------------------------------------------------- public API


def generate_world(
    out_dir: Path | str,
    *,
    seed: int = 0,
    n_classes: int = 120,
    images_per_class: int = 30,
    corpus_per_class: int = 20,
    image_size: int = 32,
    id_fraction: float = 0.5,
) -> WorldInfo:
    """Write a complete world to ``out_dir``, replacing any earlier ``images/`` and ``corpus/`` there."""
    params = _params(seed, n_classes, images_per_class, corpus_per_class, image_size, id_fraction)
    n_id = round(n_classes * id_fraction)
    specs, rare = _make_classes(np.random.default_rng(seed), n_id, n_classes - n_id)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / WORLD_JSON).unlink(missing_ok=True)
    for sub in ("images", "corpus"):
        shutil.rmtree(root / sub, ignore_errors=True)
    _write_images(root, specs, params)
    _write_corpus(root, specs, params)
    _write_label_files(root, specs, params)
    _write_world_json(root, specs, rare, params)
    return load_world(root)


def load_world(out_dir: Path | str) -> WorldInfo:
    """The WorldInfo of an already generated world, read from its world.json."""
    root = Path(out_dir)
    world = json.loads((root / WORLD_JSON).read_text(encoding="utf-8"))
    classes = world["classes"]
    return WorldInfo(
        root=root,
        class_dirs=tuple(c["class_dir"] for c in classes),
        names=tuple(c["name"] for c in classes),
        descriptions=tuple(c["description"] for c in classes),
        id_classes=tuple(world["id_classes"]),
        ood_classes=tuple(world["ood_classes"]),
        rare_values=dict(world["rare_values"]),
    )


def _expected_files(root: Path, world: dict[str, Any]) -> list[Path]:
    files = [root / name for name in ("label2text.txt", "chatgpt.txt", *LIST_FILES.values())]
    files.append(root / "corpus" / "captions.jsonl")
    for c in world["classes"]:
        d = c["class_dir"]
        files += [root / "images" / d / _image_name(d, i) for i in range(world["images_per_class"])]
        files += [root / "corpus" / "images" / d / _image_name(d, i) for i in range(world["corpus_per_class"])]
    return files


def world_is_complete(
    out_dir: Path | str,
    *,
    seed: int = 0,
    n_classes: int = 120,
    images_per_class: int = 30,
    corpus_per_class: int = 20,
    image_size: int = 32,
    id_fraction: float = 0.5,
) -> bool:
    """True when ``out_dir`` holds a finished world made with exactly these parameters."""
    params = _params(seed, n_classes, images_per_class, corpus_per_class, image_size, id_fraction)
    root = Path(out_dir)
    try:
        world = json.loads((root / WORLD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(world, dict) or any(world.get(key) != value for key, value in params.items()):
        return False
    return all(path.is_file() for path in _expected_files(root, world))


def ensure_world(
    out_dir: Path | str,
    *,
    seed: int = 0,
    n_classes: int = 120,
    images_per_class: int = 30,
    corpus_per_class: int = 20,
    image_size: int = 32,
    id_fraction: float = 0.5,
) -> WorldInfo:
    """The cached world in ``out_dir`` if complete for these parameters, else a freshly generated one."""
    kwargs = {
        "seed": seed,
        "n_classes": n_classes,
        "images_per_class": images_per_class,
        "corpus_per_class": corpus_per_class,
        "image_size": image_size,
        "id_fraction": id_fraction,
    }
    if world_is_complete(out_dir, **kwargs):
        return load_world(out_dir)
    return generate_world(out_dir, **kwargs)


def resolve_list_entry(out_dir: Path | str, entry: str) -> Path:
    """The image a list line ``<split>/<class_dir>/<file>`` names: the raw tree is ``images/<class_dir>/``."""
    _, class_dir, name = entry.strip().split("/")
    return Path(out_dir) / "images" / class_dir / name
