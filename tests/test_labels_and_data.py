"""Label/description readers against the paper's file formats, ``prepare`` in its three sources, and bad input."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_folders
from vlmdistill.data.dataset import DatasetError, open_dataset
from vlmdistill.data.images import BadImageError, load_image
from vlmdistill.data.prepare import from_folders, prepare, seeded_split
from vlmdistill.data.source import ImageSource
from vlmdistill.text.labels import (
    ClassInfo,
    LabelFileError,
    LabelSpace,
    format_label_file,
    read_descriptions,
    read_label_file,
)

CUB_LABELS = (
    "001.Black_footed_Albatross 1 Black_footed_Albatross\n"
    "002.Laysan_Albatross 2 Laysan_Albatross\n"
    "003.Sooty_Albatross 3 Sooty_Albatross\n"
)
CUB_CHATGPT = (
    "The Black-footed Albatross is a large seabird with dark brown plumage and a pale face around its bill.\n"
    "The Laysan Albatross has a white head and body with dark grey upper wings and a pink bill.\n"
    "The Sooty Albatross is a slender, all-dark seabird with a black bill and a narrow white eye-ring.\n"
)
IMAGENET_LABELS = "n02119789 1 kit_fox\nn02100735 2 English_setter\nn02110185 3 Siberian_husky\n"
CUB_DIRS = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def png(path: Path, colour: tuple[int, int, int] = (10, 20, 30), size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# ====================================================================================== label2text
def test_read_label_file_parses_cub_and_imagenet_lines(tmp_path: Path) -> None:
    cub = read_label_file(write(tmp_path / "cub.txt", CUB_LABELS))
    assert cub[0] == ClassInfo(dir="001.Black_footed_Albatross", id=1, name="Black footed Albatross")
    assert [c.id for c in cub] == [1, 2, 3]
    assert [c.name for c in cub] == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    inet = read_label_file(write(tmp_path / "inet.txt", IMAGENET_LABELS))
    assert [(c.dir, c.id, c.name) for c in inet] == [
        ("n02119789", 1, "kit fox"),
        ("n02100735", 2, "English setter"),
        ("n02110185", 3, "Siberian husky"),
    ]


@pytest.mark.parametrize("ending", ["", "\n", "\n\n\n", "\r\n"])
def test_read_label_file_ignores_trailing_newlines(tmp_path: Path, ending: str) -> None:
    lines = IMAGENET_LABELS.strip().split("\n")
    sep = "\r\n" if ending == "\r\n" else "\n"
    classes = read_label_file(write(tmp_path / "l.txt", sep.join(lines) + ending))
    assert [c.dir for c in classes] == ["n02119789", "n02100735", "n02110185"]
    assert classes[-1].name == "Siberian husky"


@pytest.mark.parametrize(
    "bad",
    ["n02100735 English_setter", "n02100735 two English_setter", "n02100735 2 English setter", ""],
)
def test_malformed_label_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path / "label2text.txt", f"n02119789 1 kit_fox\n{bad}\nn02110185 3 Siberian_husky\n")
    with pytest.raises(LabelFileError, match=r"label2text\.txt:2\b"):
        read_label_file(path)


def test_duplicate_class_dir_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "label2text.txt", "n02119789 1 kit_fox\nn02119789 2 kit_fox\n")
    with pytest.raises(LabelFileError, match=r"label2text\.txt:2.*n02119789.*twice"):
        read_label_file(path)


def test_missing_or_empty_label_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LabelFileError, match="does not exist"):
        read_label_file(tmp_path / "nope.txt")
    with pytest.raises(LabelFileError, match="no classes"):
        read_label_file(write(tmp_path / "empty.txt", "\n\n"))


def test_format_label_file_round_trips(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "a.txt", CUB_LABELS))
    assert format_label_file(classes) == CUB_LABELS
    assert read_label_file(write(tmp_path / "b.txt", format_label_file(classes))) == classes


# ====================================================================================== descriptions
def test_chatgpt_txt_is_line_aligned_with_the_label_file(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "label2text.txt", CUB_LABELS))
    described = read_descriptions(write(tmp_path / "chatgpt.txt", CUB_CHATGPT), classes)
    assert [c.dir for c in described] == CUB_DIRS
    assert described[1].description == (
        "The Laysan Albatross has a white head and body with dark grey upper wings and a pink bill."
    )
    assert described[2].description.startswith("The Sooty Albatross")


def test_chatgpt_txt_count_mismatch_names_both_counts(tmp_path: Path) -> None:
    label = write(tmp_path / "label2text.txt", CUB_LABELS)
    classes = read_label_file(label)
    two = "".join(CUB_CHATGPT.splitlines(keepends=True)[:2])
    with pytest.raises(LabelFileError, match=r"2 lines.*3 classes"):
        read_descriptions(write(tmp_path / "chatgpt.txt", two), classes, label)


def test_chatgpt_txt_empty_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "label2text.txt", CUB_LABELS))
    lines = CUB_CHATGPT.splitlines()
    with pytest.raises(LabelFileError, match=r"empty lines at \[2\]"):
        read_descriptions(write(tmp_path / "chatgpt.txt", f"{lines[0]}\n\n{lines[2]}\n"), classes)


def test_json_descriptions_by_folder_or_by_name(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "label2text.txt", CUB_LABELS))
    mapping = {
        "001.Black_footed_Albatross": "by folder",
        "Laysan Albatross": "  by name  ",
        "003.Sooty_Albatross": "folder wins",
        "Sooty Albatross": "name loses",
    }
    described = read_descriptions(write(tmp_path / "d.json", json.dumps(mapping)), classes)
    assert [c.description for c in described] == ["by folder", "by name", "folder wins"]


def test_json_descriptions_missing_classes_are_named(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "label2text.txt", CUB_LABELS))
    path = write(tmp_path / "d.json", json.dumps({"001.Black_footed_Albatross": "x"}))
    with pytest.raises(LabelFileError, match=r"2 classes.*002\.Laysan_Albatross.*003\.Sooty_Albatross"):
        read_descriptions(path, classes)


def test_prompts_plain_and_with_descriptions(tmp_path: Path) -> None:
    classes = read_label_file(write(tmp_path / "label2text.txt", IMAGENET_LABELS))
    space = LabelSpace(tuple(classes[:2]))
    assert space.prompts("a photo of {name}", "a photo of {name} . {description}", False) == [
        "a photo of kit fox",
        "a photo of English setter",
    ]
    with pytest.raises(LabelFileError, match="n02119789"):
        space.prompts("a photo of {name}", "a photo of {name} . {description}", True)
    described = read_descriptions(write(tmp_path / "c.txt", "A small fox.\nA spotted dog.\nA sled dog.\n"), classes)
    space = LabelSpace(tuple(described[:2]))
    assert space.prompts("a photo of {name}", "a photo of {name} . {description}", True) == [
        "a photo of kit fox . A small fox.",
        "a photo of English setter . A spotted dog.",
    ]


# ====================================================================================== prepare: seeded rule
def test_seeded_split_follows_the_paper_rule() -> None:
    sizes = {"a": 1, "b": 3, "c": 10, "d": 7, "e": 6}
    images = {d: [Path(f"/x/{d}/{i:02d}.png") for i in range(n)] for d, n in sizes.items()}
    out = seeded_split(images, seed=3, id_classes=["a", "b", "c", "d"])
    # ceil(0.7 n): 1 -> 1, 3 -> 3 (2.1), 10 -> 7, 7 -> 5 (4.9)
    assert {d: len(out[d]["train"]) for d in "abcd"} == {"a": 1, "b": 3, "c": 7, "d": 5}
    assert {d: len(out[d]["val_on_train"]) for d in "abcd"} == {"a": 0, "b": 0, "c": 3, "d": 2}
    assert out["e"] == {"train": [], "val_on_train": [], "val": images["e"]}
    for d in "abcd":
        assert sorted(out[d]["train"] + out[d]["val_on_train"]) == images[d] and not out[d]["val"]


@pytest.mark.parametrize(("fraction", "n_id"), [(0.5, 3), (0.3, 2), (0.1, 1), (1.0, 5)])
def test_seeded_split_takes_ceil_of_id_fraction_classes(fraction: float, n_id: int) -> None:
    images = {d: [Path(f"/x/{d}/{i}.png") for i in range(4)] for d in "abcde"}
    out = seeded_split(images, seed=0, id_fraction=fraction)
    assert sum(bool(v["train"]) for v in out.values()) == n_id == math.ceil(fraction * 5)


def test_seeded_split_unknown_id_class_is_an_error() -> None:
    with pytest.raises(DatasetError, match="zebra"):
        seeded_split({"a": [Path("/x/a/1.png")]}, seed=0, id_classes=["zebra"])


def _split_classes(out: Path, split: str) -> set[str]:
    return {line.split("/")[1] for line in read_lines(out / f"{split}_data.txt")}


def test_prepare_from_class_folders(tmp_path: Path, raw_images: Path) -> None:
    counts = prepare(tmp_path / "ds", images=raw_images, seed=0)
    # 8 classes x 6 images: ceil(.5 * 8) = 4 ID classes, ceil(.7 * 6) = 5 train + 1 ID-val each, OOD 4 x 6.
    assert counts == {"train": 20, "val_on_train": 4, "val": 24, "id_classes": 4, "ood_classes": 4}
    train, idval, ood = (_split_classes(tmp_path / "ds", s) for s in ("train", "val_on_train", "val"))
    assert idval == train and not train & ood and len(train | ood) == 8
    for line in read_lines(tmp_path / "ds" / "train_data.txt"):
        cls, name = line.split("/")[1:]
        assert (tmp_path / "ds" / line).resolve() == (raw_images / cls / name).resolve()
    ds = open_dataset(tmp_path / "ds")
    assert (len(ds.train), len(ds.id_val), len(ds.ood_val)) == (20, 4, 24)
    assert len(ds.id_space) == 4 and len(ds.ood_space) == 4
    assert set(ds.id_space.dirs) == train and set(ds.ood_space.dirs) == ood
    assert "red circle" in {c.name for c in ds.classes}  # folder underscores become spaces
    # labels index the split's own label space
    for split in (ds.train, ds.id_val, ds.ood_val):
        assert [split.space.dirs[y] for y in split.labels] == [r.class_dir for r in split.records]


def test_prepare_is_deterministic_per_seed_and_differs_across_seeds(tmp_path: Path, raw_images: Path) -> None:
    def lists(seed: int, name: str) -> tuple[list[str], ...]:
        prepare(tmp_path / name, images=raw_images, seed=seed)
        return tuple(read_lines(tmp_path / name / f"{s}_data.txt") for s in ("train", "val_on_train", "val"))

    a, b, c = lists(0, "a"), lists(0, "b"), lists(1, "c")
    assert a == b
    assert a != c


def test_prepare_id_fraction_and_explicit_id_classes(tmp_path: Path, raw_images: Path) -> None:
    counts = prepare(tmp_path / "f", images=raw_images, seed=0, id_fraction=0.3)
    assert counts["id_classes"] == 3 and counts["ood_classes"] == 5  # ceil(2.4) = 3
    prepare(tmp_path / "g", images=raw_images, id_classes=["red_circle", "blue_square"])
    assert _split_classes(tmp_path / "g", "train") == {"red_circle", "blue_square"}
    assert len(_split_classes(tmp_path / "g", "val")) == 6


# ====================================================================================== prepare: list files
LIST_LINES = {
    "train": ["train/001.Black_footed_Albatross/img_0001.png", "train/001.Black_footed_Albatross/img_0002.png"],
    "val_on_train": ["val_on_train/001.Black_footed_Albatross/img_0003.png"],
    "val": ["val/002.Laysan_Albatross/img_0101.png", "val/003.Sooty_Albatross/img_0201.png"],
}


def _lists_dir(root: Path, with_text: bool = True) -> Path:
    lists = root / "lists"
    for split, lines in LIST_LINES.items():
        write(lists / f"{split}_data.txt", "".join(f"{x}\n" for x in lines))
    if with_text:
        write(lists / "label2text.txt", CUB_LABELS)
        write(lists / "chatgpt.txt", CUB_CHATGPT)
    return lists


def _raw_tree(root: Path, layout: str) -> dict[str, Path]:
    """Where each list line's image lives in the raw tree of one layout; colours tell files apart."""
    where = {}
    for k, line in enumerate(line for lines in LIST_LINES.values() for line in lines):
        _, cls, name = line.split("/")
        rel = {"split": line, "class": f"{cls}/{name}", "flat": name}[layout]
        where[line] = png(root / "raw" / rel, colour=(10 * k, 0, 0))
    return where


@pytest.mark.parametrize("layout", ["split", "class", "flat"])
def test_prepare_from_paper_lists_in_three_raw_layouts(tmp_path: Path, layout: str) -> None:
    where = _raw_tree(tmp_path, layout)
    counts = prepare(tmp_path / "ds", lists=_lists_dir(tmp_path), images=tmp_path / "raw")
    assert counts == {"train": 2, "val_on_train": 1, "val": 2, "id_classes": 1, "ood_classes": 2}
    for split, lines in LIST_LINES.items():
        assert read_lines(tmp_path / "ds" / f"{split}_data.txt") == lines  # the paper's split, exactly
        for line in lines:
            assert (tmp_path / "ds" / line).resolve() == where[line].resolve()
    ds = open_dataset(tmp_path / "ds")
    assert (len(ds.train), len(ds.id_val), len(ds.ood_val)) == (2, 1, 2)
    assert ds.id_space.names == ["Black footed Albatross"]
    assert ds.ood_space.dirs == ["002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert ds.ood_space.classes[1].description.startswith("The Sooty Albatross")
    assert ds.ood_val.labels == [0, 1]


def test_prepare_from_lists_missing_image_is_named(tmp_path: Path) -> None:
    where = _raw_tree(tmp_path, "class")
    where["val/003.Sooty_Albatross/img_0201.png"].unlink()
    with pytest.raises(DatasetError, match=r"img_0201\.png"):
        prepare(tmp_path / "ds", lists=_lists_dir(tmp_path), images=tmp_path / "raw")


# ====================================================================================== prepare: CSV
def _csv_images(root: Path) -> list[str]:
    rels = []
    for label, n in (("Black footed Albatross", 4), ("Laysan Albatross", 3), ("kit fox", 2)):
        for i in range(n):
            rel = f"imgs/{label.split()[0].lower()}_{i}.png"
            png(root / rel)
            rels.append(f"{rel},{label}")
    return rels


def test_prepare_from_csv_path_label_uses_the_seeded_rule(tmp_path: Path) -> None:
    rows = _csv_images(tmp_path)
    csv_path = write(tmp_path / "data.csv", "path,label\n" + "\n".join(rows) + "\n")
    counts = prepare(tmp_path / "ds", csv_path=csv_path, seed=0, id_classes=["Black_footed_Albatross"])
    # ID class of 4 images: ceil(2.8) = 3 train, 1 ID-val; the other 5 images are OOD.
    assert counts == {"train": 3, "val_on_train": 1, "val": 5, "id_classes": 1, "ood_classes": 2}
    ds = open_dataset(tmp_path / "ds")
    assert ds.id_space.names == ["Black footed Albatross"]
    assert sorted(ds.ood_space.names) == ["Laysan Albatross", "kit fox"]
    assert (len(ds.train), len(ds.id_val), len(ds.ood_val)) == (3, 1, 5)


def test_prepare_from_csv_with_split_column_keeps_the_given_split(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    png(tmp_path / "sub" / "c.png")
    png(tmp_path / "d.png")
    text = "path,label,split\na.png,cat,train\nb.png,cat,val_on_train\nsub/c.png,cat,train\nd.png,dog,val\n"
    counts = prepare(tmp_path / "ds", csv_path=write(tmp_path / "x.csv", text))
    assert counts == {"train": 2, "val_on_train": 1, "val": 1, "id_classes": 1, "ood_classes": 1}
    assert read_lines(tmp_path / "ds" / "train_data.txt") == ["train/cat/a.png", "train/cat/c.png"]
    assert read_lines(tmp_path / "ds" / "val_data.txt") == ["val/dog/d.png"]
    assert (tmp_path / "ds" / "train/cat/c.png").resolve() == (tmp_path / "sub" / "c.png").resolve()
    ds = open_dataset(tmp_path / "ds")
    assert (len(ds.train), len(ds.id_val), len(ds.ood_val)) == (2, 1, 1)


def test_prepare_from_csv_bad_rows(tmp_path: Path) -> None:
    png(tmp_path / "x.png")
    png(tmp_path / "y.png")
    with pytest.raises(DatasetError, match="path,label"):
        prepare(tmp_path / "o1", csv_path=write(tmp_path / "a.csv", "file,class\nx.png,cat\n"))
    with pytest.raises(DatasetError, match=r"b\.csv:3.*'test'"):
        prepare(tmp_path / "o2", csv_path=write(tmp_path / "b.csv", "path,label,split\nx.png,c,train\ny.png,c,test\n"))
    with pytest.raises(DatasetError, match="every row or for none"):
        prepare(tmp_path / "o3", csv_path=write(tmp_path / "c.csv", "path,label,split\nx.png,c,train\ny.png,c,\n"))


def test_prepare_from_csv_missing_image_is_an_error_naming_it(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    text = "path,label\na.png,cat\nb.png,cat\nnope.png,dog\n"
    with pytest.raises(DatasetError, match=r"nope\.png"):
        prepare(tmp_path / "ds", csv_path=write(tmp_path / "x.csv", text))


# ====================================================================================== bad input
def test_prepare_with_label_file_missing_a_class_folder_names_it(tmp_path: Path) -> None:
    for cls in CUB_DIRS:
        png(tmp_path / "raw" / cls / "1.png")
    png(tmp_path / "raw" / "004.Groove_billed_Ani" / "1.png")
    labels = write(tmp_path / "label2text.txt", CUB_LABELS)
    with pytest.raises(DatasetError, match=r"004\.Groove_billed_Ani"):
        prepare(tmp_path / "ds", images=tmp_path / "raw", labels=labels)


def test_open_dataset_class_folder_not_in_label_file_is_named(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write(root / "label2text.txt", CUB_LABELS)
    png(root / "train" / "001.Black_footed_Albatross" / "a.png")
    png(root / "val" / "002.Laysan_Albatross" / "b.png")
    png(root / "val" / "999.Mystery_Bird" / "c.png")
    with pytest.raises(DatasetError, match=r"999\.Mystery_Bird.*label2text\.txt"):
        open_dataset(root)


def test_open_dataset_scans_split_folders_without_list_files(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    png(root / "train" / "cat" / "a.png")
    png(root / "train" / "cat" / "b.jpg")
    png(root / "val_on_train" / "cat" / "c.png")
    png(root / "val" / "dog" / "d.png")
    write(root / "train" / "cat" / "notes.txt", "not an image")
    ds = open_dataset(root)
    assert [r.key for r in ds.train.records] == ["train/cat/a.png", "train/cat/b.jpg"]
    assert (len(ds.id_val), len(ds.ood_val)) == (1, 1)


def test_empty_class_folder_is_a_clear_error(tmp_path: Path) -> None:
    png(tmp_path / "raw" / "cat" / "a.png")
    (tmp_path / "raw" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"\['dog'\].*no images"):
        from_folders(tmp_path / "raw")
    root = tmp_path / "ds"
    png(root / "train" / "cat" / "a.png")
    png(root / "val" / "dog" / "d.png")
    (root / "val" / "fish").mkdir()
    with pytest.raises(DatasetError, match=r"val/fish.*no images"):
        open_dataset(root)


def test_open_dataset_missing_listed_image(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "raw", per_class=2)
    prepare(tmp_path / "ds", images=tmp_path / "raw", seed=0)
    gone = read_lines(tmp_path / "ds" / "val_data.txt")[0]
    (tmp_path / "ds" / gone).unlink()
    with pytest.raises(DatasetError, match=rf"1 images.*{re.escape(gone)}.*skip_bad_images"):
        open_dataset(tmp_path / "ds")
    ds = open_dataset(tmp_path / "ds", skip_missing=True)
    assert ds.missing == [gone]
    assert gone not in [r.key for r in ds.ood_val.records]
    assert len(ds.ood_val) == 7 and len(ds.train) == 8  # 4 OOD classes x 2 - 1; 4 ID classes x ceil(1.4)


def test_open_dataset_without_train_split_or_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    png(tmp_path / "ds" / "val" / "dog" / "d.png")
    with pytest.raises(DatasetError, match="no 'train' split"):
        open_dataset(tmp_path / "ds")


# ====================================================================================== images
@pytest.fixture
def corrupt_png(tmp_path: Path) -> Path:
    path = tmp_path / "imgs" / "broken.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return path


def test_load_image_corrupt_file_raises_bad_image_error(corrupt_png: Path) -> None:
    with pytest.raises(BadImageError) as info:
        load_image(corrupt_png, 16, "squash")
    assert str(corrupt_png) in str(info.value) and "data.skip_bad_images" in str(info.value)
    assert info.value.path == corrupt_png
    with pytest.raises(BadImageError, match="not found"):
        load_image(corrupt_png.with_name("absent.png"), 16, "squash")


def test_load_image_geometry_squash_vs_center_crop(tmp_path: Path) -> None:
    # 40 x 20 image: left quarter red, middle half green, right quarter blue.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:30] = (0, 255, 0)
    arr[:, 30:] = (0, 0, 255)
    path = tmp_path / "wide.png"
    Image.fromarray(arr).save(path)
    crop = load_image(path, 20, "center_crop")
    assert crop.dtype == torch.uint8 and crop.shape == (3, 20, 20)
    assert (crop[1] == 255).all() and (crop[0] == 0).all()  # only the green middle survives
    squash = load_image(path, 20, "squash")
    assert squash.shape == (3, 20, 20)
    assert squash[0, :, 0].min() > 200 and squash[2, :, -1].min() > 200  # red and blue edges are kept


def _records(tmp_path: Path, corrupt: Path) -> list:
    from vlmdistill.data.dataset import Record

    good = [png(tmp_path / "imgs" / f"g{i}.png", colour=(i * 40, 0, 0)) for i in range(3)]
    paths = [good[0], corrupt, good[1], good[2]]
    return [Record(path=p, class_dir="c", key=f"train/c/{p.name}") for p in paths]


@pytest.mark.parametrize("preload", [False, True])
def test_image_source_skip_bad_drops_and_reports(tmp_path: Path, corrupt_png: Path, preload: bool) -> None:
    source = ImageSource(_records(tmp_path, corrupt_png), base_size=8, resize="squash", skip_bad=True, preload=preload)
    batches = list(source.batches(torch.arange(4), batch_size=2))
    assert [b.index.tolist() for b in batches] == [[0], [2, 3]]
    assert [int(b.images[0, 0, 0, 0]) for b in batches] == [0, 40]  # the right pixels came with each index
    assert source.bad_keys == ["train/c/broken.png"]


def test_image_source_without_skip_bad_raises(tmp_path: Path, corrupt_png: Path) -> None:
    source = ImageSource(_records(tmp_path, corrupt_png), base_size=8, resize="squash")
    with pytest.raises(BadImageError, match=r"broken\.png"):
        list(source.batches(torch.arange(4), batch_size=2))
