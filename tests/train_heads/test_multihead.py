"""Several heads in one read pass: each ends exactly where it ends when trained alone, resumes exactly, and the CLI
checks every head before writing anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fcache.cli import main
from fcache.common.errors import DivergedError
from fcache.train_heads import TrainConfig, run_train
from fcache.train_heads.analysis.runs import run_status
from fcache.train_heads.detection.task import DetectionTask
from fcache.train_heads.training import folder_name, run_folders, run_train_heads
from helpers import refused

pytestmark = pytest.mark.usefixtures("one_thread")

# different levels (p3..p5 vs all four), necks and RoI heads; both draw RPN and RoI samples from the RNG every step
FPN = "fpn:channels=16,rois=16,rpn_batch=16,levels=p3+p4+p5"
CASCADE = "bifpn:layers=1,roi=cascade,channels=32,rois=16,rpn_batch=16"
CANONICAL = {
    FPN: "fpn:channels=16,levels=p3+p4+p5,roi=standard,rois=16,rpn_batch=16,score=logits,semantic=0",
    CASCADE: "bifpn:channels=32,checkpoint=0,layers=1,levels=all,norm=gn,roi=cascade,rois=16,rpn_batch=16,score=logits,semantic=0",
}


def config(store: Path, out: Path, head: str, **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), head=head, iters=4, batch_size=2, lr=1e-3, warmup=2, num_workers=0, device="cpu")
    return TrainConfig(**{**base, "log_every": 1, "checkpoint_every": 100, **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def alone(det_store, tmp_path_factory):
    """Each head trained on its own: head -> RUN folder."""
    d = tmp_path_factory.mktemp("alone")
    for k, head in enumerate((FPN, CASCADE)):
        run_train(config(det_store, d / str(k), head), progress=False)
    return {FPN: d / "0", CASCADE: d / "1"}


def test_folders_are_named_by_the_spec_as_typed_old_full_spec_folders_kept_and_collisions_told_apart(tmp_path):
    assert folder_name("temporal:dropout=0.5,level=p5") == "temporal_dropout-0.5_level-p5"
    old = folder_name(CANONICAL[FPN])
    assert old == "fpn_channels-16_levels-p3+p4+p5_roi-standard_rois-16_rpn_batch-16_score-logits_semantic-0"
    (tmp_path / "old" / old).mkdir(parents=True)  # an earlier release's folder of the FPN head
    heads = [(FPN, CANONICAL[FPN]), ("bifpn:layers=3", "bifpn:channels=256,layers=3"), ("linear", "linear:dropout=0.0,level=p5")]
    new = run_folders([(tmp_path / "new", t, c) for t, c in heads])
    assert [p.name for p in new] == ["fpn_channels-16_rois-16_rpn_batch-16_levels-p3+p4+p5", "bifpn_layers-3", "linear"]
    assert [p.name for p in run_folders([(tmp_path / "old", t, c) for t, c in heads])] == [old, "bifpn_layers-3", "linear"]
    one_name = run_folders([(tmp_path, "a:x=1,y=2", "a:x=1,y=2"), (tmp_path, "a:x=1_y=2", "a:x=1_y=2")])  # distinct specs
    assert len(set(one_name)) == 2 and all(p.name.startswith("a_x-1_y-2-") for p in one_name)


def test_heads_in_one_pass_end_where_they_end_alone(det_store, alone, tmp_path):
    summaries = run_train_heads([config(det_store, tmp_path, h) for h in (FPN, CASCADE)], progress=False, say=lambda m: None)
    assert [s["head"] for s in summaries] == [CANONICAL[FPN], CANONICAL[CASCADE]]
    for head, s in zip((FPN, CASCADE), summaries, strict=True):
        run = tmp_path / folder_name(head)
        assert s["run"] == str(run) and s["iters"] == {"start": 0, "stop": 4, "total": 4}
        assert same(weights(run), weights(alone[head])), head
        assert losses(run) == losses(alone[head])
        together, single = (json.loads((p / "config.json").read_text()) for p in (run, alone[head]))
        assert together["trainable_params"] == single["trainable_params"] == s["trainable_params"]
        assert together["levels"] == single["levels"]
    assert json.loads((tmp_path / folder_name(FPN) / "config.json").read_text())["levels"][0]["name"] == "p3"


def test_resume_in_one_pass_is_exact_even_from_different_iterations(det_store, alone, tmp_path):
    """The FPN head was stopped at 2 alone; the pass resumes it there and starts the cascade at 0: both end as alone."""
    run_train(config(det_store, tmp_path / folder_name(FPN), FPN, stop_at=2), progress=False)
    cfgs = [config(det_store, tmp_path, h, resume=True) for h in (FPN, CASCADE)]
    summaries = run_train_heads(cfgs, progress=False, say=lambda m: None)
    assert [s["iters"]["start"] for s in summaries] == [2, 0]
    for head in (FPN, CASCADE):
        run = tmp_path / folder_name(head)
        assert same(weights(run), weights(alone[head])), head
        assert losses(run) == losses(alone[head])


def test_a_diverging_head_leaves_the_pass_and_the_others_finish(det_store, alone, tmp_path, monkeypatch):
    loss = DetectionTask.loss

    def nan_for_bifpn(self, model, batch):
        out = loss(self, model, batch)
        return {k: v * float("nan") for k, v in out.items()} if self.head.name == "bifpn" else out

    monkeypatch.setattr(DetectionTask, "loss", nan_for_bifpn)
    with pytest.raises(
        DivergedError, match=r"1 of 2 heads stopped \(bifpn_layers-1_roi-cascade_channels-32.*the loss is not finite at iteration 1"
    ):
        run_train_heads([config(det_store, tmp_path, h) for h in (FPN, CASCADE)], progress=False, say=lambda m: None)
    assert same(weights(tmp_path / folder_name(FPN)), weights(alone[FPN]))
    diverged = tmp_path / folder_name(CASCADE)
    assert not (diverged / "model.safetensors").exists()
    last = json.loads((diverged / "metrics.jsonl").read_text().splitlines()[-1])  # what `fcache runs` reads
    assert (last["event"], last["iter"]) == ("diverged", 1) and "the loss is not finite at iteration 1" in last["error"]
    assert run_status(diverged)["status"] == "diverged" and run_status(tmp_path / folder_name(FPN))["status"] == "finished"


def train(store: Path, out: Path, *heads: str):
    args = ["train-head", "--store", str(store), "--out", str(out), "--iters", "1", "--batch-size", "1"]
    args += ["--num-workers", "0", "--device", "cpu", "--json"]
    return CliRunner().invoke(main, [*args, *(x for h in heads for x in ("--head", h))])


def test_cli_trains_several_heads_into_sub_folders(det_store, tmp_path):
    r = train(det_store, tmp_path / "runs", FPN, CASCADE)
    assert r.exit_code == 0, r.output
    summaries = json.loads(r.stdout)
    assert [Path(s["run"]).name for s in summaries] == [folder_name(h) for h in (FPN, CASCADE)]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(folder_name(h) for h in (FPN, CASCADE))


@pytest.mark.parametrize(
    ("heads", "fragments"),
    [
        ((FPN, "retinanet"), ("unknown head 'retinanet' for detection",)),
        ((FPN, FPN.replace("levels=p3+p4+p5", "levels=p5+p4+p3")), ("is given twice", CANONICAL[FPN])),
        ((FPN, "fpn:levels=p2+p9"), ("levels='p2+p9'",)),
    ],
)
def test_cli_checks_every_head_before_writing(det_store, tmp_path, heads, fragments):
    refused(train(det_store, tmp_path / "runs", *heads), *fragments)
    assert not (tmp_path / "runs").exists()


def test_a_taken_sub_folder_stops_every_head_before_writing(det_store, tmp_path):
    assert train(det_store, tmp_path / "runs", CASCADE).exit_code == 0  # one head: --out is the RUN folder itself
    taken = tmp_path / "runs2" / folder_name(CASCADE)
    taken.mkdir(parents=True)
    (taken / "notes.txt").write_text("mine")
    refused(train(det_store, tmp_path / "runs2", FPN, CASCADE), "is not an fcache run folder")
    assert [p.name for p in (tmp_path / "runs2").iterdir()] == [taken.name]
