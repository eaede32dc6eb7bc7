"""Networks published Xavier figures use that torchvision does not build: MobileNet-v1 (MLPerf) and FCN-ResNet18 (jetson-inference).

Random weights; only the architecture matters to the latency model. Used by bench/xavier_latency.py
through the ``build`` field of bench/data/xavier_engine_time.json.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.fcn import FCNHead


def _conv_bn(cin: int, cout: int, stride: int, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def mobilenet_v1(weights: None = None, num_classes: int = 1000) -> nn.Module:
    """MobileNet-v1 1.0/224 (Howard et al. 2017, Table 1): a 3x3 stem, 13 depthwise-separable blocks, pool, FC."""
    widths = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
              *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1)]
    layers = [_conv_bn(3, 32, 2)]
    for cin, cout, stride in widths:
        layers += [_conv_bn(cin, cin, stride, groups=cin), _conv_bn(cin, cout, 1, kernel=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, num_classes))


class _FCN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = IntermediateLayerGetter(resnet18(weights=None), {"layer4": "out"})
        self.classifier = FCNHead(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.backbone(x)["out"])
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def fcn_resnet18(weights: None = None, num_classes: int = 21) -> nn.Module:
    """torchvision's FCN head on an undilated ResNet-18 (BasicBlock takes no dilation): stride 32, upsampled to the input."""
    return _FCN(num_classes)
