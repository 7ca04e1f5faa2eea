"""Multi-label CSV lists: header optional, paths relative to the CSV, and errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmdistill.multilabel.csvsource import MultiLabelCsvError, read_multilabel_csv
from vlmdistill.multilabel.labels import UnknownLabelError, multi_hot


def _files(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"not read here")


def test_reads_rows_with_header_and_splits(tmp_path: Path) -> None:
    _files(tmp_path, "img/a.png", "img/b.png")
    csv = tmp_path / "scenes.csv"
    csv.write_text("path,labels,split\nimg/a.png,banana; apple ;banana,train\n\nimg/b.png,\"power drill\",val\n")
    out = read_multilabel_csv(csv)
    assert [(r.path, r.labels, r.split, r.line) for r in out.records] == [
        (tmp_path / "img/a.png", ("banana", "apple"), "train", 2),
        (tmp_path / "img/b.png", ("power drill",), "val", 4),
    ]
    assert out.vocabulary == ("apple", "banana", "power drill")
    assert multi_hot([r.labels for r in out.records], out.vocabulary).tolist() == [[1, 1, 0], [0, 0, 1]]


def test_no_header_no_split(tmp_path: Path) -> None:
    _files(tmp_path, "a.png")
    csv = tmp_path / "s.csv"
    csv.write_text(f"{tmp_path / 'a.png'},dice\n")
    out = read_multilabel_csv(csv)
    assert out.records[0].split is None and out.vocabulary == ("dice",)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a.png,,train", "empty label"),
        ("a.png,apple;;pear,train", "empty label"),
        ("a.png,apple,test", "unknown split 'test'"),
        ("gone.png,apple,train", "gone.png not found"),
        ("a.png", "got 1 fields"),
        (",apple", "empty image path"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    _files(tmp_path, "a.png")
    csv = tmp_path / "bad.csv"
    csv.write_text(f"path,labels,split\na.png,apple,train\n{row}\n")
    with pytest.raises(MultiLabelCsvError, match=message) as err:
        read_multilabel_csv(csv)
    assert f"{csv}, line 3" in str(err.value)


def test_missing_images_skipped_and_counted(tmp_path: Path) -> None:
    _files(tmp_path, "a.png")
    csv = tmp_path / "s.csv"
    csv.write_text("a.png,apple\ngone.png,pear\n")
    out = read_multilabel_csv(csv, skip_missing=True)
    assert [r.labels for r in out.records] == [("apple",)]
    assert out.missing == (tmp_path / "gone.png",)
    assert out.vocabulary == ("apple",)  # the vocabulary is of the images kept


def test_empty_or_absent_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("path,labels\n")
    with pytest.raises(MultiLabelCsvError, match="no rows"):
        read_multilabel_csv(tmp_path / "empty.csv")
    with pytest.raises(MultiLabelCsvError, match="cannot read"):
        read_multilabel_csv(tmp_path / "absent.csv")


def test_multi_hot_unknown_label() -> None:
    with pytest.raises(UnknownLabelError, match="'pear'"):
        multi_hot([("apple",), ("pear",)], ["apple"])
