"""The ``fcache`` command: parses flags, builds a config, calls one function. No logic lives here.

Every command's flags are made from the fields of its config dataclass (``fcache.common.flags``): a setting, its
default, choices and help are written once, as a field; only the output switch ``--json`` is the command's own.
Importing this module imports neither torch nor zarr; a command imports what it runs, and a table of choices
(datasets, dtypes, tasks) is read when a command's help or flags need it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click

from fcache._version import __version__
from fcache.apps.bench import BenchConfig
from fcache.apps.config import DemoConfig, ExportConfig, PredictConfig
from fcache.commandline import Fcache, StoreLocation, options_of, user_errors, with_settings
from fcache.extract.config import BackboneCompute, ExtractConfig, PlanConfig
from fcache.spec import SourceConfig
from fcache.store.config import CopyConfig, ExportWdsConfig, InfoConfig, RecodeConfig, VerifyConfig
from fcache.train_heads.config import CkaConfig, EvalConfig, ReportConfig, RunsConfig, SweepConfig, TrainConfig


@click.group(cls=Fcache, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="fcache")
def main() -> None:
    """fcache: run a frozen vision backbone once, cache its multi-scale features, train many heads from the cache.

    A store is a zarr v3 folder; see `fcache info STORE` for what it holds and `fcache verify STORE`
    to check every committed byte.
    """


@main.command()
@click.argument("store", type=StoreLocation())
@options_of(InfoConfig)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def info(store: str, as_json: bool, **kw: Any) -> None:
    """Show what STORE (a folder, s3://... or gs://...) holds: manifest, levels and shapes, bytes stored, compression,
    statuses, int8 error."""
    from fcache.store.info import describe, format_info

    d = describe(store, InfoConfig(store=store, **kw).options())
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@main.command()
@click.argument("store", type=StoreLocation())
@options_of(VerifyConfig, BackboneCompute)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def verify(store: str, as_json: bool, attention: str, **kw: Any) -> None:
    """Check STORE against its ledger: temporaries, missing or changed shards, CRCs, statuses, NaN/Inf.

    Names each bad file with its sample range. Exit code 0 when the store is sound, 1 otherwise.
    With --recompute K, K random samples are extracted again from the original data (the store records where it
    came from and how) and compared.
    """
    from tqdm import tqdm

    from fcache.common.devices import resolve_device
    from fcache.store import FeatureStore
    from fcache.store import verify as run_verify

    cfg = VerifyConfig(store=store, **kw)
    options = cfg.options()
    if cfg.recompute:
        resolve_device(cfg.device)  # a device that is not there is named before the store is read
    total = len(FeatureStore(store, storage_options=options, check=False).ledger)  # an inconsistent store is verify's to report
    total = min(total, max(1, math.ceil(cfg.sample * total)))
    with tqdm(total=total, unit="unit", desc="verify", disable=as_json or None, file=sys.stderr) as bar:
        report = run_verify(store, fast=cfg.fast, sample=cfg.sample, progress=bar.update, storage_options=options)
    if cfg.recompute:
        from fcache.extract.recompute import recompute as run_recompute

        report.problems += run_recompute(
            store,
            cfg.recompute,
            weights=cfg.weights,
            device=cfg.device,
            tolerance=cfg.tolerance,
            storage_options=options,
            attention=attention,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            click.echo(p.line())
        mode = ("fast" if cfg.fast else "full") + (f", {cfg.sample:.0%} of the units" if cfg.sample < 1 else "")
        mode += f", {cfg.recompute} samples recomputed" if cfg.recompute else ""
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{verdict}: {report.units_committed}/{report.units_total} units committed, {report.files_checked} files checked ({mode})"
        )
    sys.exit(0 if report.ok else 1)


@main.command()
@click.argument("src", type=StoreLocation())
@click.argument("dst", type=StoreLocation(exists=False))
@options_of(CopyConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def copy(src: str, dst: str, as_json: bool, **kw: Any) -> None:
    """Copy the store SRC to DST: local folder, s3://... or gs://..., in either direction.

    Every object is checked against the sha256 of its unit's ledger record when read from SRC and again when read
    back from DST; a unit's ledger record is created at DST last. Rerun the same command to finish an interrupted copy.
    """
    from tqdm import tqdm

    from fcache.store.copy import copy_store

    cfg = CopyConfig(src=src, dst=dst, **kw)
    with tqdm(unit="unit", desc="copy", disable=as_json or None, file=sys.stderr) as bar:
        summary = copy_store(src, dst, storage_options=cfg.options(), workers=cfg.workers, progress=bar.update)
    s = summary.to_dict()
    line = f"copied {s['units_copied']} units ({s['bytes_copied']:,} bytes) into {s['destination']}"
    line += f"; {s['units_present']} were there already; {s['units_committed']}/{s['units_total']} units committed at the source"
    click.echo(json.dumps(s, indent=1) if as_json else line)


@main.command()
@click.argument("src", type=StoreLocation())
@options_of(RecodeConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def recode(src: str, as_json: bool, **kw: Any) -> None:
    """Write the store SRC again in another stored form, as a new store --out, without the backbone.

    The new store holds the same samples, statuses, geometry and targets, and features of the same backbone: a head
    trained on either store evaluates on the other. Unit by unit, each committed last, as extract does: rerun the same
    command to finish an interrupted recode. The summary gives the bits per stored value before and after, and each
    level's relative RMSE against SRC's values.
    """
    from tqdm import tqdm

    from fcache.store.recode import format_summary
    from fcache.store.recode import recode as run_recode

    cfg = RecodeConfig(src=src, **kw)
    with tqdm(unit="sample", desc="recode", disable=as_json or None, file=sys.stderr) as bar:

        def progress(k: int, total: int) -> None:
            bar.total = total
            bar.update(k)

        summary = run_recode(src, cfg.out, dtype=cfg.dtype, max_error=cfg.max_error, storage_options=cfg.options(), workers=cfg.workers,
                             progress=progress)  # fmt: skip
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else format_summary(summary))


@main.command("export-wds")
@click.argument("store", type=StoreLocation())
@options_of(ExportWdsConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def export_wds(store: str, as_json: bool, **kw: Any) -> None:
    """Write STORE's samples as webdataset tar shards: per sample <level>.npy (every view, stored dtype), geometry.json,
    targets.json; OUT/fcache-wds.json holds the manifest. fcache.store.open(OUT).stream() reads it back as a stream."""
    from tqdm import tqdm

    from fcache.store import FeatureStore
    from fcache.store.backends import parse_size
    from fcache.store.webdataset import export_wds as run_export

    cfg = ExportWdsConfig(store=store, **kw)
    options = cfg.options()
    s = FeatureStore(store, storage_options=options)
    with tqdm(total=len(s.ok_indices), unit="sample", desc="export", disable=as_json or None, file=sys.stderr) as bar:
        d = run_export(s, cfg.out, shard_size=parse_size(cfg.shard_size), levels=cfg.levels or None, storage_options=options,
                       progress=bar.update)  # fmt: skip
    click.echo(
        json.dumps(d, indent=1)
        if as_json
        else f"exported {d['samples']} samples ({', '.join(d['levels'])}) as {d['shards']} shards into {d['out']}"
    )


@main.command()
@options_of(SourceConfig, ExtractConfig, config=True)
@click.option("--out", type=StoreLocation(exists=False), help="The store to create (or resume): a folder, s3://... or gs://...")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def extract(as_json: bool, **kw: Any) -> None:
    """Run the frozen backbone once over a dataset and store its multi-scale features.

    Crash-safe: rerun the same command after an interruption and only the missing units are done.
    Exit code 0 when every sample was extracted, 3 when some were skipped (see STORE/errors.jsonl),
    2 for bad flags or data, or when another driver is running on the store.
    """
    from fcache.common.errors import SampleFailed
    from fcache.extract.driver import run_extract, summary_lines

    kw = with_settings(kw, (SourceConfig, ExtractConfig), {"out": "--out"})
    try:
        summary = run_extract(ExtractConfig.from_flags(**kw), show_progress=not as_json)
    except SampleFailed as e:
        click.echo(f"Error: {e} (--on-error fail); committed units are kept, rerun to resume", err=True)
        sys.exit(1)
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else "\n".join(summary_lines(summary)))
    sys.exit(summary.exit_code)


@main.command()
@options_of(SourceConfig, ExtractConfig, PlanConfig, skip=("overwrite", "cluster", "scheduler", "no_space_check"))
@click.option("--out", type=click.Path(file_okay=False), default="", help="Where the store would go: shows that filesystem's free space.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(as_json: bool, measure: int, no_run: bool, device_class: str, assume_tflops: float, codecs: bool, **kw: Any) -> None:
    """Show how big a store will be and how long extracting it will take, without writing it.

    Takes the same flags as `fcache extract` (--out optional: with it, the plan checks that filesystem's free space
    as extract will). Shapes come from the model built without weights, so even swinv2-g can be planned on a laptop
    with --no-run. With --codecs, a table per level of every stored form (bits per value, the whole dataset's size,
    relative RMSE, encode and decode speed, the budgets of --max-error that pick it), measured on the run's samples.
    """
    from fcache.extract.plan import format_plan
    from fcache.extract.plan import plan as make_plan

    how = PlanConfig(measure=measure, no_run=no_run, device_class=device_class, assume_tflops=assume_tflops, codecs=codecs)
    p = make_plan(ExtractConfig.from_flags(**kw), measure=how.measure, no_run=how.no_run, assume_tflops=how.assume_tflops,
                  device_class=how.device_class, codecs=how.codecs)  # fmt: skip
    click.echo(json.dumps(p, indent=1) if as_json else format_plan(p))


@main.command("train-head")
@options_of(TrainConfig, skip=("head",), config=True)
@click.option(
    "--head",
    multiple=True,
    help="Head spec NAME[:key=value,...], e.g. fpn, bifpn:layers=5,roi=cascade. Repeat it to train several heads in one read pass.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON, without progress bar.")
@user_errors
def train_head(head: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Train a task head from a feature store; AdamW with the paper's defaults for the task and head.

    Settings may come from a file (--config FILE, YAML or JSON; a RUN's config.json repeats its run), flags beside it
    overriding it.

    Defaults (frozen setting): detection lr 3e-4, weight decay 0.05, 500 warm-up iterations, step decay
    (Table 11); segmentation upernet lr 2e-3, weight decay 0.05, 1500 warm-up, linear decay, mask2former
    lr 3e-4, weight decay 0.02, no warm-up, linear decay (Table 12); video batch 64, lr 3e-4, weight decay
    0.05, 2.5 warm-up epochs, cosine decay (Table 13); classification (linear probe) batch 64, lr 1e-3, no
    weight decay, 1 warm-up epoch, cosine decay; depth lr 1e-3 (dpt 1e-4), weight decay 1e-4, 200 warm-up, cosine.

    Writes RUN/config.json, RUN/checkpoint-<iter>.pt + model.safetensors (every --checkpoint-every iterations),
    RUN/metrics.jsonl + metrics.csv and TensorBoard events (when installed); with --val-store also the task's
    predictions and metrics (when done, and every --eval-every) and best.safetensors.

    Several --head train in one read pass of the store, each into OUT/<its canonical spec>, each exactly as
    if trained alone. One head on many GPUs: torchrun --nproc-per-node K -m fcache train-head ...
    """
    from fcache.train_heads.config import run_settings
    from fcache.train_heads.console import format_train_summary
    from fcache.train_heads.distributed import is_main_process
    from fcache.train_heads.training import run_train, run_train_heads

    kw = with_settings({"head": head, **kw}, (TrainConfig,), {"head": "--head"}, document=run_settings, lists=("head",))
    heads = kw.pop("head")
    cfgs = [TrainConfig.from_flags(head=spec, **kw) for spec in ((heads,) if isinstance(heads, str) else heads)]
    if len(cfgs) == 1:
        summary = run_train(cfgs[0], progress=not as_json)
        if is_main_process():  # under torchrun, rank 0 speaks for all
            click.echo(json.dumps(summary, indent=1) if as_json else format_train_summary(summary))
        return
    summaries = run_train_heads(cfgs, progress=not as_json)
    click.echo(json.dumps(summaries, indent=1) if as_json else "\n\n".join(map(format_train_summary, summaries)))


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@options_of(EvalConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@user_errors
def eval_run(run: str, as_json: bool, **kw: Any) -> None:
    """Evaluate the head trained in RUN on a store; the metrics and predictions go into RUN/eval/<store name>/.

    Detection: box and mask AP (pycocotools), detections.json; segmentation: mIoU single scale and over the test views;
    depth: RMSE (metres), AbsRel, log10, d1-d3 of view 0 and over the test views, depth/<key>.png (16-bit mm);
    video and classification: top-1 / top-5 of each view and of the views' mean scores, predictions.jsonl per sample.
    """
    from fcache.train_heads.console import format_eval
    from fcache.train_heads.evaluation import run_eval

    summary = run_eval(EvalConfig(run=run, **kw), progress=not as_json)
    click.echo(json.dumps(summary, indent=1) if as_json else format_eval(summary))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@options_of(PredictConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON, without progress bar.")
@user_errors
def predict(run: str, inputs: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Run the head trained in RUN, with its frozen backbone rebuilt from RUN's record, on INPUTs: images, folders,
    globs, or videos (video heads); or on one feature store, a folder or s3://... (its cached features, no backbone).

    Writes into OUT: detection predictions.json (COCO results in original pixels); segmentation labels/<name>.png
    (label maps at original resolution, class palette); depth depth/<name>.png (16-bit, millimetres, original
    resolution); video and classification predictions.jsonl (top-k classes); errors.jsonl (inputs that could not be
    used). The predictions equal `fcache eval`'s on a store of the same images. OUT is new, empty or an earlier
    predict's (its files are replaced); nothing is written into RUN or an input's folder.
    Exit code 0 when every input was predicted, 3 when some were skipped, 1 when --on-error fail stopped at one.
    """
    from fcache.apps.predict import run_predict, summary_line
    from fcache.common.errors import SampleFailed

    try:
        summary = run_predict(PredictConfig(run=run, inputs=inputs, **kw), progress=not as_json)
    except SampleFailed as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    click.echo(json.dumps(summary, indent=1) if as_json else summary_line(summary))
    sys.exit(summary["exit_code"])


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@options_of(ExportConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def export(run: str, as_json: bool, **kw: Any) -> None:
    """Export the frozen backbone + head of RUN (or --head-only) as an artifact that loads without fcache.

    pt2 (torch.export) and onnx hold the graph: classification and video logits, segmentation class scores and depth
    (metres) on the canvas, and for detection the neck's feature pyramid only (RPN, RoI heads and NMS do not export); safetensors holds
    every weight (the backbone under timm's features_only key names). FILE.json says the inputs, outputs and the
    preprocessing that makes the input.
    """
    from fcache.apps.export import run_export

    summary = run_export(ExportConfig(run=run, **kw))
    text = f"{summary['task']} -> {summary['out']} ({summary['outputs']}); {summary['config']}"
    click.echo(json.dumps(summary, indent=1) if as_json else text)


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@options_of(SweepConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary (with the rows) as JSON.")
@user_errors
def sweep(spec: str, as_json: bool, **kw: Any) -> None:
    """Train a grid of head variants (SPEC.yaml, see the README) and tabulate and plot their results.

    Each variant is a train-head run in OUT/runs/<head>-<hash>; rerunning skips finished variants and resumes
    unfinished ones. Writes the report of `fcache report` over the finished variants into OUT: leaderboard.md and
    .csv (seeds as mean ± std), results.csv and .md, results.png/.pdf (main metric against trainable parameters, one
    series per head family: the paper's Figures 1 and 4) and losses.png/.pdf. Exit code 1 if a variant failed.
    """
    from fcache.train_heads.analysis.sweep import format_sweep, run_sweep

    summary = run_sweep(SweepConfig(spec=spec, **kw), progress=not as_json)
    click.echo(json.dumps(summary, indent=1) if as_json else format_sweep(summary))
    sys.exit(1 if summary["failed"] else 0)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@options_of(ReportConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the summary (with the leaderboard and rows) as JSON.")
@user_errors
def report(runs: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """A leaderboard of runs: RUN folders, or folders holding them (a multi-head --out, a sweep's folder).

    One table per task, ranked by its main metric; runs that differ only in their seed are one line (mean ± std, n),
    with trainable parameters, train time, s/iter, peak memory and the evaluation store. Writes OUT/leaderboard.md
    and .csv, results.csv and .md (one row per run and evaluation store: every setting and metric), results.png/.pdf
    (the main metric against trainable parameters, one series per head family), losses.png/.pdf (training loss, one
    line per run), per_class.md with --per-class, and report.md showing them all.
    """
    from fcache.train_heads.analysis.report import format_report, write_report

    cfg = ReportConfig(runs=runs, **kw)
    summary = write_report(cfg.runs, cfg.out, per_class=cfg.per_class)
    click.echo(json.dumps(summary, indent=1) if as_json else format_report(summary))


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(exists=True, file_okay=False))
@options_of(RunsConfig)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per run (a list) instead of a table.")
@user_errors
def runs(folders: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """List the RUN folders in FOLDERs (default: the current folder), two levels down, with their status.

    Status: finished (weights of the last iteration saved), early-stopped (--patience stopped it), running
    (unfinished, changed recently), stopped (unfinished, unchanged for --stale-after: interrupted; continue with
    train-head --resume), diverged (the loss stopped being finite) or damaged (its records cannot be read; the
    others are listed as usual). With the iterations done, the evaluation store and the best main metric of each run.
    """
    from fcache.train_heads.analysis.runs import format_runs, list_runs

    cfg = RunsConfig(folders=folders, **kw)
    lines = list_runs(cfg.folders, stale_after=cfg.stale_after)
    click.echo(json.dumps(lines, indent=1) if as_json else format_runs(lines))


@main.command()
@options_of(DemoConfig)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the summary.")
@user_errors
def demo(as_json: bool, **kw: Any) -> None:
    """Run the whole tool on an embedded dataset, on the CPU, in a few minutes.

    Real photos shipped with scikit-image / scikit-learn get pasted shapes (squares, discs, triangles)
    with exact boxes and masks; a random-init SwinV2-T extracts them once at 256 px; a BiFPN Mask
    R-CNN head trains from the store; pycocotools scores it against the untrained head. The report
    (metrics.json, loss.png, predictions.png) is written to OUT/report.
    """
    from fcache.apps.demo import run_demo, summary_lines

    cfg = DemoConfig(**kw)
    metrics = run_demo(cfg, say=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(metrics, indent=1) if as_json else "\n".join(summary_lines(metrics, cfg.out)))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@options_of(CkaConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the CKA matrices as JSON.")
@user_errors
def cka(run: str, as_json: bool, **kw: Any) -> None:
    """Linear CKA between a trained head's layers (the paper's Figures 3 and 5).

    Per pyramid level: the stored input P_x against every neck block's output (BiFPN layers, FPN,
    fpn-res residual blocks); for a cascade head: every stage's RoI features and hidden layers.
    Writes a labelled heatmap (cka.png) and the matrices (cka.json).
    """
    from fcache.train_heads.analysis.cka import run_cka

    result = run_cka(CkaConfig(run=run, **kw), progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    for group, g in result["groups"].items():
        first = g["labels"][0]
        row = ", ".join(f"{lab} {v:.2f}" for lab, v in zip(g["labels"][1:], g["cka"][0][1:], strict=True))
        click.echo(f"{group:8s} CKA({first}, .): {row}")
    click.echo(f"{result['samples']} samples; heatmap and matrices in {result['out']}")


@main.command()
@options_of(BenchConfig)
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@user_errors
def bench(as_json: bool, **kw: Any) -> None:
    """Per-iteration time and peak memory of a task head trained from the store, with the frozen backbone
    online, and trained with the backbone (the paper's Tables 7 and 8: --task detection, segmentation or video; and
    depth or classification with their own defaults).

    Defaults are the paper's heads, batch sizes and inputs for the task and backbone. Each setting runs in its own
    process; one that fails is an error row (and the exit code is 1). With --features-only (e.g. --model swinv2-g
    --input-size 1024 --batch-size 8) only the from-store row is measured, without any weights.
    """
    from fcache.apps.bench import format_rows, run_bench

    rows = run_bench(BenchConfig(**kw))
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))
    sys.exit(1 if any("error" in row for row in rows) else 0)
