"""Extraction streams: whatever N is, at most a few units are being assembled and the writers' queue stays bounded;
nothing grows with the dataset (design: "Memory stays bounded whatever N is")."""

from __future__ import annotations

import pytest

from fcache.extract import driver as runner
from fcache.extract.config import ExtractConfig
from fcache.extract.driver import run_extract
from media import image_folder


def peaks(root, out, monkeypatch) -> dict[str, int]:
    """The most units open in the assembler, and queued for the writers, at any point of a run over ``root``."""
    seen = {"open": 0, "queued": 0, "drains": 0}
    drain = runner._drain

    def watched(assembler, writers, stats, final=False):  # noqa: ANN001, ANN202
        seen["open"] = max(seen["open"], len(assembler.open))
        seen["queued"] = max(seen["queued"], writers.inbox.qsize())
        seen["drains"] += 1
        return drain(assembler, writers, stats, final)

    monkeypatch.setattr(runner, "_drain", watched)
    cfg = ExtractConfig.from_flags(dataset="folder", root=str(root), out=str(out), model="swinv2-t", random_init=True, input_size=64,
                        shard_size=2, batch_size=3, num_workers=0, writers=1, device="cpu")  # fmt: skip
    summary = run_extract(cfg, show_progress=False)
    assert summary.status_counts == {"ok": summary.samples}
    return seen


@pytest.mark.slow
def test_units_in_flight_do_not_grow_with_the_dataset(tmp_path, monkeypatch):
    small = peaks(image_folder(tmp_path / "a", n=6), tmp_path / "a.zarr", monkeypatch)
    large = peaks(image_folder(tmp_path / "b", n=30), tmp_path / "b.zarr", monkeypatch)
    assert large["drains"] >= 30  # every sample went through the pipeline
    assert 1 <= large["open"] <= 2  # a batch of 3 spans at most 2 units of 2
    assert large["queued"] <= 2  # two units per writer thread
    assert large["open"] == small["open"]  # 5x the samples, the same units in flight
