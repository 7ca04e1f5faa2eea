"""`vlmdistill demo --quick`: the whole offline job end to end, with its report and plots."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from vlmdistill.cli import app


def test_quick_demo_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "results.json").read_text())
    rows = summary["rows"]
    assert {"teacher", "closed_set", "cls", "cls_mse", "cls_imcst", "best", "best_desc", "best_desc_paper"} <= set(rows)
    assert "ood" not in rows["closed_set"]["metrics"]
    assert "ood_5shot_finetune" in rows["best_desc"]["metrics"]
    assert "ood_5shot_retrieval" in rows["best_desc"]["metrics"]
    assert "m_rel_ood" in rows["best"]["metrics"]
    assert summary["params"]["student"] < summary["params"]["teacher_image"]
    from vlmdistill.api import load
    from vlmdistill.students import count_parameters

    exported = count_parameters(load(out / "seed0" / "best_desc").student)  # what export's manifest records
    assert summary["params"]["student"] == exported
    report = (out / "report.md").read_text()
    assert "The paper's findings, checked" in report
    assert f"Student: {exported:,} parameters" in report
    # --quick trains 4 epochs, all in the tail; the patient row 16, of which the last 5 count
    assert "mean of the last 4 or 5 evaluations of its run" in report
    assert "mean of the last 2 evaluations of the fine-tuning" in report
    for png in ("ood_by_variant.png", "training_curves.png", "embeddings_2d.png"):
        assert (out / png).stat().st_size > 1000
    from vlmdistill.runfolder import RunFolder

    assert RunFolder(out / "seed0" / "best").has_checkpoint()
    from vlmdistill.export import export_model

    # the demo's own student becomes a plain open_clip model (its student is one open_clip's timm tower names)
    manifest = export_model(out / "seed0" / "best_desc", tmp_path / "model", open_clip=True)
    assert manifest["open_clip"]["parity_max_abs_diff"] < 1e-5
    assert (tmp_path / "model" / "open_clip" / "open_clip_model.safetensors").is_file()


def test_quick_demo_time_is_one_figure_everywhere() -> None:
    """README and `demo --help` give --quick the same duration (measured: README, "The demo world")."""
    import typer

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    demo = typer.main.get_command(app).commands["demo"]
    help_text = next(p.help for p in demo.params if p.name == "quick")
    mentions = [ln for ln in readme.splitlines() if "--quick" in ln] + [help_text]
    durations = {d for ln in mentions for d in re.findall(r"(?:about |~)?\d+(?:-\d+)? ?(?:s|min)\b|one-minute", ln)}
    assert durations == {"about 25 s"}, durations
