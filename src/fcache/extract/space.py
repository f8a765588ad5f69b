"""How many bytes a store will take, and whether the filesystem of ``--out`` has them, before anything is written.

One arithmetic for ``fcache plan`` (which prints it) and ``fcache extract`` (which refuses to start, exit code 2, when
the estimate exceeds the free space, unless ``--no-space-check``): bytes per sample = views x the stored bytes of each
level's map in its stored form (+ the scales per channel of the scaled forms). The estimate is the raw size, or the compressed size where a
compression ratio was measured (``plan``'s trial run, or the committed units of a store being resumed).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from fcache.common.errors import InputError
from fcache.spec import Manifest
from fcache.store import layout
from fcache.store.dtypes import stored
from fcache.store.info import human

SMALLER_LEVELS = ("p3", "p4", "p5")  # the alternative named when a store does not fit: drop the stride-4 map
SMALLER_DTYPES = ("int8", "int4")  # the forms named when a store does not fit: no measuring needed to size them (int4:
# 4 bits per value before the codec, relative RMSE about 0.08, what heads of benchmarks/compact.py did not notice)


def level_bytes(manifest: Manifest, dtype: str | None = None) -> dict[str, int]:
    """Stored bytes of one sample (all its views) per level, in ``dtype`` (default: each level's form in the manifest)."""
    out = {}
    for lv in manifest.levels:
        d, shape = stored(dtype or manifest.storage.form(lv.name)), manifest.level_shape(lv.name)
        side = math.prod(d.side_shape(shape)) * d.side.itemsize if d.side is not None else 0
        out[lv.name] = (math.prod(d.stored_shape(shape)) * d.numpy.itemsize + side) * manifest.num_views
    return out


@dataclass(frozen=True)
class Estimate:
    """Bytes a store of ``samples`` samples needs: raw, and on disk when a compression ratio is known."""

    samples: int
    raw: int
    ratio: float | None = None  # raw / on disk, where measured
    measured_on: str = ""  # how the ratio was measured

    @property
    def bytes(self) -> int:
        return round(self.raw / self.ratio) if self.ratio else self.raw

    def describe(self) -> str:
        if self.ratio:
            return f"{human(self.bytes)} (compression ratio {self.ratio:.2f} measured on {self.measured_on})"
        return f"{human(self.bytes)} (uncompressed: no compression ratio measured)"


def alternatives(manifest: Manifest, samples: int, ratio: float | None) -> dict[str, int]:
    """Estimated bytes with ``--levels p3,p4,p5`` and with ``--dtype int8`` / ``int4`` (where smaller than the plan):
    flag -> bytes."""
    scale = (1 / ratio) if ratio else 1.0
    out = {}
    per_level = level_bytes(manifest)
    kept = [name for name in per_level if name in SMALLER_LEVELS]
    if kept and len(kept) < len(per_level):
        out[f"--levels {','.join(kept)}"] = round(sum(per_level[n] for n in kept) * samples * scale)
    for dtype in SMALLER_DTYPES:
        smaller = round(sum(level_bytes(manifest, dtype).values()) * samples * scale)
        if smaller < sum(per_level.values()) * samples * scale:
            out[f"--dtype {dtype}"] = smaller
    return out


def free_bytes(out: str) -> int | None:
    """Free bytes of the filesystem ``out`` will be on (its nearest existing folder); None for a URL (object storage)."""
    if not out or "://" in out:
        return None
    p = Path(out).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_space(out: str, manifest: Manifest, estimate: Estimate, *, freed: int = 0) -> None:
    """Refuse (InputError: one line with the numbers and the smaller alternatives) when ``estimate`` exceeds the free
    space of ``out``'s filesystem plus ``freed`` (bytes an --overwrite deletes first)."""
    free = free_bytes(out)
    if free is None or estimate.bytes <= free + freed:
        return
    others = ", ".join(f"{flag} needs about {human(b)}" for flag, b in alternatives(manifest, estimate.samples, estimate.ratio).items())
    raise InputError(
        f"--out {out} needs about {estimate.describe()} for {estimate.samples} samples but its filesystem has "
        f"{human(free + freed)} free" + (f"; {others}" if others else "") + "; free some space, store less, or pass --no-space-check"
    )


def needed(out: str, manifest: Manifest, *, overwrite: bool = False) -> Estimate:
    """The bytes still needed to finish the store at ``out`` with this manifest: all of it for a new (or replaced)
    store, the uncommitted units of one being resumed (with the compression its committed units achieved)."""
    per_sample = sum(level_bytes(manifest).values())
    root = Path(out)
    existing = layout.read_manifest(root) if "://" not in out and (root / "zarr.json").is_file() else None
    if overwrite or existing is None or existing.fingerprint != manifest.fingerprint:
        return Estimate(manifest.dataset.n, per_sample * manifest.dataset.n)
    ledger = layout.read_ledger(root)
    committed = sum(rec.samples for rec in ledger.values())
    on_disk = sum(f.size for rec in ledger.values() for name, f in rec.files.items() if name.startswith((layout.FEATURES, layout.SCALES)))
    left = manifest.dataset.n - committed
    ratio = per_sample * committed / on_disk if committed and on_disk else None
    return Estimate(left, per_sample * left, ratio, f"{committed} committed samples" if ratio else "")
