"""Records on disk: every Record class round-trips through JSON by the generic path; old layouts migrate; a bad document
is one line naming the file and the field.

The round trip walks every subclass of ``Record`` in the package, so a new record class joins by itself: its example is
made from its type hints (a class whose own checks refuse the made-up values gets one in ``EXAMPLES``).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import pkgutil
import typing
from pathlib import Path
from typing import Any

import pytest

import fcache
from fcache.common.errors import CorruptStoreError, InputError, StoreError
from fcache.common.records import Format, Migration, Record, check_record, fill, from_dict, renamed, to_dict
from fcache.spec import DatasetInfo, LevelSpec, Manifest, Preprocessing, SourceConfig
from fcache.store.records import FileRecord, LedgerRecord
from fcache.train_heads.config import TrainConfig
from fcache.train_heads.runrecord import TrainingRecord

FIXTURE = Path(__file__).parents[1] / "fixtures" / "release-0.1.0"


def record_classes() -> list[type[Record]]:
    """Every Record subclass of the package (each module imported, so none is missed)."""
    for m in pkgutil.walk_packages(fcache.__path__, "fcache."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)

    def walk(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *walk(s))]

    return sorted({c for c in walk(Record) if c.__module__.startswith("fcache.")}, key=lambda c: c.__qualname__)


EXAMPLES: dict[str, Any] = {  # classes whose own checks tie fields together
    "TrainConfig": lambda: TrainConfig(
        store="s3://b/train.zarr",
        out="run",
        head="bifpn:layers=3",
        iters=90,
        task="segmentation",
        val_store="val.zarr",
        eval_every="2e",
        patience=3,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        weight_decay=0.0,
        betas=(0.8, 0.9),
        warmup=5,
        warmup_factor=0.5,
        schedule="cosine",
        lr_steps=(0.5, 0.75),
        clip=2.0,
        ema=0.99,
        seed=7,
        train_fraction=0.5,
        keep_best=False,
        cache_dir="c",
        cache_size="1GB",
    ),  # fmt: skip
    "LedgerRecord": lambda: LedgerRecord(
        unit=2,
        start=4,
        stop=7,
        status=(1, 4, 1),
        status_counts={"ok": 2, "decode_error": 1},
        files={"features/p5/c/2/0/0/0": FileRecord(12, "ab" * 32)},
        quant={"p5": (0.25, 3.0)},
        errors=({"key": "b.jpg", "index": 5, "status": "decode_error", "message": "cut"},),
        host="h",
        pid=3,
        seconds=1.5,
        time=2.0,
        token="t",
    ),  # fmt: skip
}


def example(cls: type) -> Any:
    """An instance of ``cls`` with a value of each field's type (not its default, so that every field is exercised)."""
    if cls.__name__ in EXAMPLES:
        return EXAMPLES[cls.__name__]()
    hints = typing.get_type_hints(cls)
    values = {f.name: _sample(hints[f.name], f) for f in dataclasses.fields(cls) if f.init}
    if cls.FORMAT is not None:
        values["format_version"] = cls.FORMAT.version
    return cls(**values)


def _sample(hint: Any, f: dataclasses.Field | None = None) -> Any:
    flag = f.metadata.get("flag") if f is not None else None
    if flag is not None and flag.values():
        return flag.values()[-1]
    if typing.get_origin(hint) in (typing.Union, type(int | None)) and type(None) in typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return example(hint)
    if origin is tuple:
        return tuple(_sample(args[0]) for _ in range(2)) if Ellipsis in args else tuple(_sample(a) for a in args)
    if origin is dict:
        return {"key": _sample(args[1])}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return list(hint)[-1]
    values = {bool: f is not None and f.default is False, int: 3, float: 0.5, str: "text", Any: ["any", 1]}
    return values[hint]


CLASSES = record_classes()


def test_the_walk_finds_the_records_written_to_disk():
    names = {c.__name__ for c in CLASSES}
    assert {"Manifest", "LedgerRecord", "TrainingRecord", "TrainConfig", "EvalRecord", "EvalStore", "SourceConfig"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_record_round_trips_through_json(cls):
    try:
        record = example(cls)
    except Exception as e:  # noqa: BLE001 -- the fix is an entry in EXAMPLES
        pytest.fail(f"{cls.__name__} cannot be made from its type hints ({e}); give it an example in EXAMPLES")
    d = json.loads(json.dumps(record.to_dict()))
    check_record(cls, d, "x", InputError)
    back = cls.from_dict(d, "x")
    assert back == record and type(back) is cls
    assert json.loads(json.dumps(back.to_dict())) == d
    for f in dataclasses.fields(cls):  # tuples stay tuples, floats floats: equal, and hashable where the record is
        value = getattr(back, f.name)
        assert type(value) is type(getattr(record, f.name)) or value is None, f.name


def test_unrecorded_fields_are_never_written_and_unset_ones_read_back_unset():
    cfg = TrainConfig(store="s", out="o", head="fpn", iters=1, storage_options='{"key": "secret"}')
    assert "storage_options" not in cfg.to_dict() and "secret" not in json.dumps(cfg.to_dict())
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == dataclasses.replace(cfg, storage_options="") and back.lr is None  # the task's default, when the run starts


# -- the documents of the previous release, read and written back as they were ----------------------------------------
def changed(written: Any, original: Any, where: str = "") -> list[str]:
    """Where ``written`` does not hold ``original``'s values (fields added since may be there beside them)."""
    if isinstance(original, dict) and isinstance(written, dict):
        return [w for k, v in original.items() for w in changed(written.get(k, "<missing>"), v, f"{where}.{k}")]
    return [] if written == original else [f"{where}: {original!r} -> {written!r}"]


def test_the_old_releases_documents_are_read_and_written_back_unchanged():
    attrs = json.loads((FIXTURE / "store.zarr" / "zarr.json").read_text())["attributes"]["fcache"]
    manifest = Manifest.read(attrs, "zarr.json")
    assert not changed(manifest.to_dict(), {k: v for k, v in attrs.items() if k != "quantisation_error"})
    assert Manifest.read(manifest.to_dict(), "again") == manifest
    for run in (FIXTURE / "run", *sorted((FIXTURE / "runs").iterdir())):
        config = json.loads((run / "config.json").read_text())
        record = TrainingRecord.from_dict(config, "config.json")
        assert not changed(record.to_dict(), config) and TrainingRecord.from_dict(record.to_dict()) == record
    ledger = sorted((FIXTURE / "store.zarr" / "ledger" / "done").glob("*.json"))
    assert len(ledger) == 3
    for p in ledger:
        d = json.loads(p.read_text())
        assert LedgerRecord.from_dict(d, str(p)).to_dict() == d
    assert changed({"a": {"b": 1, "new": 0}}, {"a": {"b": 1}}) == [] and changed({"a": {"b": 2}}, {"a": {"b": 1}}) == [".a.b: 1 -> 2"]


def test_a_manifest_written_before_the_source_was_recorded_whole_migrates():
    m = example(Manifest)
    video = dataclasses.replace(m.preprocessing, frames=8, clips=2, crops=3)
    d = dataclasses.replace(m, preprocessing=video).to_dict()
    d["dataset"] = {"kind": "video", "root": "/k400", "annotations": "a.csv", "n": 3, "digest": "d"}
    del d["fcache_version"], d["libraries"]
    old = Manifest.read(d, "zarr.json")
    assert old.dataset.source == SourceConfig(kind="video", root="/k400", annotations="a.csv", frames=8, clips=2, crops=3)
    assert (old.fcache_version, old.libraries) == ("", {})  # unknown, not this fcache's
    assert old.dataset.task == "" and old.dataset.label_names == ()


def test_an_old_runs_renamed_fields_migrate_and_a_newer_run_is_refused():
    config = json.loads((FIXTURE / "run" / "config.json").read_text())
    config["config"]["steps"] = config["config"].pop("lr_steps")
    for key in ("fcache_version", "store_fingerprint", "train_samples", "features"):
        config.pop(key)
    record = TrainingRecord.from_dict(config, "config.json")
    assert record.config.lr_steps == (8 / 12, 11 / 12) and record.features is None
    assert (record.fcache_version, record.store_fingerprint, record.train_samples) == ("", "", 0)
    with pytest.raises(InputError, match=r"^config\.json: RUN format 2 is newer than this fcache reads \(1\); upgrade fcache$"):
        TrainingRecord.from_dict({**config, "format_version": 2}, "config.json")
    with pytest.raises(StoreError, match="store format version 0 is not supported"):
        Manifest.read({k: v for k, v in example(Manifest).to_dict().items() if k != "format_version"}, "zarr.json")


# -- bad documents: one line naming the file and the field ------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["backbone"]["levels"][0].pop("stride"), "the field 'backbone.levels[0].stride' is missing"),
        (lambda d: d["preprocessing"].update(view_scale=[1.0]), "the field 'preprocessing.view_scale' has 1 values, not 2"),
        (lambda d: d["dataset"]["source"].update(max_pixels=0), "holds an impossible value (--max-pixels 0: must be at least 1)"),
        (lambda d: d.update(format_version="1"), "the field 'format_version' is '1' (a string), not an integer"),
    ],
)
def test_a_bad_manifest_is_one_line_naming_the_field(change, fragment):
    d = json.loads(json.dumps(example(Manifest).to_dict()))
    change(d)
    with pytest.raises(StoreError) as e:
        Manifest.read(d, "s/zarr.json")
    assert str(e.value).startswith("s/zarr.json") and fragment in str(e.value) and "\n" not in str(e.value)


def test_a_ledger_record_with_the_wrong_number_of_statuses_is_corrupt():
    d = EXAMPLES["LedgerRecord"]().to_dict() | {"status": [1, 1]}
    with pytest.raises(CorruptStoreError, match=r"^done/2\.json holds an impossible value \(2 statuses for samples 4-6\); run `fcache"):
        LedgerRecord.from_dict(d, "done/2.json")


# -- the generic path itself --------------------------------------------------------------------------------------------
class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass(frozen=True)
class Part(Record):
    colour: Colour
    sizes: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Thing(Record):
    FORMAT = Format(3, refused="thing format {version}: use {current}", oldest=2, migrations=(
        Migration(2, renamed("tint", "colour", inside="part")), Migration(2, fill(note="old")),
    ))  # fmt: skip

    part: Part
    parts: dict[str, Part]
    maybe: LevelSpec | None = None
    note: str = ""
    format_version: int = 3


def test_enums_optionals_nested_records_and_dicts_round_trip():
    thing = Thing(Part(Colour.BLUE, (1.0, 2.5)), {"a": Part(Colour.RED)}, LevelSpec("p5", 8, 32), "now")
    d = json.loads(json.dumps(to_dict(thing)))
    assert d["part"] == {"colour": "blue", "sizes": [1.0, 2.5]} and d["maybe"] == {"name": "p5", "channels": 8, "stride": 32}
    assert from_dict(Thing, d, "t.json") == thing
    assert Thing.from_dict({**d, "maybe": None}).maybe is None
    with pytest.raises(InputError, match=r"^t\.json: the field 'parts\.a\.colour' is 'green' \(a string\), not one of \"red\", \"blue\"$"):
        Thing.from_dict({**d, "parts": {"a": {"colour": "green"}}}, "t.json")
    assert Part.from_dict({"colour": "red", "sizes": [1, 2]}).sizes == (1.0, 2.0)  # numbers become the floats the hints say


def test_migrations_apply_to_their_version_and_older_only():
    old = {"part": {"tint": "red"}, "parts": {}, "format_version": 2}
    assert Thing.from_dict(old) == Thing(Part(Colour.RED), {}, note="old", format_version=2)
    newer = {"part": {"colour": "red"}, "parts": {}, "format_version": 3}
    assert Thing.from_dict(newer).note == ""
    with pytest.raises(InputError, match="thing format 1: use 3"):
        Thing.from_dict({**old, "format_version": 1}, "t.json")
    with pytest.raises(InputError, match="thing format 4: use 3"):
        Thing.from_dict({**newer, "format_version": 4}, "t.json")


def test_dataset_info_and_preprocessing_keep_tuples():
    info = DatasetInfo(SourceConfig(kind="folder", root="r"), n=2, digest="d", label_names=("a", "b"))
    assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    pre = Preprocessing.from_dict({"mean": [0.5, 0.5, 0.5], "test_views": ["flip"]})
    assert pre.mean == (0.5, 0.5, 0.5) and pre.test_views == ("flip",) and hash(pre)
