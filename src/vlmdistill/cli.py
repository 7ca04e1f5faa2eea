"""The ``vlmdistill`` command line: one verb per job.

Every verb that takes an experiment takes ``CONFIG.yaml`` followed by ``key=value`` overrides, e.g.
``vlmdistill train configs/paper/cub_resnet18.yaml optim.lr=0.01 loss.mse.weight=1``.

Longer than the project's ~400 lines on purpose: it is the one place the command line is declared, one
short function per verb, mostly typed option declarations that call a job; splitting it would scatter the
``--help`` texts a user reads together.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.logging import RichHandler

from vlmdistill.errors import VlmdistillError
from vlmdistill.progress import console
from vlmdistill.progress import out as out_console

if TYPE_CHECKING:
    from vlmdistill.config import ExperimentConfig

T = TypeVar("T")

app = typer.Typer(
    help="Distill a CLIP-style teacher into a small open-vocabulary student image encoder.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file (see configs/); '-' for none (defaults "
                                                "plus overrides).", exists=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="key=value overrides, e.g. optim.lr=0.01 loss.imcst.weight=1")
]


def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a job; known input errors become one red line and exit code 2 instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except VlmdistillError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


def _train_error(err: VlmdistillError, again: str) -> typer.Exit:
    """A train job's error line: a full disk or a lost rank left the run resumable, so the line ends with the
    resume command; a lost rank is reported by one survivor, whatever rank it is (the others stay quiet)."""
    from vlmdistill.integrity import RankLost
    from vlmdistill.io import DiskFullError

    if isinstance(err, RankLost | DiskFullError):
        under = " (under torchrun, as before)" if isinstance(err, RankLost) else ""
        err_line = f"{err}; resume with: {again}{under}"
    else:
        err_line = str(err)
    if isinstance(err, RankLost) and err.speaks:
        console.quiet = False
    console.print(f"[bold red]error:[/] {err_line}", soft_wrap=True)
    return typer.Exit(2)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.ERROR,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    logging.getLogger("vlmdistill").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        disable_progress_bars()
        logging.getLogger("root").setLevel(logging.ERROR)


def _load(config: Path | None, overrides: list[str] | None) -> ExperimentConfig:
    from vlmdistill.config import load_config

    return _run(load_config, None if str(config) == "-" else config, overrides or [])


@app.command()
def prepare(
    out: Annotated[Path, typer.Argument(help="Folder to write the prepared dataset into.")],
    lists: Annotated[Path | None, typer.Option(help="Folder with the paper's {train,val_on_train,val}_data.txt "
                                                    "(+ label2text.txt, chatgpt.txt).")] = None,
    images: Annotated[Path | None, typer.Option(help="Raw image folder: where list entries live, or class folders "
                                                     "to split by seed.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="CSV with columns path,label[,split].")] = None,
    labels: Annotated[Path | None, typer.Option(help="label2text.txt giving class order and names.")] = None,
    descriptions: Annotated[Path | None, typer.Option(help="chatgpt.txt (line-aligned) or JSON {class: text}.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random ID/OOD class split and the 70/30 image split.")] = 0,
    id_fraction: Annotated[float, typer.Option(help="Fraction of classes that are ID (ceil).")] = 0.5,
    train_fraction: Annotated[float, typer.Option(help="Per ID class: ceil(f * n) images train, rest ID-val.")] = 0.7,
    id_classes: Annotated[Path | None, typer.Option(help="File: one ID class folder a line (else random).")] = None,
    unlabeled: Annotated[Path | None, typer.Option(help="Unlabelled image pool to record with the dataset: a "
                                                        "folder, a list file or a CSV with a 'path' column.")] = None,
    shards: Annotated[bool, typer.Option(help="Write the splits as webdataset tar shards (image, class, key) "
                                              "under OUT/shards instead of linking the images.")] = False,
    shard_size: Annotated[int, typer.Option(help="Images per tar shard (with --shards).")] = 1000,
    multilabel_csv: Annotated[Path | None, typer.Option(help="Multi-label CSV path,labels[,split] (labels "
                                                             "separated by ';').")] = None,
    h5: Annotated[list[str] | None, typer.Option(help="PickClutter h5 file, as FILE (split by the ID objects) or "
                                                      "SPLIT=FILE; repeatable.")] = None,
    id_objects: Annotated[str | None, typer.Option(help="Multi-label: the ID object names, separated by ';'.")] = None,
    traj_type: Annotated[str | None, typer.Option(help="h5: keep only scenes with this traj_type.")] = None,
    skip_bad: Annotated[bool, typer.Option(help="Multi-label: skip (and count) bad scenes or missing images "
                                                "instead of stopping.")] = False,
) -> None:
    """Materialise ID-train / ID-val / OOD-val splits (the paper's layout, images linked not copied), or a
    multi-label dataset (--multilabel-csv or --h5: the paper's ID/OOD object split)."""
    if multilabel_csv is not None or h5:
        _prepare_multilabel(out, multilabel_csv, h5 or [], id_objects, seed, train_fraction, traj_type, skip_bad)
        return
    from vlmdistill.data.prepare import prepare as do_prepare

    ids = [x.strip() for x in id_classes.read_text().splitlines() if x.strip()] if id_classes else None
    counts = _run(do_prepare, out, lists=lists, images=images, csv_path=csv, labels=labels,
                  descriptions=descriptions, seed=seed, id_fraction=id_fraction, train_fraction=train_fraction,
                  id_classes=ids, unlabeled=unlabeled, shards=shards, shard_size=shard_size)
    console.print(f"prepared {out}: {counts}")


def _prepare_multilabel(out: Path, csv: Path | None, h5: list[str], id_objects: str | None, seed: int,
                        train_fraction: float, traj_type: str | None, skip_bad: bool) -> None:
    from vlmdistill.data.multilabel_set import prepare_multilabel

    files = [(s, Path(f)) if sep else (None, Path(s)) for s, sep, f in (item.partition("=") for item in h5)]
    ids = [x.strip() for x in id_objects.split(";") if x.strip()] if id_objects else None
    counts = _run(prepare_multilabel, out, csv_path=csv, h5=files, id_objects=ids, seed=seed,
                  train_fraction=train_fraction, traj_type=traj_type, skip_bad=skip_bad)
    console.print(f"prepared {out}: {counts}")


def _skipped_line(results: dict[str, Any], where: Path) -> None:
    """Say how many unreadable images a job skipped (data.skip_bad_images), and where they are listed."""
    n = (results.get("data") or {}).get("skipped_images", 0)
    if n:
        console.print(f"[yellow]skipped {n} unreadable images[/] (listed in {where})")


def _interrupted(stop: Any, then: str) -> typer.Exit:
    """The line a SIGINT/SIGTERM-stopped job leaves, and the exit code of that signal (130, 143)."""
    console.print(f"interrupted at step {stop.step} of {stop.total}; {then}", soft_wrap=True)
    return typer.Exit(stop.exit_code)


@app.command()
def train(
    config: ConfigArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from <run>/checkpoints if present.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Train again over an existing run of this name, deleting its "
                                                 "checkpoints and results (its teacher/ results stay).")] = False,
    allow_config_change: Annotated[bool, typer.Option(help="With --resume: accept overrides that change the "
                                                           "training itself (seed, lr, loss weights...); each change "
                                                           "is recorded with its step.")] = False,
) -> None:
    """Distill a student: writes checkpoints, TensorBoard logs and results.json into output_dir/name.

    Ctrl-C or SIGTERM saves a checkpoint at the current step and exits 130 / 143; --resume continues."""
    import shlex

    from vlmdistill.loop import RunInterrupted
    from vlmdistill.report import comparison_rows, rich_table
    from vlmdistill.train import distill

    cfg = _load(config, overrides)
    again = shlex.join(["vlmdistill", "train", str(config), *(overrides or []), "--resume"])
    try:
        results = distill(cfg, resume=resume, overwrite=overwrite, allow_config_change=allow_config_change)
    except RunInterrupted as stop:
        raise _interrupted(stop, f"resume with: {again}") from None
    except VlmdistillError as err:
        raise _train_error(err, again) from None
    out_console.print(rich_table(*comparison_rows([results]), title=str(cfg.run_dir)))
    _skipped_line(results, cfg.run_dir / "results.json")


@app.command("eval")
def evaluate(
    config: ConfigArg,
    overrides: Overrides = None,
    run: Annotated[Path | None, typer.Option(help="Run directory whose checkpoint to score "
                                                  "(default output_dir/name).")] = None,
    teacher_only: Annotated[bool, typer.Option(help="Score the teacher's own zero-shot instead.")] = False,
) -> None:
    """Zero-shot ID / OOD / generalized accuracy of a trained student, or of the teacher alone; a multi-label
    run's Table 12 columns (accuracy, F1, mAP; the teacher alone: mAP on the camera it sees)."""
    from vlmdistill.data.multilabel_set import is_multilabel
    from vlmdistill.evaluate import eval_results_path, evaluate_run, evaluate_teacher
    from vlmdistill.mltrain import evaluate_multilabel_run, evaluate_multilabel_teacher
    from vlmdistill.report import comparison_rows, rich_table
    from vlmdistill.workspace import build_workspace

    cfg = _load(config, overrides)
    run_dir = run or cfg.run_dir
    written = cfg.run_dir / "teacher" / "results.json" if teacher_only else eval_results_path(cfg, run_dir)
    multilabel = is_multilabel(cfg.data.dir)
    if multilabel and teacher_only:
        results = _run(evaluate_multilabel_teacher, cfg)
    elif multilabel:
        results = _run(evaluate_multilabel_run, cfg, run_dir)
    elif teacher_only:
        results = _run(evaluate_teacher, cfg, _run(build_workspace, cfg))
    else:
        results = _run(evaluate_run, cfg, _run(build_workspace, cfg), run_dir, analysis=cfg.train.analysis)
    out_console.print(rich_table(*comparison_rows([results])))
    _skipped_line(results, written)


@app.command()
def fewshot(
    config: ConfigArg,
    overrides: Overrides = None,
    from_run: Annotated[Path | None, typer.Option("--from", help="Distilled run directory to adapt "
                                                                 "(default output_dir/name).")] = None,
    shots: Annotated[int | None, typer.Option(help="Images per OOD class (default fewshot.shots).")] = None,
    method: Annotated[list[str] | None, typer.Option(help="finetune and/or retrieval (default both).")] = None,
    continual: Annotated[bool, typer.Option(help="Also the paper's continual setting: adapt on half of the OOD "
                                                 "classes, score both halves.")] = False,
) -> None:
    """Adapt a distilled student to the OOD classes from K images each: finetune and Tip-Adapter retrieval."""
    from vlmdistill.data.multilabel_set import is_multilabel
    from vlmdistill.fewshot import run_fewshot
    from vlmdistill.loop import RunInterrupted
    from vlmdistill.workspace import build_workspace

    extra = [f"fewshot.shots={shots}"] if shots is not None else []
    if method:
        extra.append(f"fewshot.methods=[{','.join(method)}]")
    if continual:
        extra.append("fewshot.continual=true")
    cfg = _load(config, [*(overrides or []), *extra])
    if is_multilabel(cfg.data.dir):
        _multilabel_fewshot(cfg, from_run or cfg.run_dir)
        return
    ws = _run(build_workspace, cfg)
    try:
        out = _run(run_fewshot, cfg, ws, from_run or cfg.run_dir)
    except RunInterrupted as stop:
        raise _interrupted(stop, "few-shot adaptation does not resume: run the same command again") from None
    for name in ("finetune", "retrieval"):
        if name in out:
            ood = out[name]["ood"]
            n = out[name].get("averaged_over", 1)
            how = f"mean of the last {n} evaluations" if n > 1 else "one evaluation"
            console.print(f"{out['shots']}-shot {name}: OOD mean per-class {ood['mean_per_class_recall']:.2f}% "
                          f"(acc1 {ood['acc1']:.2f}%, {ood['n_images']} images; {how})")
    if "continual" in out:
        c = out["continual"]
        console.print(f"continual: before {c['before']}, after adapting on half 1: {c['after']}")
    _skipped_line(out, (from_run or cfg.run_dir) / "fewshot.json")


def _multilabel_fewshot(cfg: Any, from_run: Path) -> None:
    """Few-shot finetuning on multi-label scenes (``multilabel.fewshot_scenes`` OOD scenes); its table."""
    from vlmdistill.loop import RunInterrupted
    from vlmdistill.mlfewshot import run_multilabel_fewshot
    from vlmdistill.report import comparison_rows, rich_table

    try:
        out = _run(run_multilabel_fewshot, cfg, from_run)
    except RunInterrupted as stop:
        raise _interrupted(stop, "few-shot adaptation does not resume: run the same command again") from None
    out_console.print(rich_table(*comparison_rows([{"run": str(from_run), "fewshot": out}])))


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="Small world, short training (about 25 s on 2 cores); the tests "
                                             "run it.")] = False,
    seeds: Annotated[int, typer.Option(help="Run every variant with seeds 0..N-1; the table shows mean ± std.")] = 1,
    out: Annotated[Path, typer.Option(help="Runs, report.md, results.json and plots go here.")] = Path("runs/demo"),
    cache_dir: Annotated[Path, typer.Option(help="World, teacher and target caches (reused).")] = Path(
        ".cache/vlmdistill"),
    pools: Annotated[bool, typer.Option(help="Also train with unlabelled pools of the world: an ID-only control "
                                             "(4x the train set) and the domain at 1x and 4x.")] = False,
    clutter: Annotated[bool, typer.Option(help="Instead: the robotics experiment (Table 12) on cluttered RGB-D "
                                               "scenes of the world's objects, multi-label, zero- and few-shot "
                                               "(about 12 min a seed on 2 cores; README).")] = False,
    overrides: Overrides = None,
) -> None:
    """The whole method offline on a generated world: teacher, distilled variants, 5-shot, report."""
    from vlmdistill.demo.report import findings, rich_summary
    from vlmdistill.demo.run import POOL_ROWS, ROWS, run_demo

    if clutter:
        _clutter_demo(out, cache_dir, seeds, overrides or [])
        return

    rows = (*ROWS, *POOL_ROWS) if pools else ROWS
    summary = _run(run_demo, out, cache_dir, quick=quick, seeds=seeds, overrides=overrides or [], rows=rows)
    out_console.print(rich_summary(summary))
    for claim, ok, detail in findings(summary):
        console.print(f"{'[green]yes[/]' if ok else '[red]no[/]'}  {claim}: {detail}")
    console.print(f"report: {out / 'report.md'} ({summary['seconds']:.0f} s)")


def _clutter_demo(out: Path, cache_dir: Path, seeds: int, overrides: list[str]) -> None:
    from vlmdistill.demo.clutter_run import clutter_table, findings, run_clutter_demo

    summary = _run(run_clutter_demo, out, cache_dir, seeds=seeds, overrides=overrides)
    out_console.print(clutter_table(summary))
    for claim, ok, detail in findings(summary):
        console.print(f"{'[green]yes[/]' if ok else '[red]no[/]'}  {claim}: {detail}")
    console.print(f"report: {out / 'clutter.md'} ({summary['seconds']:.0f} s)")


@app.command()
def cache(
    config: ConfigArg,
    overrides: Overrides = None,
    verify: Annotated[bool, typer.Option(help="Re-hash every shard of every store under cache_dir (opening a "
                                              "store only re-hashes files whose size or mtime changed); "
                                              "damaged shards are re-extracted on next use.")] = False,
) -> None:
    """Extract and store the teacher's embeddings of every training image under its stored views."""
    from vlmdistill.targets.lookup import target_recipe
    from vlmdistill.targets.store import open_store, store_footprint, store_path, verify_stores
    from vlmdistill.workspace import build_workspace

    cfg = _load(config, overrides)
    if verify:
        damaged = _run(verify_stores, cfg.cache_dir)
        for directory, shards in damaged.items():
            state = f"damaged shards {shards} dropped, re-extracted on next use" if shards else "ok"
            console.print(f"{directory}: {state}")
        console.print(f"verified {len(damaged)} store(s) under {cfg.cache_dir / 'targets'}")
        return
    recipe = target_recipe(cfg)
    if recipe is None:
        console.print("this config renders views that cannot be stored (data.augment_per=batch or "
                      "train.target_views=0): training runs the teacher online, there is nothing to cache")
        return
    ws = _run(build_workspace, cfg)
    store = _run(open_store, ws.teacher, ws.train, recipe, cfg.cache_dir, cfg.train.progress)
    fp = store_footprint(store)
    views = f"{fp['n_views']} views (the whole image + {fp['n_views'] - 1} random)"
    console.print(f"target store: {fp['n_images']} images x {views} x {fp['embed_dim']} dims, "
                  f"{fp['disk_bytes'] / 2**20:.1f} MiB on disk ({fp['disk_bytes_per_1000_image_views'] / 2**20:.2f} "
                  f"MiB per 1000 image-views) -> {store_path(cfg.cache_dir, store.key)}")


@app.command("text-stats")
def text_stats(
    config: ConfigArg,
    overrides: Overrides = None,
    out: Annotated[Path | None, typer.Option(help="Folder for text_stats.json and the spectrum plots "
                                                  "(default <run>/text).")] = None,
) -> None:
    """Spread of the class text embeddings per prompt recipe: mean pairwise cosine and SVD spectrum."""
    from vlmdistill.text.stats import text_diagnostics
    from vlmdistill.workspace import build_workspace

    cfg = _load(config, overrides)
    ws = _run(build_workspace, cfg)
    target = out or cfg.run_dir / "text"
    stats = _run(text_diagnostics, cfg, ws, target)
    for split, recipes in stats.items():
        for recipe, v in recipes.items():
            console.print(f"{split:>3} {recipe:<12} mean pairwise cosine {v['mean_pairwise_cosine']:.4f}")
    console.print(f"plots and text_stats.json in {target}")


config_app = typer.Typer(help="Inspect experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: ConfigArg, overrides: Overrides = None) -> None:
    """Print the resolved config as YAML: every key, with defaults, mode: paper and overrides applied."""
    import yaml

    from vlmdistill.config import config_to_dict

    out_console.print(yaml.safe_dump(config_to_dict(_load(config, overrides)), sort_keys=False), end="",
                      highlight=False, markup=False)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (or results.json files).")],
    out: Annotated[Path | None, typer.Option(help="Write the table here (.md or .csv).")] = None,
) -> None:
    """Compare runs' results.json side by side."""
    from vlmdistill.io import atomic_write_text
    from vlmdistill.report import comparison_rows, csv_text, load_results, markdown_table, rich_table

    header, rows = comparison_rows(_run(load_results, runs))
    out_console.print(rich_table(header, rows))
    if out is not None:
        atomic_write_text(out, csv_text(header, rows) if out.suffix == ".csv" else markdown_table(header, rows))
        console.print(f"wrote {out}")


@app.command()
def describe(
    labels: Annotated[Path, typer.Argument(help="label2text.txt, or a text file with one class name per line.")],
    out: Annotated[Path, typer.Option(help="Output: .json {class: description} or chatgpt.txt (line-aligned).")],
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")] = (
        "https://api.openai.com/v1"),
    model: Annotated[str, typer.Option(help="Model name at that endpoint.")] = "gpt-4o-mini",
    api_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    prompt: Annotated[str, typer.Option(help="paper | succinct | detailed | distinct, or a custom instruction "
                                             "containing {cls}.")] = "paper",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at most.")] = 4,
    retries: Annotated[int, typer.Option(help="Retries per class on timeouts, 429, 5xx, bad answers.")] = 5,
    cache_file: Annotated[Path | None, typer.Option("--cache", help="Resumable answer cache (JSONL); default "
                                                                    "next to --out.")] = None,
    teacher_config: Annotated[Path | None, typer.Option(help="Experiment YAML whose teacher's tokenizer checks "
                                                             "that each prompt fits its context.")] = None,
) -> None:
    """Write one-sentence appearance descriptions per class with an LLM (the paper's chatgpt.txt)."""
    from vlmdistill.text.describe import LLMEndpoint, describe_classes, write_chatgpt_txt, write_descriptions
    from vlmdistill.text.labels import read_class_list

    names = [c.name for c in _run(read_class_list, labels)]
    count_tokens, context = None, 77
    if teacher_config is not None:
        from vlmdistill.teachers import load_teacher

        teacher = _run(load_teacher, _load(teacher_config, []).teacher)
        count_tokens, context = teacher.count_tokens, teacher.context_length
    endpoint = LLMEndpoint(base_url=base_url, model=model, api_key_env=api_key_env)
    result = describe_classes(
        names, endpoint, prompt=prompt, cache_path=cache_file or out.with_suffix(".cache.jsonl"),
        concurrency=concurrency, max_retries=retries, count_tokens=count_tokens, context_length=context,
    )
    if result.failed:
        for name, why in list(result.failed.items())[:10]:
            console.print(f"[red]failed[/] {name}: {why}")
        console.print(f"[bold red]{len(result.failed)} classes failed[/]; answers so far are cached, re-run to retry")
    for name, n in result.too_long.items():
        console.print(f"[yellow]truncated[/] {name}: {n} tokens > {context}")
    if not result.failed:
        if out.suffix == ".json":
            write_descriptions(result, out)
        else:
            write_chatgpt_txt(names, result, out)
        console.print(f"wrote {out}: {len(result.descriptions)} descriptions "
                      f"({result.requests_made} requests, {result.cache_hits} from cache)")
    raise typer.Exit(1 if result.failed else 0)


@app.command("export")
def export_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory (runs/<name>).")],
    out: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    labels: Annotated[Path | None, typer.Option(help="Classes to store: one name a line, or a label2text.txt "
                                                     "(default: the run's ID and OOD classes).")] = None,
    descriptions: Annotated[Path | None, typer.Option(help="Descriptions of --labels: chatgpt.txt or JSON.")] = None,
    open_clip: Annotated[bool, typer.Option("--open-clip", help="Also write an open_clip model (timm "
                                            "student + the teacher's text tower) in OUT/open_clip.")] = False,
    text_tower: Annotated[bool, typer.Option(help="Carry the teacher's text tower in OUT/text, so the folder "
                                             "classifies new class names anywhere; --no-text-tower ships the "
                                             "stored class embeddings alone.")] = True,
) -> None:
    """A self-contained model folder: weights, manifest, class text embeddings, model.onnx, the text tower."""
    from vlmdistill.export import export_model
    from vlmdistill.mlapi import export_multilabel, is_multilabel_model

    if _run(is_multilabel_model, run_dir):
        manifest = _run(export_multilabel, run_dir, out)
        console.print(f"wrote {out}: multi-label student ({manifest['onnx']['input']}), {len(manifest['names'])} "
                      f"object names, model.onnx (max |onnx - torch| {manifest['onnx']['parity_max_abs_diff']:.1e})")
        return

    manifest = _run(export_model, run_dir, out, labels=labels, descriptions=descriptions, open_clip=open_clip,
                    text_tower=text_tower)
    oc, tt = manifest["open_clip"], manifest["text_tower"]
    console.print(f"wrote {out}: {manifest['student']['arch']} ({manifest['student']['parameters']:,} parameters), "
                  f"{len(manifest['classes'])} classes, model.onnx (max |onnx - torch| "
                  f"{manifest['onnx']['parity_max_abs_diff']:.1e})"
                  + (f", text tower in {out / tt['dir']} (max |saved - teacher| {tt['parity_max_abs_diff']:.1e})"
                     if tt else ", no text tower (stored classes only)")
                  + (f", open_clip model in {out / oc['dir']} (max |open_clip - student| "
                     f"{oc['parity_max_abs_diff']:.1e})" if oc else ""))
    if oc and not oc["matches_vlmdistill_eval"]:
        console.print(f"[yellow]warning:[/] open_clip's preprocess is not this run's eval view ({oc['reason']}), so "
                      f"CLIP_benchmark scores other pixels than vlmdistill eval; {oc['fix']}", soft_wrap=True)


@app.command("clip-benchmark")
def clip_benchmark_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder to write; its name is the dataset's: wds/<name>.")],
    config: ConfigArg,
    overrides: Overrides = None,
    split: Annotated[str, typer.Option(help="ood (the unseen classes: OOD-val over the OOD classes) or id_val "
                                            "(ID-val over the ID classes), as vlmdistill eval scores each.")] = "ood",
    shard_size: Annotated[int, typer.Option(help="Images per tar shard at most (a split of 4 images or more is at "
                                               "least 4 shards: one per CLIP_benchmark reader worker).")] = 1000,
) -> None:
    """Write a split in CLIP_benchmark's webdataset layout, with the class names and prompts vlmdistill eval
    scores with (from the same CONFIG and overrides), for `clip_benchmark eval` on an `export --open-clip`."""
    from vlmdistill.clip_benchmark import MIN_SHARDS, PROMPTS, write_clip_benchmark

    cfg = _load(config, overrides)
    info = _run(write_clip_benchmark, cfg, out, split, shard_size)
    prompts = f" --custom_template_file {out / PROMPTS}" if info["prompts_of_vlmdistill_eval"] == PROMPTS else ""
    console.print(f"wrote {out}: {info['images']} images of {info['classes']} classes ({split}) in {info['shards']} "
                  f"shard(s)" + (f", skipped {len(info['skipped'])} unreadable" if info["skipped"] else ""))
    workers = f" --num_workers {info['shards']}" if info["shards"] < MIN_SHARDS else ""
    console.print(f"clip_benchmark eval --model local-dir:MODEL/open_clip --dataset {info['name']} --dataset_root "
                  f"{out}{prompts} --no_amp{workers} --output {out.name}.json", soft_wrap=True)


def _predict_classes(labels: Path | None, classes: str | None, descriptions: Path | None
                     ) -> tuple[list[str] | None, list[str | None] | None]:
    """Class names (None: the model's stored classes) and their descriptions, from --labels or --classes."""
    from vlmdistill import inputs
    from vlmdistill.api import read_classes
    from vlmdistill.text.labels import ClassInfo, read_descriptions

    if labels is not None and classes is not None:
        raise inputs.InputError("give --labels or --classes, not both")
    if labels is not None:
        names, descs = read_classes(labels, descriptions)
        return inputs.class_names(names, f"--labels {labels}"), descs
    if classes is None:
        if descriptions is not None:
            raise inputs.InputError("--descriptions describes the classes of --labels or --classes; the model's "
                                    "stored classes carry their own")
        return None, None
    names = inputs.parse_class_list(classes)
    if descriptions is None:
        return names, None
    infos = read_descriptions(descriptions, [ClassInfo(dir=n, id=i + 1, name=n) for i, n in enumerate(names)],
                              Path("--classes"))
    return names, [c.description for c in infos]


@app.command("predict")
def predict_cmd(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (vlmdistill export) or a run directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files and folders (searched recursively).")],
    labels: Annotated[Path | None, typer.Option(help="Class names: one a line, or a label2text.txt.")] = None,
    classes: Annotated[str | None, typer.Option(help='Comma-separated class names, e.g. "cat,dog,bird".')] = None,
    descriptions: Annotated[Path | None, typer.Option(help="Descriptions of the --labels / --classes classes: a "
                                                           "line-aligned chatgpt.txt or JSON {class: text}; used "
                                                           "when the run was trained with descriptions.")] = None,
    top_k: Annotated[int, typer.Option(help="Labels per image (1 or more; all classes when fewer).")] = 5,
    out: Annotated[Path | None, typer.Option(help="Write predictions to a .jsonl or .csv file.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto.")] = "cpu",
) -> None:
    """Top-k classes of each image; new class names go through the teacher's text tower. Unreadable
    images are reported one by one and the rest are still predicted."""
    from vlmdistill import inputs
    from vlmdistill.api import load
    from vlmdistill.mlapi import MultiLabelDistilled
    from vlmdistill.predict import format_rows, output_kind, predict, write_predictions

    _run(inputs.top_k, top_k, "--top-k")
    _run(inputs.device, device, "--device")
    if out is not None:
        _run(output_kind, out)
    names, descs = _run(_predict_classes, labels, classes, descriptions)
    model = _run(load, model_dir, device)
    if isinstance(model, MultiLabelDistilled):
        _predict_scenes(model, images, names, out)
        return
    rows = _run(predict, model, images, names, top_k, descriptions=descs)
    if out is not None:
        _run(write_predictions, rows, out)
    else:
        typer.echo(format_rows(rows, "jsonl"), nl=False)
    bad = [r for r in rows if r.error]
    for r in bad:
        typer.echo(f"unreadable {r.path}: {r.error}", err=True)
    typer.echo(f"{len(rows) - len(bad)} images predicted, {len(bad)} unreadable"
               + (f"; wrote {out}" if out is not None else ""), err=True)


def _predict_scenes(model: Any, scenes: list[Path], names: list[str] | None, out: Path | None) -> None:
    """A multi-label model: one JSON line per scene (h5 files: each scene) with the present objects and every
    name's probability, printed or written to ``out`` (.jsonl)."""
    from vlmdistill.io import atomic_write_text
    from vlmdistill.mlapi import detections_json

    if out is not None and out.suffix != ".jsonl":
        console.print(f"[bold red]error:[/] --out {out}: a multi-label model writes .jsonl (one scene a line)")
        raise typer.Exit(2)
    rows = _run(model.detect, scenes, names)
    text = detections_json(rows)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
    typer.echo(f"{len(rows)} scenes predicted" + (f"; wrote {out}" if out is not None else ""), err=True)


def run() -> None:
    """The entry point: under torchrun every rank joins the process group first; only rank 0 prints."""
    from vlmdistill import distributed

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    distributed.init_from_env()
    if not distributed.is_main():
        console.quiet = out_console.quiet = True
    try:
        app()
    finally:
        distributed.shutdown()
