"""Head specs (NAME[:key=value,...]) and the learning-rate schedules (paper Table 11 defaults)."""

from __future__ import annotations

import pytest

from fcache.train_heads.config import TrainConfig
from fcache.train_heads.defaults import with_defaults
from fcache.train_heads.detection.task import HEADS, parse_detection_head
from fcache.train_heads.headspec import KINDS, Param, show
from fcache.train_heads.necks import NECKS, UPER_FPN
from fcache.train_heads.schedule import get_lr
from fcache.train_heads.tasks import TASKS

TYPES = {"int": int, "bool": bool, "prob": float, "positive": float, "choice": str, "levels": str}  # what each kind parses to


def test_parse_fills_defaults_and_prints_canonically():
    spec = parse_detection_head("bifpn:roi=cascade, layers=5")
    assert spec.name == "bifpn" and spec["layers"] == 5 and spec["roi"] == "cascade"
    assert spec["channels"] == 256 and spec["rois"] == 512 and spec["rpn_batch"] == 256 and spec["norm"] == "gn"
    roi_keys = "rois=512,rpn_batch=256,score=logits,semantic=0"
    assert str(spec) == f"bifpn:channels=256,checkpoint=0,layers=5,levels=all,norm=gn,roi=cascade,{roi_keys}"
    assert parse_detection_head(str(spec)) == spec
    assert str(parse_detection_head("fpn:levels=p5+p3+p4")) == f"fpn:channels=256,levels=p3+p4+p5,roi=standard,{roi_keys}"
    assert set(HEADS) == {"fpn", "fpn-res", "bifpn"} and parse_detection_head("fpn-res")["blocks"] == 4


def test_values_are_typed_and_booleans_print_as_they_always_did():
    spec = parse_detection_head("bifpn:checkpoint=1,roi=htc,semantic=0")
    assert spec["checkpoint"] is True and spec["semantic"] is False and type(spec["layers"]) is int
    assert "checkpoint=1," in str(spec) and str(spec).endswith("semantic=0")
    assert parse_detection_head(str(spec)) == spec


# canonical specs as RUN config.json files of the first release hold them (booleans as 0/1, no neck keys in upernet's)
RELEASED = [
    ("detection", "bifpn:channels=256,checkpoint=0,layers=5,levels=all,norm=gn,roi=htc,rois=512,rpn_batch=256,score=logits,semantic=1"),
    ("detection", "fpn-res:blocks=4,channels=256,levels=p3+p4+p5,norm=bn,roi=cascade,rois=512,rpn_batch=256,score=probs,semantic=0"),
    ("segmentation", "upernet:aux=1,channels=512,layers=5,levels=all,neck=bifpn,norm=gn"),
    ("segmentation", "upernet:aux=0,channels=512,layers=1,levels=all,neck=fpn-res,norm=gn"),
    ("video", "temporal:blocks=4,dim=0,drop_path=0.2,dropout=0.5,heads=0,level=p5"),
]


@pytest.mark.parametrize(("task", "text"), RELEASED)
def test_specs_of_released_runs_read_back_to_the_same_text(task, text):
    assert str(TASKS[task].parse(text)) == text


def every_param() -> list[tuple[str, Param]]:
    """Every head parameter of every task, every neck's and every option's."""
    tables = [h.params for t in TASKS.values() for h in t.heads.values()] + [n.params for n in (*NECKS.values(), UPER_FPN)]
    found = [(k, p) for table in tables for k, p in table.items()]
    return found + [(k, q) for _, p in found if p.options for table in p.options.values() for k, q in table.items()]


def test_every_default_is_a_value_of_its_kind_and_reads_back_from_its_text():
    params = every_param()
    assert {p.kind for _, p in params} <= set(KINDS) == set(TYPES) and any(p.options for _, p in params)
    for key, p in params:
        assert type(p.default) is TYPES[p.kind], (key, p)
        assert p.parse("h", key, show(p.default)) == p.default, (key, p)
        assert p.options is None or set(p.options) == set(p.choices), key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bifpn:layers", "'layers' is not key=value"),
        ("bifpn:layers=two", "layers='two' is not an integer"),
        ("bifpn:layers=3,layers=4", "key 'layers' given twice"),
        ("fpn:layers=3", "unknown key 'layers' (known: channels, levels, roi, rois, rpn_batch, score, semantic)"),
        ("fpn:levels=p3,p4", "'p4' is not key=value"),
        ("fpn:levels=p3+p9", "levels='p3+p9' must be 'all' or distinct level names"),
        ("fpn-res:norm=ln", "norm='ln' is not one of gn, bn"),
        ("mask2former", "unknown head 'mask2former' for detection"),
    ],
)
def test_parse_errors_name_the_fix(text, message):
    with pytest.raises(ValueError) as e:
        parse_detection_head(text)
    assert message in str(e.value)


def cfg(**kw):
    return with_defaults(TrainConfig(**{"store": "s", "out": "o", "head": "fpn", "iters": 1200, **kw}))


def test_defaults_are_the_papers():
    c = cfg()
    assert (c.lr, c.weight_decay, c.betas, c.warmup, c.schedule, c.gamma, c.batch_size) == (3e-4, 0.05, (0.9, 0.999), 500, "step", 0.1, 16)


def test_warmup_then_multi_step():
    c = cfg()
    assert get_lr(0, c) == pytest.approx(3e-4 * 1e-3)
    assert get_lr(250, c) == pytest.approx(3e-4 * (1e-3 + (1 - 1e-3) * 0.5))
    assert get_lr(500, c) == get_lr(799, c) == pytest.approx(3e-4)
    assert get_lr(800, c) == get_lr(1099, c) == pytest.approx(3e-5)  # 8/12 of 1200
    assert get_lr(1100, c) == get_lr(1199, c) == pytest.approx(3e-6)  # 11/12


def test_cosine_and_linear_decay_to_zero():
    cos, lin = cfg(schedule="cosine", warmup=0), cfg(schedule="linear", warmup=0)
    assert get_lr(0, cos) == get_lr(0, lin) == pytest.approx(3e-4)
    assert get_lr(600, cos) == pytest.approx(1.5e-4) and get_lr(600, lin) == pytest.approx(1.5e-4)
    assert get_lr(300, cos) == pytest.approx(3e-4 * (0.5 + 0.5 * 2**-0.5)) and get_lr(300, lin) == pytest.approx(2.25e-4)
    assert get_lr(1200, cos) == pytest.approx(0) and get_lr(1200, lin) == pytest.approx(0)


def test_config_validates_and_separates_identity_from_operations():
    with pytest.raises(ValueError, match="--train-fraction 0: must be greater than 0"):
        cfg(train_fraction=0)
    with pytest.raises(ValueError, match="--schedule 'poly': use one of step, cosine, linear"):
        cfg(schedule="poly")
    a, b = cfg(num_workers=0, device="cpu", out="x", resume=True), cfg()
    assert a.identity() == b.identity() and cfg(lr=1e-3).identity() != b.identity()
    assert TrainConfig.from_dict(a.to_dict()) == a
