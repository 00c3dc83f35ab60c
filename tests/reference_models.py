"""Compact re-implementations of torchvision's resnet18, resnet50, mobilenet_v2 and vit_b_16.

Same layers, shapes and order as torchvision's definitions (torchvision cannot be installed
beside this torch), so their multiply-adds equal the ``GFLOPS`` figures torchvision publishes
in its weight metadata (which are GMACs): resnet18 1.81, resnet50 4.09, mobilenet_v2 0.30,
vit_b_16 17.56. Weights are left at their default initialization; ``device="meta"`` builds
them without memory.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU, device=None):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False,
                        device=device), nn.BatchNorm2d(cout, device=device)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1, device=None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 3, stride, device=device)
        self.conv2 = _conv_bn(width, cout, 3, act=None, device=device)
        self.downsample = (_conv_bn(cin, cout, 1, stride, act=None, device=device)
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, device=None):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1, device=device)
        self.conv2 = _conv_bn(width, width, 3, stride, device=device)  # stride here: "v1.5"
        self.conv3 = _conv_bn(width, cout, 1, act=None, device=device)
        self.downsample = (_conv_bn(cin, cout, 1, stride, act=None, device=device)
                           if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, device=None):
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2, device=device),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (j == 0 and i > 0) else 1, device=device))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes, device=device)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18(device=None):
    return ResNet(BasicBlock, [2, 2, 2, 2], device=device)


def resnet50(device=None):
    return ResNet(Bottleneck, [3, 4, 6, 3], device=device)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, device=None):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6, device=device)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6,
                            device=device),
                   _conv_bn(hidden, cout, 1, act=None, device=device)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # expand t, channels c, repeats n, stride s

    def __init__(self, num_classes=1000, device=None):
        super().__init__()
        layers, cin = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6, device=device)], 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, device=device))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6, device=device))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes,
                                                                   device=device))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(device=None):
    return MobileNetV2(device=device)


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: nn.MultiheadAttention (whose eval/no-grad fast path
    is the fused ``aten._native_multi_head_attention``) and a GELU MLP."""

    def __init__(self, dim, heads, mlp_dim, device=None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True, device=device)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim, device=device), nn.GELU(),
                                 nn.Linear(mlp_dim, dim, device=device))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size=224, patch=16, layers=12, heads=12, dim=768, mlp_dim=3072,
                 num_classes=1000, device=None):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch, device=device)
        tokens = (image_size // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim, device=device))
        self.pos_embedding = nn.Parameter(torch.zeros(1, tokens, dim, device=device))
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim, device=device)
                                      for _ in range(layers)])
        self.ln = nn.LayerNorm(dim, eps=1e-6, device=device)
        self.head = nn.Linear(dim, num_classes, device=device)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.head(x[:, 0])


def vit_b_16(device=None):
    return VisionTransformer(device=device)


# torchvision's published GFLOPS (GMACs), as printed in its weight metadata
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet50": 4.09, "mobilenet_v2": 0.30, "vit_b_16": 17.56}
BUILDERS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
            "vit_b_16": vit_b_16}
