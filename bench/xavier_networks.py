"""Networks published Xavier figures use that torchvision does not build: MobileNet-v1 (MLPerf), FCN-ResNet18
(jetson-inference), and the BVLC Caffe deploy nets AlexNet and GoogLeNet (HaX-CoNN's GPU/DLA profiles).

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


def _lrn() -> nn.LocalResponseNorm:
    # Caffe's LRN across channels: local_size 5, alpha 1e-4 (divided by local_size, as PyTorch does), beta 0.75, k 1
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def _caffe_max_pool() -> nn.MaxPool2d:
    # 3x3 stride 2; Caffe rounds the pooled size up
    return nn.MaxPool2d(3, 2, ceil_mode=True)


def bvlc_alexnet(weights: None = None, num_classes: int = 1000) -> nn.Module:
    """BVLC AlexNet, the Caffe deploy net (models/bvlc_alexnet/deploy.prototxt), input 227x227: conv1 96 11x11/4, LRN,
    pool; conv2 256 5x5 in 2 groups, LRN, pool; conv3 384; conv4 384 and conv5 256 in 2 groups, pool; fc6/fc7 4096, fc8, softmax.

    torchvision's alexnet has 64/192 channels in its first convs, no groups and no LRN.
    """
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), nn.ReLU(inplace=True), _lrn(), _caffe_max_pool(),  # 227 -> 55 -> 27
        nn.Conv2d(96, 256, 5, 1, 2, groups=2), nn.ReLU(inplace=True), _lrn(), _caffe_max_pool(),  # 27 -> 13
        nn.Conv2d(256, 384, 3, 1, 1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, 1, 1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, 1, 1, groups=2), nn.ReLU(inplace=True), _caffe_max_pool(),  # 13 -> 6
        nn.Flatten(),
        nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, num_classes), nn.Softmax(dim=1),
    )


class _Inception(nn.Module):
    """A GoogLeNet inception module as in the Caffe deploy net: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1,
    each conv with a bias and a ReLU (no BatchNorm), concatenated over channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()

        def conv(a: int, b: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, k, 1, k // 2), nn.ReLU(inplace=True))

        self.b1 = conv(cin, c1, 1)
        self.b3 = nn.Sequential(conv(cin, c3r, 1), conv(c3r, c3, 3))
        self.b5 = nn.Sequential(conv(cin, c5r, 1), conv(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def bvlc_googlenet(weights: None = None, num_classes: int = 1000) -> nn.Module:
    """BVLC GoogLeNet, the Caffe deploy net (models/bvlc_googlenet/deploy.prototxt), input 224x224: conv1 7x7/2, pool, LRN,
    conv2 1x1 + 3x3, LRN, pool, inception 3a-3b, pool, 4a-4e, pool, 5a-5b, 7x7 average pool, fc, softmax (no auxiliary heads).

    torchvision's googlenet puts BatchNorm after every conv and has no LRN.
    """
    pool = _caffe_max_pool  # with Caffe's rounding up: 112 -> 56 -> 28 -> 14 -> 7
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU(inplace=True), pool(), _lrn(),
        nn.Conv2d(64, 64, 1), nn.ReLU(inplace=True), nn.Conv2d(64, 192, 3, 1, 1), nn.ReLU(inplace=True), _lrn(), pool(),
        _Inception(192, 64, 96, 128, 16, 32, 32), _Inception(256, 128, 128, 192, 32, 96, 64), pool(),
        _Inception(480, 192, 96, 208, 16, 48, 64), _Inception(512, 160, 112, 224, 24, 64, 64),
        _Inception(512, 128, 128, 256, 24, 64, 64), _Inception(512, 112, 144, 288, 32, 64, 64),
        _Inception(528, 256, 160, 320, 32, 128, 128), pool(),
        _Inception(832, 256, 160, 320, 32, 128, 128), _Inception(832, 384, 192, 384, 48, 128, 128),
        nn.AvgPool2d(7, 1), nn.Dropout(0.4), nn.Flatten(), nn.Linear(1024, num_classes), nn.Softmax(dim=1),
    )
