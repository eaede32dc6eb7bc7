"""The int8 pass: placement by the target's scheme, calibrators, fake quantisation, Q/DQ lowering,
and accuracy on real data (scikit-learn's digits) in ONNX Runtime."""

from __future__ import annotations

import importlib
import operator
import platform

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxopt
import fxopt.passes.quantize as q
from fxopt.models.digits import DigitsCNN, fit, load_digits_split
from fxopt.passes import QuantizeInt8
from fxopt.passes.quant_observers import (
    FakeQuantize,
    RangeObserver,
    amax_entropy,
    amax_max,
    amax_mse,
    amax_percentile,
)
from fxopt.passes.quantize import annotate_int8
from fxopt.targets import get_target
from fxopt.testing.emulated_cpu import emulator


def traced(model, *inputs):
    return fxopt.trace(model.eval(), inputs)


def fq_inputs(gm, consumer_target):
    """Names of the FakeQuantize nodes feeding the node that calls `consumer_target`."""
    node = next(n for n in gm.graph.nodes if n.target == consumer_target)
    return [a.target for a in node.args if isinstance(a, torch.fx.Node) and str(a.target).startswith("fxopt_fq_")]


def quantize(model, inputs, target="xavier", **kw):
    kw.setdefault("keep_faster", False)
    calib = [tuple(torch.randn_like(x) for x in inputs) for _ in range(3)]
    compiled = fxopt.compile(model, target, example_inputs=inputs, precision="int8", calib_data=calib, passes=[QuantizeInt8(**kw)])
    return compiled


# --- placement -----------------------------------------------------------------------------------

class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.b(self.a(x).relu()) + x


class DownsampleBlock(nn.Module):
    """A ResNet basic block with a 1x1 strided conv shortcut: the add has a conv on both inputs."""

    def __init__(self, shortcut_first=False):
        super().__init__()
        self.shortcut_first = shortcut_first
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down, self.bn_down = nn.Conv2d(4, 8, 1, stride=2), nn.BatchNorm2d(8)

    def forward(self, x):
        identity = self.bn_down(self.down(x)) if self.shortcut_first else None
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        if identity is None:  # torchvision's order: the shortcut after the main branch
            identity = self.bn_down(self.down(x))
        return (out + identity).relu()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], dim=1))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.out(attn @ v)


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gate, self.b = nn.Conv2d(3, 4, 1), Gate(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.gate(self.a(x)))


def test_conv_bn_relu_chain_quantizes_every_conv_input_and_weight():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()).eval()
    compiled = quantize(model, (torch.randn(1, 3, 8, 8),))
    gm = compiled.graph_module
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    assert fq_inputs(gm, "0") == [f"fxopt_fq_{placeholder}"] and fq_inputs(gm, "3") == ["fxopt_fq__2"]
    assert [type(gm.get_submodule(p)).__name__ for p in ("0", "3")] == ["_ConvFakeQuant", "_ConvFakeQuant"]
    assert sum(isinstance(m, FakeQuantize) for m in gm.modules()) == 2  # no Q/DQ after the last ReLU


def test_residual_add_input_is_quantized_for_tensorrt_not_for_onnx_runtime():
    x = torch.randn(1, 4, 8, 8)
    xavier = annotate_int8(traced(Residual(), x), get_target("xavier").quant_scheme)
    cpu = annotate_int8(traced(Residual(), x), get_target("cpu").quant_scheme)
    assert xavier["add"].kind == "residual_add" and xavier["add"].quantized_inputs == ("x",)
    assert {n.kind for n in xavier.values()} == {"conv", "residual_add"}
    # ONNX Runtime: no residual rule, but the conv's output is quantised where the add reads it
    # (DQ -> Conv -> Q is what its QDQ fusion turns into an int8 QLinearConv), and so is the add's
    # other input: DQ, DQ -> Add -> Q is its QLinearAdd
    assert cpu["add"] == q.QuantAnnotation("output", ("b", "x"), False)
    assert cpu["b"].quantized_inputs == ("relu",)


def test_onnx_runtime_scheme_quantizes_relu_outputs_unsigned_and_op_outputs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)).eval()
    gm = quantize(model, (torch.randn(1, 3, 8, 8),), target="cpu").graph_module
    fqs = {name: m for name, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    # the relu output (uint8, zero point 0); the input and the conv output are signed. The max pool
    # of the relu stays on the relu's grid and gets no Q/DQ of its own: the conv after it reads it
    # through ONNX Runtime's DQ propagation, so the pool runs in int8 (NhwcMaxPool)
    assert {n: m.unsigned for n, m in fqs.items()} == {"fxopt_fq_input_1": False, "fxopt_fq__1": True, "fxopt_fq__3": False, "fxopt_fq__4": False}
    pool = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.MaxPool2d))
    assert pool.args[0].target == "fxopt_fq__1" and [u.target for u in pool.users] == ["3"]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0].name == "_5"  # the last linear's output is not quantised


@pytest.mark.parametrize("shortcut_first", [False, True])
def test_add_of_two_convs_quantizes_the_shortcut_so_the_main_conv_fuses_it(shortcut_first):
    torch.manual_seed(0)
    model = DownsampleBlock(shortcut_first).eval()
    x = torch.randn(1, 4, 8, 8)
    compiled = quantize(model, (x,))
    gm = compiled.graph_module
    notes = {n.name: n.meta["fxopt"]["quantize"] for n in gm.graph.nodes if "quantize" in n.meta.get("fxopt", {})}
    placeholder = next(n.name for n in gm.graph.nodes if n.op == "placeholder")
    # Expected: conv1 and the shortcut read the (one) quantised input, conv2 the ReLU, and the add's
    # residual is the shortcut conv's output, never conv2's (conv2 sits on the longer path and fuses the add)
    assert {k: (v.kind, v.quantized_inputs) for k, v in notes.items()} == {
        "conv1": ("conv", (placeholder,)), "conv2": ("conv", ("relu",)), "down": ("conv", (placeholder,)),
        "add": ("residual_add", ("down",)),
    }
    assert sorted(n for n, m in gm.named_modules() if isinstance(m, FakeQuantize)) == sorted(
        [f"fxopt_fq_{placeholder}", "fxopt_fq_relu", "fxopt_fq_down"])
    assert sum(n.op_type == "QuantizeLinear" for n in compiled.onnx_model.graph.node) == 3 + 3  # activations + weights
    with torch.no_grad():
        got, want = compiled(x), model(x)
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) < 0.1  # int8 noise, not a broken graph


def test_concat_quantizes_the_consumer_input_not_the_branches():
    notes = annotate_int8(traced(Concat(), torch.randn(1, 3, 4, 4)), get_target("xavier").quant_scheme)
    assert notes["c"].quantized_inputs == ("cat",)
    assert notes["a"].quantized_inputs == notes["b"].quantized_inputs == ("x",)


def test_depthwise_conv_and_linear_head_get_per_channel_weights():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    gm = quantize(model, (torch.randn(1, 4, 8, 8),)).graph_module
    assert tuple(gm.get_submodule("0").scale.shape) == (4,) and tuple(gm.get_submodule("3").scale.shape) == (3,)
    assert fq_inputs(gm, "3") == ["fxopt_fq__2"]  # the flatten's output


def test_attention_matmuls_quantize_both_operands():
    notes = annotate_int8(traced(Attention(), torch.randn(1, 5, 8)), get_target("xavier").quant_scheme)
    matmuls = [n for n in notes.values() if n.kind == "matmul"]
    assert len(matmuls) == 2 and all(len(n.quantized_inputs) == 2 for n in matmuls)


def test_a_leaf_is_left_alone_but_feeds_a_quantized_conv():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    gm = traced(WithLeaf(), x)
    notes = annotate_int8(gm, get_target("xavier").quant_scheme)
    assert set(notes) == {"a", "b"} and notes["b"].quantized_inputs == ("gate",)


def test_skip_keeps_a_layer_in_higher_precision():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    gm = quantize(model, (torch.randn(1, 3, 8, 8),), skip=("2",)).graph_module
    assert isinstance(gm.get_submodule("2"), nn.Conv2d) and fq_inputs(gm, "2") == []


# --- calibrators ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal(100_000))
    x[:10] = 30.0  # outliers
    hist, edges = np.histogram(x, bins=2048, range=(0, x.max()))
    return x, hist.astype(float), edges


def test_max_and_percentile_match_numpy(gaussian):
    x, hist, edges = gaussian
    assert amax_max(hist, edges) == pytest.approx(x.max())
    bin_width = edges[1] - edges[0]
    # an upper bin edge: above numpy's interpolated value by at most two bins of the histogram
    assert 0 <= amax_percentile(hist, edges, 99.9) - np.percentile(x, 99.9) <= 2 * bin_width


def test_entropy_clips_outliers_and_keeps_a_uniform_range(gaussian):
    x, hist, edges = gaussian
    assert 2.5 < amax_entropy(hist, edges) < 10.0  # between the bulk's tail and the outliers
    uniform, uedges = np.histogram(np.random.default_rng(1).uniform(0, 1, 100_000), bins=2048, range=(0, 1))
    assert amax_entropy(uniform.astype(float), uedges) > 0.9


def test_mse_matches_a_brute_force_search_on_the_raw_values(gaussian):
    x, hist, edges = gaussian
    candidates = np.linspace(x.max() / 128, x.max(), 128)

    def mse(amax):
        s = amax / 127
        return np.mean((np.clip(np.round(x / s), 0, 127) * s - x) ** 2)

    brute = candidates[np.argmin([mse(a) for a in candidates])]
    assert amax_mse(hist, edges) == pytest.approx(brute, rel=0.05)


def test_range_observer_histogram_counts_every_value():
    obs = RangeObserver(num_bins=16)
    for t in (torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.5, -0.25])):
        obs.observe_range(t)
    obs.observe_histogram(torch.tensor([1.0, -2.0, 4.0, 0.5, -0.25]))
    assert obs.amax == 4.0 and obs.hist.sum() == 5


# --- fake quantisation ------------------------------------------------------------------------------

def test_fake_quant_matches_numpy_and_passes_straight_through_gradients():
    fq = FakeQuantize()
    fq.set_amax(2.54)
    x = torch.linspace(-4, 4, 101, requires_grad=True)
    y = fq(x)
    s = 2.54 / 127
    expected = np.clip(np.round(x.detach().numpy() / s), -128, 127) * s
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-6)
    y.sum().backward()
    inside = (x.detach() >= -128 * s) & (x.detach() <= 127 * s)
    assert torch.equal(x.grad, inside.float())


# --- lowering --------------------------------------------------------------------------------------

def test_qdq_onnx_has_zero_points_0_per_channel_weights_and_matches_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = quantize(model, (x,))
    graph = compiled.onnx_model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    values = inits | constants
    qs = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(qs) == 4  # two activations, two weights
    for node in qs:
        zp = values[node.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    per_channel = [node for node in qs if values[node.input[1]].size > 1]
    assert sorted(values[node.input[1]].size for node in per_channel) == [4, 8]
    session = ort.InferenceSession(compiled.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        xi = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        got = session.run(None, {session.get_inputs()[0].name: xi.numpy()})[0]
        want = compiled(xi).detach().numpy()
        step = np.abs(want).max() / 127
        assert np.abs(got - want).max() <= 2 * step
    assert compiled.report.onnx["inputs_checked"] == 1 + 3 + 3
    onnx.checker.check_model(compiled.onnx_model)


def test_report_has_the_calibration_table():
    compiled = quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(), (torch.randn(1, 3, 8, 8),), calibrator="percentile")
    rows = compiled.report.tables["int8 calibration"]
    assert [r["calibrator"] for r in rows] == ["max", "percentile"]  # the model input is calibrated with max
    assert "## int8 calibration" in compiled.report.to_markdown()


# --- bad input ---------------------------------------------------------------------------------------

def test_int8_needs_calib_data_and_matching_batches():
    model, x = nn.Conv2d(3, 4, 3).eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(fxopt.InputError, match=r"needs calib_data=\[\(x,\), \.\.\.\]"):
        fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8")
    with pytest.raises(fxopt.InputError, match=r"calib_data\[1\]\[0\] is \(1, 3, 9, 8\):float32, the example input is \(1, 3, 8, 8\)"):
        fxopt.compile(model, "xavier", example_inputs=(x,), precision="int8", calib_data=[(x,), (torch.randn(1, 3, 9, 8),)])
    with pytest.raises(fxopt.InputError, match="unknown calibrator 'kl'"):
        QuantizeInt8(calibrator="kl")


def test_precision_int8_adds_the_quantize_pass():
    x = torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), "xavier", example_inputs=(x,), precision="int8", calib_data=[(x,)])
    assert compiled.report.pipeline[-1] == "quantize"
    assert next(r for r in compiled.report.passes if r.name == "quantize").status == "applied"


# --- real data -----------------------------------------------------------------------------------------

def ort_accuracy(onnx_model, x, y):
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = sum(int(session.run(None, {name: x[i:i + 1].numpy()})[0].argmax()) == int(y[i]) for i in range(len(y)))
    return correct / len(y)


@pytest.mark.parametrize(("target", "int8_weights"), [("xavier", None), ("cpu", None), ("cpu", "portable")])
def test_digits_int8_accuracy_within_half_a_point_of_fp32_in_onnx_runtime(target, int8_weights, one_thread):
    split = load_digits_split(0)
    torch.manual_seed(0)
    model = DigitsCNN(width=8)
    fit(model, split.x_train, split.y_train, epochs=8, seed=0)
    model.eval()
    x = split.x_train[:1]
    calib = [(split.x_train[i:i + 1],) for i in range(0, 256, 8)]  # 32 training images
    fp32 = fxopt.compile(model, target, example_inputs=(x,), precision="fp32")
    # keep_faster=False: this test is about accuracy, whichever is faster on this host
    int8 = fxopt.compile(model, target, example_inputs=(x,), precision="int8", calib_data=calib, passes=[QuantizeInt8(keep_faster=False, int8_weights=int8_weights)])
    assert sum(n.op_type == "QuantizeLinear" for n in int8.onnx_model.graph.node) >= 10
    acc32, acc8 = ort_accuracy(fp32.onnx_model, split.x_test, split.y_test), ort_accuracy(int8.onnx_model, split.x_test, split.y_test)
    assert acc32 > 0.9
    assert acc8 >= acc32 - 0.005, (acc32, acc8)


def test_operator_matmul_is_recognised():
    assert operator.matmul in importlib.import_module("fxopt.passes.quantize")._MATMUL_FUNCTIONS


@pytest.mark.parametrize(("int8_ms", "applied"), [(1.0, True), (3.0, False)])
def test_cpu_keeps_int8_only_when_onnx_runtime_runs_it_faster(monkeypatch, int8_ms, applied):
    import fxopt.passes.quantize as q

    calls = []

    def fake_timing(models, inputs, runs, threads):
        calls.append((len(models), threads))
        return [2.0, int8_ms]

    monkeypatch.setattr(q, "isolated_latencies_ms", fake_timing)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(model, "cpu", example_inputs=(x,), precision="int8", calib_data=[(x,)])
    record = next(r for r in compiled.report.passes if r.name == "quantize")
    assert calls == [(2, 1)]  # fp32 and int8, on one fixed thread
    has_qdq = "QuantizeLinear" in {n.op_type for n in compiled.onnx_model.graph.node}
    assert (record.status == "applied") == applied == has_qdq
    assert compiled.report.tables["int8 vs fp32 in ONNX Runtime (this host)"][1]["median ms"] == f"{int8_ms:.4f}"
    assert ("int8 summary" in compiled.report.tables) == applied  # no int8 layer table for a graph that was not kept
    if not applied:
        assert "int8 is not faster on this host: ONNX Runtime median 3.000 ms vs fp32 2.000 ms over 30 runs on 1 thread(s)" in record.reason
        assert any(n.startswith("WARNING: requested pass 'quantize' changed nothing: int8 is not faster") for n in compiled.report.notes)
    # what ships is said the same way everywhere: manifest, report headline and markdown
    shipped = "int8" if applied else "fp32"
    assert compiled.manifest["precision"] == compiled.report.precision == shipped
    assert str(compiled.report).splitlines()[0].endswith(f"({shipped})")
    assert f"for `cpu` ({shipped})" in compiled.report.to_markdown().splitlines()[0]
    assert ("int8_weights" in compiled.manifest) == applied
    assert any(n.startswith("WARNING: precision fp32, not int8") for n in compiled.report.notes) == (not applied)


def test_xavier_is_never_timed_here(monkeypatch):
    import fxopt.passes.quantize as q

    monkeypatch.setattr(q, "isolated_latencies_ms", lambda *a, **k: pytest.fail("timed a TensorRT target on this host"))
    x = torch.randn(1, 3, 8, 8)
    compiled = fxopt.compile(nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), "xavier", example_inputs=(x,), precision="int8", calib_data=[(x,)])
    assert next(r for r in compiled.report.passes if r.name == "quantize").status == "applied"


def test_sensitivity_ranks_layers_and_skip_most_sensitive_keeps_the_worst_in_higher_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    calib = [(torch.randn(1, 3, 12, 12),) for _ in range(4)]
    plain = quantize(model, (x,))
    ranked = q.sensitivity(plain.graph_module, calib)
    assert sorted(r.layer for r in ranked) == ["_0", "_2", "_4"]
    assert [r.error for r in ranked] == sorted((r.error for r in ranked), reverse=True) and ranked[-1].error > 0
    assert all(m.enabled for parts in q.quantized_layers(plain.graph_module).values() for m in parts)  # left as it was
    mixed = quantize(model, (x,), skip_most_sensitive=1)
    table = mixed.report.tables["int8 sensitivity"]  # most sensitive first, on the pass's calib_data
    worst = table[0]["layer"]
    assert [r["precision"] for r in table] == ["kept in fp16: rank 1 of 3 by sensitivity", "int8", "int8"]
    assert not mixed.graph_module.get_submodule(worst.lstrip("_")).enabled
    qdq = sum(n.op_type == "QuantizeLinear" for n in mixed.onnx_model.graph.node)
    assert qdq < sum(n.op_type == "QuantizeLinear" for n in plain.onnx_model.graph.node)  # its weight Q/DQ is gone


def test_error_budget_keeps_layers_out_until_the_error_fits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    compiled = quantize(model, (x,), error_budget=1e-9)  # only fp32 meets it: every layer is kept out
    assert all(r["precision"].startswith("kept in fp16") for r in compiled.report.tables["int8 sensitivity"])


# --- report ----------------------------------------------------------------------------------------------

def test_report_puts_fp16_and_int8_estimates_side_by_side_and_says_what_stayed_fp16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(16, 16, 2, stride=2, groups=2), nn.Conv2d(16, 4, 1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 12 * 12, 2)).eval()
    compiled = quantize(model, (torch.randn(1, 3, 8, 8),), skip=("9",))  # the linear head by name
    tables = compiled.report.tables
    per_layer = tables["int8 vs fp16: estimated xavier latency per layer (cost model)"]
    layers, total = per_layer[:-1], per_layer[-1]
    assert total["layer"] == "total" and [r["layer"] for r in layers if r["op"] == "Conv2d"] == ["_0", "_3", "_6"]
    for column in ("est. ms fp16", "est. ms int8", "est. ms as compiled"):
        assert float(total[column]) == pytest.approx(sum(float(r[column]) for r in layers), abs=1e-3)
    # each column is the cost model at that precision on the graph without fake quantisation
    twin = q.float_graph(compiled.graph_module)
    fp16, int8 = (fxopt.estimate_costs(twin, "xavier", p).per_node for p in ("fp16", "int8"))
    for r in layers:
        assert (r["est. ms fp16"], r["est. ms int8"]) == (f"{fp16[r['layer']].latency_s * 1e3:.4f}", f"{int8[r['layer']].latency_s * 1e3:.4f}")
    assert [r["runs at"] for r in layers if r["op"] == "Conv2d"] == ["int8"] * 3
    assert {r["layer"]: r["reason"] for r in tables["layers left in fp16"]} == {
        "_5": "grouped transposed conv: its weight is not per-channel quantisable here",
        "_9": "skip= keeps it in fp16",
    }
    summary = {r["what"]: r["value"] for r in tables["int8 summary"]}
    qdq = sum(n.op_type == "QuantizeLinear" for n in compiled.onnx_model.graph.node)
    assert summary["Q/DQ pairs"] == f"{qdq} (3 activations, 3 weights)"
    assert summary["layers in int8 / left in fp16"] == "3 / 2"
    assert "## int8 summary" in compiled.report.to_markdown()


def test_report_names_the_layers_kept_by_sensitivity_and_the_cpu_compares_with_fp32(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    mixed = quantize(model, (torch.randn(1, 3, 8, 8),), skip_most_sensitive=1)
    worst = mixed.report.tables["int8 sensitivity"][0]["layer"]
    left = mixed.report.tables["layers left in fp16"]
    assert left == [{"layer": worst, "op": "Conv2d", "precision": "fp16", "reason": "kept in fp16: rank 1 of 2 by sensitivity"}]
    assert mixed.report.tables["int8 summary"][0]["value"] == "2 (1 activations, 1 weights)"  # the kept conv's Q/DQ are off
    cpu = quantize(model, (torch.randn(1, 3, 8, 8),), target="cpu")
    assert "int8 vs fp32: estimated cpu latency per layer (cost model)" in cpu.report.tables


def test_float_graph_is_the_graph_without_fake_quantisation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = quantize(model, (x,)).graph_module
    twin = q.float_graph(gm)
    assert not any(isinstance(m, (FakeQuantize, *q.WEIGHT_FAKE_QUANT)) for m in twin.modules())
    assert [n.name for n in twin.graph.nodes] == [n.name for n in gm.graph.nodes if not n.name.startswith("fxopt_fq_")]
    torch.testing.assert_close(twin(x), model(x))
    assert any(isinstance(m, FakeQuantize) for m in gm.modules())  # the compiled graph is untouched


def test_a_permute_of_the_model_input_is_calibrated_like_the_input():
    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x.permute(0, 2, 1).reshape(1, -1, 3))

    compiled = quantize(Permuted().eval(), (torch.randn(1, 3, 5),))
    rows = {r["tensor"]: r for r in compiled.report.tables["int8 calibration"]}
    assert [r["calibrator"] for r in rows.values()] == ["max"]  # not entropy: it is the input's data
    views = q.input_views(q.float_graph(compiled.graph_module))
    assert {"x", "permute"} <= views and set(rows) <= views and "fc" not in views


def test_cpu_timing_is_skipped_when_the_graph_cannot_be_exported():
    """Found by `make fuzz`: a leaf that branches on data after an integer-scale interpolate cannot be
    scripted, so neither graph exports; the pass keeps int8 untimed instead of being rolled back
    (the compile's export reports the model's own problem)."""
    from fxopt.testing import check_pass

    class DataGate(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.mean() > 0.1:
                return self.inner(x)
            return x * 0.5

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.b0_conv = nn.Conv2d(2, 2, 3, stride=1, padding=1, groups=2, bias=False)
            self.b2_gate = DataGate(nn.Conv2d(2, 2, 1, padding=0))

        def forward(self, x):
            x = torch.nn.functional.interpolate(self.b0_conv(x), scale_factor=2, mode="bilinear", align_corners=False)
            return self.b2_gate(x)

    torch.manual_seed(0)
    model, inputs = Model().eval(), (torch.randn(1, 2, 4, 5),)
    result = check_pass(lambda: fxopt.create_pass("quantize"), model, inputs, calib_data=[inputs])
    assert result.record.status == "applied"
    table = result.graph_module.meta["fxopt_tables"]["int8 vs fp32 in ONNX Runtime (this host)"]
    assert table[0]["graph"] == "not timed" and "does not export" in table[0]["why"]


# --- what ONNX Runtime makes of the cpu file --------------------------------------------------------

class PoolResidualHead(nn.Module):
    """A ResNet stem in miniature: conv-relu, max pool, a residual block reading the pool, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(8, 5)

    def forward(self, x):
        y = self.pool(self.stem(x).relu())
        y = (self.b(self.a(y).relu()) + y).relu()
        return self.fc(y.mean((2, 3)))


def ort_optimized_ops(model: onnx.ModelProto) -> list[str]:
    """The op kinds ONNX Runtime's CPU provider runs after its hardware-independent fusions."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = f"{tmp}/optimized.onnx"
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_cpu_file_runs_every_conv_add_and_linear_as_an_onnx_runtime_int8_kernel():
    torch.manual_seed(0)
    compiled = quantize(PoolResidualHead().eval(), (torch.randn(1, 3, 16, 16),), target="cpu")
    ops = ort_optimized_ops(compiled.onnx_model)
    # before: scales of shape [1] kept the add in float, the pool's own Q/DQ left the add after it
    # in float, and a float bias kept the head a float Gemm dequantising its weight every run
    assert ops.count("QLinearConv") == 3 and ops.count("QLinearAdd") == 1 and ops.count("QGemm") == 1, ops
    assert "Conv" not in ops and "Add" not in ops and "Gemm" not in ops


def test_per_tensor_scales_are_scalars_and_only_the_cpu_file_gets_an_int32_bias():
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 16, 16),)
    for target in ("cpu", "xavier"):
        graph = quantize(PoolResidualHead().eval(), x, target=target).onnx_model.graph
        initializers = {t.name: t for t in graph.initializer}
        per_tensor = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(a.name == "axis" for a in n.attribute)]
        assert per_tensor and all(list(initializers[n.input[1]].dims) == [] for n in per_tensor if n.input[1] in initializers)
        int32 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT32]
        assert len(int32) == (1 if target == "cpu" else 0), target  # TensorRT 8.5 parses int8 Q/DQ only


def test_int32_bias_is_the_float_bias_on_the_product_grid():
    torch.manual_seed(0)
    compiled = quantize(PoolResidualHead().eval(), (torch.randn(1, 3, 16, 16),), target="cpu")
    graph = compiled.onnx_model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    bias_dq, a_dq, b_dq = (producers[name] for name in (gemm.input[2], gemm.input[0], gemm.input[1]))
    scale = initializers[bias_dq.input[1]]
    np.testing.assert_allclose(scale, initializers[a_dq.input[1]] * initializers[b_dq.input[1]], rtol=1e-6)
    bias = compiled.graph_module.get_submodule("fc").module.bias.detach().numpy()
    np.testing.assert_array_less(np.abs(initializers[bias_dq.input[0]] * scale - bias), scale / 2 + 1e-9)


def test_int8_verification_accepts_rounding_noise_but_not_a_wrong_scale():
    from fxopt.backends.onnx import OnnxExport, verify_onnx
    from fxopt.errors import VerificationError
    from fxopt.passes.quantize import float_graph

    torch.manual_seed(0)
    x = (torch.randn(1, 3, 16, 16),)
    compiled = quantize(PoolResidualHead().eval(), x, target="xavier")
    gm, good = compiled.graph_module, compiled.onnx_model
    report = compiled.report.onnx
    assert report["int8_vs_float_max_abs_error"] > 0 and report["int8_vs_float_in_output_int8_steps"] > 0
    checked = verify_onnx(OnnxExport(good, 17, ["input"], ["output"]), gm, x, atol=1e-2, rtol=5e-2, float_module=float_graph(gm))
    assert checked.max_error_steps is not None and checked.int8_error is not None
    bad = onnx.ModelProto()
    bad.CopyFrom(good)
    initializers = {t.name: t for t in bad.graph.initializer}
    first_dq = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and not any(a.name == "axis" for a in n.attribute))
    wrong = numpy_helper.to_array(initializers[first_dq.input[1]]) * 8  # the input dequantised 8x too large (its Q keeps the scale)
    bad.graph.initializer.append(numpy_helper.from_array(wrong, "wrong_scale"))
    first_dq.input[1] = "wrong_scale"
    with pytest.raises(VerificationError, match="nor is its error vs the float graph"):
        verify_onnx(OnnxExport(bad, 17, ["input"], ["output"]), gm, x, atol=1e-2, rtol=5e-2, float_module=float_graph(gm))


def test_cpu_report_gives_measured_latencies_even_when_int8_is_forced(monkeypatch):
    import fxopt.passes.quantize as q

    monkeypatch.setattr(q, "isolated_latencies_ms", lambda models, inputs, runs, threads: [2.0, 3.0])
    x = torch.randn(1, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    compiled = fxopt.compile(model, "cpu", example_inputs=(x,), precision="int8", calib_data=[(x,)], passes=[QuantizeInt8(keep_faster=False)])
    record = next(r for r in compiled.report.passes if r.name == "quantize")
    assert record.status == "applied"  # slower, but forced
    assert [row["median ms"] for row in compiled.report.tables["int8 vs fp32 in ONNX Runtime (this host)"]] == ["2.0000", "3.0000"]


# --- the host's int8 kernels (fxopt/targets/host.py): tested under both kinds of x86 host ------------------

VNNI_HOSTS = [("avx2", "avx512_bw", "avx512_vnni"), ("avx2", "avx_vnni"), ("avx2", "avx512_bw", "avx512_vnni", "amx_int8")]
SATURATING_HOSTS = [("avx2",), ("avx2", "avx512_bw")]


def onnx_weight_q(model: onnx.ModelProto) -> np.ndarray:
    """The int8 values of every quantised weight in an exported file (each weight's Q of its initializer)."""
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values = []
    for node in model.graph.node:
        axis = [a.i for a in node.attribute if a.name == "axis"]
        if node.op_type == "QuantizeLinear" and axis and node.input[0] in initializers:
            w, scale = initializers[node.input[0]], initializers[node.input[1]]
            shape = [1] * w.ndim
            shape[axis[0]] = -1
            values.append(np.round(w / scale.reshape(shape)).ravel())
        elif node.op_type == "DequantizeLinear" and axis and node.input[0] in initializers and initializers[node.input[0]].dtype == np.int8:
            values.append(initializers[node.input[0]].astype(np.float64).ravel())
    assert values, "no quantised weight in the file"
    return np.concatenate(values)


@pytest.mark.parametrize("features", VNNI_HOSTS + SATURATING_HOSTS)
def test_cpu_int8_weight_range_follows_the_simulated_host(features):
    from fxopt.targets.host import simulated_host

    with simulated_host(features) as cpu:
        torch.manual_seed(0)
        gm_levels = [m.levels for m in quantize_graph_modules(target="cpu")]
    expected = 127 if cpu.exact_int8 else 64
    assert cpu.exact_int8 == any(f in features for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert gm_levels and set(gm_levels) == {expected}


def quantize_graph_modules(target, **kw):
    from fxopt.passes.quant_observers import WEIGHT_FAKE_QUANT

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(1, 3, 8, 8)
    gm = fxopt.trace(model, (x,))
    from fxopt.passinfra.pass_base import CompileContext, use_context

    ctx = CompileContext.create(get_target(target), (x,), "int8", calib_data=[(torch.randn(1, 3, 8, 8),)], **kw)
    with use_context(ctx):
        out = QuantizeInt8(keep_faster=False).call(gm).graph_module
    return [m for m in out.modules() if isinstance(m, WEIGHT_FAKE_QUANT)]


def test_xavier_weights_use_the_full_range_on_any_host():
    from fxopt.targets.host import simulated_host

    with simulated_host(("avx2",)):
        torch.manual_seed(0)
        assert {m.levels for m in quantize_graph_modules(target="xavier")} == {127}
        with pytest.raises(fxopt.InputError, match="portable"):
            quantize_graph_modules(target="xavier", int8_weights="portable")


@pytest.mark.parametrize("features", [VNNI_HOSTS[0], SATURATING_HOSTS[0]])
def test_cpu_int8_file_is_exact_where_its_weight_range_says_and_the_manifest_records_why(features):
    """Simulated host (the decision) x this machine's real ONNX Runtime kernels (the check): the
    |q| <= 64 file verifies on every x86 host; the full-range one only where the real host has VNNI."""
    from fxopt.errors import VerificationError
    from fxopt.targets.host import host_cpu, simulated_host

    real_exact = host_cpu().exact_int8
    torch.manual_seed(0)
    model = PoolResidualHead().eval()
    x = (torch.rand(1, 3, 16, 16) * 4,)
    with simulated_host(features) as cpu:
        if cpu.exact_int8 and not real_exact:  # full range on a host whose kernels saturate: what issue 23 saw
            with pytest.raises(VerificationError):
                quantize(model, x, target="cpu")
            return
        compiled = quantize(model, x, target="cpu")
    q = np.abs(onnx_weight_q(compiled.onnx_model))
    assert q.max() == (127 if cpu.exact_int8 else 64)
    recorded = compiled.manifest["int8_weights"]
    assert recorded["max_abs_q"] == int(q.max())
    assert list(recorded["host"]["features"]) == list(features)
    assert compiled.manifest["host"]["source"] == "simulated"
    assert any(row["what"] == "int8 weights" and row["value"] == recorded["why"] for row in compiled.report.tables["int8 summary"])


def test_portable_int8_weights_are_exact_everywhere_and_full_is_refused_where_it_would_saturate():
    from fxopt.targets.host import simulated_host

    torch.manual_seed(0)
    x = (torch.randn(1, 3, 16, 16),)
    with simulated_host(VNNI_HOSTS[0]):
        portable = quantize(PoolResidualHead().eval(), x, target="cpu", int8_weights="portable")
    assert np.abs(onnx_weight_q(portable.onnx_model)).max() == 64
    assert portable.manifest["int8_weights"]["choice"] == "portable"
    with simulated_host(SATURATING_HOSTS[0]), pytest.raises(fxopt.InputError, match="overflow"):
        quantize(PoolResidualHead().eval(), x, target="cpu", int8_weights="full")
    with pytest.raises(fxopt.InputError, match="int8_weights must be one of"):
        QuantizeInt8(int8_weights="7bit")


def test_host_isa_is_read_from_proc_cpuinfo_when_torch_cannot_say(tmp_path):
    from fxopt.targets.host import _from_cpuinfo

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    vnni = tmp_path / "vnni"
    vnni.write_text("model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512bw avx512_vnni\n")
    a, v = _from_cpuinfo("x86_64", str(avx2)), _from_cpuinfo("x86_64", str(vnni))
    assert (a.name, a.features, a.exact_int8) == ("AMD EPYC 7B12", ("avx2",), False)
    assert (v.features, v.exact_int8) == (("avx2", "avx512_bw", "avx512_vnni"), True)
    assert "vpmaddubsw" in a.int8_kernels and "AVX2" in a.int8_kernels
    assert _from_cpuinfo("x86_64", str(tmp_path / "missing")).features == ()


def saturation_probe(levels: int) -> int:
    """ONNX Runtime's u8 x s8 integer product on this host (MatMulInteger: the kernel QLinearConv and
    QGemm use) with activations at 255 and weights at ±`levels`: its largest error against exact
    integer arithmetic. (A QDQ conv with a float output would not do: ONNX Runtime runs it as a float
    Conv, fusing a QLinearConv only when a Q follows.)"""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    a = np.full((4, 256), 255, dtype=np.uint8)
    a[1::2] = rng.integers(0, 256, size=a[1::2].shape)
    b = (rng.choice([-1, 1], size=(256, 16)) * levels).astype(np.int8)
    b[:, 0] = levels  # same signs in every pair: the int16 pair sum saturates first here
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, list(a.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"a": a})[0].astype(np.int64)
    return int(np.abs(y - a.astype(np.int64) @ b.astype(np.int64)).max())


def test_onnx_runtime_int8_kernels_on_this_host_behave_as_fxopt_detects():
    """The detection against the real kernels of whichever host runs the suite: full-range weights are
    exact with VNNI/AMX and saturate without; |q| <= 64 is exact on both."""
    from fxopt.targets.host import host_cpu

    if host_cpu().x86:
        full = saturation_probe(127)
        assert (full == 0) == host_cpu().exact_int8, (full, host_cpu())
    assert saturation_probe(64) == 0


@pytest.mark.skipif(
    emulator() is None or platform.machine() != "x86_64",
    reason="needs qemu-x86_64 (Debian qemu-user; `make test` and .ci/run install it) on an x86-64 host",
)
def test_cpu_int8_file_is_exact_on_an_emulated_avx2_host():
    """The AVX2-only host for real, on any x86 host: ONNX Runtime's AVX2 int8 kernels under QEMU's
    Haswell. The file fxopt writes for such a host matches the torch graph it verified; a full-range
    file (what a VNNI host writes) does not, which is why the range follows the host."""
    from fxopt.backends.onnx import error_in_steps
    from fxopt.targets.host import simulated_host
    from fxopt.testing.emulated_cpu import run_onnx_emulated

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 64, 10)).eval()
    x = torch.rand(1, 3, 8, 8) * 4
    steps = {}
    for features in (SATURATING_HOSTS[0], VNNI_HOSTS[0]):
        with simulated_host(features) as cpu:
            compiled = fxopt.compile(model, "cpu", example_inputs=(x,), precision="int8", passes=[QuantizeInt8(keep_faster=False)],
                                     calib_data=[(torch.rand(1, 3, 8, 8) * 4,) for _ in range(3)])
        emulated = run_onnx_emulated(compiled.onnx_model, [x], cpu="Haswell")
        steps[cpu.exact_int8] = error_in_steps(emulated, [compiled(x)], [None])
    assert steps[False] <= 1.0, steps  # |q| <= 64: exact on AVX2 (rounding of the last requantisation only)
    assert steps[True] > 5.0, steps  # full range: vpmaddubsw saturates


def test_each_layer_left_out_gets_the_first_reason_of_the_table_that_holds():
    from fxopt.targets import QuantScheme

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.leaf = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8))

        def forward(self, x):
            return torch.matmul(self.q(x), x.transpose(1, 2)) + self.leaf(x).sum()

    gm = fxopt.trace(Attention().eval(), (torch.randn(1, 4, 8),), leaf_modules=["leaf"])
    scheme = QuantScheme(quantized_ops=("linear",))  # no matmul in this scheme
    annotate_int8(gm, scheme, skip=())
    reasons = QuantizeInt8()._why_not_int8(gm, scheme, {}, "fp16")
    assert reasons == {"matmul": "the target's int8 scheme does not quantise matmul",
                       "leaf": "an opaque module: fxopt does not quantise inside it"}
    skipped = QuantizeInt8(skip=("q",))
    annotate_int8(gm, scheme, skip=skipped.skip)
    assert skipped._why_not_int8(gm, scheme, {}, "fp32")["q"] == "skip= keeps it in fp32"
