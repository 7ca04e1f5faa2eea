"""CLIP_benchmark on our exports: a split of a prepared dataset in its webdataset layout, and the open_clip
preprocess that sees the pixels ``vlmdistill eval`` sees.

``write_clip_benchmark`` writes what ``vlmdistill eval`` scores (same images, class names and prompts, from the
same config) for ``clip_benchmark eval --dataset wds/<name> --dataset_root DIR``::

    DIR/test/0.tar ...                         <key>.png (the source pixels, 8-bit RGB, lossless), <key>.cls
    DIR/test/nshards.txt                       how many tars: at least MIN_SHARDS (see there)
    DIR/classnames.txt                         one class name a line, in label order
    DIR/zeroshot_classification_templates.txt  text.template with {c} for the name
    DIR/class_prompts.json                     with text.use_descriptions: {<name>: {class name: [its prompt]}},
                                               CuPL's layout, for --custom_template_file
    DIR/vlmdistill.json                        where it came from, and which prompts match vlmdistill eval

Images are stored decoded (PNG) rather than as their own bytes, so every model's preprocessing starts from the
pixels our decoder reads (``images.decode_rgb``: deep and palette images already 8-bit RGB).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Literal

from vlmdistill.config import ExperimentConfig
from vlmdistill.data.dataset import Record, Split, open_dataset
from vlmdistill.data.images import BadImageError, decode_rgb
from vlmdistill.data.stream import read_member
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_json, atomic_write_text, replace_dir
from vlmdistill.workspace import class_prompts

BenchSplit = Literal["ood", "id_val"]
PROMPTS = "class_prompts.json"
TEMPLATES = "zeroshot_classification_templates.txt"
PROVENANCE = "vlmdistill.json"
MIN_SHARDS = 4
"""CLIP_benchmark reads with ``--num_workers 4`` by default and webdataset refuses a DataLoader worker that gets no
shard ("No samples found"), so a split of 4 images or more is written as at least 4 shards."""


class ClipBenchmarkError(VlmdistillError, ValueError):
    """A split or prompt set CLIP_benchmark cannot be given as ``vlmdistill eval`` scores it; says what to do."""


def open_clip_preprocess(cfg: ExperimentConfig, mean: list[float], std: list[float]
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's eval ``preprocess_cfg`` closest to the run's eval view, and whether it is that very view.

    open_clip's eval transform resizes (shorter side to S then centre crop S, or squash to S x S) with PIL and
    has no crop fraction. Our view is ``images.fit_image`` to ``data.base_size`` (the same resize, same rounding),
    then the centre ``data.eval_crop`` area-resampled to S: the identity exactly when base_size == S and
    eval_crop == 1. Otherwise the closest is the same resize straight to S, without the crop."""
    d, s = cfg.data, cfg.student.image_size
    preprocess = {"size": [s, s], "mean": list(mean), "std": list(std), "interpolation": d.interpolation,
                  "resize_mode": "shortest" if d.resize == "center_crop" else "squash"}
    differences = []
    if d.eval_crop != 1:
        differences.append(f"vlmdistill eval sees the centre {d.eval_crop:g} of the image, open_clip the whole "
                           f"{'shorter side' if d.resize == 'center_crop' else 'image'}")
    if d.base_size != s:
        differences.append(f"vlmdistill eval resizes to {d.base_size} px then area-resamples to {s} px, open_clip "
                           f"resizes to {s} px directly")
    if d.decode == "device":
        differences.append("vlmdistill eval decodes JPEGs on the device (data.decode=device), open_clip with PIL")
    view: dict[str, Any] = {"matches_vlmdistill_eval": not differences}
    if differences:
        view["reason"] = "; ".join(differences)
        view["fix"] = (f"a run trained with data.base_size={s} data.eval_crop=1"
                       + (" data.decode=cpu" if d.decode == "device" else "") + " has a view open_clip reproduces")
    return preprocess, view


def _template_file(cfg: ExperimentConfig, split: Split) -> str:
    """``text.template`` as CLIP_benchmark's ``{c}`` template, checked to give our plain prompts as it reads them."""
    text = cfg.text.template.replace("{name}", "{c}") + "\n"
    read = [line.strip() for line in text.splitlines()]
    try:
        same = len(read) == 1 and [read[0].format(c=n) for n in _names_as_read(split)] == split.space.prompts(
            cfg.text.template, cfg.text.description_template, False)
    except (KeyError, IndexError, ValueError):
        same = False
    if not same:
        raise ClipBenchmarkError(f"text.template {cfg.text.template!r} cannot be written as a CLIP_benchmark template "
                                 "that gives the same prompts: one line, no leading or trailing spaces (CLIP_benchmark "
                                 "strips them), the class as {name}")
    return text


def _names_as_read(split: Split) -> list[str]:
    """classnames.txt's lines as CLIP_benchmark reads them (stripped), refused if that changes a name."""
    names = split.space.names
    read = [line.strip() for line in "".join(f"{n}\n" for n in names).splitlines()]
    if read != names:
        bad = [n for n in names if n.strip() != n or len(n.splitlines()) != 1]
        raise ClipBenchmarkError(f"class names {bad[:5]} do not survive classnames.txt (one name a line, stripped); "
                                 "rename them in label2text.txt")
    return names


def _prompt_map(cfg: ExperimentConfig, split: Split, name: str) -> dict[str, dict[str, list[str]]]:
    """CuPL's layout keyed by the dataset's name: each class name's one prompt, exactly ``vlmdistill eval``'s."""
    names, prompts = _names_as_read(split), class_prompts(cfg, split.space)
    by_name: dict[str, list[str]] = {}
    for n, p in zip(names, prompts, strict=True):
        if by_name.setdefault(n, [p]) != [p]:
            raise ClipBenchmarkError(f"two classes are named {n!r} with different prompts; CLIP_benchmark looks "
                                     "prompts up by class name: rename one in label2text.txt")
    return {name: by_name}


def _png(record: Record) -> bytes:
    """The source pixels as PNG; unreadable images raise ``BadImageError`` naming the image."""
    try:
        data = read_member(record) if record.shard is not None else record.path.read_bytes()
    except OSError as err:
        raise BadImageError(record.path, f"{type(err).__name__}: {err}") from err
    rgb = decode_rgb(data, str(record.path))
    rgb.info.clear()  # no colour profile or transparency key: only the pixels
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path, split: Split, shard_size: int, skip_bad: bool) -> tuple[int, int, list[str]]:
    """``folder/test/<n>.tar`` and ``nshards.txt``; returns (images written, shards, keys of skipped images)."""
    import webdataset

    test = folder / "test"
    test.mkdir()
    written, skipped = 0, []
    per_shard = min(shard_size, math.ceil(len(split) / MIN_SHARDS))
    with webdataset.ShardWriter(str(test / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for record, label in zip(split.records, split.labels, strict=True):
            try:
                png = _png(record)
            except BadImageError:
                if not skip_bad:
                    raise
                skipped.append(record.key)
                continue
            sink.write({"__key__": f"s{written:07d}", "png": png, "cls": label})
            written += 1
    shards = len(list(test.glob("*.tar")))
    atomic_write_text(test / "nshards.txt", f"{shards}\n")
    return written, shards, skipped


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ClipBenchmarkError(f"{out} is a file; give a folder for the CLIP_benchmark dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise ClipBenchmarkError(f"{out} is not empty and was not written by `vlmdistill clip-benchmark` (no "
                                 f"{PROVENANCE}); give a new or empty folder")


def write_clip_benchmark(cfg: ExperimentConfig, out: Path, split: BenchSplit = "ood", shard_size: int = 1000
                         ) -> dict[str, Any]:
    """Write ``split`` of ``cfg``'s dataset with ``cfg``'s class prompts as the CLIP_benchmark dataset ``out``
    (named ``wds/<out's name>``); built aside and swapped in whole. Returns what ``vlmdistill.json`` records."""
    out, t = Path(out), cfg.text
    if split not in ("ood", "id_val"):
        raise ClipBenchmarkError(f"split must be ood or id_val, got {split!r}")
    if t.learn_context:
        raise ClipBenchmarkError("this run scores against a learned prompt context (text.learn_context), which no "
                                 "text prompt expresses; add text.learn_context=false to write the plain prompts")
    if shard_size < 1:
        raise ClipBenchmarkError(f"--shard-size must be at least 1 image per shard, got {shard_size}")
    _check_out(out)
    dataset = open_dataset(cfg.data.dir, t.descriptions, skip_missing=cfg.data.skip_bad_images)
    part = dataset.ood_val if split == "ood" else dataset.id_val
    if not len(part):
        raise ClipBenchmarkError(f"split {split} of {cfg.data.dir} has no images")
    templates = _template_file(cfg, part)
    prompts = _prompt_map(cfg, part, out.name) if t.use_descriptions else None
    with replace_dir(out) as new:
        n, shards, skipped = _write_shards(new, part, shard_size, cfg.data.skip_bad_images)
        if not n:
            raise ClipBenchmarkError(f"no image of split {split} of {cfg.data.dir} could be read")
        atomic_write_text(new / "classnames.txt", "".join(f"{c}\n" for c in part.space.names))
        atomic_write_text(new / TEMPLATES, templates)
        if prompts is not None:
            atomic_write_text(new / PROMPTS, json.dumps(prompts, indent=1, ensure_ascii=False) + "\n")
        info = {"dataset": str(cfg.data.dir), "split": split, "name": f"wds/{out.name}", "images": n,
                "classes": len(part.space), "shards": shards,
                "skipped": skipped + [k for k in dataset.missing if k.startswith(f"{part.name}/")],
                "prompts_of_vlmdistill_eval": PROMPTS if prompts is not None else TEMPLATES}
        atomic_write_json(new / PROVENANCE, info)
    return info
