"""Unlabelled image pools: sources, the honest-protocol checks, term masking, and resume with a pool."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_class_folders
from vlmdistill.cli import app
from vlmdistill.config import ConfigError, LossConfig, load_config
from vlmdistill.data.pool import PoolError, check_disjoint, read_pool, recorded_pool
from vlmdistill.demo.unlabeled import ensure_pool, train_size
from vlmdistill.demo.world import LIST_FILES, WorldParams, generate_world, resolve_list_entry
from vlmdistill.losses import ClsLoss, LossInputs, Objective
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import distill
from vlmdistill.workspace import build_workspace, class_text_embeddings


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images of the same 8-class domain drawn with another seed: no file or bytes shared with any split."""
    root = tmp_path_factory.mktemp("pool") / "photos"
    make_class_folders(root, per_class=2, seed=7)
    for i, f in enumerate(sorted(root.rglob("*.png"))):
        f.rename(root / f"IMG_{i:03d}.png")  # no labels: a flat folder of anonymous photos
    for d in [d for d in root.iterdir() if d.is_dir()]:
        d.rmdir()
    (root / "nested").mkdir()
    shutil.move(root / "IMG_000.png", root / "nested" / "IMG_000.png")
    return root


def test_pool_from_folder_list_and_csv(pool_dir: Path, tmp_path: Path) -> None:
    records, missing = read_pool(pool_dir)
    assert len(records) == 16 and not missing and "nested/IMG_000.png" in {r.key for r in records}
    assert all(r.class_dir == "" for r in records)
    listing = tmp_path / "pool.txt"
    listing.write_text(f"{pool_dir}/IMG_001.png\n\n{pool_dir}/nested/IMG_000.png\n")
    assert [r.path for r in read_pool(listing)[0]] == [pool_dir / "IMG_001.png", pool_dir / "nested" / "IMG_000.png"]
    table = tmp_path / "pool.csv"
    table.write_text(f"path,note\n{pool_dir}/IMG_002.png,x\n{pool_dir}/gone.png,y\n")
    with pytest.raises(PoolError, match=r"gone\.png"):
        read_pool(table)
    records, missing = read_pool(table, skip_missing=True)
    assert len(records) == 1 and missing == [f"{pool_dir}/gone.png"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(PoolError, match="'path' column"):
        read_pool(tmp_path / "bad.csv")


def _pool_overrides(base: list[str], pool: Path) -> list[str]:
    return [*base, f"data.unlabeled={pool}", "data.unlabeled_ratio=1", "optim.epochs=1", "train.analysis=false"]


def test_pool_holding_an_ood_val_image_is_refused(base_overrides: list[str], pool_dir: Path, prepared: Path,
                                                   tmp_path: Path) -> None:
    ood_file = sorted((prepared / "val").rglob("*.png"))[0]
    copied = tmp_path / "copied"
    shutil.copytree(pool_dir, copied)
    shutil.copy(ood_file, copied / "renamed.png")  # same bytes under another name
    cfg = load_config(None, [*_pool_overrides(base_overrides, copied), "loss.imcst.weight=1"])
    with pytest.raises(PoolError, match=r"renamed\.png has the same bytes as val image"):
        distill(cfg)
    listing = tmp_path / "pool.txt"
    listing.write_text(f"{pool_dir}/IMG_001.png\n{ood_file.resolve()}\n")  # the very file, by path
    cfg = load_config(None, [*_pool_overrides(base_overrides, listing), "loss.imcst.weight=1", "name=bypath"])
    with pytest.raises(PoolError, match="is the same file as val image"):
        distill(cfg)


def test_objective_masks_label_terms_to_labelled_rows() -> None:
    torch.manual_seed(0)
    s, t, w = (torch.nn.functional.normalize(torch.randn(n, 8), dim=-1) for n in (6, 6, 4))
    y = torch.tensor([0, 1, 2, -1, -1, -1])  # three pool rows: no label
    labelled = torch.tensor([True, True, True, False, False, False])
    x = LossInputs(s=s, y=y, w=w, t=t)
    cfg = LossConfig.model_validate({"cls": {"weight": 1}, "mse": {"weight": 1, "on": "pool"},
                                     "imcst": {"weight": 1}, "kd": {"weight": 1, "on": "labelled"}})
    _, terms = Objective(cfg)(x, labelled)  # L_cls on y = -1 would raise: it must see the labelled rows only
    ref = Objective(LossConfig.model_validate({"cls": {"weight": 0}, "mse": {"weight": 1}, "imcst": {"weight": 1},
                                               "kd": {"weight": 1}}))
    _, on_labelled = Objective(LossConfig.model_validate({"kd": {"weight": 1}}))(x.rows(labelled))
    on_labelled["cls"] = ClsLoss(0.07)(x.rows(labelled))
    _, on_pool = ref(x.rows(~labelled))
    _, on_all = ref(LossInputs(s=s, y=torch.tensor([0, 1, 2, 0, 1, 2]), w=w, t=t))
    assert torch.allclose(terms["cls"], on_labelled["cls"]) and torch.allclose(terms["kd"], on_labelled["kd"])
    assert torch.allclose(terms["mse"], on_pool["mse"])
    assert torch.allclose(terms["imcst"], on_all["imcst"])  # both: pool rows are in-batch negatives too
    _, unmasked = Objective(cfg)(x.rows(labelled))  # no pool rows at all: a pool-only term adds 0
    assert float(unmasked["mse"]) == 0.0
    for bad in ({"cls": {"weight": 1, "on": "both"}}, {"vlalign": {"weight": 1, "on": "pool"}}):
        with pytest.raises(ConfigError, match="needs labels"):
            Objective(LossConfig.model_validate(bad))
    assert Objective(LossConfig.model_validate({"vlalign": {"weight": 1, "filter": False, "on": "pool"}})).on_pool


def test_ood_class_texts_never_reach_a_loss(base_overrides: list[str], pool_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    forward = Objective.forward

    def recording(self: Objective, x: LossInputs, labelled: torch.Tensor | None = None) -> object:
        seen.append((x.w.detach().clone(), labelled))
        return forward(self, x, labelled)

    monkeypatch.setattr(Objective, "forward", recording)
    cfg = load_config(None, [*_pool_overrides(base_overrides, pool_dir), "loss.imcst.weight=1", "loss.mse.weight=1",
                             "loss.kd.weight=1", "loss.vlalign.weight=1", "loss.vlalign.filter=false",
                             "text.use_descriptions=true", "name=honest"])
    ws = build_workspace(cfg)
    distill(cfg, ws)
    w_id, w_ood = class_text_embeddings(cfg, ws)
    assert seen and all(m is not None and (~m).any() for _, m in seen)  # every step had pool rows
    for w, _ in seen:
        assert torch.equal(w, w_id)
        assert torch.cdist(w, w_ood).min() > 1e-4  # no OOD class text, not even among the rows
    ood_files = {p.resolve() for p in (cfg.data.dir / "val").rglob("*.png")}
    assert not ood_files & {r.path.resolve() for r in next(iter(ws.pools.values())).records}


def test_resume_with_pool_equals_uninterrupted(base_overrides: list[str], pool_dir: Path) -> None:
    common = [*_pool_overrides(base_overrides, pool_dir), "loss.imcst.weight=1", "data.unlabeled_ratio=0.5"]
    full = load_config(None, [*common, "name=full"])
    ws = build_workspace(full)
    steps = distill(full, ws)["train"]["steps"]
    stopped = load_config(None, [*common, "name=resumed", f"train.max_steps={steps // 2 + 1}"])
    assert distill(stopped, ws)["complete"] is False
    res = distill(load_config(None, [*common, "name=resumed"]), ws, resume=True)
    assert res["complete"] is True and res["train"]["steps"] == steps
    a = RunFolder(full.run_dir).student().weights
    b = RunFolder(full.run_dir.parent / "resumed").student().weights
    no_pool = load_config(None, [*common, "data.unlabeled_ratio=0", "name=nopool"])
    c = RunFolder(no_pool.run_dir).student().weights if distill(no_pool, ws) else {}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the pool did change the student


def test_prepare_records_the_pool(raw_images: Path, pool_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    res = CliRunner().invoke(app, ["prepare", str(out), "--images", str(raw_images), "--unlabeled", str(pool_dir)])
    assert res.exit_code == 0, res.output
    assert recorded_pool(out) == pool_dir.resolve()
    bad = tmp_path / "bad_pool"
    shutil.copytree(pool_dir, bad)
    shutil.copy(next(raw_images.rglob("*.png")), bad / "dup.png")
    res = CliRunner().invoke(app, ["prepare", str(tmp_path / "ds2"), "--images", str(raw_images),
                                   "--unlabeled", str(bad)])
    assert res.exit_code == 2 and "dup.png" in res.output and not (tmp_path / "ds2").exists()



def test_demo_pools_leave_the_world_untouched_and_share_no_image(tmp_path: Path) -> None:
    params = WorldParams(seed=5, n_classes=24, images_per_class=2, corpus_per_class=2)
    info = generate_world(tmp_path / "w", params)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in info.root.rglob("*") if p.is_file()}
    pools = [ensure_pool(info.root, params, kind, 1) for kind in ("full", "id_only")]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before  # the world's files untouched
    splits = {s: [resolve_list_entry(info.root, line) for line in (info.root / f).read_text().split()]
              for s, f in LIST_FILES.items()}
    for pool in pools:
        records, _ = read_pool(pool)
        assert len(records) == train_size(params)
        check_disjoint([r.path for r in records], splits, pool)
    generate_world(tmp_path / "w2", params)
    again = ensure_pool(tmp_path / "w2", params, "full", 1)
    assert [r.path.read_bytes() for r in read_pool(again)[0]] == [r.path.read_bytes() for r in read_pool(pools[0])[0]]
