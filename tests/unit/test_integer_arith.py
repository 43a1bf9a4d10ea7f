"""The emulated integer arithmetic (sdq_lightning.integer.arith) against onnxruntime's kernels, op by op, on inputs
chosen where the arithmetic matters: every uint8 pair for QLinearAdd (its fused multiply-adds), exact ties for
QuantizeLinear, accumulators beyond 2^24 for QLinearConv (the int32 -> fp32 rounding), and round-to-odd against
exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from sdq_lightning.integer import arith

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from helpers.ort import exact_int8_kernels  # noqa: E402


def _run(node, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray], out_type: int) -> np.ndarray:
    graph = helper.make_graph(
        [node], "op",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], out_type, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)[0]


def _f32(v: float) -> np.ndarray:
    return np.array(v, np.float32)


@pytest.mark.parametrize("za, zb, zc", [(0, 0, 0), (128, 128, 128), (0, 128, 0), (128, 0, 128)])
def test_qlinear_add_every_pair(za, zb, zc):
    rng = np.random.default_rng(za + 2 * zb + 3 * zc)
    a, b = (v.reshape(-1) for v in np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8)))
    for _ in range(3):
        sa, sb, sc = (np.float32(v) for v in rng.uniform(0.01, 0.1, 3))
        node = helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["y"],
                                domain="com.microsoft")
        got = _run(node, {"a": a, "b": b}, {"sa": _f32(sa), "za": np.array(za, np.uint8), "sb": _f32(sb),
                                            "zb": np.array(zb, np.uint8), "sc": _f32(sc), "zc": np.array(zc, np.uint8)},
                   TensorProto.UINT8)
        ours = arith.qlinear_add(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                 torch.tensor(sa), za, torch.tensor(sb), zb, torch.tensor(sc), zc, 0, 255)
        assert np.array_equal(ours.numpy().astype(np.uint8), got)


def test_quantize_linear_divides_and_rounds_half_to_even():
    s = np.float32(0.1)
    codes = np.arange(-140, 140, 0.5, dtype=np.float32)
    x = (codes * s).astype(np.float32)  # many exact and near ties
    x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    got = _run(node, {"x": x}, {"s": _f32(s), "z": np.array(128, np.uint8)}, TensorProto.UINT8)
    ours = arith.quantize_input(torch.tensor(x), torch.tensor(s), -128, 127) + 128
    assert np.array_equal(ours.numpy().astype(np.uint8), got)


@exact_int8_kernels
def test_qlinear_conv_large_accumulators():
    """1x1 conv over 2048 channels of codes 255 and weights up to 127: sums beyond 2^24 (fp32 rounding of the
    accumulator, float64 path of the emulation), plus int32 biases near 2^30."""
    rng = np.random.default_rng(0)
    cin, cout = 2048, 16
    x = rng.integers(200, 256, (2, cin, 3, 3)).astype(np.uint8)
    w = rng.integers(60, 128, (cout, cin, 1, 1)).astype(np.int8)
    bias = rng.integers(-2**30, 2**30, cout).astype(np.int32)
    sx, sy = np.float32(0.02), np.float32(900.0)
    sw = rng.uniform(0.001, 0.01, cout).astype(np.float32)
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"])
    got = _run(node, {"x": x}, {"sx": _f32(sx), "zx": np.array(0, np.uint8), "w": w, "sw": sw,
                                "zw": np.zeros(cout, np.int8), "sy": _f32(sy), "zy": np.array(128, np.uint8),
                                "b": bias}, TensorProto.UINT8)
    acc = arith.conv_sum(torch.tensor(x, dtype=torch.float32), torch.tensor(w, dtype=torch.float32), 255.0, 1, 0,
                         1, 1)
    assert acc.abs().max() > 2**24 and acc.dtype == torch.float64
    mult = arith.conv_multiplier(torch.tensor(sx), torch.tensor(sw), torch.tensor(sy)).view(1, -1, 1, 1)
    ours = arith.requantize(acc + torch.tensor(bias, dtype=torch.float64).view(1, -1, 1, 1), mult, -128, 127) + 128
    assert np.array_equal(ours.numpy().astype(np.uint8), got)


def test_qlinear_conv_converts_the_accumulator_to_fp32():
    """Accumulators (here: the int32 bias alone) just off an fp32 tie: 2^25 + 2^18 + 2 is 64.5 + 2^-18 output steps
    exactly (rounds to 65) but 64.5 after the int32 -> fp32 conversion (rounds to 64, half to even)."""
    base = 2**25 + 2**18
    bias = np.array([base + d for d in (-2, -1, 0, 1, 2, 3, 6)], np.int32)
    cout = len(bias)
    x = np.zeros((1, 1, 1, 1), np.uint8)
    sw = np.full(cout, 2.0**-10, np.float32)
    node = helper.make_node("QLinearConv", ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy", "b"], ["y"])
    got = _run(node, {"x": x}, {"sx": _f32(1.0), "zx": np.array(0, np.uint8), "w": np.ones((cout, 1, 1, 1), np.int8),
                                "sw": sw, "zw": np.zeros(cout, np.int8), "sy": _f32(2.0**9),
                                "zy": np.array(0, np.uint8), "b": bias}, TensorProto.UINT8)
    mult = arith.conv_multiplier(torch.tensor(1.0), torch.tensor(sw), torch.tensor(2.0**9)).view(1, -1, 1, 1)
    acc = torch.tensor(bias, dtype=torch.float64).view(1, -1, 1, 1)
    ours = arith.requantize(acc, mult, 0, 255)
    assert np.array_equal(ours.numpy().astype(np.uint8), got)
    assert got.reshape(-1)[3] == 64  # 2^25 + 2^18 + 1: exactly 65 without the conversion


@exact_int8_kernels
def test_global_average_pool_and_gemm():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (4, 64, 8, 8)).astype(np.uint8)
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "sx", "zx", "sy", "zy"], ["y"],
                            domain="com.microsoft", channels_last=0)
    got = _run(node, {"x": x}, {"sx": _f32(0.037), "zx": np.array(128, np.uint8), "sy": _f32(0.011),
                                "zy": np.array(0, np.uint8)}, TensorProto.UINT8)
    ours = arith.gap_codes(torch.tensor(x, dtype=torch.float64), torch.tensor(np.float32(0.037)), 128,
                           torch.tensor(np.float32(0.011)), 0, 0, 255)
    assert np.array_equal(ours.numpy().astype(np.uint8), got)
    a = rng.integers(0, 256, (5, 64)).astype(np.uint8)
    w = rng.integers(-128, 128, (64, 10)).astype(np.int8)
    bias = rng.integers(-2**20, 2**20, 10).astype(np.int32)
    sa, sw = np.float32(0.05), rng.uniform(0.001, 0.01, 10).astype(np.float32)
    node = helper.make_node("QGemm", ["a", "sa", "za", "w", "sw", "zw", "c"], ["y"], domain="com.microsoft")
    got = _run(node, {"a": a}, {"sa": _f32(sa), "za": np.array(0, np.uint8), "w": w, "sw": sw,
                                "zw": np.zeros(10, np.int8), "c": bias}, TensorProto.FLOAT)
    acc = arith.linear_sum(torch.tensor(a, dtype=torch.float32), torch.tensor(w.T, dtype=torch.float32), 255.0)
    ours = arith.gemm_logits(acc + torch.tensor(bias, dtype=torch.float64), torch.tensor(sa), torch.tensor(sw))
    assert np.array_equal(ours.numpy(), got)


def _nearest_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational ``q`` (ties to even), by integer arithmetic."""
    if q == 0:
        return np.float32(0.0)
    e = (abs(q.numerator) // abs(q.denominator)).bit_length() - 24
    while abs(q) / Fraction(2) ** e >= 2**24:
        e += 1
    while abs(q) / Fraction(2) ** e < 2**23:
        e -= 1
    return np.float32(float(round(q / Fraction(2) ** e) * Fraction(2) ** e))


def test_add_f32_rounds_the_exact_sum_once():
    """Against exact rationals; the inputs include sums just above an fp32 midpoint, where rounding to float64 first
    lands on the midpoint and a second rounding goes the wrong way (1 + 2^-24 + 2^-80 must round up)."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal(600) * 2.0 ** rng.integers(-20, 20, 600)
    b = rng.standard_normal(600) * 2.0 ** rng.integers(-40, 0, 600)
    k = rng.integers(60, 90, 200)
    a[:200], b[:200] = 1.0, 2.0**-24 + np.ldexp(rng.choice([-1.0, 1.0], 200), -k)
    got = arith.add_f32(torch.tensor(a), torch.tensor(b)).numpy()
    exact = np.array([_nearest_f32(Fraction(x) + Fraction(y)) for x, y in zip(a, b)])
    assert np.array_equal(got, exact)
    assert not np.array_equal((a + b).astype(np.float32), exact)  # the naive double rounding is wrong here
