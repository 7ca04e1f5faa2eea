"""The demo world's vocabulary and classes: attribute values, descriptions, and the ID/OOD split.

A class is a (shape, colour, pattern) combination. Each also has a habitat (typical background and
size) that its name lacks but its description states, as ChatGPT descriptions add cues to bare class
names. The split makes every OOD class a new combination of attribute values seen in ID, with a few
values rare in ID but common in OOD. Nothing here draws pixels or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np

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
MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(PATTERNS)

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
PATTERN_WORDS = {
    "solid": "filled with one solid colour",
    "striped": "covered in thin diagonal white stripes",
    "dotted": "sprinkled with small white dots",
    "checkered": "patterned with a tiny white checkerboard",
    "hollow": "drawn as a thick outline with an empty middle",
}
WHERE = {
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

Combo = tuple[str, str, str]


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


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def pick(rng: np.random.Generator, items: list[Any]) -> Any:
    """One item, drawn with a single ``integers`` call so every caller consumes the stream alike."""
    return items[int(rng.integers(len(items)))]


def _id_combos(rng: np.random.Generator, n_id: int, rare: dict[str, str]) -> list[Combo]:
    """ID combos: every non-rare value at least once, each rare value 1-2 times, the rest at random."""
    shapes = [s for s in SHAPES if s != rare["shape"]]
    colours = [c for c in COLOURS if c != rare["colour"]]
    patterns = list(PATTERNS)
    for values in (shapes, colours, patterns):
        rng.shuffle(values)
    cover = [(shapes[i], colours[i % len(colours)], patterns[i % len(patterns)]) for i in range(len(shapes))]
    n_rare = 1 if n_id < 40 else 2
    rare_id = [(pick(rng, shapes), rare["colour"], pick(rng, patterns)) for _ in range(n_rare)]
    rare_id += [(rare["shape"], pick(rng, colours), pick(rng, patterns)) for _ in range(n_rare)]
    chosen = list(dict.fromkeys(cover + rare_id))
    common = [c for c in product(shapes, colours, patterns) if c not in chosen]
    if n_id > len(chosen) + len(common):
        raise ValueError(f"{n_id} ID classes cannot keep {rare} rare in ID; lower n_classes or id_fraction")
    order = rng.permutation(len(common))
    return chosen + [common[i] for i in order[: n_id - len(chosen)]]


def _ood_combos(rng: np.random.Generator, n_ood: int, id_combos: list[Combo], rare: dict[str, str]) -> list[Combo]:
    """OOD combos: new combinations, with a quota that carries each rare value."""
    rest = [c for c in product(SHAPES, COLOURS, PATTERNS) if c not in set(id_combos)]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    quota = max(3, round(0.2 * n_ood))
    ood = [c for c in rest if c[1] == rare["colour"]][:quota]
    ood += [c for c in rest if c[0] == rare["shape"] and c not in ood][:quota]
    ood += [c for c in rest if c not in set(ood)][: n_ood - len(ood)]
    return ood


def _describe(rng: np.random.Generator, shape: str, colour: str, pattern: str, background: str, size: str) -> str:
    """One appearance sentence from a random template, so descriptions do not all read alike."""
    template = pick(rng, list(_DESCRIPTION_TEMPLATES))
    words = {
        "colour": colour,
        "shape": _SHAPE_WORDS[shape],
        "pattern": PATTERN_WORDS[pattern],
        "where": WHERE[background],
        "size": size,
        "A": "An" if colour[0] in "aeiou" else "A",
        "A_size": with_article(size).capitalize(),
    }
    return template.format(**words)


def make_classes(rng: np.random.Generator, n_id: int, n_ood: int) -> tuple[list[ClassSpec], dict[str, str]]:
    """The world's classes in label order (sorted class dirs) and its rare attribute values."""
    rare = {"shape": pick(rng, list(SHAPES)), "colour": pick(rng, list(COLOURS))}
    id_combos = _id_combos(rng, n_id, rare)
    ood_combos = _ood_combos(rng, n_ood, id_combos, rare)
    flagged = [(c, True) for c in id_combos] + [(c, False) for c in ood_combos]
    flagged.sort(key=lambda item: "_".join((item[0][1], item[0][2], item[0][0])))  # = sorted class dirs
    specs = []
    for (shape, colour, pattern), is_id in flagged:
        background, size = pick(rng, list(BACKGROUNDS)), pick(rng, list(SIZES))
        description = _describe(rng, shape, colour, pattern, background, size)
        specs.append(ClassSpec(shape, colour, pattern, background, size, description, is_id))
    return specs, rare
