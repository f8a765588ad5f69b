"""The compact stored forms: their error bounds, bit packing, torch decode against numpy decode, and the choice of
the smallest form within an error budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fcache.store import quant
from fcache.store.dtypes import DTYPES, decode, decode_torch, encode
from fcache.store.forms import FormMeasure, choose_forms, measure_all, pick

COMPACT = ("bf16m3", "int6", "int4", "int3", "int2")
PROJECTED = ("pca4", "pca8", "pca16", "pca32")


def features(kind: str, shape=(3, 2, 24, 10, 13), seed: int = 0) -> np.ndarray:
    """Normalised-like features (per-channel scales and offsets), or the same with a few channels 100x the rest."""
    rng = np.random.default_rng(seed)
    per_c = (1, 1, shape[2], 1, 1)
    x = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, per_c) + rng.normal(0, 0.5, per_c)
    if kind == "heavy":
        x[:, :, :3] *= 100
    return x.astype(np.float32)


def low_rank(shape=(6, 2, 64, 9, 11), rank: int = 2, seed: int = 0) -> np.ndarray:
    """Features of ``rank`` directions in channel space (the same for every sample), channel means, a little noise,
    and three channels 100x the rest."""
    rng = np.random.default_rng(seed)
    c = shape[-3]
    directions = rng.standard_normal((rank, c)) * np.linspace(3, 1, rank)[:, None]
    directions[:, :3] *= 100
    fields = rng.standard_normal((*shape[:-3], rank, *shape[-2:]))
    x = np.einsum("rc,...rhw->...chw", directions, fields) + rng.normal(0, 1, (c, 1, 1)) + 0.01 * rng.standard_normal(shape)
    return x.astype(np.float32)


def rel_rmse(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.square(got - want).sum() / np.square(want).sum()))


@pytest.mark.parametrize("kind", ["random", "heavy"])
@pytest.mark.parametrize("form", COMPACT)
def test_round_trip_within_the_forms_bound(form, kind):
    x = features(kind)
    enc = encode(x, form)
    got = decode(enc.values, form, enc.scales, width=x.shape[-1])
    assert got.dtype == np.float32 and got.shape == x.shape
    err = rel_rmse(got, x)
    assert 0 < err < DTYPES[form].tolerance
    assert enc.rel_rmse == pytest.approx(err, rel=1e-6)  # measured at write time: what the reader gets
    if kind == "heavy":  # scales per channel: the 100x channels do not flatten the others
        assert rel_rmse(got[:, :, 3:], x[:, :, 3:]) < DTYPES[form].tolerance


@pytest.mark.parametrize("form", PROJECTED)
def test_projected_round_trip_within_the_coefficients_bound_when_the_rank_fits(form):
    x = low_rank()
    d = DTYPES[form]
    basis = d.fit(x[:3])  # fitted on some samples, used on the others
    assert basis.shape == (-(-64 // d.ratio) + 1, 64) and np.all(basis[1:] == np.round(basis[1:]))
    enc = encode(x[3:], form, basis=basis)
    assert enc.values.shape == (3, 2, -(-64 // d.ratio), 9, 11) and enc.scales.shape == (3, 2, 1)
    got = decode(enc.values, form, enc.scales, basis=basis)
    assert got.shape == x[3:].shape and 0 < rel_rmse(got, x[3:]) < d.tolerance
    assert enc.rel_rmse == pytest.approx(rel_rmse(got, x[3:]), rel=1e-6)


def test_projected_decode_is_exact_whole_number_sums_whatever_the_batch():
    """mean + scale x (rows^T @ coefficients): the matmul sums whole numbers below 2**24, so one map decoded alone, in
    a batch, in numpy or in torch gives the same bits."""
    x = low_rank(rank=5, seed=1)
    basis = DTYPES["pca4"].fit(x)
    enc = encode(x, "pca4", basis=basis)
    k = basis.shape[0] - 1
    assert np.abs(basis[1:]).max() * 127 * k < 2**24
    batch = decode(enc.values, "pca4", enc.scales, basis=basis)
    np.testing.assert_array_equal(decode(enc.values[4, 1], "pca4", enc.scales[4, 1], basis=basis), batch[4, 1])
    side, b = torch.from_numpy(enc.scales), torch.from_numpy(basis)
    np.testing.assert_array_equal(decode_torch(torch.from_numpy(enc.values), "pca4", side, basis=b).numpy(), batch)
    with pytest.raises(ValueError, match="basis"):
        decode(enc.values, "pca4", enc.scales)


def test_lower_bit_forms_lose_more_and_take_less():
    x = features("random")
    errors = [encode(x, f).rel_rmse for f in ("int8", "int6", "int4", "int3", "int2")]
    assert errors == sorted(errors)
    assert errors[-1] < 0.5


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 8, 9])
def test_packing_round_trips_at_odd_widths(bits, width):
    q = (1 << (bits - 1)) - 1
    v = torch.from_numpy(np.random.default_rng(width).integers(-q, q + 1, size=(2, 3, 4, width)).astype(np.float32))
    per_byte = quant.slots(bits)
    packed = quant.pack((v + q).to(torch.uint8), per_byte)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-width // per_byte)
    ones = np.ones((2, 3), np.float32)
    scales = quant.bf16_bits(torch.from_numpy(ones)).numpy().view(np.uint16)
    got = quant.int_decode(packed.numpy(), scales, width, bits)
    np.testing.assert_array_equal(got, v.numpy())
    padding = packed.numpy()[..., -1] >> ((width % per_byte) * (8 // per_byte)) if width % per_byte else 0
    assert np.all(padding == 0)  # the padded values of the last byte are zero bits


def test_packing_order_is_first_value_lowest():
    v = torch.tensor([[1, 2, 3]], dtype=torch.uint8)
    assert quant.pack(v, 2).tolist() == [[0x21, 0x03]]
    assert quant.pack(torch.tensor([[1, 2, 3, 0, 1]], dtype=torch.uint8), 4).tolist() == [[0b00111001, 0b01]]


@pytest.mark.parametrize("form", tuple(DTYPES))
def test_torch_decode_equals_numpy_decode_bit_for_bit(form):
    x = features("heavy", shape=(2, 3, 16, 7, 9), seed=1)
    if form == "fp16":
        x = x / 100
    basis = DTYPES[form].fit(x)
    enc = encode(x, form, basis=basis)
    want = decode(enc.values, form, enc.scales, width=9, basis=basis)
    side = None if enc.scales is None else torch.from_numpy(enc.scales)
    tb = None if basis is None else torch.from_numpy(basis)
    got = decode_torch(torch.from_numpy(enc.values), form, side, width=9, basis=tb)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want)
    out = torch.full(want.shape, float("nan"))  # a reused buffer: decoded into in place, the same bits
    into = decode_torch(torch.from_numpy(enc.values), form, side, width=9, basis=tb, out=out)
    np.testing.assert_array_equal(into.numpy(), want)
    assert into.data_ptr() == out.data_ptr() and torch.equal(out, into)


def test_a_packed_form_needs_the_width():
    enc = encode(features("random"), "int4")
    with pytest.raises(ValueError, match="width"):
        decode(enc.values, "int4", enc.scales)
    with pytest.raises(ValueError, match="cannot hold"):
        decode(enc.values, "int4", enc.scales, width=3)


def test_rounded_mantissa_matches_numcodecs_bitround():
    numcodecs = pytest.importorskip("numcodecs")
    x = features("heavy", seed=2).ravel()
    x[:4] = [1.0625, 1.1875, -1.0625, 3.0]  # ties: nearest even
    ref = numcodecs.BitRound(keepbits=3).decode(numcodecs.BitRound(keepbits=3).encode(x))
    enc = encode(x.reshape(1, 1, 1, -1), "bf16m3")
    got = decode(enc.values, "bf16m3").ravel()
    np.testing.assert_array_equal(got, np.frombuffer(ref, dtype=np.float32))
    assert np.all(np.abs(got - x) <= np.abs(x) * 2.0**-4)


def test_pick_takes_the_smallest_within_budget_or_the_most_exact():
    ms = [FormMeasure("a", 0.3, 1.0, 1, 1), FormMeasure("b", 0.1, 2.0, 1, 1), FormMeasure("c", 0.01, 8.0, 1, 1)]
    assert pick(ms, 0.25).form == "b"
    assert pick(ms, 0.5).form == "a"
    assert pick(ms, 0.001).form == "c"


def test_choose_forms_picks_the_smallest_form_meeting_the_budget():
    """Per level: the candidate of fewest bits whose measured error is within budget. On smooth, wide-range features
    the answer is known from their measurement: nothing lossy below int8's error, int6 within 0.05, int2 within 0.6."""
    x = {"p3": features("random", shape=(4, 1, 16, 12, 12)), "p5": features("heavy", shape=(4, 1, 32, 4, 4), seed=3)}
    table = {lv: measure_all(v) for lv, v in x.items()}
    for budget in (0.6, 0.25, 0.05, 0.01, 1e-6):
        chosen = choose_forms(x, budget)
        for lv, c in chosen.items():
            within = [m for m in table[lv] if m.rel_rmse <= budget]
            assert c.form == min(within, key=lambda m: m.bits).form
            assert c.rel_rmse <= budget and c.bits == pytest.approx(min(m.bits for m in within))
    assert choose_forms(x, 0.6)["p3"].form == "int2"
    assert choose_forms(x, 1e-6)["p3"].form == "fp32"  # only the exact form meets a budget below every rounding
    chosen = choose_forms(x, 0.05)
    assert chosen["p3"].form == "int6"  # random channels: no projection holds them
    assert chosen["p5"].form == "pca8"  # three channels 100x the rest: four components hold nearly all of it


def test_features_of_few_directions_take_a_projected_form_with_its_basis():
    """Two directions in 64 channels: every projected form keeps them to the coefficients' rounding, at a fraction of a
    bit per value; the fewest components win, with the basis fitted on all the samples."""
    x = low_rank()
    chosen = choose_forms({"p4": x}, 0.05)["p4"]
    assert chosen.form == "pca32" and chosen.rel_rmse < 0.05 and chosen.bits < 0.5
    assert chosen.basis is not None and chosen.basis.shape == (3, 64)
    np.testing.assert_array_equal(chosen.basis, DTYPES["pca32"].fit(x.reshape(-1, 64, 9, 11)))
    assert choose_forms({"p4": features("random", shape=(4, 1, 64, 9, 11))}, 0.05)["p4"].basis is None  # no structure: int6


def test_features_a_small_form_holds_exactly_take_it_at_any_budget():
    """Ternary maps (each channel -s, 0 or s, s a power of two) are exact in every form: the smallest, int2, wins."""
    rng = np.random.default_rng(5)
    x = (rng.integers(-1, 2, size=(3, 1, 8, 10, 10)) * 2.0 ** rng.integers(-3, 4, size=(1, 1, 8, 1, 1))).astype(np.float32)
    chosen = choose_forms({"p4": x}, 1e-6)["p4"]
    assert chosen.form == "int2" and chosen.rel_rmse == 0.0


def test_measured_bits_count_values_side_data_and_chunk_overhead():
    from fcache.store.codecs import CHUNK_OVERHEAD, blosc_of, side_bytes
    from fcache.store.forms import measure

    x = features("random", shape=(4, 1, 16, 12, 12))
    m = measure(x, "int4")
    enc = encode(x.reshape(-1, 16, 12, 12), "int4")
    blosc = blosc_of("zstd", "int4")
    values = sum(len(blosc.encode(np.ascontiguousarray(v))) for v in enc.values)
    assert m.bits == pytest.approx(8 * (values + CHUNK_OVERHEAD * 4 + side_bytes(enc.scales)) / x.size)
    bits = {m.form: m.bits for m in measure_all(x)}
    assert bits["int2"] < bits["int3"] < bits["int4"] < bits["int6"] < bits["int8"] < bits["bf16"]


def test_a_budget_outside_zero_to_one_is_refused():
    from fcache.common.errors import InputError

    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="--max-error"):
            choose_forms({"p3": features("random")}, bad)


def test_a_basis_counts_in_the_bits_of_a_small_store():
    """A projected form keeps its basis once per store: over a few samples it outweighs the coefficients."""
    from fcache.store.codecs import side_bytes
    from fcache.store.forms import measure

    x = low_rank()
    alone = measure(x, "pca4")
    small = measure(x, "pca4", store_values=x.size)
    basis = DTYPES["pca4"].fit(x.reshape(-1, 64, 9, 11)[0::2])  # fitted on every other map
    assert small.bits == pytest.approx(alone.bits + 8 * side_bytes(basis) / x.size)
    assert choose_forms({"p4": x}, 0.05, store_values={"p4": x.size})["p4"].form == "pca32"  # the smallest basis still wins
    assert measure(x, "pca4", store_values=10**9).bits == pytest.approx(alone.bits, abs=1e-3)


@pytest.mark.parametrize("bits", [6, 4, 2])
def test_the_clip_search_sees_rare_outlier_positions(bits):
    """Two positions of a 64x64 map 100x the rest: the search on a strided sample plus each channel's largest values
    chooses clips about as good as a search on every value (a strided sample alone clipped the outliers: 3-4x the error)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 16, 64, 64)).astype(np.float32)
    x[:, :, 10, 20] *= 100
    x[:, :4, 40, 3] = 300
    t = torch.from_numpy(x)
    q = (1 << (bits - 1)) - 1

    def error(scales: torch.Tensor) -> float:
        return float((quant.quantise(t, scales, q) * scales[..., None, None] - t).square().sum() / t.square().sum()) ** 0.5

    assert error(quant.best_scales(t, q)) <= 1.05 * error(quant.best_scales(t, q, search=64 * 64))


def test_the_clip_search_sample_does_not_fall_on_one_column():
    """A stride that is a multiple of the width samples one column: here a column of near zeros, whose clip would
    crush the rest. The stride is kept prime to the width."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 64, 16)).astype(np.float32)
    x[..., 0] *= 0.01
    t = torch.from_numpy(x)

    def error(scales: torch.Tensor) -> float:
        return float((quant.quantise(t, scales, 7) * scales[..., None, None] - t).square().sum() / t.square().sum()) ** 0.5

    assert error(quant.best_scales(t, 7, search=64)) <= 1.1 * error(quant.best_scales(t, 7, search=64 * 16))  # one column: 1.26
