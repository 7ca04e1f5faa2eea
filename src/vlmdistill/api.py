"""The distilled student as a ready model: ``vlmdistill.load(MODEL_DIR or RUN_DIR)``.

A model folder (``vlmdistill export``) or a run directory both become a ``DistilledModel``: the student,
the exact eval preprocessing the run was scored with, the class texts, and (lazily) a text tower for new
class names. The text tower is the model folder's open_clip export when there is one, else the teacher
named in the run's config, checked to be the very teacher the student was trained against.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from vlmdistill import inputs
from vlmdistill.config import ExperimentConfig, load_config
from vlmdistill.data.images import BadImageError, Interpolation, ResizeMode, fit_image, load_image
from vlmdistill.data.views import Views, render
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import read_json
from vlmdistill.mlapi import MultiLabelDistilled, is_multilabel_model, load_multilabel
from vlmdistill.runfolder import RunFolder, SavedStudent, read_tensors
from vlmdistill.students import Student
from vlmdistill.texttower import TEXT_DIR, TextTowerError, open_text_tower

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path | torch.Tensor
"""PIL image, path, uint8 tensor (a decoded image) or float tensor (transformed pixels): ``vlmdistill.inputs``."""

API_IMAGE_FIX = ("replace the file or leave it out (`vlmdistill predict` gives such a file a row of its own and "
                 "predicts the rest)")

MANIFEST = "manifest.json"
WEIGHTS = "student.safetensors"
CLASSES = "classes.safetensors"
CONFIG = "config.yaml"
CONTEXT = "prompt_context.safetensors"
ONNX = "model.onnx"
OPEN_CLIP_DIR = "open_clip"
FORMAT = "vlmdistill-model/2"


class ModelLoadError(VlmdistillError, ValueError):
    """A path that is neither a model folder nor a usable run directory."""


class ClosedSetError(ModelLoadError):
    """The closed-set baseline is a classifier over its training classes, not an encoder in the teacher's
    space: it cannot score new class names, so it is not exported or loaded as a zero-shot model."""


@dataclass(frozen=True)
class Transform:
    """The run's eval view: ``base_size`` square (``resize``), centre ``eval_crop``, area-resampled to
    ``image_size`` (torchvision ``roi_align``, aligned), pixels in [0, 1]. The student normalises itself."""

    base_size: int
    resize: ResizeMode
    eval_crop: float
    image_size: int
    interpolation: Interpolation = "bicubic"

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Transform:
        d = cfg.data
        return cls(d.base_size, d.resize, d.eval_crop, cfg.student.image_size, d.interpolation)

    def base(self, image: Image.Image | str | Path) -> torch.Tensor:
        """uint8 [3, base, base], decoded as every reader of the toolkit decodes (a path's errors name the file)."""
        if isinstance(image, Image.Image):
            return fit_image(image, self.base_size, self.resize, self.interpolation)
        try:
            return load_image(Path(image), self.base_size, self.resize, self.interpolation)
        except BadImageError as err:
            raise BadImageError(err.path, err.reason, API_IMAGE_FIX) from err.__cause__

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        """float [3, image_size, image_size] in [0, 1]."""
        base = self.base(image).unsqueeze(0)
        return render(base, Views.center(1, self.eval_crop), self.image_size)[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_classes(path: Path, descriptions: Path | None = None) -> tuple[list[str], list[str | None]]:
    """Class names from a label2text.txt or a plain file of one name a line, with optional descriptions."""
    from vlmdistill.text.labels import read_class_list, read_descriptions

    classes = read_class_list(path)
    if descriptions is not None:
        classes = read_descriptions(descriptions, classes, path)
    return [c.name for c in classes], [c.description for c in classes]


def _run_classes(cfg: ExperimentConfig) -> tuple[list[str], list[str | None]]:
    """The run's ID then OOD classes, when its dataset is still where the config says."""
    from vlmdistill.data.dataset import open_dataset

    try:
        d = open_dataset(cfg.data.dir, cfg.text.descriptions, skip_missing=True)
    except VlmdistillError as err:
        log.warning("the run's classes are unavailable (%s); give class names to classify", err)
        return [], []
    classes = list(d.id_space.classes) + list(d.ood_space.classes)
    return [c.name for c in classes], [c.description for c in classes]


class DistilledModel:
    """The student with its preprocessing and class texts. Embeddings are unit-norm, on CPU."""

    def __init__(self, student: Student, cfg: ExperimentConfig, teacher_id: str, source: Path,
                 class_names: list[str], descriptions: list[str | None], class_embeddings: torch.Tensor | None = None,
                 context: torch.Tensor | None = None, manifest: dict[str, Any] | None = None) -> None:
        self.student = student.eval().requires_grad_(False)
        self.cfg, self.teacher_id, self.source = cfg, teacher_id, Path(source)
        self.transform = Transform(**manifest["preprocessing"]["transform"]) if manifest else Transform.from_config(cfg)
        self.class_names, self.descriptions = class_names, descriptions
        self._class_embeddings, self.context, self.manifest = class_embeddings, context, manifest or {}
        self.logit_scale = 1.0 / cfg.loss.temperature
        self._text: _TeacherText | None = None
        self._teacher: Any = None

    @property
    def device(self) -> torch.device:
        return self.student.mean.device

    def pixels(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1]: PIL images, paths and uint8 tensors through ``transform``, float tensors
        checked to be transformed pixels already (``vlmdistill.inputs`` has the rules)."""
        return inputs.to_pixels(images, self.transform, self.transform.image_size)

    @torch.no_grad()
    def encode_image(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm student embeddings [B, D] in the teacher's space."""
        pixels = self.pixels(images)
        out = [self.student(chunk.to(self.device).float()).float().cpu() for chunk in pixels.split(batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Unit-norm teacher text embeddings [N, D] of the texts exactly as given (no template); a string is
        one text."""
        return self._text_tower().encode(inputs.text_list(texts))

    def prompts(self, names: Sequence[str], descriptions: Sequence[str | None] | None = None) -> list[str]:
        """The run's prompt of each class: its template, with the description when the run used them."""
        t = self.cfg.text
        descs = list(descriptions) if descriptions is not None else [None] * len(names)
        if t.use_descriptions and all(descs):
            return [t.description_template.format(name=n, description=d) for n, d in zip(names, descs, strict=True)]
        if t.use_descriptions:
            missing = len(descs) - sum(1 for d in descs if d)
            log.warning("this run was trained with class descriptions, but %d of these %d classes have none, so "
                        "all use the plain template %r (lower accuracy): give descriptions (predict "
                        "--descriptions FILE, or descriptions= in the API)", missing, len(descs), t.template)
        return [t.template.format(name=n) for n in names]

    @torch.no_grad()
    def class_embeddings(self, names: Sequence[str] | None = None,
                         descriptions: Sequence[str | None] | None = None) -> torch.Tensor:
        """Unit-norm [C, D]: the stored classes' (``names`` None), or new names through the text tower."""
        if names is None:
            if self._class_embeddings is None:
                if not self.class_names:
                    raise TextTowerError(f"{self.source} stores no classes: give class names to classify")
                self._class_embeddings = self.class_embeddings(self.class_names, self.descriptions)
            return self._class_embeddings
        names = inputs.class_names(names)
        if descriptions is not None and len(descriptions) != len(names):
            raise inputs.InputError(f"descriptions has {len(descriptions)} entries for {len(names)} class names: "
                                    "give one per class (None where a class has none)")
        if descriptions is not None and any(descriptions) and not self.cfg.text.use_descriptions:
            log.warning("this run was trained without class descriptions, so the descriptions given are not used")
        if self.context is not None:
            from vlmdistill.text.prompt_learner import class_prompt_texts

            use = self.cfg.text.use_descriptions and descriptions is not None and all(descriptions)
            texts = class_prompt_texts(list(names), list(descriptions) if use else None)
            return self._text_tower().encode_with_context(texts)
        return self.encode_text(self.prompts(names, descriptions))

    def probabilities(self, embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Softmax [B, C] at the run's temperature of unit image embeddings against unit class embeddings."""
        return (self.logit_scale * embeddings @ class_embeddings.T).softmax(-1)

    @torch.no_grad()
    def scores(self, images: ImageInput | Sequence[ImageInput], class_names: Sequence[str] | None = None,
               descriptions: Sequence[str | None] | None = None) -> torch.Tensor:
        """Softmax probabilities [B, C] at the run's temperature over ``class_names`` (or the stored classes)."""
        return self.probabilities(self.encode_image(images), self.class_embeddings(class_names, descriptions))

    def classify(self, images: ImageInput | Sequence[ImageInput], class_names: Sequence[str] | None = None,
                 top_k: int = 5, descriptions: Sequence[str | None] | None = None) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` (class name, probability) pairs, best first (every class when fewer)."""
        top_k = inputs.top_k(top_k)
        names = inputs.class_names(class_names) if class_names is not None else self.class_names
        probs = self.scores(images, names if class_names is not None else None, descriptions)
        top = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [[(names[int(i)], float(p)) for p, i in zip(ps, ix, strict=True)]
                for ps, ix in zip(top.values, top.indices, strict=True)]

    def teacher(self) -> Any:
        """The run's teacher (from its config), checked to be the one the student was trained against."""
        if self._teacher is None:
            self._teacher = _load_teacher(self)
        return self._teacher

    def _text_tower(self) -> _TeacherText:
        if self._text is None:
            self._text = _open_text_tower(self)
        return self._text


class _TeacherText:
    """The run's teacher, with the run's learned prompt context when it learned one."""

    def __init__(self, teacher: Any, context: torch.Tensor | None) -> None:
        self.teacher, self.context = teacher, context

    def encode(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.teacher.encode_texts(texts), dim=-1).cpu()

    def encode_with_context(self, class_texts: list[str]) -> torch.Tensor:
        from vlmdistill.text.prompt_learner import PromptLearner

        assert self.context is not None
        learner = PromptLearner(self.teacher, class_texts, n_ctx=len(self.context)).to(self.teacher.device)
        learner.ctx.data.copy_(self.context)
        return learner().cpu()


def _load_teacher(m: DistilledModel) -> Any:
    from vlmdistill.teachers import load_teacher
    from vlmdistill.teachers.ensemble import text_teacher_id

    where = m.source / "config.yaml"
    stored = f"only the {len(m.class_names)} classes stored in {m.source} can be scored (give no class names)"
    try:
        teacher = load_teacher(m.cfg.teacher.model_copy(update={"device": str(m.device)}))
    except VlmdistillError as err:
        raise TextTowerError(
            f"new class names need the teacher's text tower, and the teacher of {where} cannot be loaded: {err}. "
            f"Without it {stored}; `vlmdistill export` puts the text tower into the model folder"
        ) from err
    if m.teacher_id and teacher.id != text_teacher_id(m.teacher_id):
        raise TextTowerError(
            f"the teacher of {where} loads as {teacher.id}, but the student was trained against {m.teacher_id}: "
            f"its weights or preprocessing changed. Point teacher.* in {where} at the original weights; "
            f"until then {stored}"
        )
    return teacher


def _open_text_tower(m: DistilledModel) -> _TeacherText:
    """A model folder's own text tower (``text/``), else the run's teacher (checked to be the same weights)."""
    if not (m.source / MANIFEST).is_file():
        return _TeacherText(m.teacher(), m.context)
    if not (m.source / TEXT_DIR).is_dir():
        raise TextTowerError(
            f"{m.source} was exported without the teacher's text tower (--no-text-tower): only its "
            f"{len(m.class_names)} stored classes can be scored (give no class names). Export the run again "
            "without --no-text-tower to classify new names")
    return _TeacherText(open_text_tower(m.source / TEXT_DIR, str(m.device)), m.context)


def _from_run(run: Path, device: str) -> DistilledModel:
    folder = RunFolder(run)
    if not folder.is_run() or not folder.has_checkpoint():
        raise ModelLoadError(
            f"{run} is neither a model folder ({MANIFEST}) nor a finished run (config.yaml and "
            "a checkpoint): give a `vlmdistill export` folder or a trained run directory"
        )
    cfg = folder.config()
    saved = folder.student()
    if cfg.loss.closed_set or saved.meta.closed_set:
        raise ClosedSetError(
            f"{run} is the closed-set baseline (loss.closed_set): its student is a classifier over its training "
            "classes, not an encoder in the teacher's space, so it cannot score class names. Export or load an "
            "open-vocabulary run instead"
        )
    context = saved.context if cfg.text.learn_context else None
    names, descs = _run_classes(cfg)
    return DistilledModel(saved.build(cfg.student, device), cfg, saved.meta.teacher_id, run, names, descs,
                          context=context)


def _from_folder(folder: Path, device: str) -> DistilledModel:
    manifest = read_json(folder / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{folder / MANIFEST} is not a {FORMAT} manifest; re-export with `vlmdistill export`")
    cfg = load_config(folder / CONFIG)
    saved = SavedStudent.read(folder / WEIGHTS, folder / CONTEXT)
    classes = manifest["classes"]
    embeddings = read_tensors(folder / CLASSES)["embeddings"]
    return DistilledModel(saved.build(cfg.student, device), cfg, manifest["teacher"]["id"], folder,
                          [c["name"] for c in classes], [c.get("description") for c in classes], embeddings,
                          saved.context, manifest)


def load(path: str | Path, device: str = "cpu") -> DistilledModel | MultiLabelDistilled:
    """A model folder (``vlmdistill export``) or a run directory (``runs/<name>``) as a ``DistilledModel``; a
    multi-label one as a ``MultiLabelDistilled`` (``detect`` lists the objects a scene holds), on CPU."""
    path, device = Path(path), inputs.device(device)
    if path.is_dir() and is_multilabel_model(path):
        return load_multilabel(path)
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{path} is a file, not a model folder: give the folder `vlmdistill export` wrote "
                             f"(it holds {MANIFEST}) or a run directory (runs/<name>)")
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist: give a `vlmdistill export` folder or a run directory")
    return _from_folder(path, device) if (path / MANIFEST).is_file() else _from_run(path, device)
