"""Default-tier smoke of the pruning zoo: two small models the pass tests do not compile end to end.

ShuffleNet V2 (channel shuffle: a view/transpose/view over coupled channels, split and concat) and
a timm ViT (attention heads, class token, LayerNorm) go through the same check as
tests/zoo/test_prune_zoo.py: half the FLOPs, output shapes kept, ONNX opset 17 verified in ONNX
Runtime, FLOPs ratio within 5 points.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "zoo"))

import test_prune_zoo as prune_zoo  # noqa: E402

ZOO = {c.name: c for c in prune_zoo.CASES}
SMOKE = (
    ZOO["tv/shufflenet_v2_x0_5"],
    # the zoo's timm ViT cut to two blocks at 32 px (a 2x2 patch grid) to stay fast
    prune_zoo.zc.ZooCase("timm/vit_tiny_patch16_224-depth2", "timm", "vit_tiny_patch16_224", "classification",
                         (1, 3, 32, 32), {"img_size": 32, "depth": 2}),
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("case", SMOKE, ids=lambda c: c.name)
def test_small_zoo_model_prunes_to_half_the_flops(case: prune_zoo.zc.ZooCase) -> None:
    check = prune_zoo.prune_and_check(case)
    prune_zoo.assert_pruned_to_budget(check)
    assert check.onnx_max_abs < 1e-3
