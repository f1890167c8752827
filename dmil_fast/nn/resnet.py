"""ResNet18 encoders of the official DMIL code, in plain ``torch.nn``.

Same layer names as torchvision's ``resnet18`` without ``avgpool``/``fc`` (``conv1``, ``bn1``,
``layer1.0.conv1``, ..., ``layer4.1.bn2``, ``layer{2,3,4}.0.downsample.{0,1}``), so ImageNet
weights (``resnet18-f37072fd.pth``) and the encoders of official DMIL checkpoints
(``visual_net.*``, ``audio_net.*``) load with ``strict=True``.

Like the official backbone, the encoder returns the last 4-D feature map, not pooled features;
:class:`dmil_fast.nn.DMILModel` averages it over frames and space:

- ``modality="visual"`` (3 input channels): x (B, 3, T, H, W), frames folded into the batch
  -> (B*T, 512, H/32, W/32), rows [b*T, (b+1)*T) belonging to sample b;
- ``modality="audio"`` (1 channel, a spectrogram): x (B, 1, F, T) -> (B, 512, F/32, T/32)
  (sizes rounded up at every stride-2 step).
"""

from __future__ import annotations

from typing import Dict, Mapping

import torch
from torch import nn

Tensor = torch.Tensor

#: Input channels per modality (the official backbone also knows optical flow).
MODALITY_CHANNELS = {"visual": 3, "audio": 1, "flow": 2}
#: Modalities whose input carries a time axis that is folded into the batch.
FRAME_MODALITIES = ("visual", "flow")
#: Residual blocks per stage of ResNet18 and the stages' widths.
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET18_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 projection when the
    stride or the width changes). x (N, in_planes, H, W) -> (N, planes, H/stride, W/stride)."""

    def __init__(self, in_planes: int, planes: int, *, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet18 trunk (no pooling, no classifier) for one modality.

    Args:
        modality: ``"visual"`` (3 channels, input (B, 3, T, H, W)), ``"audio"`` (1 channel,
            input (B, 1, F, T)) or ``"flow"`` (2 channels, input (B, 2, T, H, W)).

    Initialisation as in the official code: convolutions Kaiming-normal (fan_out, ReLU gain),
    BatchNorm weights N(1, 0.02) and biases 0.
    """

    def __init__(self, *, modality: str = "visual"):
        super().__init__()
        if modality not in MODALITY_CHANNELS:
            raise ValueError(f"modality must be one of {tuple(MODALITY_CHANNELS)}, got {modality!r}")
        self.modality = modality
        self.in_channels = MODALITY_CHANNELS[modality]
        self.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = 64
        for k, (blocks, width) in enumerate(zip(RESNET18_BLOCKS, RESNET18_WIDTHS), start=1):
            stride = 1 if k == 1 else 2
            layer = [BasicBlock(in_planes, width, stride=stride)]
            layer += [BasicBlock(width, width) for _ in range(blocks - 1)]
            setattr(self, f"layer{k}", nn.Sequential(*layer))
            in_planes = width
        self.out_channels = in_planes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, mean=1.0, std=0.02)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, in_channels={self.in_channels}"

    def forward(self, x: Tensor) -> Tensor:
        """visual/flow: (B, C, T, H, W) -> (B*T, 512, h, w); audio: (B, 1, F, T) -> (B, 512, f, t)."""
        if self.modality in FRAME_MODALITIES:
            if x.dim() != 5 or x.shape[1] != self.in_channels:
                raise ValueError(f"x must be (B, {self.in_channels}, T, H, W) for the {self.modality} ResNet18, "
                                 f"got shape {tuple(x.shape)}")
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B, C, T, H, W) -> (B*T, C, H, W)
        elif x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, F, T) for the {self.modality} ResNet18, "
                             f"got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 64, H/4, W/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (N, 512, H/32, W/32)


def resnet18(modality: str) -> ResNet18:
    """The official ``resnet18(modality)`` encoder: ``"visual"`` or ``"audio"`` (or ``"flow"``)."""
    return ResNet18(modality=modality)


def adapt_imagenet_state(state_dict: Mapping[str, Tensor], *, in_channels: int) -> Dict[str, Tensor]:
    """ImageNet ResNet18 weights (torchvision names) for an encoder with ``in_channels`` inputs.

    Drops the classifier (``fc.*``). For ``in_channels != 3`` the first convolution (64, 3, 7, 7)
    becomes the mean over its RGB kernels, repeated ``in_channels`` times (what the official code
    does for the audio encoder). A ``module.`` prefix (DataParallel) is removed.
    """
    out = {}
    for name, value in state_dict.items():
        name = name[len("module."):] if name.startswith("module.") else name
        if not name.startswith("fc."):
            out[name] = value
    if "conv1.weight" not in out:
        raise ValueError("the ResNet18 weights have no 'conv1.weight'; expected torchvision resnet18 names")
    conv1 = out["conv1.weight"]
    if conv1.dim() != 4:
        raise ValueError(f"conv1.weight must be 4-D (64, C, 7, 7), got shape {tuple(conv1.shape)}")
    if conv1.shape[1] != in_channels:
        mean = conv1.float().mean(dim=1, keepdim=True)  # (64, 1, 7, 7)
        out["conv1.weight"] = mean.repeat(1, in_channels, 1, 1).to(conv1.dtype)
    return out


def load_imagenet_weights(encoder: ResNet18, state_dict: Mapping[str, Tensor]) -> ResNet18:
    """Load ImageNet ResNet18 weights (torchvision names, ``fc`` ignored) into ``encoder`` (strict).

    Returns ``encoder``. Raises ValueError naming the missing or unexpected keys on a mismatch.
    """
    adapted = adapt_imagenet_state(state_dict, in_channels=encoder.in_channels)
    try:
        result = encoder.load_state_dict(adapted, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ValueError(f"the weights do not fit a ResNet18 trunk: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the weights do not fit a ResNet18 trunk: missing {result.missing_keys[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    return encoder
