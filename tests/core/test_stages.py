"""Staged compiles (`fxopt.frontend.stages`): a detector's backbone and heads are the graph, its transform
and post-processing stay eager, and ``compiled(images)`` gives the original detections.

The default tier uses the torchvision detector classes with tiny backbones (a few seconds per
compile on this machine); the real builders (resnet50 FPN, mobilenet_v3, ssdlite) are in the zoo
tier (`tests/zoo`, detection cases) and in the `slow` test at the end.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import onnx
import pytest
import torch
import torchvision.models.detection as D
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.ops import MultiScaleRoIAlign

import fxopt
from fxopt.frontend.stages import Stages, preset_for, split_stages

C = 32  # feature channels of the tiny backbone (FCOS heads use GroupNorm(32))
SMALL = {"min_size": 128, "max_size": 128}


class TinyBackbone(nn.Module):
    """Three feature levels (strides 8, 16, 32) with BatchNorm and a residual add, as an FPN gives."""

    out_channels = C

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = nn.Sequential(block(3, 8, 2), block(8, 24, 2), block(24, 24, 2))
        self.res = block(24, 24, 1)
        self.down1, self.down2 = block(24, 32, 2), block(32, 32, 2)
        self.lat = nn.ModuleList([nn.Conv2d(c, C, 1) for c in (24, 32, 32)])

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        p3 = self.stem(x)
        p3 = p3 + self.res(p3)
        p4 = self.down1(p3)
        p5 = self.down2(p4)
        return OrderedDict((str(i), lat(p)) for i, (lat, p) in enumerate(zip(self.lat, (p3, p4, p5))))


def _anchors(ratios: tuple[float, ...]) -> AnchorGenerator:
    return AnchorGenerator(((16,), (32,), (64,)), (ratios,) * 3)


def tiny(family: str) -> nn.Module:
    """A torchvision detector of `family` on the tiny backbone, low score threshold so the
    comparison covers many boxes."""
    torch.manual_seed(0)
    if family == "retinanet":
        m = D.RetinaNet(TinyBackbone(), 5, anchor_generator=_anchors((0.5, 1.0, 2.0)), score_thresh=0.0, **SMALL)
    elif family == "fcos":
        m = D.FCOS(TinyBackbone(), 5, anchor_generator=_anchors((1.0,)), score_thresh=0.0, **SMALL)
    elif family == "fasterrcnn":
        m = D.FasterRCNN(TinyBackbone(), 5, rpn_anchor_generator=_anchors((0.5, 1.0, 2.0)),
                         box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], 7, 2), box_score_thresh=0.0, **SMALL)
    elif family == "ssd":
        from torchvision.models.detection.ssd import SSD, SSDHead

        m = SSD(TinyBackbone(), DefaultBoxGenerator([[2], [2], [2]]), (128, 128), 5,
                  head=SSDHead([C] * 3, [4] * 3, 5), score_thresh=0.0)
    else:
        raise ValueError(family)
    return m.eval()


def _images(seed: int, n: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 128, 128, generator=g) for _ in range(n)]


def _assert_same_detections(model: nn.Module, compiled: nn.Module, images: list[torch.Tensor], atol: float = 1e-4) -> int:
    """Same detections within `atol`: scores equal in sorted order, and every reference box has a
    compiled box of the same label, score and coordinates (boxes whose scores tie within float
    rounding may come out of NMS in either order)."""
    with torch.no_grad():
        ref, out = model([x.clone() for x in images]), compiled([x.clone() for x in images])
    assert len(ref) == len(out)
    boxes = 0
    for r, o in zip(ref, out):
        assert r.keys() == o.keys() and all(r[k].shape == o[k].shape for k in r)
        torch.testing.assert_close(o["scores"].sort().values, r["scores"].sort().values, atol=atol, rtol=0)
        for i in range(len(r["boxes"])):
            same = (o["labels"] == r["labels"][i]) & ((o["scores"] - r["scores"][i]).abs() <= atol)
            same &= ((o["boxes"] - r["boxes"][i]).abs() <= atol * (1 + r["boxes"][i].abs())).all(dim=1)
            assert bool(same.any()), f"detection {i} ({r['labels'][i]}, {r['scores'][i]:.4f}, {r['boxes'][i].tolist()}) not found"
        boxes += len(r["boxes"])
    return boxes


@pytest.mark.parametrize("family", ["retinanet", "fcos", "fasterrcnn", "ssd"])
def test_detector_families_compile_by_preset_and_match_on_fresh_images(family):
    model = tiny(family)
    compiled = fxopt.compile(model, "cpu", example_inputs=(_images(0),), export=False)
    part = {"fasterrcnn": ["backbone", "rpn.head"]}.get(family, ["backbone", "head"])
    assert compiled.manifest["stages"]["graph"] == part
    assert any(n.op == "call_module" and str(n.target).startswith(part[1]) for n in compiled.graph_module.graph.nodes)
    boxes = sum(_assert_same_detections(model, compiled, _images(seed)) for seed in (1, 2))
    assert boxes > 0  # the comparison is not vacuous
    # fold_batchnorm ran on the graph part
    assert [r.status for r in compiled.report.passes if r.name == "fold_batchnorm"] == ["applied"]


def test_onnx_holds_the_graph_part_and_the_report_says_where_the_cut_is(tmp_path):
    model = tiny("retinanet")
    compiled = fxopt.compile(model, "xavier", example_inputs=(_images(0),), save_to=tmp_path)
    _assert_same_detections(model, compiled, _images(2))
    proto = onnx.load(tmp_path / "model.onnx")
    assert [i.name for i in proto.graph.input] == ["input"]
    outputs = [o.name for o in proto.graph.output]
    assert outputs == ["backbone_0", "backbone_1", "backbone_2", "head_cls_logits", "head_bbox_regression"]
    assert compiled.report.onnx["max_abs_error_vs_torch"] < 1e-3
    text = str(compiled.report)
    assert "the graph (and model.onnx) is backbone -> head of RetinaNet" in text
    assert "eager around the graph" in text and "anchor_generator" in text and "transform" in text
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stages"]["graph"] == ["backbone", "head"]
    assert manifest["stages"]["eager"] == ["<root> forward (RetinaNet)", "anchor_generator", "transform"]
    assert manifest["example_inputs"] == [[1, 3, 128, 128]]


def test_prune_on_the_graph_part_meets_a_flops_budget_with_the_output_shapes():
    model = tiny("retinanet")
    compiled = fxopt.compile(model, "cpu", example_inputs=(_images(0),), export=False,
                             passes=[fxopt.create_pass("prune", amount=0.3, by="flops", round_to=1)])
    [record] = [r for r in compiled.report.passes if r.name == "prune"]
    assert record.status == "applied"
    assert compiled.report.cost_after.flops < 0.8 * compiled.report.cost_before.flops
    stem = compiled.graph_module.get_submodule("backbone.stem.0.0")
    assert stem.out_channels < 8
    # the graph outputs keep their shapes, so the eager post-processing still runs
    split = split_stages(model, (_images(0),), None)
    with torch.no_grad():
        before, after = split.root(*split.graph_inputs), compiled.graph_module(*split.graph_inputs)
    assert [t.shape for t in torch.utils._pytree.tree_leaves(after)] == [t.shape for t in torch.utils._pytree.tree_leaves(before)]
    with torch.no_grad():
        detections = compiled(_images(3))
    assert detections[0]["boxes"].shape[1] == 4 and len(detections[0]["boxes"]) > 0


def test_user_named_single_part_and_stages_object():
    model = tiny("fcos")
    compiled = fxopt.compile(model, "cpu", example_inputs=(_images(0),), export=False, stages="backbone")
    assert compiled.manifest["stages"] == {
        "stages": "user", "graph": ["backbone"], "graph_inputs": ["backbone input 0: [1, 3, 128, 128]"],
        "eager": ["<root> forward (FCOS)", "anchor_generator", "head", "transform"],
    }
    _assert_same_detections(model, compiled, _images(4))
    again = fxopt.compile(model, "cpu", example_inputs=(_images(0),), export=False, stages=Stages(("backbone", "head"), "mine"))
    assert again.manifest["stages"]["stages"] == "mine"


def test_calibration_batches_are_mapped_through_the_eager_transform():
    model = tiny("ssd")
    split = split_stages(model, (_images(0),), None)
    [x] = split.graph_inputs_for((_images(5),))
    assert x.shape == (1, 3, 128, 128) and not torch.equal(x, split.graph_inputs[0])


@pytest.mark.parametrize(("stages", "match"), [
    ("backbone.nope", r"RetinaNet has no submodule 'backbone.nope'; did you mean"),
    ("neck", r"RetinaNet has no submodule 'neck'; its top-level submodules: backbone, anchor_generator, head, transform"),
    (("backbone", "backbone.stem"), r"'backbone.stem' lies inside 'backbone'"),
    ((), r"one or more submodule paths"),
    (("backbone.stem", "backbone.down1"), r"'backbone.down1' takes a tensor of shape \(1, 24, 16, 16\) that is neither a graph input nor an output"),
    ("head.classification_head.cls_logits", r"must be called exactly once.*'head.classification_head.cls_logits' was called 3 times"),
])
def test_bad_stages_are_input_errors(stages, match):
    with pytest.raises(fxopt.InputError, match=match):
        fxopt.compile(tiny("retinanet"), "cpu", example_inputs=(_images(0),), export=False, stages=stages)


def test_another_batch_size_at_run_time_is_an_input_error():
    model = tiny("retinanet")
    compiled = fxopt.compile(model, "cpu", example_inputs=(_images(0),), export=False)
    with pytest.raises(fxopt.InputError, match=r"compiled for 'backbone' inputs of shape \[\(1, 3, 128, 128\)\], this call gives \[\(2, 3, 128, 128\)\]"):
        compiled(_images(1, n=2))


def test_presets_by_class_and_plain_models_are_untouched():
    assert preset_for(tiny("fasterrcnn")).graph == ("backbone", "rpn.head")
    assert preset_for(tiny("ssd")).graph == ("backbone", "head")
    assert preset_for(nn.Conv2d(3, 3, 1)) is None
    plain = fxopt.compile(nn.Sequential(nn.Conv2d(3, 4, 3)), "cpu", example_inputs=(torch.randn(1, 3, 8, 8),), export=False)
    assert plain.staged is None and "stages" not in plain.manifest


@pytest.mark.slow
@pytest.mark.parametrize(("builder", "kwargs"), [
    ("retinanet_resnet50_fpn", {**SMALL, "score_thresh": 0.0}),
    ("fcos_resnet50_fpn", {**SMALL, "score_thresh": 0.0}),
    ("ssdlite320_mobilenet_v3_large", {"score_thresh": 0.0}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {**SMALL, "box_score_thresh": 0.0}),
])
def test_torchvision_builders_compile_and_match(builder, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = getattr(D, builder)(weights=None, weights_backbone=None, **kwargs).eval()
        compiled = fxopt.compile(model, "xavier", example_inputs=(_images(0),))
    assert _assert_same_detections(model, compiled, _images(1)) > 0
