"""configs/paper/robotics.yaml: it says what paper_spec §8 says, its prepare command makes the 14/12 object
split on a PickClutter-layout h5 file, and it runs one step there (a tiny random teacher swapped in)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import h5py
import numpy as np
from typer.testing import CliRunner

from vlmdistill.cli import app
from vlmdistill.config import load_config
from vlmdistill.data.multilabel_set import open_multilabel
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import distill

PRESET = Path(__file__).resolve().parents[1] / "configs" / "paper" / "robotics.yaml"
# paper_spec.md §8, from the official code
ID = ["002_master_chef_can", "006_mustard_bottle", "011_banana", "013_apple", "015_peach", "024_bowl", "030_fork",
      "032_knife", "035_power_drill", "037_scissors", "048_hammer", "056_tennis_ball", "058_golf_ball", "062_dice"]
OOD = ["003_cracker_box", "012_strawberry", "014_lemon", "016_pear", "017_orange", "021_bleach_cleanser",
       "026_sponge", "031_spoon", "036_wood_block", "043_phillips_screwdriver", "053_mini_soccer_ball",
       "077_rubiks_cube"]


def test_preset_says_what_the_paper_says() -> None:
    cfg = load_config(PRESET)
    assert (cfg.student.arch, cfg.student.pretrained, cfg.student.image_size) == ("efficientnet_b0", False, 224)
    assert (cfg.teacher.name, cfg.teacher.pretrained) == ("ViT-L-14", "openai")
    assert cfg.data.cameras == ("base", "hand") and cfg.data.channels == ("rgb", "depth")
    assert cfg.data.teacher_camera == "hand"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.gamma) == ("sgd", 1e-3, "step", 0.3)
    assert (cfg.fewshot.lr, cfg.multilabel.fewshot_scenes, cfg.multilabel.fewshot_batch_size) == (5e-4, 50, 46)
    a = cfg.loss.asl
    assert (a.weight, a.gamma_neg, a.gamma_pos, a.clip, cfg.loss.cls.weight) == (1.0, 2.0, 1.0, 0.05, 0.0)
    assert cfg.multilabel.head == "dual_prompt" and cfg.text.n_ctx == 8
    for line in PRESET.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line or line.startswith(("name:", "  dir:", "  gamma:")), f"uncited setting: {line}"


def _prepare_args(h5: dict[str, Path], out: Path) -> list[str]:
    """The preset header's prepare command, with this test's files in place of the downloaded ones."""
    text = PRESET.read_text()
    command = re.search(r"#   (vlmdistill prepare .*?\\\n#\s+--id-objects \".*?\")", text, re.S).group(1)
    args = shlex.split(command.replace("\\\n#", " "))[1:]
    args[1] = str(out)
    return [a.replace("pickclutter_train.h5", str(h5["train"])).replace("pickclutter_val.h5", str(h5["val"]))
            for a in args]


def _write(path: Path, scenes: list[list[str]], rng: np.random.Generator) -> Path:
    with h5py.File(path, "w") as f:
        for i, ids in enumerate(scenes):
            g = f.create_group(f"traj_{i}")
            for camera in ("base", "hand"):
                g.create_dataset(f"dict_str_{camera}_camera/dict_str_rgb",
                                 data=rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
                g.create_dataset(f"dict_str_{camera}_camera/dict_str_depth",
                                 data=rng.uniform(0.2, 1.5, (40, 40, 1)).astype(np.float32))
            g.create_dataset("model_ids", data=np.array([s.encode() for s in ids]))
    return path


def test_prepare_and_one_step_on_a_built_h5_file(tmp_path: Path, base_overrides: list[str]) -> None:
    rng = np.random.default_rng(0)
    h5 = {"train": _write(tmp_path / "train.h5", [[ID[i % 14], ID[(i + 3) % 14]] for i in range(6)], rng),
          "val": _write(tmp_path / "val.h5", [[ID[i], OOD[i]] for i in range(4)] + [[ID[5], ID[6]]], rng)}
    res = CliRunner().invoke(app, _prepare_args(h5, tmp_path / "ds"))
    assert res.exit_code == 0, res.output
    ds = open_multilabel(tmp_path / "ds")
    assert len(ds.id_objects) == 14 and ds.ood_objects == ("cracker box", "lemon", "pear", "strawberry")
    assert [len(ds.splits[s]) for s in ("train", "val_on_train", "val")] == [6, 1, 4]
    keep = [o for o in base_overrides if o.startswith(("teacher.", "output_dir", "cache_dir", "device",
                                                       "data.num_workers", "train.progress"))]
    cfg = load_config(PRESET, [*keep, f"data.dir={tmp_path / 'ds'}", "optim.batch_size=4", "train.max_steps=1",
                               "train.target_views=2", "data.base_size=64", "student.image_size=64"])
    out = distill(cfg)
    assert out["train"]["steps"] == 1 and out["complete"] is False
    weights = RunFolder(cfg.run_dir).student().weights
    assert weights["student.net.conv_stem.weight"].shape[1] == 8
    assert weights["head.project.weight"].shape == (32, 1280, 1, 1)  # 1280 channels -> the teacher's width
    assert weights["head.positive.ctx"].shape[0] == 8
