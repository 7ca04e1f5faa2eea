"""Experiment configuration: one YAML file per experiment, validated into typed objects.

Command-line overrides use dotted ``key=value`` pairs (``optim.lr=0.01``); values are parsed as YAML
scalars so ``true``, ``3`` and ``[30, 60]`` get their natural types. The resolved config is what a run
saves, so a run directory always says exactly what produced it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vlmdistill.errors import VlmdistillError

_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?|[-+]?\.?(inf|infinity|nan)", re.IGNORECASE)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` and ``inf`` (no dot) as strings: such a string is read as the number it spells."""
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


# Every number is strict and finite: ``true`` is not 1, ``3.0`` is not an integer, ``inf`` and ``nan`` are
# refused. Ranges every numeric key must lie in: a value outside one is refused with the key and the range,
# instead of running (epochs=0 "completes" untrained, epochs=1e21 never ends) or failing deep inside torch
# (batch_size=0, lr=1e308). The upper bounds are far above anything meant; README "Reliability" states them.
MAX_EPOCHS, MAX_BATCH, MAX_STEPS, MAX_LR = 10_000, 2**20, 10**9, 100.0
Int = Annotated[int, Field(strict=True, le=2**63 - 1)]
Real = Annotated[float, BeforeValidator(_number), Field(strict=True, allow_inf_nan=False)]
Count = Annotated[Int, Field(ge=1)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
Epochs = Annotated[Int, Field(ge=1, le=MAX_EPOCHS)]
BatchSize = Annotated[Int, Field(ge=1, le=MAX_BATCH)]
Steps = Annotated[Int, Field(ge=1, le=MAX_STEPS)]
Positive = Annotated[Real, Field(gt=0)]
NonNegative = Annotated[Real, Field(ge=0)]
Fraction = Annotated[Real, Field(gt=0, le=1)]
LearningRate = Annotated[Real, Field(gt=0, le=MAX_LR)]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a config must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TeacherConfig(_Strict):
    """Which frozen vision-language model to distill from. ``backend``: ``open_clip``, ``hf``, or any name given
    to ``teachers.register_backend`` (an unknown one is refused, with the list, when the teacher loads)."""

    backend: str = "open_clip"
    name: str = "ViT-L-14"
    pretrained: str | None = "openai"
    checkpoint: Path | None = None
    model_config_path: Path | None = Field(default=None, alias="model_config")
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    batch_size: BatchSize = 256

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())


class StudentConfig(_Strict):
    """The small image encoder; ``arch`` is a timm name or ``tv:<torchvision name>``."""

    arch: str = "tv:resnet18"
    pretrained: bool = False
    image_size: Annotated[Int, Field(ge=8)] = 224
    drop_path: Annotated[Real, Field(ge=0, lt=1)] = 0.0
    model_kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    """A prepared dataset directory (see ``vlmdistill prepare``) and how images become tensors.

    ``unlabeled``: a pool of unlabelled images (folder, list file or CSV with a ``path`` column; default: the
    pool ``prepare --unlabeled`` recorded) for the label-free terms, ``unlabeled_ratio`` pool images per
    labelled image in each batch (0: no pool). ``decode``: ``cpu`` decodes in loader workers with PIL; ``device``
    has the workers read JPEG bytes and decodes them on the training device (``data/device_decode.py``).

    Multi-label scene data (``prepare --h5``): the student takes ``cameras`` x ``channels`` stacked (base + hand
    RGB-D: the paper's 8 channels), depth as metres / ``depth_max`` (null: raw metres, the official code's);
    the teacher sees ``teacher_camera``'s RGB (the paper's L_mse / L_im-cst use the hand camera's).

    ``randaugment``: RandAugment(2, 9) on the student's images. ``student`` (``true``, the paper's) augments them
    after the teacher's target was taken, so the target describes another image; ``consistent`` draws the ops with
    each stored view, so the teacher's target is of the augmented view the student sees."""

    dir: Path = Path("data")
    base_size: Annotated[Int, Field(ge=8)] = 256
    resize: Literal["squash", "center_crop"] = "center_crop"
    augment_per: Literal["image", "batch"] = "image"
    crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0)
    hflip: bool = True
    randaugment: Literal["off", "student", "consistent"] = "off"
    eval_crop: Fraction = 0.875
    teacher_eval_view: Literal["center", "whole"] = "center"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    decode: Literal["cpu", "device"] = "cpu"
    num_workers: NonNegativeInt = 2
    preload: bool = False
    skip_bad_images: bool = False
    unlabeled: Path | None = None
    unlabeled_ratio: NonNegative = 1.0
    cameras: tuple[Literal["base", "hand"], ...] = Field(default=("base", "hand"), min_length=1)
    channels: tuple[Literal["rgb", "depth"], ...] = Field(default=("rgb", "depth"), min_length=1)
    teacher_camera: Literal["base", "hand"] = "hand"
    depth_max: Positive | None = 2.0

    @field_validator("randaugment", mode="before")
    @classmethod
    def _randaugment_bool(cls, value: Any) -> Any:
        """``true`` (as the paper presets write it) is the student-only RandAugment; ``false`` is off."""
        return {True: "student", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("crop_scale")
    @classmethod
    def _ordered_scale(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")
        return scale


class TextConfig(_Strict):
    """How class prompts are written; descriptions come from ``chatgpt.txt`` or a JSON file."""

    template: str = "a photo of {name}"
    description_template: str = "a photo of {name} . {description}"
    use_descriptions: bool = False
    descriptions: Path | None = None
    captions: Path | None = None
    learn_context: bool = False
    n_ctx: Count = 8


class LossTerm(_Strict):
    """``on``: the rows a term runs on when batches hold unlabelled pool images. Unset: ``both`` for the
    label-free terms, ``labelled`` for those that need labels (anything else is refused for them)."""

    weight: NonNegative = 0.0
    on: Literal["labelled", "pool", "both"] | None = None


class MseTerm(LossTerm):
    normalized: bool = True


class ImCstTerm(LossTerm):
    mode: Literal["single", "bidirectional"] = "bidirectional"


class VlAlignTerm(LossTerm):
    k: Count = 256
    filter: bool = True


class KdTerm(LossTerm):
    temperature: Positive = 1.0


class CapTerm(LossTerm):
    temperature: Positive = 1.0


class AslTerm(LossTerm):
    """The asymmetric loss of a multi-label head: the paper's gammas and clip, and the score bias mode
    (``multilabel.loss``: ``tanh`` at training and prediction, or ``paper``: the raw bias at prediction)."""

    gamma_neg: NonNegative = 2.0
    gamma_pos: NonNegative = 1.0
    clip: Annotated[Real, Field(ge=0, lt=1)] = 0.05
    bias_mode: Literal["tanh", "paper"] = "tanh"


class LossConfig(_Strict):
    """Weighted sum of named terms; a weight of 0 disables a term (it is not even computed)."""

    temperature: Positive = 0.07
    cls: LossTerm = Field(default_factory=lambda: LossTerm(weight=1.0))
    mse: MseTerm = Field(default_factory=MseTerm)
    imcst: ImCstTerm = Field(default_factory=ImCstTerm)
    vlalign: VlAlignTerm = Field(default_factory=VlAlignTerm)
    kd: KdTerm = Field(default_factory=KdTerm)
    cap: CapTerm = Field(default_factory=CapTerm)
    asl: AslTerm = Field(default_factory=AslTerm)
    closed_set: bool = False
    closed_set_id_logits: Literal["id", "all"] = "id"


class OptimConfig(_Strict):
    """SGD + step schedule (paper ResNet) or AdamW + OneCycle (paper ViT)."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: LearningRate = 0.05
    momentum: Annotated[Real, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegative = 1e-4
    schedule: Literal["step", "onecycle", "constant"] = "step"
    milestones: tuple[Positive, ...] = (1 / 3, 2 / 3)
    gamma: Positive = 0.1
    epochs: Epochs = 90
    repeat_epochs: Epochs = 1
    batch_size: BatchSize = 128
    eval_batch_size: BatchSize = 256
    grad_clip: Positive | None = None
    onecycle_per: Literal["step", "epoch"] = "step"


class TrainConfig(_Strict):
    """Loop settings that do not change the maths."""

    amp: bool = True
    eval_every: Count = 1
    average_last: Count = 5
    checkpoint_every: Count = 1
    log_every: Count = 10
    log_minutes: Positive = 5.0
    max_steps: Steps | None = None
    progress: bool = True
    analysis: bool = True
    analysis_max_images: Count | None = 2000
    teacher_view: Literal["same", "whole"] = "same"
    target_views: NonNegativeInt = 10
    views_per_step: Annotated[Int, Field(ge=1, le=64)] = 1  # V views of each image per step (stored ones: distinct)
    ema_decay: Annotated[Real, Field(gt=0, lt=1)] | None = None  # evaluate/save/export a weight average (ema.py)
    sync_batchnorm: bool = True  # under DDP: BatchNorm over the global batch (as one process), not each rank's


class FewShotConfig(_Strict):
    """Adapting a distilled student to the OOD classes from K labelled images each (paper §4.2, App. E)."""

    shots: Count = 5
    selection: Literal["seeded", "first"] = "seeded"
    methods: tuple[Literal["finetune", "retrieval"], ...] = ("finetune", "retrieval")
    epochs: Epochs = 20
    repeat_epochs: Epochs | None = None
    lr: LearningRate = 0.003
    alpha: NonNegative = 1.0
    beta: NonNegative = 5.5
    keys: Literal["student", "teacher"] = "student"
    text_scale: Positive = 100.0
    key_views: Count = 1
    key_view_kind: Literal["crop", "randaugment"] = "crop"
    key_merge: Literal["mean", "separate"] = "mean"
    continual: bool = False


class MultiLabelConfig(_Strict):
    """The multi-label head on the student's last feature map (used on multi-label data only). ``dual_prompt``:
    DualCoOp's learned positive/negative contexts (``text.n_ctx`` tokens, descriptions with
    ``text.use_descriptions``); ``region_cosine``: fixed teacher text embeddings, no prompt learning.
    Few-shot: the first ``fewshot_scenes`` OOD scenes join the training scenes."""

    head: Literal["dual_prompt", "region_cosine"] = "dual_prompt"
    fewshot_scenes: Count = 50
    fewshot_batch_size: BatchSize = 46


PAPER_MODE: dict[str, dict[str, Any]] = {
    "data": {"resize": "squash", "augment_per": "batch", "base_size": 256, "teacher_eval_view": "whole",
             "interpolation": "bilinear"},
    "optim": {"onecycle_per": "epoch"},
    "train": {"teacher_view": "whole", "average_last": 5, "amp": False, "analysis_max_images": None},
    "loss": {"temperature": 0.07, "closed_set_id_logits": "all"},
    "fewshot": {"selection": "first", "keys": "teacher", "text_scale": 1.0, "key_views": 10,
                "key_view_kind": "randaugment", "key_merge": "separate"},
}


class ExperimentConfig(_Strict):
    """One experiment. ``mode: paper`` sets every switch in ``PAPER_MODE`` to the official code's behaviour
    (configs/paper/README.md lists each one, and what still differs).

    ``teacher`` may be a list, a teacher ensemble (``teachers/ensemble.py``): it is read as ``teacher`` (the
    first) plus ``extra_teachers`` (the rest). Only image targets are ensembled, as the mean of the teachers'
    unit-normalised image embeddings; classification uses teacher 1's text embeddings (class prompts, learned
    context, export). The teachers must share ``embed_dim`` and input size (checked when they load)."""

    name: str = "run"
    seed: NonNegativeInt = 0
    mode: Literal["ours", "paper"] = "ours"
    device: str = "auto"
    output_dir: Path = Path("runs")
    cache_dir: Path = Path(".cache/vlmdistill")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    extra_teachers: tuple[TeacherConfig, ...] = ()
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)
    multilabel: MultiLabelConfig = Field(default_factory=MultiLabelConfig)

    @model_validator(mode="before")
    @classmethod
    def _paper_mode(cls, raw: Any) -> Any:
        """``mode: paper`` sets the official code's data handling unless a key is given explicitly."""
        if isinstance(raw, dict) and raw.get("mode") == "paper":
            for section, values in PAPER_MODE.items():
                given = raw.setdefault(section, {})
                if isinstance(given, dict):
                    for key, value in values.items():
                        given.setdefault(key, value)
        return raw

    @model_validator(mode="before")
    @classmethod
    def _teacher_list(cls, raw: Any) -> Any:
        """``teacher: [a, b, ...]`` is teacher ``a`` with ``extra_teachers: [b, ...]``."""
        if isinstance(raw, dict) and isinstance(raw.get("teacher"), list):
            if not raw["teacher"]:
                raise ValueError("teacher: an empty list names no teacher; give one teacher or a list of them")
            if raw.get("extra_teachers"):
                raise ValueError("give the teachers as one list in teacher:, or teacher: and extra_teachers:, "
                                 "not both")
            raw = {**raw, "teacher": raw["teacher"][0], "extra_teachers": raw["teacher"][1:]}
        return raw

    @property
    def teachers(self) -> list[TeacherConfig]:
        """Every teacher: the one whose text space the student classifies in first."""
        return [self.teacher, *self.extra_teachers]

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        # The loss terms declare what they need; the one import of a layer above, made at validation time.
        from vlmdistill.losses import check_loss_config

        check_loss_config(self.loss, captions=self.text.captions is not None)
        if self.data.randaugment == "consistent" and self.train.teacher_view == "whole":
            raise ValueError("data.randaugment=consistent gives the teacher's target the student's RandAugment ops, "
                             "but train.teacher_view=whole scores the whole un-augmented image: set "
                             "train.teacher_view=same, or data.randaugment=student")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


class ConfigError(VlmdistillError, ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into its key path and YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.01)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict, creating intermediate mappings as needed."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_config(path: Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key=value`` overrides and validate (paths stay relative to the cwd)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"config file {path} does not exist") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate_config(raw, overrides or [], str(path) if path is not None else "<overrides>")


def validate_config(raw: dict[str, Any], overrides: list[str], where: str) -> ExperimentConfig:
    """Apply overrides to a raw mapping (a copy) and validate it; errors name ``where`` and each bad key."""
    raw = apply_overrides(copy.deepcopy(raw), overrides)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid config {where}:\n  " + "\n  ".join(map(_describe_error, err.errors()))) from err


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _describe_error(error: Any) -> str:
    """One line per bad key; range violations read ``optim.epochs must be >= 1, got 0``, type errors
    ``optim.epochs: Input should be a valid integer, got True``."""
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] in _BOUNDS:
        name, symbol = _BOUNDS[error["type"]]
        return f"{key} must be {symbol} {error['ctx'][name]}, got {error['input']!r}"
    if error["type"] in ("int_type", "float_type", "finite_number", "bool_type"):
        return f"{key}: {error['msg']}, got {error['input']!r}"
    return f"{key}: {error['msg']}"


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A JSON/YAML-ready dict of the resolved config (paths as strings, aliases as written in files)."""
    return cfg.model_dump(mode="json", by_alias=True)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    from vlmdistill.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
