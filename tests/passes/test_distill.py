"""DistillHooks / StripDistillHooks: features as extra outputs, and the deploy graph given back exactly."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.models.digits import DigitsCNN
from fxopt.passes import PruneChannels
from fxopt.passes.distill import (
    DistillHooks,
    StripDistillHooks,
    hooked_copy,
    kept_channels,
    match_features,
    stage_features,
)


def _digits_graph(width: int = 8) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    return fxopt.trace(DigitsCNN(width=width).eval(), x), x


def test_hooks_expose_features_and_keep_the_original_output():
    gm, x = _digits_graph()
    before = gm(x)
    before_nodes = [(n.name, n.op, n.target) for n in gm.graph.nodes]
    result = DistillHooks(["features_0_2", "features_4"])(gm)
    assert result.modified
    out, feats = result.graph_module(x)
    torch.testing.assert_close(out, before, rtol=0, atol=0)
    assert list(feats) == ["features_0_2", "features_4"]
    assert feats["features_0_2"].shape == (4, 8, 8, 8) and feats["features_4"].shape == (4, 32, 2, 2)
    # no node added: only the output node's arguments changed
    assert [(n.name, n.op, n.target) for n in result.graph_module.graph.nodes] == before_nodes


def test_strip_gives_back_the_deploy_graph_exactly():
    gm, x = _digits_graph()
    before = gm(x)
    code_before = gm.code
    hooked = DistillHooks(["features_1_2"])(gm).graph_module
    stripped = StripDistillHooks()(hooked)
    assert stripped.modified
    assert stripped.graph_module.code == code_before
    torch.testing.assert_close(stripped.graph_module(x), before, rtol=0, atol=0)
    assert "fxopt" not in next(iter(reversed(stripped.graph_module.graph.nodes))).meta


def test_strip_without_hooks_changes_nothing_and_says_why():
    gm, _ = _digits_graph()
    p = StripDistillHooks()
    assert not p(gm).modified
    assert "no distillation hooks" in p.unchanged_reason
    assert not DistillHooks()(gm).modified


def test_unknown_feature_and_double_hooks_are_refused():
    gm, _ = _digits_graph()
    with pytest.raises(fxopt.InputError, match="no node named nope"):
        DistillHooks(["nope"])(gm)
    hooked = DistillHooks(["features_0_2"])(gm).graph_module
    with pytest.raises(fxopt.InputError, match="already has distillation hooks"):
        DistillHooks(["features_4"])(hooked)


def test_hooked_copy_shares_parameters_and_leaves_the_graph_alone():
    gm, x = _digits_graph()
    code = gm.code
    hooked = hooked_copy(gm, ["features_0_2"])
    assert gm.code == code
    assert hooked.get_parameter("features.0.0.weight") is gm.get_parameter("features.0.0.weight")
    out, feats = hooked(x)
    torch.testing.assert_close(out, gm(x), rtol=0, atol=0)


def test_stage_features_pick_the_last_node_per_resolution():
    gm, _ = _digits_graph()
    assert stage_features(gm) == ["features_1_2", "features_3_2", "features_4"]


class _TwoHeads(torch.nn.Module):
    """A trunk at 8x8 and 4x4 read by a dense head (4x4) and a class head; the dense head has its own 4x4 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.down = torch.nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dense = torch.nn.Conv2d(8, 3, 1)
        self.cls = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        trunk = torch.relu(self.down(torch.relu(self.stem(x))))
        return {"heatmap": self.dense(trunk), "logits": self.cls(trunk.mean((2, 3)))}


def test_stage_features_of_a_multi_head_model_are_its_trunk():
    gm = fxopt.trace(_TwoHeads().eval(), torch.randn(2, 1, 8, 8))
    # Before: the last 4x4 node was the dense head's logits ("dense"); Expected: the trunk's relu_1
    assert stage_features(gm) == ["relu", "relu_1"]


def test_pruned_student_matches_by_name_with_kept_channel_indices():
    gm, x = _digits_graph(width=16)
    prune = PruneChannels(amount=0.5, by="channels", round_to=1)
    student = fxopt.compile(DigitsCNN(width=16), "cpu", example_inputs=(x,), export=False, passes=[prune]).graph_module
    teacher = fxopt.compile(DigitsCNN(width=16), "cpu", example_inputs=(x,), export=False).graph_module
    kept = kept_channels(prune)
    assert kept["features_0_2"] and len(kept["features_0_2"]) == 8
    pairs = match_features(student, teacher, ["features_0_2", "features_4"], kept=kept)
    assert [(p.student_channels, p.teacher_channels) for p in pairs] == [(8, 16), (32, 64)]
    assert pairs[0].kept == kept["features_0_2"]
    by_stage = match_features(student, teacher, "stages")
    assert [p.student for p in by_stage] == [p.teacher for p in by_stage] == ["features_1_2", "features_3_2", "features_4"]
    assert all(p.kept is None for p in by_stage)
    explicit = match_features(student, teacher, {"features_1_2": "features_3_2"})
    assert (explicit[0].student_channels, explicit[0].teacher_channels) == (16, 64)


def test_a_folded_conv_is_matched_to_the_teachers_batchnorm_output():
    gm, x = _digits_graph(width=8)  # the traced original: conv -> BN -> ReLU
    student = fxopt.compile(DigitsCNN(width=8).eval(), "cpu", example_inputs=(x,), export=False).graph_module  # BN folded
    (pair,) = match_features(student, gm, ["features_0_0"])
    # Before: the student's folded conv (conv + BN) was compared with the teacher's bare conv output
    assert (pair.student, pair.teacher) == ("features_0_0", "features_0_1")
    (same,) = match_features(gm, gm, ["features_0_0"])  # nothing folded: the node itself
    assert same.teacher == "features_0_0"


def test_kept_channels_needs_a_pass_that_ran():
    with pytest.raises(fxopt.InputError, match="has run"):
        kept_channels(PruneChannels())
