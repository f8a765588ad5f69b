"""The encoder's output is pinned, and its error sums (float32 blocks summed in float64) equal float64 sums."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fcache.store.dtypes import DTYPES, ERROR_SAMPLE, encode, stored

# sha256 (first 16 hex digits) of values + scales of ``pinned_input()`` per form, as the releases before encoded them
PINNED = {
    "fp16": "fc5609c39a69d739",
    "bf16": "7288722e0584c6fe",
    "int8": "67a1a184bd997eaf",
    "bf16m3": "0588f2ea39b96d7b",
    "int6": "26c6c39c925cf684",
    "int4": "0388033b78b9138d",
    "int3": "ed7e059255dd7377",
    "int2": "fca19a680e321357",
    "fp32": "a000935bb8f8595e",
}


def pinned_input() -> np.ndarray:
    return np.random.default_rng(24).standard_normal((2, 3, 40, 9, 70), dtype=np.float32) * np.float32(4)


def float64_error(t: torch.Tensor, got: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The sums as float64 arithmetic gives them, on the same strided subset."""
    n = t.shape[0]
    step = max(1, t.numel() // ERROR_SAMPLE)
    ref = t.reshape(n, -1)[:, ::step].double()
    got = got.reshape(n, -1)[:, ::step].double()
    return ((got - ref).square().sum(dim=1) * step).numpy(), (ref.square().sum(dim=1) * step).numpy()


@pytest.mark.parametrize("form", sorted(PINNED))
def test_encoded_values_and_scales_are_the_pinned_bytes(form):
    e = encode(pinned_input(), form)
    h = hashlib.sha256(e.values.tobytes())
    if e.scales is not None:
        h.update(e.scales.tobytes())
    assert h.hexdigest()[:16] == PINNED[form]


# whole blocks only, a tail after them, a tail alone, and a strided subset (more than ERROR_SAMPLE values)
SHAPES = [(3, 2, 16, 16, 16), (2, 3, 7, 13, 51), (5, 1, 3, 2, 2), (3, 1, 32, 128, 177)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_error_sums_equal_float64_sums(shape):
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * np.float32(3))
    x[0, 0, 0, 0, :2] = 40.0  # outliers that the int forms clip
    for form in DTYPES if x.numel() <= ERROR_SAMPLE else ("fp16", "int4"):  # every form, then the strided subset
        d = stored(form)
        basis = torch.from_numpy(d.fit(x[:2].numpy())) if d.fitted else None
        e = encode(x, form, basis=basis)
        values, side = d.encode(x, basis)
        err, ref = float64_error(x, d.decode_torch(values, side, x.shape[-1], basis, None))
        assert e.sq_err.dtype == e.sq_ref.dtype == np.float64 and e.sq_err.shape == (shape[0],)
        np.testing.assert_allclose(e.sq_ref, ref, rtol=1e-6, atol=0, err_msg=form)
        np.testing.assert_allclose(e.sq_err, err, rtol=1e-6, atol=0, err_msg=form)
        assert (e.sq_err == 0).all() == (form == "fp32")


def test_error_sums_ignore_an_active_autocast():
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 4, 32, 32), dtype=np.float32))
    want = encode(x, "fp16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = encode(x, "fp16")
    np.testing.assert_array_equal(got.sq_err, want.sq_err)
    np.testing.assert_array_equal(got.sq_ref, want.sq_ref)
    assert stored("fp16").tolerance > 0
