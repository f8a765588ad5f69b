"""The ``fcache`` command: parses flags, builds a config, calls one function. No logic lives here."""

from __future__ import annotations

import errno
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from fcache import __version__

F = TypeVar("F", bound=Callable[..., Any])


class UserError(click.ClickException):
    """Bad input from the user: one line, exit code 2, no traceback."""

    exit_code = 2


def user_errors(fn: F) -> F:
    """Turn a user's mistake (an ``FcacheError``) into one clear line and exit code 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fcache.common.errors import FcacheError

        try:
            return fn(*args, **kwargs)
        except FcacheError as e:
            raise UserError(str(e)) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise UserError(f"disk full ({e.filename or 'no space left on device'}): free some space and rerun") from None
            raise

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fcache")
def main() -> None:
    """fcache: run a frozen vision backbone once, cache its multi-scale features, train many heads from the cache.

    A store is a zarr v3 folder; see `fcache info STORE` for what it holds and `fcache verify STORE`
    to check every committed byte.
    """


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@user_errors
def info(store: str, as_json: bool) -> None:
    """Show what STORE holds: manifest, levels and shapes, bytes on disk, compression, statuses, int8 error."""
    from fcache.store.info import describe, format_info

    d = describe(store)
    click.echo(json.dumps(d, indent=1) if as_json else format_info(d))


@main.command()
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--fast", is_flag=True, help="Check presence, sizes and statuses only; skip checksums and decoding.")
@click.option("--recompute", type=int, default=0, help="Also re-extract K random samples and compare them with the store.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None, help="With --recompute: the weights file used.")
@click.option("--device", default="cpu", show_default=True, help="With --recompute: where to run the backbone.")
@click.option("--tolerance", type=float, default=None, help="With --recompute: relative RMSE allowed (default by dtype).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def verify(store: str, fast: bool, recompute: int, weights: str | None, device: str, tolerance: float | None, as_json: bool) -> None:
    """Check STORE against its ledger: temporaries, missing or changed shards, CRCs, statuses, NaN/Inf.

    Names each bad file with its sample range. Exit code 0 when the store is sound, 1 otherwise.
    With --recompute K, K random samples are extracted again from the original data and compared.
    """
    from tqdm import tqdm

    from fcache.store import open as open_store
    from fcache.store import verify as run_verify

    total = len(open_store(store).ledger)
    with tqdm(total=total, unit="unit", desc="verify", disable=as_json or None, file=sys.stderr) as bar:
        report = run_verify(store, fast=fast, progress=bar.update)
    if recompute:
        from fcache.extract.recompute import recompute as run_recompute

        report.problems += run_recompute(store, recompute, weights=weights or "", device=device, tolerance=tolerance)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            click.echo(p.line())
        mode = ("fast" if fast else "full") + (f", {recompute} samples recomputed" if recompute else "")
        verdict = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{verdict}: {report.units_committed}/{report.units_total} units committed, {report.files_checked} files checked ({mode})"
        )
    sys.exit(0 if report.ok else 1)


def _floats(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected LO,HI such as 0.1,2.0") from None
    return lo, hi


def _extract_options(fn: F) -> F:
    """Flags shared by `extract` and `plan` (plan accepts the same command line and writes nothing)."""
    options = [
        click.option(
            "--dataset", type=click.Choice(["coco", "ade20k", "video", "folder", "wds"]), required=True, help="Kind of raw dataset."
        ),
        click.option(
            "--root",
            type=click.Path(exists=True, file_okay=False),
            required=True,
            help="Image folder (coco, folder), ADEChallengeData2016 folder (ade20k), class folders (video), tar folder (wds).",
        ),
        click.option(
            "--annotations", type=click.Path(exists=True, dir_okay=False), default=None, help="COCO json (coco) or path,label CSV (video)."
        ),
        click.option("--split", default="", help="ade20k: training or validation."),
        click.option("--model", default="swinv2-t", show_default=True, help="swinv2-t/s/b/l/g or any timm model with features_only."),
        click.option(
            "--weights",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="Checkpoint (safetensors or torch) of the full timm model.",
        ),
        click.option("--random-init", is_flag=True, help="Random backbone weights (tests, demo). Never implied."),
        click.option(
            "--input-size", type=int, default=256, show_default=True, help="Square canvas side; the window size stays as pretrained."
        ),
        click.option("--levels", default="p2,p3,p4,p5", show_default=True, help="Levels to store (p2..p5 = strides 4..32)."),
        click.option("--dtype", type=click.Choice(["fp16", "bf16", "int8", "fp32"]), default="fp16", show_default=True),
        click.option("--codec", default="zstd", show_default=True, help="zstd, zstd:LEVEL (1-9), lz4 or none; CRC32C always."),
        click.option("--shard-size", type=int, default=16, show_default=True, help="Samples per shard (= unit of work)."),
        click.option("--views", type=int, default=1, show_default=True, help="Training views per sample (>1: seeded random resize-crop)."),
        click.option(
            "--view-scale",
            default="1.0,1.0",
            callback=lambda c, p, v: _floats(v),
            show_default=True,
            help="LO,HI scale range of training views relative to the plain fit (paper: 0.1,2.0).",
        ),
        click.option(
            "--view-flip/--no-view-flip",
            default=True,
            show_default=True,
            help="Random horizontal flip in training views (when --views > 1).",
        ),
        click.option("--test-views", default="", help="Evaluation views: flip, ms, or flip,ms."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--frames", type=int, default=16, show_default=True, help="video: frames per clip."),
        click.option("--clips", type=int, default=1, show_default=True, help="video: temporal clips per video."),
        click.option("--crops", type=int, default=1, show_default=True, help="video: spatial crops per clip (1 or 3)."),
        click.option("--batch-size", type=int, default=8, show_default=True, help="Images per backbone forward."),
        click.option("--num-workers", type=int, default=2, show_default=True, help="DataLoader processes decoding media."),
        click.option("--device", default="cuda" if _cuda() else "cpu", show_default="cuda if available"),
        click.option("--limit", type=int, default=0, help="Only the first N samples."),
        click.option(
            "--on-error",
            type=click.Choice(["skip", "fail"]),
            default="skip",
            show_default=True,
            help="skip: record a bad sample and go on; fail: stop at the first.",
        ),
        click.option(
            "--writers", type=int, default=0, help="Threads encoding + compressing + committing units [default: one per 2 cores]."
        ),
        click.option("--decode-timeout", type=float, default=60.0, show_default=True, help="Seconds one sample may take to decode."),
        click.option(
            "--max-pixels",
            type=int,
            default=89_478_485,
            show_default=True,
            help="Larger images are refused as too_large (decompression bombs).",
        ),
        click.option(
            "--drop-degenerate-boxes", is_flag=True, help="coco: drop boxes with w or h <= 0 (with a warning) instead of refusing the json."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _extract_config(out: str, overwrite: bool, kw: dict[str, Any]) -> Any:
    from fcache.extract.backbones import iter_levels
    from fcache.extract.driver import ExtractConfig

    return ExtractConfig(
        out=out,
        overwrite=overwrite,
        dataset=kw["dataset"],
        root=kw["root"],
        annotations=kw["annotations"] or "",
        split=kw["split"],
        model=kw["model"],
        weights=kw["weights"] or "",
        random_init=kw["random_init"],
        input_size=kw["input_size"],
        levels=tuple(iter_levels(kw["levels"])),
        dtype=kw["dtype"],
        codec=kw["codec"],
        shard_size=kw["shard_size"],
        views=kw["views"],
        view_scale=kw["view_scale"],
        view_flip=kw["view_flip"],
        test_views=tuple(t for t in kw["test_views"].split(",") if t),
        seed=kw["seed"],
        frames=kw["frames"],
        clips=kw["clips"],
        crops=kw["crops"],
        batch_size=kw["batch_size"],
        num_workers=kw["num_workers"],
        device=kw["device"],
        limit=kw["limit"],
        on_error=kw["on_error"],
        decode_timeout=kw["decode_timeout"],
        writers=kw["writers"],
        drop_degenerate_boxes=kw["drop_degenerate_boxes"],
        max_pixels=kw["max_pixels"],
    )


@main.command()
@_extract_options
@click.option("--out", type=click.Path(file_okay=False), required=True, help="The store to create (or resume).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store of another configuration.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--cluster", default="", help="local:N: units as dask tasks on a local cluster of N worker processes (CUDA: one per GPU).")
@click.option("--scheduler", default="", help="tcp://HOST:PORT: units as dask tasks on a running dask cluster (TLS from dask's config).")
@user_errors
def extract(out: str, overwrite: bool, as_json: bool, cluster: str, scheduler: str, **kw: Any) -> None:
    """Run the frozen backbone once over a dataset and store its multi-scale features.

    Crash-safe: rerun the same command after an interruption and only the missing units are done.
    Exit code 0 when every sample was extracted, 3 when some were skipped (see STORE/errors.jsonl),
    2 for bad flags or data, or when another driver is running on the store.
    """
    import dataclasses

    from fcache.common.errors import SampleFailed
    from fcache.extract.driver import run_extract, summary_lines

    cfg = dataclasses.replace(_extract_config(out, overwrite, kw), cluster=cluster, scheduler=scheduler)
    try:
        summary = run_extract(cfg, show_progress=not as_json)
    except SampleFailed as e:
        click.echo(f"Error: {e} (--on-error fail); committed units are kept, rerun to resume", err=True)
        sys.exit(1)
    click.echo(json.dumps(summary.to_dict(), indent=1) if as_json else "\n".join(summary_lines(summary)))
    sys.exit(summary.exit_code)


@main.command()
@_extract_options
@click.option("--measure", type=int, default=4, show_default=True, help="Samples extracted into a temporary folder to measure.")
@click.option("--no-run", is_flag=True, help="Measure nothing: sizes from shapes, time from FLOPs (works without weights).")
@click.option("--assume-tflops", type=float, default=100.0, show_default=True, help="Sustained TFLOP/s for the --no-run time estimate.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@user_errors
def plan(measure: int, no_run: bool, assume_tflops: float, as_json: bool, **kw: Any) -> None:
    """Show how big a store will be and how long extracting it will take, without writing it.

    Takes the same flags as `fcache extract` (no --out). Shapes come from the model built without
    weights, so even swinv2-g can be planned on a laptop with --no-run.
    """
    from fcache.extract.plan import format_plan
    from fcache.extract.plan import plan as make_plan

    p = make_plan(_extract_config("", False, kw), measure=measure, no_run=no_run, assume_tflops=assume_tflops)
    click.echo(json.dumps(p, indent=1) if as_json else format_plan(p))


def _fractions(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of fractions, e.g. 0.667,0.917") from None


@main.command("train-head")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False), help="Training feature store.")
@click.option("--val-store", type=click.Path(exists=True, file_okay=False), help="Store to evaluate on when training finishes.")
@click.option("--task", default="detection", show_default=True, help="detection, segmentation, video or classification.")
@click.option(
    "--head",
    required=True,
    multiple=True,
    help="Head spec NAME[:key=value,...], e.g. fpn, bifpn:layers=5,roi=cascade. Repeat it to train several heads in one read pass.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="RUN folder: config.json, checkpoint, metrics.jsonl. With several --head: the parent of one RUN folder per head.",
)
@click.option("--iters", required=True, type=int, help="Training iterations (the schedule is relative to this).")
@click.option("--batch-size", type=int, help="Samples per iteration [default: per task: 16, video and classification 64].")
@click.option("--lr", type=float, help="Base AdamW learning rate [default: per task and head, see below].")
@click.option("--weight-decay", type=float, help="AdamW weight decay [default: per task and head].")
@click.option("--warmup", type=int, help="Linear warm-up iterations [default: per task and head].")
@click.option("--warmup-epochs", type=float, help="Warm-up in epochs of the training set instead (video default: 2.5).")
@click.option("--schedule", type=click.Choice(["step", "cosine", "linear"]), help="Learning-rate decay [default: per task and head].")
@click.option("--steps", callback=_fractions, help="Multi-step milestones as fractions of --iters [default: 8/12,11/12].")
@click.option("--gamma", default=0.1, show_default=True, type=float, help="Multi-step decay factor.")
@click.option("--clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--num-workers", default=2, show_default=True, type=int, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-fraction", default=1.0, show_default=True, type=float, help="Train on a seeded subset (Table 6: 0.01, 0.1).")
@click.option("--checkpoint-every", default=1000, show_default=True, type=int)
@click.option("--log-every", default=20, show_default=True, type=int, help="Iterations per metrics.jsonl record.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (bit-exact on CPU).")
@click.option("--stop-at", type=int, default=None, help="Stop (with a checkpoint) after this iteration; finish later with --resume.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON, without progress bar.")
@user_errors
def train_head(
    store: str,
    val_store: str | None,
    task: str,
    head: tuple[str, ...],
    out: str,
    iters: int,
    batch_size: int | None,
    lr: float | None,
    weight_decay: float | None,
    warmup: int | None,
    warmup_epochs: float | None,
    schedule: str | None,
    steps: tuple[float, ...] | None,
    gamma: float,
    clip: float | None,
    num_workers: int,
    device: str,
    seed: int,
    train_fraction: float,
    checkpoint_every: int,
    log_every: int,
    resume: bool,
    stop_at: int | None,
    as_json: bool,
) -> None:
    """Train a task head from a feature store; AdamW with the paper's defaults for the task and head.

    Defaults (frozen setting): detection lr 3e-4, weight decay 0.05, 500 warm-up iterations, step decay
    (Table 11); segmentation upernet lr 2e-3, weight decay 0.05, 1500 warm-up, linear decay, mask2former
    lr 3e-4, weight decay 0.02, no warm-up, linear decay (Table 12); video batch 64, lr 3e-4, weight decay
    0.05, 2.5 warm-up epochs, cosine decay (Table 13); classification (linear probe) batch 64, lr 1e-3, no
    weight decay, 1 warm-up epoch, cosine decay.

    Writes RUN/config.json, RUN/checkpoint.pt + model.safetensors (every --checkpoint-every iterations)
    and RUN/metrics.jsonl; with --val-store also RUN/detections.json and the AP numbers.

    Several --head train in one read pass of the store, each into OUT/<its canonical spec>, each exactly as
    if trained alone. One head on many GPUs: torchrun --nproc-per-node K -m fcache train-head ...
    """
    from fcache.train_heads.config import TrainConfig, hyper_parameters
    from fcache.train_heads.console import format_train_summary
    from fcache.train_heads.distributed import is_main_process
    from fcache.train_heads.multihead import run_train_heads
    from fcache.train_heads.training import run_train, task_defaults

    given = {"batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "steps": steps}
    given |= {"warmup": warmup, "warmup_epochs": warmup_epochs}
    cfgs = [
        TrainConfig(
            store=store,
            val_store=val_store,
            task=task,
            head=spec,
            out=out,
            iters=iters,
            gamma=gamma,
            clip=clip,
            num_workers=num_workers,
            device=device,
            seed=seed,
            train_fraction=train_fraction,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            resume=resume,
            stop_at=stop_at,
            **hyper_parameters(task_defaults(task, spec), given),  # given flags win
        )
        for spec in head
    ]
    if len(cfgs) == 1:
        summary = run_train(cfgs[0], progress=not as_json)
        if is_main_process():  # under torchrun, rank 0 speaks for all
            click.echo(json.dumps(summary, indent=1) if as_json else format_train_summary(summary))
        return
    summaries = run_train_heads(cfgs, progress=not as_json)
    click.echo(json.dumps(summaries, indent=1) if as_json else "\n\n".join(map(format_train_summary, summaries)))


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False), help="Feature store to evaluate on.")
@click.option("--batch-size", default=2, show_default=True, type=int)
@click.option("--num-workers", default=2, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@user_errors
def eval_run(run: str, store: str, batch_size: int, num_workers: int, device: str, as_json: bool) -> None:
    """Evaluate the head trained in RUN on a store: box and mask AP (pycocotools), detections into RUN/detections.json.

    Video and classification: top-1 / top-5 of each view and of the views' mean scores, per-sample predictions
    into RUN/predictions.jsonl.
    """
    from fcache.train_heads.config import EvalConfig
    from fcache.train_heads.console import format_eval
    from fcache.train_heads.training import run_eval

    summary = run_eval(
        EvalConfig(run=run, store=store, batch_size=batch_size, num_workers=num_workers, device=device), progress=not as_json
    )
    click.echo(json.dumps(summary, indent=1) if as_json else format_eval(summary))


@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--cluster", default="", help="local:N: one variant per worker of a local dask cluster of N processes.")
@click.option("--scheduler", default="", help="tcp://HOST:PORT: one variant per worker thread of a running dask cluster.")
@click.option("--out", type=click.Path(file_okay=False), default="", help="Folder for runs/ and results.* [default: SPEC's out key].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (with the rows) as JSON.")
@user_errors
def sweep(spec: str, cluster: str, scheduler: str, out: str, as_json: bool) -> None:
    """Train a grid of head variants (SPEC.yaml, see the README) and tabulate and plot their results.

    Each variant is a train-head run in OUT/runs/<head>-<hash>; rerunning skips finished variants and resumes
    unfinished ones. Writes OUT/results.csv, results.md and results.png (main metric against trainable
    parameters, one series per head family: the paper's Figures 1 and 4) and losses.png (training loss per
    variant). Exit code 1 if a variant failed.
    """
    from fcache.train_heads.analysis.sweep import SweepConfig, format_sweep, run_sweep

    summary = run_sweep(SweepConfig(spec=spec, out=out, cluster=cluster, scheduler=scheduler), progress=not as_json)
    click.echo(json.dumps(summary, indent=1) if as_json else format_sweep(summary))
    sys.exit(1 if summary["failed"] else 0)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default="report", show_default=True, help="Folder for the report files.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (with the rows) as JSON.")
@user_errors
def report(runs: tuple[str, ...], out: str, as_json: bool) -> None:
    """Tabulate and plot runs: RUN folders, or folders holding them (a multi-head --out, a sweep's folder).

    Writes OUT/results.csv and results.md (one row per run: head, trainable parameters, settings, every metric of
    its last evaluation, training time), results.png (the task's main metric against trainable parameters, one
    line per head family), losses.png (training loss curves, one line per run) and report.md showing them all.
    """
    from fcache.train_heads.analysis.report import format_report, write_report

    summary = write_report(runs, out)
    click.echo(json.dumps(summary, indent=1) if as_json else format_report(summary))


@main.command()
@click.option(
    "--out", default="demo-output", show_default=True, type=click.Path(file_okay=False), help="Folder for data, stores, run, report."
)
@click.option("--iters", type=int, default=120, show_default=True, help="Training iterations of the head.")
@click.option("--train-images", type=int, default=48, show_default=True)
@click.option("--val-images", type=int, default=16, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the summary.")
@user_errors
def demo(out: str, iters: int, train_images: int, val_images: int, as_json: bool) -> None:
    """Run the whole tool on an embedded dataset, on the CPU, in a few minutes.

    Real photos shipped with scikit-image / scikit-learn get pasted shapes (squares, discs, triangles)
    with exact boxes and masks; a random-init SwinV2-T extracts them once at 256 px; a BiFPN Mask
    R-CNN head trains from the store; pycocotools scores it against the untrained head. The report
    (metrics.json, loss.png, predictions.png) is written to OUT/report.
    """
    from fcache.apps.demo import DemoConfig, run_demo, summary_lines

    cfg = DemoConfig(out=out, iters=iters, train_images=train_images, val_images=val_images)
    metrics = run_demo(cfg, say=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(metrics, indent=1) if as_json else "\n".join(summary_lines(metrics, out)))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False), help="Store whose samples are analysed.")
@click.option("--samples", type=int, default=64, show_default=True, help="Samples drawn (seeded) from the store.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Minibatch of the unbiased HSIC estimator (>= 4).")
@click.option("--out", type=click.Path(file_okay=False), default="", help="Folder for cka.json + cka.png [default: RUN/cka].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the CKA matrices as JSON.")
@user_errors
def cka(run: str, store: str, samples: int, batch_size: int, out: str, device: str, as_json: bool) -> None:
    """Linear CKA between a trained head's layers (the paper's Figures 3 and 5).

    Per pyramid level: the stored input P_x against every neck block's output (BiFPN layers, FPN,
    fpn-res residual blocks); for a cascade head: every stage's RoI features and hidden layers.
    Writes a labelled heatmap (cka.png) and the matrices (cka.json).
    """
    from fcache.train_heads.analysis.cka import CkaConfig, run_cka

    result = run_cka(CkaConfig(run=run, store=store, samples=samples, batch_size=batch_size, out=out, device=device), progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    for group, g in result["groups"].items():
        first = g["labels"][0]
        row = ", ".join(f"{lab} {v:.2f}" for lab, v in zip(g["labels"][1:], g["cka"][0][1:], strict=True))
        click.echo(f"{group:8s} CKA({first}, .): {row}")
    click.echo(f"{result['samples']} samples; heatmap and matrices in {result['out']}")


@main.command()
@click.option("--model", default="swinv2-t", show_default=True, help="Backbone whose features (or shapes) are used.")
@click.option("--input-size", type=int, default=256, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--head", default="fpn", show_default=True, help="Detection head spec, e.g. bifpn:layers=5.")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed iterations (after one warm-up).")
@click.option("--device", default="cuda" if _cuda() else "cpu", show_default="cuda if available")
@click.option("--features-only", is_flag=True, help="Only the from-store setting, on synthetic features of the backbone's shapes.")
@click.option("--num-workers", type=int, default=2, show_default=True, help="DataLoader workers reading the store.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@user_errors
def bench(model: str, input_size: int, batch_size: int, head: str, steps: int, device: str, features_only: bool, num_workers: int,
          as_json: bool) -> None:  # fmt: skip
    """Per-iteration time and peak memory of a head trained from the store, with the frozen backbone
    online, and with the backbone finetuned (the paper's Tables 7 and 8).

    Each setting runs in its own process. With --features-only (e.g. --model swinv2-g --input-size 1024
    --batch-size 8 --head bifpn:layers=5) only the from-store row is measured, without any weights.
    """
    from fcache.apps.bench import BenchConfig, format_rows, run_bench

    cfg = BenchConfig(model=model, input_size=input_size, batch_size=batch_size, head=head, steps=steps, device=device,
                      features_only=features_only, num_workers=num_workers)  # fmt: skip
    rows = run_bench(cfg)
    click.echo(json.dumps(rows, indent=1) if as_json else format_rows(rows))
