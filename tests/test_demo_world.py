"""The demo world must be indistinguishable in format from the paper's datasets and keep its OOD promises."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdistill.demo import world as demo_world
from vlmdistill.demo.world import (
    MIN_CLASSES,
    WorldInfo,
    WorldParams,
    ensure_world,
    generate_world,
    load_world,
    resolve_list_entry,
    world_is_complete,
)

SMALL = WorldParams(seed=5, n_classes=24, images_per_class=5, corpus_per_class=3, image_size=32)
# The full world's class count, with few images: the split guarantees are about classes, not images.
WIDE = WorldParams(seed=1, n_classes=120, images_per_class=2, corpus_per_class=2, image_size=32)
# The smallest images a world allows, for the tests that only need files to exist.
TINY = replace(SMALL, images_per_class=2, corpus_per_class=2)
HABITAT_WORDS = {"dark": "dark", "light": "pale", "grass": "grass", "sand": "sand", "water": "water"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> WorldInfo:
    return generate_world(tmp_path_factory.mktemp("small"), SMALL)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> WorldInfo:
    return generate_world(tmp_path_factory.mktemp("wide"), WIDE)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _world_json(info: WorldInfo) -> dict:
    return json.loads((info.root / "world.json").read_text(encoding="utf-8"))


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_world(tmp_path: Path) -> None:
    generate_world(tmp_path / "a", TINY)
    generate_world(tmp_path / "b", TINY)
    generate_world(tmp_path / "c", replace(TINY, seed=TINY.seed + 1))
    a, b, c = (_all_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a["label2text.txt"] != c["label2text.txt"]
    images_a = {k: v for k, v in a.items() if k.endswith(".png")}
    assert not set(images_a.items()) & set(c.items())


def test_label_and_description_files(small: WorldInfo) -> None:
    rows = [line.split(" ") for line in _lines(small.root / "label2text.txt")]
    assert all(len(row) == 3 for row in rows)
    assert [int(row[1]) for row in rows] == list(range(1, SMALL.n_classes + 1))
    assert [row[0] for row in rows] == list(small.class_dirs) == sorted(small.class_dirs)
    assert all(row[2] == row[0] == name.replace(" ", "_") for row, name in zip(rows, small.names, strict=True))
    assert _lines(small.root / "chatgpt.txt") == list(small.descriptions)
    assert len(set(small.descriptions)) == len(small.descriptions)


def test_descriptions_state_the_habitat_that_names_lack(wide: WorldInfo) -> None:
    classes = _world_json(wide)["classes"]
    for c in classes:
        assert HABITAT_WORDS[c["background"]] in c["description"]
        assert c["size"] in c["description"]
        assert c["colour"] in c["description"]
        assert not set(c["name"].split()) & {c["size"], HABITAT_WORDS[c["background"]]}
    assert len({d.split(" ")[0] for d in wide.descriptions}) >= 3, "descriptions should not share one template"


def test_split_lists_follow_the_papers_rule(small: WorldInfo) -> None:
    n = SMALL.images_per_class
    per_split: dict[str, dict[str, list[str]]] = {}
    for split in ("train", "val_on_train", "val"):
        per_split[split] = {}
        for line in _lines(small.root / f"{split}_data.txt"):
            prefix, class_dir, name = line.split("/")
            assert prefix == split
            assert resolve_list_entry(small.root, line).is_file()
            per_split[split].setdefault(class_dir, []).append(name)
    assert not set(small.id_classes) & set(small.ood_classes)
    assert sorted(small.id_classes + small.ood_classes) == sorted(small.class_dirs)
    assert set(per_split["train"]) == set(per_split["val_on_train"]) == set(small.id_classes)
    assert set(per_split["val"]) == set(small.ood_classes)
    for d in small.id_classes:
        train, held_out = per_split["train"][d], per_split["val_on_train"][d]
        assert len(train) == math.ceil(0.7 * n)
        assert sorted(train + held_out) == sorted(p.name for p in (small.root / "images" / d).iterdir())
    for d in small.ood_classes:
        assert len(per_split["val"][d]) == n


def test_train_images_are_drawn_at_random_per_class(small: WorldInfo) -> None:
    picks: dict[str, set[str]] = {}
    for line in _lines(small.root / "train_data.txt"):
        _, class_dir, name = line.split("/")
        picks.setdefault(class_dir, set()).add(name.rsplit("_", 1)[1])
    assert len({frozenset(p) for p in picks.values()}) > 1


@pytest.mark.parametrize("fixture", ["small", "wide"])
def test_every_ood_value_is_seen_in_id_and_rare_values_are_rare(fixture: str, request) -> None:
    info: WorldInfo = request.getfixturevalue(fixture)
    classes = _world_json(info)["classes"]
    for attribute in ("shape", "colour", "pattern"):
        in_id = Counter(c[attribute] for c in classes if c["split"] == "id")
        in_ood = Counter(c[attribute] for c in classes if c["split"] == "ood")
        assert set(in_ood) <= set(in_id), attribute
        rare = info.rare_values.get(attribute)
        if rare is not None:
            assert 1 <= in_id[rare] <= 2
            assert in_ood[rare] >= 3 and in_ood[rare] > in_id[rare]
    assert set(info.rare_values) == {"shape", "colour"}
    combos = {(c["shape"], c["colour"], c["pattern"]) for c in classes}
    assert len(combos) == len(classes)


def test_world_json_records_attributes_and_split(wide: WorldInfo) -> None:
    world = _world_json(wide)
    assert world["seed"] == WIDE.seed and world["image_size"] == WIDE.image_size
    assert set(world["vocabulary"]) == {"shape", "colour", "pattern", "background", "size"}
    assert len(world["vocabulary"]["colour"]) >= 8 and len(world["vocabulary"]["shape"]) >= 8
    assert [c["class_dir"] for c in world["classes"]] == list(wide.class_dirs)
    assert {c["class_dir"] for c in world["classes"] if c["split"] == "ood"} == set(wide.ood_classes)
    assert abs(len(wide.id_classes) - len(wide.ood_classes)) <= 1
    assert load_world(wide.root) == wide
    assert wide.params == WIDE


def test_corpus_captions_cover_names_and_descriptions(small: WorldInfo) -> None:
    corpus = small.root / "corpus"
    records = [json.loads(line) for line in _lines(corpus / "captions.jsonl")]
    assert len(records) == SMALL.n_classes * SMALL.corpus_per_class
    by_class: dict[str, list[str]] = {}
    for r in records:
        assert set(r) == {"path", "caption"}
        assert (corpus / r["path"]).is_file()
        by_class.setdefault(r["path"].split("/")[1], []).append(r["caption"])
    for d, name, description in zip(small.class_dirs, small.names, small.descriptions, strict=True):
        captions = by_class[d]
        assert len(captions) == SMALL.corpus_per_class
        assert any(name in c for c in captions)
        assert description in captions


def test_corpus_images_differ_from_dataset_images(small: WorldInfo) -> None:
    d = small.class_dirs[0]
    dataset = {p.read_bytes() for p in (small.root / "images" / d).iterdir()}
    corpus = {p.read_bytes() for p in (small.root / "corpus" / "images" / d).iterdir()}
    assert not dataset & corpus


@pytest.mark.parametrize("size", [32, 48, 64])
def test_images_are_rgb_pngs_of_the_requested_size(tmp_path: Path, size: int) -> None:
    info = generate_world(tmp_path, replace(TINY, image_size=size))
    for path in [*(tmp_path / "images").rglob("*.png"), *(tmp_path / "corpus").rglob("*.png")][::7]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (size, size)
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(info.class_dirs) * 2


def test_habitat_background_is_visible(wide: WorldInfo) -> None:
    classes = _world_json(wide)["classes"]
    brightness: dict[str, list[float]] = {"dark": [], "light": []}
    for c in classes:
        if c["background"] in brightness:
            for path in (wide.root / "images" / c["class_dir"]).iterdir():
                with Image.open(path) as image:
                    brightness[c["background"]].append(float(np.asarray(image).mean()))
    assert np.median(brightness["dark"]) + 60 < np.median(brightness["light"])


def test_completeness_check_and_interrupted_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = TINY
    assert not world_is_complete(tmp_path, params)
    generate_world(tmp_path, params)
    assert world_is_complete(tmp_path, params)
    assert not world_is_complete(tmp_path, replace(params, seed=params.seed + 1))
    assert not world_is_complete(tmp_path, replace(params, image_size=48))

    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_world, "_write_corpus", crash)
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path, params)
    assert not world_is_complete(tmp_path, params)
    monkeypatch.undo()
    assert ensure_world(tmp_path, params).root == tmp_path
    assert world_is_complete(tmp_path, params)

    next(iter((tmp_path / "images").rglob("*.png"))).unlink()
    assert not world_is_complete(tmp_path, params)
    (tmp_path / "world.json").unlink()
    assert not world_is_complete(tmp_path, params)


def test_ensure_world_reuses_a_complete_world(tmp_path: Path) -> None:
    first = ensure_world(tmp_path, TINY)
    stamp = (tmp_path / "world.json").stat().st_mtime_ns
    assert ensure_world(tmp_path, TINY) == first
    assert (tmp_path / "world.json").stat().st_mtime_ns == stamp


def test_regeneration_removes_classes_of_an_older_world(tmp_path: Path) -> None:
    generate_world(tmp_path, TINY)
    info = generate_world(tmp_path, replace(TINY, seed=TINY.seed + 1))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(info.class_dirs)


def test_named_worlds_keep_their_cache_folder_names() -> None:
    assert (WorldParams.quick().n_classes, WorldParams.full().n_classes) == (32, 120)
    assert WorldParams.quick().tag == "c32-i12-k12-s32"
    assert WorldParams.full().tag == "c120-i30-k40-s32"
    assert replace(SMALL, id_fraction=0.6).tag == "c24-i5-k3-s32-seed5-id0.6"


@pytest.mark.parametrize(
    "bad",
    [
        {"n_classes": MIN_CLASSES - 1},
        {"n_classes": 401},
        {"id_fraction": 0.1},
        {"images_per_class": 1},
        {"corpus_per_class": 1},
        {"image_size": 8},
        {"n_classes": 400, "id_fraction": 0.9},
    ],
)
def test_rejects_parameters_it_cannot_honour(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        generate_world(tmp_path, replace(SMALL, **bad))
    assert not (tmp_path / "world.json").exists()
