"""Output as a cluster job's log or a pipe sees it: plain lines per epoch, full-width tables on stdout."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from vlmdistill.cli import app


def test_training_in_a_log_prints_one_line_per_epoch_and_eval(base_overrides: list[str], tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["train", "-", *base_overrides, "name=logged", "optim.epochs=2", "train.progress=true",
            "train.analysis=false", "loss.imcst.weight=1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    err = res.stderr
    for epoch in (1, 2):
        line = next(x for x in err.splitlines() if f"logged epoch {epoch}/2 step" in x)
        assert "cls=" in line and "imcst=" in line and "lr=" in line and "img/s" in line, line
    assert "logged eval epoch 2/2: id=" in err and "ood=" in err
    assert "━" not in err  # no progress bar in a log


def test_compare_writes_the_whole_table_to_stdout(tmp_path: Path) -> None:
    runs = []
    for i in range(3):
        d = tmp_path / f"a-rather-long-run-name-to-overflow-eighty-columns-{i}"
        d.mkdir()
        m = {"ood": {"mean_per_class_recall": 40.0 + i, "acc1": 41.0}, "id": {"mean_per_class_recall": 80.0},
             "gzsl": {"harmonic": 30.0}}
        (d / "results.json").write_text(json.dumps({
            "run": d.name, "metrics": m, "metrics_last_avg": m,
            "analysis": {"train": {"m_rel": 0.2}, "ood": {"m_rel": 0.1, "m_neigh@5": 0.3, "m_vlalign@3": 0.9,
                                                          "mse": 0.8}}}))
        runs.append(str(d))
    res = CliRunner().invoke(app, ["compare", *runs])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "M_vlalign@3 OOD" in out and "…" not in out
    for i in range(3):
        assert f"a-rather-long-run-name-to-overflow-eighty-columns-{i}" in out
    assert max(len(line) for line in out.splitlines()) > 120


def test_config_show_prints_every_resolved_key() -> None:
    import yaml

    res = CliRunner().invoke(app, ["config", "show", "-", "mode=paper", "optim.lr=0.01"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert shown["optim"]["lr"] == 0.01 and shown["data"]["resize"] == "squash"  # override and paper mode
    assert shown["train"]["average_last"] == 5 and "eval_every" in shown["train"]  # defaults too
    res = CliRunner().invoke(app, ["config", "show", "-", "optim.nope=1"])
    assert res.exit_code == 2 and "optim.nope" in res.output
