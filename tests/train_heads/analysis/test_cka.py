"""Linear CKA: the estimator's properties, a reference computed independently, and `fcache cka` on a trained run."""

from __future__ import annotations

import json
from itertools import permutations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from dethelpers import OBJECTS, build_detection_store

from fcache.cli import main
from fcache.train_heads.analysis.cka import MinibatchCKA, cka
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.training import run_train
from helpers import build_store, refused


def reference_hsic1(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al.'s unbiased HSIC written as its sums over distinct indices (slow, independent of the library)."""
    k, l = x @ x.T, y @ y.T  # noqa: E741
    n = len(k)
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    term1 = sum(k[i, j] * l[i, j] for i in range(n) for j in range(n))
    term2 = k.sum() * l.sum() / ((n - 1) * (n - 2))
    term3 = sum(k[i, j] * l[j, q] for i, j, q in permutations(range(n), 3)) + sum(k[i, j] * l[j, i] for i, j in permutations(range(n), 2))
    return (term1 + term2 - 2.0 / (n - 2) * term3) / (n * (n - 3))


def biased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s linear CKA on centred features: ||Y^T X||^2 / (||X^T X|| ||Y^T Y||)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_self_similarity_is_one_and_invariances_hold():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    y = x @ torch.randn(12, 7, generator=g, dtype=torch.float64) + 0.3 * torch.randn(40, 7, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x @ q, y) == pytest.approx(cka(x, y), abs=1e-10)  # orthogonal transform
    assert cka(3.7 * x, y) == pytest.approx(cka(x, y), abs=1e-10)  # isotropic scaling
    assert cka(x, y) == pytest.approx(cka(y, x), abs=1e-12)
    assert 0.2 < cka(x, y) < 1.0
    assert abs(cka(x, torch.randn(40, 12, generator=g, dtype=torch.float64))) < 0.2  # unrelated: near 0


def test_matches_an_independent_numpy_computation():
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(7, 5)), rng.normal(size=(7, 3))) for _ in range(2)]
    batches = [(x, x[:, :3] * 2 + 0.5 * y) for x, y in batches]
    m = MinibatchCKA(["x", "y"])
    for x, y in batches:
        m.update({"x": torch.from_numpy(x), "y": torch.from_numpy(y)})
    hxy = np.mean([reference_hsic1(x, y) for x, y in batches])
    hxx = np.mean([reference_hsic1(x, x) for x, _ in batches])
    hyy = np.mean([reference_hsic1(y, y) for _, y in batches])
    assert float(m.matrix()[0, 1]) == pytest.approx(hxy / np.sqrt(hxx * hyy), rel=1e-10)


def test_unbiased_estimate_agrees_with_kornblith_cka_on_many_examples():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 10))
    y = np.tanh(x @ rng.normal(size=(10, 6))) + 0.2 * rng.normal(size=(2000, 6))
    assert cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(biased_cka(x, y), abs=0.02)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cka")
    store = build_detection_store(root / "s.zarr", objects=OBJECTS * 4)  # 8 images: two minibatches of 4
    cfg = TrainConfig(store=str(store), out=str(root / "run"), head="bifpn:layers=2,roi=cascade,channels=32,rois=16,rpn_batch=16",
                      iters=2, batch_size=2, lr=1e-3, warmup=1, num_workers=0, device="cpu", checkpoint_every=100)  # fmt: skip
    run_train(cfg, progress=False)
    return store, root / "run"


def test_fcache_cka_writes_heatmaps_of_the_neck_and_the_cascade(trained, tmp_path):
    store, run = trained
    r = CliRunner().invoke(main, ["cka", str(run), "--store", str(store), "--samples", "8", "--batch-size", "4", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "cka.json").read_text())
    assert (tmp_path / "cka.png").stat().st_size > 0
    assert set(result) == {"p2", "p3", "p4", "p5", "cascade"}
    assert result["p3"]["labels"] == ["P3 in", "F1", "F2"] and result["p3"]["minibatches"] == 2
    assert result["cascade"]["labels"] == [f"s{s} {k}" for s in (1, 2, 3) for k in ("RoI", "fc6", "fc7")]
    for g in result.values():
        m = np.array(g["cka"])
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
        np.testing.assert_allclose(m, m.T, atol=1e-12)
    r = CliRunner().invoke(main, ["cka", str(run), "--store", str(store), "--batch-size", "2"])
    assert r.exit_code == 2 and "at least 4" in r.output


def test_an_output_folder_holding_files_of_the_users_is_refused_before_anything_is_computed(tmp_path):
    store = build_store(tmp_path / "s.zarr")
    (tmp_path / "run").mkdir()
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "cka.json").write_text("{}")
    r = CliRunner().invoke(main, ["cka", str(tmp_path / "run"), "--store", str(store), "--out", str(out)])
    refused(r, f"--out {out} holds files fcache cka did not write (notes.txt)")
    assert sorted(p.name for p in out.iterdir()) == ["cka.json", "notes.txt"] and (out / "cka.json").read_text() == "{}"
