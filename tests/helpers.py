"""Small builders shared by tests: manifests, deterministic synthetic features, whole stores."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fcache import store as fstore
from fcache.spec import (
    GEOMETRY_FIELDS,
    BackboneInfo,
    DatasetInfo,
    Geometry,
    LevelSpec,
    Manifest,
    Preprocessing,
    SourceConfig,
    Status,
    StorageSpec,
    keys_digest,
)

LEVELS = (LevelSpec("p2", 8, 4), LevelSpec("p3", 16, 8), LevelSpec("p4", 24, 16), LevelSpec("p5", 32, 32))


def make_manifest(
    n: int = 10,
    *,
    dtype: str = "fp16",
    codec: str = "zstd",
    shard_size: int = 4,
    input_size: int = 64,
    views: int = 1,
    frames: int | None = None,
    levels: tuple[LevelSpec, ...] = LEVELS,
    kind: str = "synthetic",
) -> tuple[Manifest, list[str]]:
    keys = [f"img_{i:04d}.jpg" for i in range(n)]
    m = Manifest(
        backbone=BackboneInfo("test", "test_model", "random-init", input_size, 8, levels),
        preprocessing=Preprocessing(views=1 if frames else views, frames=frames, clips=views if frames else 1),
        storage=StorageSpec(dtype=dtype, codec=codec, shard_size=shard_size),
        dataset=DatasetInfo(SourceConfig(kind, ""), n=n, digest=keys_digest(keys)),
        fcache_version="test",
    )
    return m, keys


def sample_features(m: Manifest, i: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic features of sample i, shaped (V, ...) per level, like normalised backbone outputs. A level stored
    in a projected form gets features of one direction in channel space (the same for every sample) plus a little noise,
    which its one component holds."""
    from fcache.store.dtypes import stored

    out = {}
    for k, lv in enumerate(m.levels):
        rng = np.random.default_rng((seed, i, k))
        shape = (m.num_views, *m.level_shape(lv.name))
        c_axis = -3
        per_c = [1] * len(shape)
        per_c[c_axis] = shape[c_axis]
        scale = rng.uniform(0.2, 3.0, size=per_c)
        shift = rng.normal(0, 0.5, size=per_c)
        if stored(m.storage.form(lv.name)).fitted:
            direction = np.random.default_rng((seed, k)).uniform(0.2, 3.0, size=per_c)
            one = rng.standard_normal((*shape[:-3], 1, *shape[-2:]))
            out[lv.name] = (one * direction + 0.01 * rng.standard_normal(shape)).astype(np.float32)
            continue
        out[lv.name] = (rng.standard_normal(shape) * scale + shift).astype(np.float32)
    return out


def fitted_bases(m: Manifest, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """The bases of the levels ``m`` stores in projected forms, fitted on the features of its first ``n`` samples."""
    from fcache.store.dtypes import stored

    out = {}
    for lv in m.levels:
        d = stored(m.storage.form(lv.name))
        if d.fitted:
            basis = d.fit(
                np.concatenate([sample_features(m, i, seed)[lv.name] for i in range(n)]).reshape(-1, *m.level_shape(lv.name)[-3:])
            )
            assert basis is not None
            out[lv.name] = basis
    return out


def unit_payload(m: Manifest, unit: fstore.Unit, seed: int = 0, failed: tuple[int, ...] = ()):
    """Features, statuses and geometry of one unit; samples in ``failed`` get zeros and decode_error."""
    n_u = len(unit)
    feats = {lv.name: np.zeros((n_u, m.num_views, *m.level_shape(lv.name)), np.float32) for lv in m.levels}
    status = np.full(n_u, int(Status.OK), np.uint8)
    geometry = np.zeros((n_u, m.num_views, len(GEOMETRY_FIELDS)), np.float32)
    errors = []
    for j, i in enumerate(range(unit.start, unit.stop)):
        geometry[j, :] = Geometry(orig_h=100 + i, orig_w=120 + i, scale=0.5, canvas=m.backbone.input_size).to_array()
        if i in failed:
            status[j] = int(Status.DECODE_ERROR)
            errors.append({"key": f"img_{i:04d}.jpg", "status": "decode_error", "message": "test failure"})
            continue
        for name, x in sample_features(m, i, seed).items():
            feats[name][j] = x
    return feats, status, geometry, errors


def write_all(writer: fstore.StoreWriter, seed: int = 0, failed: tuple[int, ...] = ()) -> None:
    for unit in writer.pending():
        feats, status, geometry, errors = unit_payload(writer.manifest, unit, seed, failed)
        writer.write_unit(unit, feats, status, geometry, errors=errors)
    writer.finalize()


def build_store(path: Path, failed: tuple[int, ...] = (), **kw) -> Path:
    m, keys = make_manifest(**kw)
    write_all(fstore.create(path, m, keys, bases=fitted_bases(m)), failed=failed)
    return path


def decoded(path: Path) -> dict[str, np.ndarray]:
    """Everything a store holds, decoded: for byte-identity comparisons between stores."""
    s = fstore.open(path)
    out = {"status": s.status, "geometry": s.geometry_array, "keys": s.keys.astype(str)}
    for lv in s.level_names:
        out[lv] = np.asarray(s.to_dask(lv).compute())
    return out


def refused(r, *fragments: str) -> None:
    """A CLI result refused as users should see it: exit code 2, one `Error: ` line holding ``fragments``, no traceback."""
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    for f in fragments:
        assert f in lines[0], lines[0]


def source_of(kind: str, root, **settings):
    """``build_source`` of a SourceConfig made from ``kind``, ``root`` and the other source settings (paths as str)."""
    from fcache.extract.sources import build_source
    from fcache.spec import SourceConfig

    return build_source(SourceConfig(kind, str(root), **{k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}))


def extract_killed_after(args: list[str], out: Path, units: int = 2) -> int:
    """``fcache extract ARGS --out OUT`` in a process SIGKILLed once ``units`` units are committed; the units committed."""
    proc = subprocess.Popen([sys.executable, "-m", "fcache", "extract", *args, "--out", str(out)], stderr=subprocess.DEVNULL)
    done = out / "ledger" / "done"
    deadline = time.time() + 120
    while len(list(done.glob("*.json"))) < units and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list(done.glob("*.json")))
