"""The ``text-stats`` job: how spread the class text embeddings are per prompt recipe (paper Table 6 and
Fig. 4), for any label space, with the teacher of the config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmdistill.analysis import plot_text_spectra, text_mean_pairwise_cosine, text_svd_spectrum
from vlmdistill.config import ExperimentConfig
from vlmdistill.io import atomic_write_json
from vlmdistill.text.textbank import embed_texts
from vlmdistill.workspace import Workspace


def text_diagnostics(cfg: ExperimentConfig, ws: Workspace, out_dir: Path) -> dict[str, Any]:
    """Mean pairwise cosine and the top SVD eigenvalues per split and recipe (plain; descriptions when
    every class has one); writes ``text_stats.json`` and one spectrum plot per split."""
    t = cfg.text
    recipes = {"plain": False}
    if all(c.description for c in ws.dataset.classes):
        recipes["descriptions"] = True
    out: dict[str, Any] = {}
    for split, space in (("id", ws.dataset.id_space), ("ood", ws.dataset.ood_space)):
        spectra = {}
        for recipe, use in recipes.items():
            w = embed_texts(ws.teacher, space.prompts(t.template, t.description_template, use), cfg.cache_dir)
            spectra[recipe] = text_svd_spectrum(w)
            out.setdefault(split, {})[recipe] = {
                "mean_pairwise_cosine": text_mean_pairwise_cosine(w),
                "top_eigenvalues": [float(v) for v in spectra[recipe]],
            }
        plot_text_spectra(spectra, Path(out_dir) / f"text_spectrum_{split}.png")
    atomic_write_json(Path(out_dir) / "text_stats.json", out)
    return out
