"""Jobs besides training: teacher zero-shot, evaluating a saved student, and the analysis metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmdistill.analysis import analysis_metrics
from vlmdistill.checkpoint import checkpoint_paths, load_weights
from vlmdistill.config import ExperimentConfig, config_to_dict, save_config
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views
from vlmdistill.errors import RunError
from vlmdistill.evaluate import embed_source, zero_shot_metrics
from vlmdistill.io import atomic_write_json
from vlmdistill.students import count_parameters
from vlmdistill.train import Distiller, Workspace, build_workspace, class_texts


def teacher_view(cfg: ExperimentConfig, n: int) -> Views:
    """The paper's teacher sees the whole (squashed) image at test time; ours sees the student's crop."""
    return Views.whole(n) if cfg.mode == "paper" else Views.center(n, cfg.data.eval_crop)


def teacher_embed(cfg: ExperimentConfig, ws: Workspace, source: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's eval-view embeddings of a split; the workspace's own splits are embedded once."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return embed_source(ws.teacher.encode_images, source, ws.teacher.image_size, lambda n: teacher_view(cfg, n),
                            ws.teacher.batch_size)

    if not any(source is own for own in (ws.train, ws.id_val, ws.ood_val)):
        return run()
    key = (id(source), f"{cfg.mode}:{cfg.data.eval_crop}")
    if key not in ws.teacher_features:
        ws.teacher_features[key] = run()
    return ws.teacher_features[key]


def evaluate_teacher(cfg: ExperimentConfig, ws: Workspace, out_dir: Path | None = None) -> dict[str, Any]:
    """The teacher's own zero-shot numbers under the same protocol and prompts as the student's.

    Written to ``out_dir`` (default ``<run>/teacher``) so a trained run's own results are never replaced.
    """
    out_dir = Path(out_dir) if out_dir is not None else cfg.run_dir / "teacher"
    w_id, w_ood = class_texts(cfg, ws)
    id_f, id_i = teacher_embed(cfg, ws, ws.id_val)
    ood_f, ood_i = teacher_embed(cfg, ws, ws.ood_val)
    id_y = torch.tensor(ws.dataset.id_val.labels, dtype=torch.long)[id_i]
    ood_y = torch.tensor(ws.dataset.ood_val.labels, dtype=torch.long)[ood_i]
    metrics = zero_shot_metrics(id_f, id_y, ood_f, ood_y, w_id, w_ood)
    results = {
        "run": f"{cfg.name} (teacher)",
        "run_dir": str(out_dir),
        "mode": cfg.mode,
        "teacher_only": True,
        "teacher": {"id": ws.teacher.id, "description": ws.teacher.description,
                    "params": count_parameters(ws.teacher.model)},
        "student": None,
        "metrics": metrics,
        "config": config_to_dict(cfg),
    }
    save_config(cfg, out_dir / "config.yaml")
    atomic_write_json(out_dir / "results.json", results)
    return results


def load_student(distiller: Distiller, run_dir: Path) -> None:
    """Weights of a finished or interrupted run, refusing a checkpoint of another teacher or architecture."""
    path = checkpoint_paths(run_dir)[0]
    if not path.is_file():
        raise RunError(f"{run_dir} has no checkpoint ({path}); train first or point --run at a run directory")
    weights, meta = load_weights(path)
    expected = distiller.model_meta()
    for key in ("teacher_id", "student_arch", "out_dim"):
        if meta.get(key) != expected[key]:
            raise RunError(
                f"checkpoint {path} was made with {key}={meta.get(key)!r} but the config gives {expected[key]!r}; "
                "evaluate it with the config it was trained with (its config.yaml)"
            )
    distiller.student.load_state_dict(weights)
    distiller.load_prompt(run_dir)


def analyse(cfg: ExperimentConfig, ws: Workspace, distiller: Distiller, max_images: int = 2000) -> dict[str, Any]:
    """The paper's §6 metrics on (a seeded subset of) the training set and on the OOD set."""
    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(cfg.seed)
    w_id, w_ood = distiller.class_embeddings()
    for name, source, w in (("train", ws.train, w_id), ("ood", ws.ood_val, w_ood)):
        if len(source) > max_images:
            keep = torch.randperm(len(source), generator=g)[:max_images].sort().values
            source = ImageSource([source.records[i] for i in keep.tolist()], source.base_size, source.resize,
                                 source.num_workers, source.skip_bad)
        s, s_i = distiller.embed(source)
        t, t_i = teacher_embed(cfg, ws, source)
        common = torch.isin(s_i, t_i)
        s, t = s[common], t[torch.isin(t_i, s_i)]
        out[name] = analysis_metrics(s, t, w, neigh_ks=tuple(k for k in (3, 5, 10) if k < len(s)))
    return out


def evaluate_run(cfg: ExperimentConfig, ws: Workspace, run_dir: Path, analysis: bool = True) -> dict[str, Any]:
    """Re-score a saved student; writes ``eval.json`` next to the run's results."""
    distiller = Distiller(cfg, ws)
    load_student(distiller, run_dir)
    results = {"run": str(run_dir), "metrics": distiller.evaluate(), "config": config_to_dict(cfg)}
    if analysis and not distiller.closed_set:
        results["analysis"] = analyse(cfg, ws, distiller)
    atomic_write_json(Path(run_dir) / "eval.json", results)
    return results


def distill(cfg: ExperimentConfig, ws: Workspace | None = None, resume: bool = False) -> dict[str, Any]:
    """Train a student as configured, add the analysis metrics, and write results.json."""
    torch.manual_seed(cfg.seed)
    ws = ws or build_workspace(cfg)
    distiller = Distiller(cfg, ws)
    results = distiller.fit(resume=resume)
    if cfg.train.analysis and not distiller.closed_set:
        results["analysis"] = analyse(cfg, ws, distiller, cfg.train.analysis_max_images)
        atomic_write_json(cfg.run_dir / "results.json", results)
    return results


def text_diagnostics(cfg: ExperimentConfig, ws: Workspace, out_dir: Path) -> dict[str, Any]:
    """Paper Table 6 / Fig. 4 for any label space and prompt recipe: how spread the class texts are."""
    from vlmdistill.analysis import plot_text_spectra, text_mean_pairwise_cosine, text_svd_spectrum
    from vlmdistill.text.textbank import embed_texts

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
