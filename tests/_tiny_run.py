"""One tiny trained run per test session, shared by the export / predict / load tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

_RUNS: dict[str, Path] = {}


def tiny_run(root: Path, prepared: Path, teacher_files: tuple[Path, Path], name: str = "tiny",
             extra: tuple[str, ...] = ()) -> Path:
    """``vlmdistill train`` of a timm ResNet-10-T at 32 px for one epoch against the tiny open_clip teacher."""
    if name in _RUNS:
        return _RUNS[name]
    from vlmdistill.cli import app

    cfg_path, ckpt = teacher_files
    overrides = [
        f"name={name}", f"data.dir={prepared}", "data.base_size=40", "data.num_workers=0", "data.preload=true",
        f"teacher.model_config={cfg_path}", f"teacher.checkpoint={ckpt}", "teacher.batch_size=16",
        "teacher.device=cpu", "device=cpu", "student.arch=resnet10t", "student.image_size=32",
        "optim.batch_size=8", "optim.epochs=1", "optim.lr=0.01", "train.progress=false", "train.target_views=0",
        "train.analysis=false", "loss.imcst.weight=1", f"output_dir={root / 'runs'}", f"cache_dir={root / 'cache'}",
        *extra,
    ]
    res = CliRunner().invoke(app, ["train", "-", *overrides])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    _RUNS[name] = root / "runs" / name
    return _RUNS[name]


def exported(run: Path, open_clip: bool = True) -> Path:
    """The run's model folder (``export --open-clip``), made once."""
    key = f"{run}:export:{open_clip}"
    if key not in _RUNS:
        from vlmdistill.export import export_model

        out = run.parent / f"{run.name}-model{'-oc' if open_clip else ''}"
        export_model(run, out, open_clip=open_clip)
        _RUNS[key] = out
    return _RUNS[key]


def fake_run(src: Path, dest: Path, overrides: dict[str, dict[str, object]]) -> Path:
    """A copy of run ``src`` with config sections changed, for the refusal tests."""
    import shutil

    import yaml

    shutil.copytree(src, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    for section, values in overrides.items():
        cfg[section].update(values)
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest
