"""The captioned corpus on which the demo teacher learns the world, as CLIP learned the web.

Its images are other draws of the same classes (their own generator stream), and each caption
describes what its image shows: the drawn count and background, not the class habitat. Image 0 of a
class is captioned with the class-name prompt and image 1 with the description, so the teacher has
seen every class both ways.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vlmdistill.demo.classes import PATTERN_WORDS, WHERE, ClassSpec, with_article
from vlmdistill.demo.render import STREAM_CORPUS, Scene, image_rng, render_class_image

_COUNT_WORDS = {2: "two", 3: "three"}


def _plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith(("s", "x", "sh", "ch")) else f"{shape}s"


def _things(spec: ClassSpec, count: int, adjective: str = "", noun: str = "") -> str:
    """'a small red striped star' / 'two small red striped stars'."""
    words = " ".join(w for w in (adjective, noun or f"{spec.colour} {spec.pattern}") if w)
    if count == 1:
        return with_article(f"{words} {spec.shape}")
    return f"{_COUNT_WORDS[count]} {words} {_plural(spec.shape)}"


def _caption(rng: np.random.Generator, spec: ClassSpec, scene: Scene, index: int) -> str:
    """Image 0 of a class gets the name prompt, image 1 the description, the rest a random template."""
    where = WHERE[scene.background]
    things = _things(spec, scene.count)
    sized = _things(spec, scene.count, adjective=spec.size)
    options = (
        f"a photo of {with_article(spec.name)}.",
        spec.description,
        f"a photo of {things}.",
        f"{sized.capitalize()} {where}.",
        f"a photo of {sized} {where}.",
        f"{spec.description} This picture shows {things} {where}.",
        spec.name,
        f"{_things(spec, scene.count, spec.size, spec.colour)}, {PATTERN_WORDS[spec.pattern]}, {where}.",
    )
    return options[index] if index < 2 else options[int(rng.integers(len(options)))]


def corpus_pair(spec: ClassSpec, class_index: int, index: int, seed: int, image_size: int) -> tuple[Image.Image, str]:
    """Corpus image ``index`` of a class and its caption; the caption draws from the image's generator."""
    rng = image_rng(seed, STREAM_CORPUS, class_index, index)
    image, scene = render_class_image(spec, rng, image_size)
    return image, _caption(rng, spec, scene, index)
