"""A teacher ensemble (``teacher:`` as a list): mean image targets, the first teacher's text space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_OPEN_CLIP
from vlmdistill.config import ConfigError, load_config, validate_config
from vlmdistill.targets.lookup import open_targets
from vlmdistill.teachers.ensemble import load_teachers, text_teacher_id
from vlmdistill.workspace import build_workspace, class_text_embeddings


def _tiny_teacher(folder: Path, name: str, seed: int, embed_dim: int = 32) -> dict[str, str]:
    """A tiny random open_clip teacher saved from ``seed`` (model config + checkpoint), as config keys."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps({**TINY_OPEN_CLIP, "embed_dim": embed_dim}))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    ckpt = folder / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), ckpt)
    return {"model_config": str(cfg_path), "checkpoint": str(ckpt), "device": "cpu", "batch_size": 16}


def _without_teacher(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("teacher.")]


def test_ensemble_targets_are_the_mean_of_the_normalised_single_targets(base_overrides: list[str],
                                                                        tmp_path: Path) -> None:
    one, two = _tiny_teacher(tmp_path, "tiny-a", 1), _tiny_teacher(tmp_path, "tiny-b", 2)
    common = [*_without_teacher(base_overrides), "train.target_views=2"]
    ens = validate_config({"teacher": [one, two]}, common, "test")
    assert ens.teacher.checkpoint == Path(one["checkpoint"]) and len(ens.extra_teachers) == 1
    singles = [validate_config({"teacher": t}, common, "test") for t in (one, two)]
    stores = []
    for cfg in [*singles, ens]:
        ws = build_workspace(cfg)
        stores.append(open_targets(cfg, ws.teacher, ws.train, needed=True).store)
    ids = [s.key["teacher_id"] for s in stores]
    assert ids[2] == f"ensemble:{ids[0]}+{ids[1]}" and text_teacher_id(ids[2]) == ids[0]  # the key names both
    assert torch.equal(stores[0].boxes, stores[2].boxes)  # the same stored views
    mean = (F.normalize(stores[0].feats.float(), dim=-1) + F.normalize(stores[1].feats.float(), dim=-1)) / 2
    torch.testing.assert_close(stores[2].feats.float(), mean, atol=2e-3, rtol=0)  # fp16 storage
    assert not torch.allclose(mean, F.normalize(stores[0].feats.float(), dim=-1), atol=0.05)


def test_ensemble_classifies_in_the_first_teachers_text_space(base_overrides: list[str], tmp_path: Path) -> None:
    one, two = _tiny_teacher(tmp_path, "tiny-c", 3), _tiny_teacher(tmp_path, "tiny-d", 4)
    common = _without_teacher(base_overrides)
    ens = validate_config({"teacher": [one, two]}, common, "test")
    first = validate_config({"teacher": one}, common, "test")
    pairs = zip(class_text_embeddings(ens, build_workspace(ens)), class_text_embeddings(first, build_workspace(first)),
                strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_teachers_of_different_embed_dim_are_a_config_error(tmp_path: Path) -> None:
    one, other = _tiny_teacher(tmp_path, "tiny-e", 5), _tiny_teacher(tmp_path, "tiny-f", 6, embed_dim=16)
    cfg = validate_config({"teacher": [one, other]}, [], "test")
    with pytest.raises(ConfigError, match="must share embed_dim"):
        load_teachers(cfg.teachers)


def test_teacher_list_config_round_trips_and_refuses_both_forms(tmp_path: Path) -> None:
    from vlmdistill.config import save_config

    cfg = validate_config({"teacher": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, [], "test")
    assert [t.name for t in cfg.teachers] == ["a", "b", "c"]
    save_config(cfg, tmp_path / "c.yaml")
    assert [t.name for t in load_config(tmp_path / "c.yaml").teachers] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="not both"):
        validate_config({"teacher": [{"name": "a"}], "extra_teachers": [{"name": "b"}]}, [], "test")
    with pytest.raises(ConfigError, match="empty list"):
        validate_config({"teacher": []}, [], "test")
