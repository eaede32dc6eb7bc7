"""TensorRT 8.5 compatibility rules, one test per rule on crafted ONNX graphs (both sides of each limit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import fxopt
from fxopt.backends.onnx import export_onnx
from fxopt.backends.tensorrt_compat import check_tensorrt_compat, torch_source_names
from fxopt.backends.tensorrt_ops import MATRICES, support_matrix

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def model(nodes, inputs, outputs, inits=(), opset=17):
    vi = lambda name, t, shape: helper.make_tensor_value_info(name, t, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes, "g", [vi(*i) for i in inputs], [vi(*o) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def node(op, inputs, outputs, name=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or f"/{op}", **attrs)


def errors(m, version="8.5"):
    return [(f.op_type, f.rule, f.message) for f in check_tensorrt_compat(m, version).errors]


def warnings_of(m, version="8.5"):
    return [(f.op_type, f.rule, f.message) for f in check_tensorrt_compat(m, version).warnings]


X4 = ("x", F, [1, 2, 4, 4])


def unary(op, shape=(1, 2, 4, 4), **attrs):
    return model([node(op, ["x"], ["y"], **attrs)], [("x", F, list(shape))], [("y", F, list(shape))])


# --- op support: the matrix's Y / N column -------------------------------------------------------

def test_supported_op_passes_and_unsupported_op_is_an_error_with_a_fix():
    assert errors(unary("Relu")) == []
    report = check_tensorrt_compat(unary("IsInf"), "8.5")
    assert [f.op_type for f in report.errors] == ["IsInf"] and "abs()" in report.errors[0].fix


def test_layer_norm_is_an_error_before_8_6_and_fine_from_8_6():
    ln = model([node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1)], [("x", F, [2, 8])], [("y", F, [2, 8])],
               [("s", np.ones(8, np.float32)), ("b", np.zeros(8, np.float32))])
    (found,) = check_tensorrt_compat(ln, "xavier").errors
    assert found.op_type == "LayerNormalization" and "rewrites" in found.fix
    assert errors(ln, "8.6") == []


def test_op_outside_the_matrix_and_custom_domain_are_errors():
    assert errors(unary("MadeUpOp"))[0][:2] == ("MadeUpOp", "op")
    custom = model([helper.make_node("Plugin", ["x"], ["y"], name="/p", domain="com.example")], [X4], [("y", F, [1, 2, 4, 4])])
    assert errors(custom)[0][1] == "domain"


def test_opset_above_17_is_an_error():
    assert errors(unary("Relu"), "8.5") == []
    assert errors(model([node("Relu", ["x"], ["y"])], [X4], [("y", F, [1, 2, 4, 4])], opset=18))[0][1] == "opset"


def test_later_release_is_checked_against_the_nearest_table_and_says_so():
    report = check_tensorrt_compat(unary("Relu"), "10.3")
    assert report.ok and "8.6 matrix" in report.note
    with pytest.raises(fxopt.TargetError):
        support_matrix("7.1")
    assert MATRICES["8.5"].max_opset == 17


# --- attribute and input limits of the matrix rows -------------------------------------------------

def test_pooling_is_2d_or_3d_only():
    assert errors(unary("MaxPool", kernel_shape=[2, 2])) == []
    one_d = model([node("MaxPool", ["x"], ["y"], kernel_shape=[2])], [("x", F, [1, 2, 8])], [("y", F, [1, 2, 7])])
    assert errors(one_d)[0][:2] == ("MaxPool", "attribute")


def test_maxpool_indices_output_is_an_error():
    two = model([node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])], [X4], [("y", F, [1, 2, 3, 3]), ("i", I64, [1, 2, 3, 3])])
    assert any("Indices" in e[2] for e in errors(two))


@pytest.mark.parametrize("attr, ok, bad", [
    ("mode", "linear", "cubic"),
    ("coordinate_transformation_mode", "align_corners", "tf_crop_and_resize"),
    ("nearest_mode", "floor", "made_up"),
])
def test_resize_modes(attr, ok, bad):
    def resize(value):
        return model([node("Resize", ["x", "", "scales"], ["y"], **{attr: value})], [X4], [("y", F, [1, 2, 8, 8])],
                     [("scales", np.array([1, 1, 2, 2], np.float32))])
    assert errors(resize(ok)) == []
    assert errors(resize(bad))[0][:2] == ("Resize", "attribute")


def test_axes_must_be_constants():
    const = model([node("Unsqueeze", ["x", "axes"], ["y"])], [X4], [("y", F, [1, 1, 2, 4, 4])], [("axes", np.array([1]))])
    computed = model([node("Unsqueeze", ["x", "axes"], ["y"])], [X4, ("axes", I64, [1])], [("y", F, [1, 1, 2, 4, 4])])
    assert errors(const) == []
    assert errors(computed)[0][:2] == ("Unsqueeze", "input")


def test_topk_k_must_be_constant_in_8_5_not_in_8_6():
    computed = model([node("TopK", ["x", "k"], ["v", "i"])], [X4, ("k", I64, [1])], [("v", F, [1, 2, 4, 2]), ("i", I64, [1, 2, 4, 2])])
    assert errors(computed)[0][:2] == ("TopK", "input")
    assert errors(computed, "8.6") == []


def test_cast_targets():
    assert errors(unary("Cast", to=TensorProto.FLOAT16)) == []
    assert warnings_of(unary("Cast", to=TensorProto.INT64))[0][1] == "dtype"
    assert errors(unary("Cast", to=TensorProto.INT16))[0][:2] == ("Cast", "dtype")


def test_einsum_ellipsis_diagonal_and_broadcast():
    def einsum(eq, a, b):
        return model([node("Einsum", ["a", "b"], ["y"], equation=eq)], [("a", F, a), ("b", F, b)], [("y", F, None)])
    assert errors(einsum("ij,jk->ik", [2, 3], [3, 4])) == []
    assert "ellipsis" in errors(einsum("...j,jk->...k", [2, 3], [3, 4]))[0][2]
    assert "diagonal" in errors(einsum("ii,ik->ik", [3, 3], [3, 4]))[0][2]
    assert "broadcasts" in errors(einsum("ij,jk->ik", [2, 1], [3, 4]))[0][2]


def test_instance_norm_needs_constant_scale_and_rank_3_to_5():
    def inorm(shape, const=True):
        inits = [("s", np.ones(2, np.float32)), ("b", np.zeros(2, np.float32))] if const else []
        extra = [] if const else [("s", F, [2]), ("b", F, [2])]
        return model([node("InstanceNormalization", ["x", "s", "b"], ["y"])], [("x", F, shape), *extra], [("y", F, shape)], inits)
    assert errors(inorm([1, 2, 4, 4])) == []
    assert errors(inorm([1, 2, 4, 4], const=False))[0][1] == "input"
    assert "rank-6" in errors(inorm([1, 2, 2, 2, 2, 2]))[0][2]


def test_reverse_sequence_needs_static_shapes_before_8_6():
    def rs(shape):
        return model([node("ReverseSequence", ["x", "lens"], ["y"])], [("x", F, shape)], [("y", F, shape)], [("lens", np.array([2, 2]))])
    assert errors(rs([2, 2, 3])) == []
    assert errors(rs(["n", 2, 3]))[0][:2] == ("ReverseSequence", "shape")
    assert errors(rs(["n", 2, 3]), "8.6") == []


def test_bidirectional_recurrence_needs_the_same_activations():
    def gru(acts):
        return model([node("GRU", ["x", "w", "r"], ["y"], direction="bidirectional", hidden_size=2, activations=acts)],
                     [("x", F, [3, 1, 2])], [("y", F, None)],
                     [("w", np.zeros((2, 6, 2), np.float32)), ("r", np.zeros((2, 6, 2), np.float32))])
    assert errors(gru(["Sigmoid", "Tanh", "Sigmoid", "Tanh"])) == []
    assert errors(gru(["Sigmoid", "Tanh", "Sigmoid", "Relu"]))[0][:2] == ("GRU", "attribute")


def test_random_seed_is_a_warning():
    shape = [2, 2]
    assert warnings_of(model([node("RandomNormal", [], ["y"], shape=shape)], [], [("y", F, shape)])) == []
    assert warnings_of(model([node("RandomNormal", [], ["y"], shape=shape, seed=1.0)], [], [("y", F, shape)]))[0][0] == "RandomNormal"


def test_if_branches_must_output_distinct_tensors():
    def branch(name, out):
        return helper.make_graph([node("Identity", ["x"], [out], name=f"/{name}")], name, [], [helper.make_tensor_value_info(out, F, [1])])
    x, c = ("x", F, [1]), ("c", B, [])
    good = model([node("If", ["c"], ["y"], then_branch=branch("t", "a"), else_branch=branch("e", "b"))], [x, c], [("y", F, [1])])
    bad = model([node("If", ["c"], ["y"], then_branch=branch("t", "a"), else_branch=branch("e", "a"))], [x, c], [("y", F, [1])])
    assert errors(good) == []
    assert errors(bad)[0][:2] == ("If", "attribute")


def test_nodes_inside_if_branches_are_checked():
    then = helper.make_graph([node("IsInf", ["x"], ["a"], name="/then/IsInf")], "t", [], [helper.make_tensor_value_info("a", B, [1])])
    other = helper.make_graph([node("IsNaN", ["x"], ["b"], name="/else/IsNaN")], "e", [], [helper.make_tensor_value_info("b", B, [1])])
    m = model([node("If", ["c"], ["y"], then_branch=then, else_branch=other)], [("x", F, [1]), ("c", B, [])], [("y", B, [1])])
    assert [e[0] for e in errors(m)] == ["IsInf"]


def test_data_dependent_shapes_are_warnings():
    assert [w[0] for w in warnings_of(unary("NonZero"))] == ["NonZero"]


# --- dtypes ------------------------------------------------------------------------------------------

def test_bool_input_to_an_op_without_a_bool_form_is_an_error():
    bools = model([node("And", ["a", "b"], ["y"])], [("a", B, [4]), ("b", B, [4])], [("y", B, [4])])
    equal = model([node("Equal", ["a", "b"], ["y"])], [("a", B, [4]), ("b", B, [4])], [("y", B, [4])])
    assert errors(bools) == []
    assert errors(equal)[0][:2] == ("Equal", "dtype")


def test_int64_constants_outside_int32_are_errors_except_slice_ends():
    def add(value):
        return model([node("Add", ["x", "c"], ["y"])], [("x", I64, [1])], [("y", I64, [1])], [("c", np.array([value], np.int64))])
    assert errors(add(2**31 - 1)) == []
    assert errors(add(2**31))[0][1] == "dtype"
    to_end = model([node("Slice", ["x", "s", "e", "a"], ["y"])], [("x", F, [8])], [("y", F, [7])],
                   [("s", np.array([1])), ("e", np.array([2**63 - 1])), ("a", np.array([0]))])
    assert errors(to_end) == []


def test_int64_graph_io_is_a_warning_and_int16_an_error():
    assert warnings_of(model([node("Identity", ["x"], ["y"])], [("x", I64, [2])], [("y", I64, [2])]))[0][1] == "dtype"
    i16 = TensorProto.INT16
    assert errors(model([node("Identity", ["x"], ["y"])], [("x", i16, [2])], [("y", i16, [2])]))[0][1] == "dtype"


def test_dynamic_input_shape_is_a_warning():
    assert warnings_of(unary("Relu")) == []
    found = warnings_of(unary("Relu", shape=("n", 2, 4, 4)))
    assert found and found[0][1] == "shape"


# --- Q/DQ ----------------------------------------------------------------------------------------------

def qdq(zero=0, zero_type=np.int8, scale=(0.1,), axis=1, weight=False):
    inits = [("s", np.array(scale, np.float32) if len(scale) > 1 else np.float32(scale[0])),
             ("z", np.array([zero] * len(scale), zero_type) if len(scale) > 1 else zero_type(zero))]
    nodes = [node("QuantizeLinear", ["w" if weight else "x", "s", "z"], ["q"], axis=axis),
             node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="/DQ", axis=axis)]
    if weight:
        inits.append(("w", np.ones((2, 2, 1, 1), np.float32)))
        nodes.append(node("Conv", ["x", "dq"], ["y"]))
        return model(nodes, [X4], [("y", F, [1, 2, 4, 4])], inits)
    return model(nodes, [X4], [("dq", F, [1, 2, 4, 4])], inits)


def test_qdq_zero_point_must_be_zero():
    assert errors(qdq()) == []
    assert {e[1] for e in errors(qdq(zero=3))} == {"qdq"}


def test_qdq_uint8_is_an_error():
    assert any("uint8" in e[2] for e in errors(qdq(zero_type=np.uint8)))


def test_per_channel_only_on_weights_along_output_channels():
    assert errors(qdq(scale=(0.1, 0.2), axis=0, weight=True)) == []
    assert "axis 1" in errors(qdq(scale=(0.1, 0.2), axis=1, weight=True))[0][2]
    assert "activation" in errors(qdq(scale=(0.1, 0.2), axis=1))[0][2]


# --- torch source names and compile() ----------------------------------------------------------------

class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_findings_name_the_torch_module():
    model_ = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 8)
    gm = fxopt.trace(model_, (x,))
    assert torch_source_names(gm)["norm_1"].startswith("module '1.norm' (LayerNorm")
    report = check_tensorrt_compat(export_onnx(gm, (x,)).model, "xavier", graph_module=gm)
    assert [f.torch_source.split(" (")[0] for f in report.errors] == ["module '0.norm'", "module '1.norm'"]


def test_compile_for_xavier_rewrites_layer_norm_and_reports():
    compiled = fxopt.compile(nn.Sequential(Block(), nn.GELU()), "xavier", example_inputs=(torch.randn(2, 8),))
    assert "LayerNormalization" not in compiled.report.onnx["op_types"]
    assert any("TensorRT 8.5 compatibility" in n and "0 errors" in n for n in compiled.report.notes)
    assert any(n.startswith("ONNX rewrite for TensorRT 8.5: 1 x LayerNormalization") for n in compiled.report.notes)


def test_compile_for_xavier_refuses_a_hard_incompatibility_naming_the_module():
    class Pool1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.MaxPool1d(2)

        def forward(self, x):
            return self.pool(x)

    x = (torch.randn(1, 2, 8),)
    with pytest.raises(fxopt.TensorRTCompatError, match=r"MaxPool.*module 'pool' \(MaxPool1d.*2-D or 3-D") as info:
        fxopt.compile(Pool1d(), "xavier", example_inputs=x)
    assert info.value.findings and isinstance(info.value, fxopt.ExportError)
    assert fxopt.compile(Pool1d(), "cpu", example_inputs=x).onnx_model is not None  # ONNX Runtime has no such limit
