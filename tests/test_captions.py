"""L_cap: per-image captions read from JSONL/CSV, matched to training images, and the masked loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlmdistill.config import load_config
from vlmdistill.data.captions import captions_for, read_captions
from vlmdistill.data.dataset import open_dataset
from vlmdistill.losses import CaptionLoss, LossInputs
from vlmdistill.text.labels import LabelFileError
from vlmdistill.train import distill


def test_caption_loss_masks_same_class_captions() -> None:
    # s_i . c_j with 2-D unit vectors; images 0 and 1 share class 0, so for image 0 caption 1 is masked.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    c = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    a = [[0.8, 1.0, 0.0], [0.6, 0.0, 1.0], [0.96, 0.6, 0.8]]
    row0 = -a[0][0] + math.log(math.exp(a[0][0]) + math.exp(a[0][2]))
    row1 = -a[1][1] + math.log(math.exp(a[1][1]) + math.exp(a[1][2]))
    row2 = -a[2][2] + math.log(sum(math.exp(v) for v in a[2]))
    got = CaptionLoss(temperature=1.0)(LossInputs(s=s, y=y, c=c))
    assert got.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    halved = CaptionLoss(temperature=0.5)(LossInputs(s=s, y=y, c=c))
    assert halved.item() != pytest.approx(got.item())


def test_read_and_match_captions(prepared: Path, tmp_path: Path) -> None:
    ds = open_dataset(prepared)
    records = ds.train.records
    jsonl = tmp_path / "caps.jsonl"
    lines = [{"path": r.key, "caption": f"caption {i}"} for i, r in enumerate(records[:-1])]
    lines.append({"path": records[-1].path.name, "caption": "by file name"})
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = captions_for(records, read_captions(jsonl), jsonl)
    assert got[0] == "caption 0" and got[-1] == "by file name"
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text("path,caption\n" + "".join(f"{r.key},cap {i}\n" for i, r in enumerate(records[1:])))
    with pytest.raises(LabelFileError, match="1 training images have no caption"):
        captions_for(records, read_captions(csv_path), csv_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "x.png"}\n')
    with pytest.raises(LabelFileError, match=r"bad\.jsonl:1"):
        read_captions(bad)


def test_training_with_captions(prepared: Path, base_overrides: list[str], tmp_path: Path) -> None:
    ds = open_dataset(prepared)
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"path": r.key, "caption": f"a {r.class_dir} thing"}) + "\n"
                            for r in ds.train.records))
    cfg = load_config(None, [*base_overrides, "name=cap", "loss.cap.weight=1", f"text.captions={caps}",
                             "optim.epochs=1", "train.analysis=false", "train.log_every=1"])
    res = distill(cfg)
    assert res["complete"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"))
    acc.Reload()
    assert "train/cap" in acc.Tags()["scalars"]


def test_cap_weight_without_captions_is_rejected(base_overrides: list[str]) -> None:
    from vlmdistill.config import ConfigError

    with pytest.raises(ConfigError, match=r"text\.captions"):
        load_config(None, [*base_overrides, "loss.cap.weight=1"])
