"""Few-shot finetuning of a distilled multi-label student (Table 12's second numbers): the first K OOD scenes
(``multilabel.fewshot_scenes``; the paper: the first 50 keys of its val file) join the training scenes, with
targets over every name (ID then OOD), in balanced batches as the paper's FewShotSampler mixes them, a fresh
OneCycle schedule at ``fewshot.lr`` (the paper: 5e-4) and batch ``multilabel.fewshot_batch_size`` (46),
starting from the distilled weights. Scored on the OOD scenes that are not support scenes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmdistill import distributed
from vlmdistill.checkpoint import clear_checkpoints
from vlmdistill.config import ExperimentConfig
from vlmdistill.data.dataset import DatasetError
from vlmdistill.data.multilabel_set import open_multilabel
from vlmdistill.data.scenes import SceneSource
from vlmdistill.io import atomic_write_json, read_json
from vlmdistill.loop import fit
from vlmdistill.mlevaluate import score_scenes
from vlmdistill.mltask import MultiLabelTask, SceneTrainSet, scene_layout
from vlmdistill.mltrain import object_descriptions, results_of
from vlmdistill.multilabel.labels import multi_hot
from vlmdistill.resume_check import record_config
from vlmdistill.runfolder import ModelMeta, RunFolder
from vlmdistill.runlock import run_lock
from vlmdistill.teachers import Teacher, load_teacher


def fewshot_config(base: ExperimentConfig, from_run: Path) -> ExperimentConfig:
    """The distilled run's config with the few-shot schedule, writing into ``<from_run>/fewshot-<K>scenes``."""
    f, m = base.fewshot, base.multilabel
    optim = base.optim.model_copy(update={"lr": f.lr, "epochs": f.epochs, "schedule": "onecycle",
                                          "batch_size": m.fewshot_batch_size,
                                          "repeat_epochs": f.repeat_epochs or base.optim.repeat_epochs})
    return base.model_copy(update={"optim": optim, "output_dir": Path(from_run),
                                   "name": f"fewshot-{m.fewshot_scenes}scenes"})


def run_multilabel_fewshot(cfg: ExperimentConfig, from_run: Path, teacher: Teacher | None = None) -> dict[str, Any]:
    """Finetune on training + support scenes, score, and add ``fewshot.finetune`` to the run's results.json."""
    from_run = Path(from_run)
    with run_lock(from_run):
        ds = open_multilabel(cfg.data.dir)
        k = cfg.multilabel.fewshot_scenes
        ood = ds.splits["val"]
        if len(ood) <= k:
            raise DatasetError(f"{cfg.data.dir} holds {len(ood)} OOD scenes: too few to hold out "
                               f"multilabel.fewshot_scenes={k} support scenes and score the rest; lower it")
        ft = fewshot_config(cfg, from_run)
        teacher = teacher or load_teacher(cfg.teacher)
        descriptions = object_descriptions(cfg, ds)
        d = cfg.data
        scenes = SceneSource([*ds.splits["train"], *ood[:k]], d.base_size, scene_layout(cfg), d.skip_bad_images,
                             d.preload)
        labels = multi_hot([item.objects for item in scenes.records], ds.objects)
        support = torch.arange(len(scenes)) >= len(ds.splits["train"])
        task = MultiLabelTask(ft, teacher, ds, SceneTrainSet(scenes, labels, ds.objects, support), descriptions)
        saved = RunFolder(from_run).student(ModelMeta.expected(cfg, teacher.id, teacher.embed_dim))
        task.student.load_state_dict(saved.weights)
        x_id = SceneSource(ds.splits["val_on_train"], d.base_size, scene_layout(cfg), d.skip_bad_images, d.preload)
        x_ood = SceneSource(ood[k:], d.base_size, scene_layout(cfg), d.skip_bad_images, d.preload)

        def evaluate() -> dict[str, Any]:
            return score_scenes(task.student, ft, teacher, x_id, x_ood, ds.id_objects, ds.ood_objects, descriptions)

        if distributed.is_main():  # under torchrun rank 0 alone writes, as for single-label runs
            ft.run_dir.mkdir(parents=True, exist_ok=True)
            clear_checkpoints(ft.run_dir)
            record_config(ft, ft.run_dir, None)
        results = results_of(task, teacher, fit(task, evaluate), [scenes, x_id, x_ood], ds).to_dict()
        out = {"scenes": k, "finetune": {**results["metrics_last_avg"], "averaged_over": results["averaged_over"],
                                         "last": results["metrics"], "run": str(ft.run_dir)}}
        if not distributed.is_main():
            return out
        atomic_write_json(ft.run_dir / "results.json", results)
        path = RunFolder(from_run).results_path
        if path.is_file():
            atomic_write_json(path, {**read_json(path), "fewshot": out})
        atomic_write_json(from_run / "fewshot.json", out)
        return out
