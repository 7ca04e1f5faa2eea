"""The bad-input corpus (issue 13): each file is built here, and each must give a right answer or a
one-line ``VlmdistillError`` naming the file, never a traceback, a silently wrong tensor or a half-written folder.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_class_folders
from vlmdistill.data import prepare as prepare_mod
from vlmdistill.data.dataset import DatasetError, Record, open_dataset
from vlmdistill.data.images import BadImageError, load_image
from vlmdistill.data.prepare import prepare
from vlmdistill.data.source import ImageSource
from vlmdistill.io import sha256_strings
from vlmdistill.text.labels import LabelFileError, LabelSpace, read_descriptions, read_label_file


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-pixel-of-data PNG whose header claims side x side pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = _png_chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
    body = _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# ============================================================================== 4: bit depths
def test_16_bit_png_mid_grey_stays_mid_grey(tmp_path: Path) -> None:
    arr = np.full((16, 16), 32768, dtype=np.uint16)
    arr[:, :4] = 65535
    arr[:, 12:] = 0
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    out = load_image(path, 16, "squash")
    assert out.shape == (3, 16, 16)
    assert int(out[0, 8, 8]) == 128 and int(out[1, 8, 8]) == 128  # not clipped to 255
    assert int(out[0, 8, 0]) == 255 and int(out[0, 8, 15]) == 0


def test_float_image_in_unit_range_is_scaled(tmp_path: Path) -> None:
    arr = np.full((16, 16), 0.5, dtype=np.float32)
    arr[:, :4] = 1.0
    path = tmp_path / "grey.tiff"
    Image.fromarray(arr, mode="F").save(path)
    out = load_image(path, 16, "squash")
    assert int(out[2, 8, 8]) == 128 and int(out[2, 8, 0]) == 255


# (200, 100, 50) as each mode stores it: P snaps to the web palette, L keeps the ITU-R 601 luma 124, CMYK JPEG
# is lossy (within 3 levels).
@pytest.mark.parametrize(("mode", "rgb", "tolerance"), [
    ("P", (204, 102, 51), 0), ("LA", (124, 124, 124), 0), ("CMYK", (200, 100, 50), 3), ("L", (124, 124, 124), 0),
    ("RGBA", (200, 100, 50), 0)])
def test_other_modes_decode_to_their_colour_in_rgb(tmp_path: Path, mode: str, rgb: tuple[int, int, int],
                                                   tolerance: int) -> None:
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode, dither=Image.Dither.NONE).save(path)
    out = load_image(path, 8, "squash")
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    assert (out.int() - torch.tensor(rgb).view(3, 1, 1)).abs().max() <= tolerance


# ============================================================================== 7: decompression bomb
def test_decompression_bomb_is_a_bad_image(tmp_path: Path) -> None:
    path = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(BadImageError, match=r"bomb\.png.*pixels"):
        load_image(path, 16, "squash")


def test_decompression_bomb_is_skipped_with_skip_bad_images(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good)
    records = [Record(p, "c", f"train/c/{p.name}") for p in (good, bomb_png(tmp_path / "bomb.png"))]
    source = ImageSource(records, base_size=8, resize="squash", skip_bad=True)
    batches = list(source.batches(torch.arange(2), batch_size=2))
    assert [b.index.tolist() for b in batches] == [[0]] and source.bad_keys == ["train/c/bomb.png"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_over_the_pixel_limit_warning_zone_is_a_bad_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 900 pixels: over the limit, under twice it
    with pytest.raises(BadImageError, match=r"big\.png"):
        load_image(path, 8, "squash")


# ============================================================================== 8: names and encodings
def _raw_with_latin1_name(root: Path) -> bytes:
    make_class_folders(root, per_class=4)
    name = os.fsencode(root / "red_circle") + b"/caf\xe9.png"
    Image.new("RGB", (40, 40), (220, 40, 40)).save(os.fsdecode(name))
    return name


def test_prepare_and_fingerprint_work_with_non_utf8_file_names(tmp_path: Path) -> None:
    _raw_with_latin1_name(tmp_path / "raw")
    prepare(tmp_path / "ds", images=tmp_path / "raw", seed=0, id_classes=["red_circle", "blue_square"])
    ds = open_dataset(tmp_path / "ds")
    keys = [r.key for r in ds.train.records + ds.id_val.records]
    odd = [k for k in keys if "caf" in k]
    assert len(odd) == 1 and os.fsencode(odd[0]).endswith(b"caf\xe9.png")
    record = next(r for r in ds.train.records + ds.id_val.records if r.key == odd[0])
    assert load_image(record.path, 8, "squash").shape == (3, 8, 8)
    assert len(sha256_strings(keys)) == 64


def test_prepare_refuses_a_non_utf8_class_folder_by_name(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "raw", per_class=2)
    bad = os.fsdecode(os.fsencode(tmp_path / "raw") + b"/gr\xfcn")
    os.makedirs(bad)
    Image.new("RGB", (8, 8)).save(os.path.join(bad, "a.png"))
    with pytest.raises(DatasetError, match=r"gr\\xfcn.*UTF-8"):
        prepare(tmp_path / "ds", images=tmp_path / "raw", seed=0)
    assert not (tmp_path / "ds").exists()


def test_label_file_with_a_latin1_byte_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "label2text.txt"
    path.write_bytes(b"a 1 cat\nb 2 caf\xe9\n")
    with pytest.raises(LabelFileError, match=r"label2text\.txt:2: .*UTF-8"):
        read_label_file(path)
    desc = tmp_path / "chatgpt.txt"
    desc.write_bytes(b"a cat\na caf\xe9\n")
    classes = read_label_file(_ok_labels(tmp_path))
    with pytest.raises(LabelFileError, match=r"chatgpt\.txt:2: .*UTF-8"):
        read_descriptions(desc, classes)


def _ok_labels(tmp_path: Path) -> Path:
    path = tmp_path / "ok.txt"
    path.write_text("a 1 cat\nb 2 cafe\n")
    return path


@pytest.mark.parametrize("digit", ["\u0663", "\u00b2", "\u2460"])
def test_label_file_with_a_non_ascii_digit_is_a_clear_error(tmp_path: Path, digit: str) -> None:
    path = tmp_path / "label2text.txt"
    path.write_text(f"a 1 cat\nb {digit} dog\n", encoding="utf-8")
    with pytest.raises(LabelFileError, match=r"label2text\.txt:2: expected"):
        read_label_file(path)


# ============================================================================== 8: prepare writes aside
def test_failed_prepare_leaves_the_previous_output_intact(
    tmp_path: Path, raw_images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ds"
    prepare(out, images=raw_images, seed=0)
    before = {p.relative_to(out): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}

    def boom(*args: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod, "format_label_file", boom)
    with pytest.raises(OSError, match="disk full"):
        prepare(out, images=raw_images, seed=1)
    after = {p.relative_to(out): (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp folder left beside it


def test_reprepare_leaves_no_stale_class_folders(tmp_path: Path, raw_images: Path) -> None:
    out = tmp_path / "ds"
    prepare(out, images=raw_images, seed=0)
    small = tmp_path / "small"
    make_class_folders(small, per_class=3)
    for extra in sorted(small.iterdir())[2:]:
        for f in extra.iterdir():
            f.unlink()
        extra.rmdir()
    prepare(out, images=small, seed=0)
    for split in ("train", "val_on_train", "val"):
        listed = (out / f"{split}_data.txt").read_text().split()
        on_disk = sorted(p.relative_to(out).as_posix() for p in (out / split).rglob("*") if p.is_symlink())
        assert sorted(listed) == on_disk
    assert len(list((out / "train").iterdir())) + len(list((out / "val").iterdir())) == 2


def test_prepare_refuses_a_non_empty_folder_it_did_not_make(tmp_path: Path, raw_images: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match=r"mine.*not .*prepare"):
        prepare(out, images=raw_images, seed=0)
    assert (out / "thesis.tex").read_text() == "precious" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize(("kwargs", "split"), [({"id_fraction": 0.0}, "train"), ({"id_fraction": 1.0}, "val")])
def test_prepare_refuses_an_empty_split(tmp_path: Path, raw_images: Path, kwargs: dict, split: str) -> None:
    with pytest.raises(DatasetError, match=f"'{split}' split .*empty"):
        prepare(tmp_path / "ds", images=raw_images, seed=0, **kwargs)
    assert not (tmp_path / "ds").exists()


def test_missing_descriptions_message_names_the_real_data_dir(tmp_path: Path, raw_images: Path) -> None:
    prepare(tmp_path / "birds", images=raw_images, seed=0)
    ds = open_dataset(tmp_path / "birds")
    with pytest.raises(LabelFileError) as info:
        ds.id_space.prompts("a photo of {name}", "{name}. {description}", True)
    assert str(tmp_path / "birds" / "chatgpt.txt") in str(info.value) and "data/chatgpt.txt" not in str(info.value)
    with pytest.raises(LabelFileError, match=r"<data\.dir>/chatgpt\.txt"):
        LabelSpace(ds.id_space.classes).prompts("", "", True)  # a space built by hand has no folder to name


# ============================================================================== 10: paths stay inside the root
def _escaping_dataset(tmp_path: Path, entry: str) -> Path:
    root = tmp_path / "ds"
    for split, cls in (("train", "a"), ("val", "b")):
        (root / split / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / cls / "x.png")
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside" / "x.png")
    (root / "train_data.txt").write_text(f"train/a/x.png\n{entry}\n")
    (root / "val_data.txt").write_text("val/b/x.png\n")
    return root


@pytest.mark.parametrize("entry", ["train/a/../../../outside/x.png", "../etc/passwd", "/etc/passwd"])
def test_list_entries_cannot_escape_the_dataset_root(tmp_path: Path, entry: str) -> None:
    root = _escaping_dataset(tmp_path, entry)
    with pytest.raises(DatasetError, match=r"train_data\.txt:2: .*outside"):
        open_dataset(root)
    with pytest.raises(DatasetError, match=r"train_data\.txt:2: .*outside"):
        open_dataset(root, skip_missing=True)


def test_symlink_out_of_the_root_is_refused_unless_prepare_made_it(tmp_path: Path, raw_images: Path) -> None:
    root = _escaping_dataset(tmp_path, "train/a/y.png")
    (root / "train" / "a" / "y.png").symlink_to(tmp_path / "outside" / "x.png")
    with pytest.raises(DatasetError, match=r"y\.png.*outside"):
        open_dataset(root)
    prepared = tmp_path / "prepared"
    prepare(prepared, images=raw_images, seed=0)
    assert json.loads((prepared / "prepare.json").read_text())["images_root"] == str(raw_images.resolve())
    ds = open_dataset(prepared)
    link = ds.train.records[0].path
    link.unlink()
    link.symlink_to(tmp_path / "outside" / "x.png")
    with pytest.raises(DatasetError, match=f"{link.name}.*outside"):
        open_dataset(prepared)


# ============================================================================== io helpers for other writers
def test_io_writers_for_images_bytes_and_line_logs(tmp_path: Path) -> None:
    from vlmdistill.io import append_line, atomic_save_image, atomic_write_bytes, end_last_line

    atomic_save_image(tmp_path / "a" / "x.png", Image.new("RGB", (4, 4), (1, 2, 3)))
    assert Image.open(tmp_path / "a" / "x.png").format == "PNG"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": ')
    end_last_line(log, lambda line: line.endswith(b"}"))
    append_line(log, '{"c": 3}')
    assert log.read_bytes() == b'{"a": 1}\n{"c": 3}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "log.jsonl"]
