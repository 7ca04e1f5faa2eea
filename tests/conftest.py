"""Shared fixtures: a tiny generated image dataset and tiny random-weight teachers, all offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(2)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")

TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def draw(colour: str, shape: str, rng: np.random.Generator, size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
    d = ImageDraw.Draw(img)
    r = int(rng.integers(8, 16))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    return img


def make_class_folders(root: Path, per_class: int = 6, seed: int = 0) -> list[str]:
    """8 classes '<colour>_<shape>' with ``per_class`` PNGs each."""
    rng = np.random.default_rng(seed)
    names = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}"
            names.append(name)
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw(colour, shape, rng).save(root / name / f"{name}_{i:03d}.png")
    return names


@pytest.fixture(scope="session")
def raw_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "images"
    make_class_folders(root)
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, raw_images: Path) -> Path:
    from vlmdistill.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "ds"
    desc = raw_images.parent / "descriptions.json"
    text = {d.name: f"a {d.name.replace('_', ' ')} on a dark background" for d in raw_images.iterdir()}
    desc.write_text(json.dumps(text))
    prepare(out, images=raw_images, descriptions=desc, seed=0)
    return out


@pytest.fixture(scope="session")
def open_clip_teacher_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny open_clip model config JSON and a checkpoint of random weights saved from it."""
    import open_clip

    d = tmp_path_factory.mktemp("teacher")
    cfg_path = d / "tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip")
    ckpt = d / "tiny-clip.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt


@pytest.fixture
def base_overrides(prepared: Path, open_clip_teacher_files: tuple[Path, Path], tmp_path: Path) -> list[str]:
    cfg_path, ckpt = open_clip_teacher_files
    return [
        f"data.dir={prepared}",
        "data.base_size=40",
        "data.num_workers=0",
        "data.preload=true",
        f"teacher.model_config={cfg_path}",
        f"teacher.checkpoint={ckpt}",
        "teacher.batch_size=16",
        "student.arch=resnet10t",
        "student.image_size=32",
        "optim.batch_size=8",
        "optim.epochs=2",
        "optim.lr=0.01",
        "train.progress=false",
        "train.target_views=3",
        f"output_dir={tmp_path / 'runs'}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
        "teacher.device=cpu",
    ]


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel with CLIP's real BPE vocabulary, saved as users' local directories are."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    simple = open_clip.get_tokenizer("ViT-B-32")
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    d = tmp_path_factory.mktemp("hf") / "hf-clip"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({rename.get(k, k): v for k, v in simple.encoder.items()}))
    merges = sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m, _ in merges) + "\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "vocab_size": 49408},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory, prepared: Path, open_clip_teacher_files: tuple[Path, Path]) -> Path:
    """One tiny trained run (timm ResNet-10-T, one epoch), shared by the export, predict and load tests."""
    from _tiny_run import tiny_run

    return tiny_run(tmp_path_factory.mktemp("tiny-run"), prepared, open_clip_teacher_files)


@pytest.fixture(scope="session")
def model_dir(run: Path) -> Path:
    """The tiny run exported with ``--open-clip``."""
    from _tiny_run import exported

    return exported(run)


@pytest.fixture(scope="session")
def clutter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared multi-label dataset of built PickClutter h5 files (16 train, 6 X_id, 8 X_ood scenes of the demo's
    cluttered objects, 32 px); its h5 files are in ``clutter_dir.parent / "h5"``."""
    from vlmdistill.data.multilabel_set import prepare_multilabel
    from vlmdistill.demo.clutter import ClutterParams, clutter_classes, generate_clutter

    params = ClutterParams(image_size=32, seed=0)
    root = tmp_path_factory.mktemp("clutter")
    files = generate_clutter(root / "h5", params, {"train": 16, "val_on_train": 6, "val": 8})
    ids = [c.name for c in clutter_classes(params) if c.is_id]
    prepare_multilabel(root / "ds", h5=list(files.items()), id_objects=ids)
    return root / "ds"
