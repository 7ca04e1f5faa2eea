"""Experiment config: YAML + typed ``key=value`` overrides, strict keys, paper mode, saving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vlmdistill.config import ConfigError, ExperimentConfig, load_config, save_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.mode == "ours" and cfg.loss.cls.weight == 1.0 and cfg.loss.temperature == 0.07
    assert cfg.data.augment_per == "image" and cfg.data.resize == "center_crop"


def test_yaml_file_and_typed_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path / "exp.yaml",
        "name: cub\noptim:\n  lr: 0.05\n  epochs: 90\ndata:\n  dir: data/cub\nloss:\n  mse:\n    weight: 1\n",
    )
    cfg = load_config(
        path,
        [
            "optim.lr=0.01",
            "data.crop_scale=[0.2,1.0]",
            "data.hflip=false",
            "train.amp=true",
            "optim.milestones=[30, 60]",
            "loss.vlalign.k=16",
            "teacher.pretrained=null",
            "optim.grad_clip=1e-1",
        ],
    )
    assert cfg.name == "cub" and cfg.optim.epochs == 90  # from the file
    assert cfg.data.dir == Path("data/cub") and cfg.loss.mse.weight == 1.0
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)  # override wins over the file
    assert cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.data.hflip is False and cfg.train.amp is True
    assert cfg.optim.milestones == (30.0, 60.0)
    assert cfg.loss.vlalign.k == 16 and isinstance(cfg.loss.vlalign.k, int)
    assert cfg.teacher.pretrained is None
    assert cfg.optim.grad_clip == pytest.approx(0.1)


def test_override_value_may_contain_equals_and_creates_sections() -> None:
    cfg = load_config(None, ["text.template=a photo of {name}, x=y", "loss.kd.weight=0.5"])
    assert cfg.text.template == "a photo of {name}, x=y"
    assert cfg.loss.kd.weight == 0.5


@pytest.mark.parametrize(
    ("key", "named"),
    [("optim.lrr", "optim.lrr"), ("loss.vlalign.topk", "loss.vlalign.topk"), ("foo", "foo"), ("dat.dir", "dat")],
)
def test_unknown_keys_are_rejected_naming_the_key(key: str, named: str) -> None:
    with pytest.raises(ConfigError, match=rf"\n  {re.escape(named)}: Extra inputs are not permitted"):
        load_config(None, [f"{key}=1"])


def test_unknown_key_in_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "optim.learning_rate" in str(info.value)


def test_bad_values_are_rejected_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.resize"):
        load_config(None, ["data.resize=stretch"])
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["optim.lr=fast"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.epochs=0", r"optim\.epochs must be >= 1, got 0"),
        ("optim.repeat_epochs=0", r"optim\.repeat_epochs must be >= 1"),
        ("optim.lr=-1", r"optim\.lr must be > 0"),
        ("optim.batch_size=0", r"optim\.batch_size must be >= 1"),
        ("optim.eval_batch_size=0", r"optim\.eval_batch_size must be >= 1"),
        ("teacher.batch_size=0", r"teacher\.batch_size must be >= 1"),
        ("train.eval_every=0", r"train\.eval_every must be >= 1"),
        ("train.checkpoint_every=0", r"train\.checkpoint_every must be >= 1"),
        ("train.log_every=0", r"train\.log_every must be >= 1"),
        ("train.target_views=-1", r"train\.target_views must be >= 0"),
        ("data.eval_crop=0", r"data\.eval_crop must be > 0"),
        ("data.eval_crop=1.5", r"data\.eval_crop must be <= 1"),
        ("data.crop_scale=[0.9,0.2]", r"data\.crop_scale: .*min <= max"),
        ("data.crop_scale=[0,1]", r"data\.crop_scale\.0 must be > 0"),
        ("loss.temperature=0", r"loss\.temperature must be > 0"),
        ("loss.mse.weight=-1", r"loss\.mse\.weight must be >= 0"),
        ("fewshot.shots=0", r"fewshot\.shots must be >= 1"),
        ("student.image_size=4", r"student\.image_size must be >= 8"),
    ],
)
def test_numbers_out_of_range_name_the_key_and_the_range(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(None, [override])


def test_malformed_override_and_non_section() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(None, ["name=a", "name.x=1"])


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "exp.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "a.yaml", "optim: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "b.yaml", "- 1\n- 2\n"))


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path / "e.yaml", "")) == load_config(None)


def test_paper_mode_sets_the_official_data_handling(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "p.yaml", "mode: paper\n"))
    assert cfg.data.augment_per == "batch"
    assert cfg.train.teacher_view == "whole"
    assert cfg.data.resize == "squash"
    assert cfg.fewshot.selection == "first" and cfg.fewshot.keys == "teacher"
    # also when paper mode comes from an override
    cfg = load_config(None, ["mode=paper"])
    assert (cfg.data.augment_per, cfg.train.teacher_view, cfg.data.resize) == ("batch", "whole", "squash")


def test_paper_mode_keeps_explicit_values(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", "mode: paper\ndata:\n  resize: center_crop\n  dir: d\n")
    cfg = load_config(path, ["train.teacher_view=same"])
    assert cfg.data.resize == "center_crop" and cfg.train.teacher_view == "same"
    assert cfg.data.augment_per == "batch"  # not given: the paper default still applies
    assert cfg.data.dir == Path("d")


def test_ours_mode_is_untouched_by_paper_defaults() -> None:
    cfg = load_config(None, ["mode=ours"])
    assert (cfg.data.augment_per, cfg.train.teacher_view, cfg.data.resize) == ("image", "same", "center_crop")


def test_all_loss_weights_zero_is_rejected() -> None:
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        load_config(None, ["loss.cls.weight=0"])
    # the closed-set baseline has no weighted terms and is fine
    assert load_config(None, ["loss.cls.weight=0", "loss.closed_set=true"]).loss.closed_set is True
    # any single enabled term is enough
    assert load_config(None, ["loss.cls.weight=0", "loss.imcst.weight=1"]).loss.imcst.weight == 1.0


def test_vlalign_k_below_one_is_rejected_when_enabled() -> None:
    with pytest.raises(ConfigError, match=r"k must be >= 1"):
        load_config(None, ["loss.vlalign.weight=1", "loss.vlalign.k=0"])


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "mode=paper",
            "name=cub_best",
            "optim.lr=0.01",
            "data.crop_scale=[0.2,1.0]",
            "data.dir=data/cub",
            "teacher.model_config=configs/tiny.json",
            "loss.mse.weight=1",
            "loss.vlalign.weight=1",
            "fewshot.methods=[retrieval]",
        ],
    )
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    save_config(cfg, path)
    raw = yaml.safe_load(path.read_text())
    assert raw["teacher"]["model_config"] == "configs/tiny.json"  # written under its file name (alias)
    assert raw["data"]["crop_scale"] == [0.2, 1.0]
    again = load_config(path)
    assert again == cfg
    assert again.teacher.model_config_path == Path("configs/tiny.json")
    assert again.optim.milestones == pytest.approx((1 / 3, 2 / 3))


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from vlmdistill.io import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "a.txt").st_mode & 0o777 == 0o666 & ~mask
