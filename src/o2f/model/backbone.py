"""Backbones and the FPN neck.

A backbone maps images (B x 3 x H x W, normalised) to C3-C5 feature maps at strides
8/16/32; the neck turns them into P3-P7 (or P3-P5) of one width.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from o2f.config import ConfigError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


class ResNetBackbone(nn.Module):
    """torchvision ResNet returning C3, C4, C5 (strides 8, 16, 32).

    With ``norm_eval`` every BatchNorm keeps its running statistics (it stays in eval mode
    in ``train()``) while its affine parameters still train outside the frozen stages; this
    is the release's setting for ImageNet-initialised training. ``frozen_stages`` = 1
    freezes the stem and stage 1 (0: nothing frozen).
    """

    def __init__(self, name: str, weights: str | None = None, *, frozen_stages: int = 1,
                 norm_eval: bool = True) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"unknown ResNet '{name}'; choose from {', '.join(RESNETS)}")
        net = getattr(torchvision.models, name)(weights=None)
        if weights:
            net.load_state_dict(_resolve_weights(name, weights), strict=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1, net.layer2, net.layer3, net.layer4)
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        for module in [self.stem, self.layer1][:frozen_stages + 1 if frozen_stages else 0]:
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        c2 = self.layer1(self.stem(x))
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class WeightsUnavailableError(ConfigError):
    """Backbone weights that cannot be loaded (no network, unknown name, missing file); the
    message says where a downloaded file goes and how to train without them."""


def _resolve_weights(name: str, weights: str) -> dict[str, Tensor]:
    """A local ``.pth`` path, or a torchvision weight enum name (downloaded once into the
    torch hub cache, ``torch.hub.get_dir()/checkpoints``)."""
    no_weights = ("or start from random weights: backbone_weights=None in Python, "
                  "--set model.backbone_weights=null on the command line")
    if Path(weights).suffix in (".pth", ".pt") or Path(weights).exists():
        if not Path(weights).is_file():
            raise WeightsUnavailableError(f"backbone weights file {weights} not found; "
                                          f"{no_weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        return state.get("state_dict", state) if isinstance(state, dict) else state
    enum = torchvision.models.get_model_weights(name)
    if weights not in enum.__members__:
        raise WeightsUnavailableError(
            f"unknown {name} weights '{weights}'; choose from "
            f"{', '.join(enum.__members__)}, a .pth file, {no_weights}")
    entry = enum[weights]
    try:
        return entry.get_state_dict(progress=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a truncated file a RuntimeError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        reason = getattr(e, "reason", None) or e
        raise WeightsUnavailableError(
            f"cannot load the ImageNet weights {type(entry).__name__}.{weights} of the {name} "
            f"backbone ({type(e).__name__}: {reason}). Without network, download "
            f"{entry.url} elsewhere and put the file in {cache}/ (the torch hub cache), or "
            f"set model.backbone_weights to a local .pth file, {no_weights}"
        ) from None


class DigitsCNN(nn.Module):
    """A plain 10-conv CNN (3x3 conv, BN, ReLU; widths 24-128) for CPU training.

    Five stages, each opening with a stride-2 conv; outputs C3-C5 at strides 8, 16, 32.
    The stride-2 stage has a single conv: at half resolution a second one would cost a
    quarter of the network's time for little gain on small objects.
    """

    stages_spec = ((24, 1), (48, 2), (64, 2), (96, 2), (128, 3))  # (width, convs)

    def __init__(self, norm_eval: bool = False) -> None:
        super().__init__()
        self.norm_eval = norm_eval
        stages, c_in = [], 3
        for width, depth in self.stages_spec:
            convs = [_conv_bn(c_in if i == 0 else width, width, 2 if i == 0 else 1)
                     for i in range(depth)]
            stages.append(nn.Sequential(*convs))
            c_in = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = [w for w, _ in self.stages_spec[2:]]

    def train(self, mode: bool = True) -> DigitsCNN:
        super().train(mode)
        if mode and self.norm_eval:  # BN statistics frozen (e.g. to compare DDP runs)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[2:]


def _conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SwinBackbone(nn.Module):
    """Swin-T from timm (drop path 0.2), features at strides 8/16/32."""

    def __init__(self, weights: str | None = None, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError("the Swin backbone needs timm: pip install 'o2f[swin]'") from e
        self.body = timm.create_model(
            "swin_tiny_patch4_window7_224", pretrained=False, features_only=True,
            out_indices=(1, 2, 3), drop_path_rate=drop_path_rate, strict_img_size=False)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            self.body.load_state_dict(state.get("model", state), strict=False)
        self.out_channels = list(self.body.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        # timm's Swin returns NHWC maps
        return [f.permute(0, 3, 1, 2).contiguous() for f in self.body(x)]


def build_backbone(name: str, weights: str | None = None, *, frozen_stages: int = 1,
                   norm_eval: bool | None = None) -> nn.Module:
    """Backbone by name. ``norm_eval=None`` means "frozen BN when starting from weights"."""
    if name == "digits_cnn":
        return DigitsCNN(norm_eval=bool(norm_eval))
    if name == "swin_t":
        return SwinBackbone(weights)
    if norm_eval is None:
        norm_eval = weights is not None
    return ResNetBackbone(name, weights, frozen_stages=frozen_stages if weights else 0,
                          norm_eval=norm_eval)


class LastLevelP6(ExtraFPNBlock):
    """Identity extra block: keeps P3-P5 only (the CPU configs)."""

    def forward(self, results, x, names):  # type: ignore[override]
        return results, names


class FPN(nn.Module):
    """FPN P3-P7: 1x1 laterals and 3x3 outputs with bias, no norm; P6 is a stride-2 3x3
    conv on the P5 *output* and P7 one on ReLU(P6) (torchvision's LastLevelP6P7 with equal
    in/out widths does exactly this). ``num_levels`` = 3 stops at P5.
    """

    def __init__(self, in_channels: list[int], out_channels: int, num_levels: int = 5) -> None:
        super().__init__()
        if num_levels not in (3, 5):
            raise ValueError("num_levels must be 3 (P3-P5) or 5 (P3-P7)")
        extra = LastLevelP6P7(out_channels, out_channels) if num_levels == 5 else LastLevelP6()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra)
        for m in self.modules():  # the release initialises the FPN with Xavier-uniform
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))
        return list(out.values())
