"""Issue 17, point 3: a learned-prompt (CoOp) run exports, loads and classifies class names it never saw.

``api.py`` imported ``class_texts`` from ``text/prompt_learner.py`` after its rename to ``class_prompt_texts``;
the import sat inside a function, so only a run with learned context reached it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmdistill.api import load
from vlmdistill.cli import app

NEW = ["purple triangle", "orange star"]
"""Class names the tiny runs were never trained on."""


def test_coop_run_exports_loads_and_classifies_new_names(prepared: Path, open_clip_teacher_files: tuple[Path, Path],
                                                         tmp_path_factory: pytest.TempPathFactory,
                                                         raw_images: Path) -> None:
    from _tiny_run import exported, tiny_run

    run = tiny_run(tmp_path_factory.mktemp("coop"), prepared, open_clip_teacher_files, name="coop",
                   extra=("text.learn_context=true", "text.n_ctx=4"))
    folder = exported(run, open_clip=False)
    assert (folder / "prompt_context.safetensors").is_file()
    from_folder, from_run = load(folder), load(run)
    paths = sorted(raw_images.rglob("*.png"))[:4]
    w = from_folder.class_embeddings(NEW)
    assert torch.allclose(w, from_run.class_embeddings(NEW), atol=1e-6)
    assert not torch.allclose(w, from_folder.encode_text([f"a photo of {n}" for n in NEW]), atol=1e-3)
    top = from_folder.classify(paths, NEW, top_k=2)
    assert all({n for n, _ in t} == set(NEW) and abs(sum(p for _, p in t) - 1) < 1e-5 for t in top)
    res = CliRunner().invoke(app, ["predict", str(folder), str(paths[0]), "--classes", ",".join(NEW)])
    assert res.exit_code == 0 and json.loads(res.stdout.splitlines()[0])["labels"][0] in NEW, res.output
