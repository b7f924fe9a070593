"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell, 2015) on a torchvision ResNet18 trunk.

Geometry. In torchvision's ResNet every downsampling is a stride-2 convolution or pooling padded so that
output cell j is centred on input position 2j; a stride-s feature cell i is therefore centred on pixel s*i.
All upsampling here keeps that alignment: a value at coarse cell i lands on fine position f*i and is
linearly interpolated in between (``align_corners=True`` semantics). Two useful consequences:
- bilinear x2 followed by bilinear x16 is exactly bilinear x32, so a fresh FCN16s (zero skip scores,
  bilinear x2) computes the same output as FCN32s on the same trunk, as the paper's staged training
  intends; likewise FCN8s and FCN16s;
- no crop offsets are needed: outputs are sliced to the input size from the top-left.

Upsampling. The in-network x2 deconvolutions are initialised to bilinear and learned, as the paper's text says
("we initialize the 2x upsampling to bilinear interpolation, but allow the parameters to be learned"); the
reference Caffe nets (``upscore2``, ``lr_mult: 0``) and wkentaro/pytorch-fcn freeze them instead. We follow the
text; the optimiser keeps them out of weight decay (engine.parameter_groups), which would otherwise pull the
bilinear kernel towards zero. The final x32/x16/x8 upsampling is frozen bilinear: two small matrix products
(``upsample_aligned``), much cheaper than a (C, C, 2f-1, 2f-1) transposed convolution; it equals that
deconvolution wherever a pixel lies between two cell centres, while past the last centre (the last f-1
rows/columns) the deconvolution fades towards zero and ours holds the border value (tested in tests/test_model.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from segmentation import UserError

ARCHS = ("fcn32", "fcn16", "fcn8")


def bilinear_kernel(factor: int) -> torch.Tensor:
    """1-D kernel of length 2f-1 with w[k] = 1 - |k - (f-1)| / f: linear interpolation between cells f apart.

    As a transposed convolution (stride f, padding f-1) it places input cell i at output f*i and blends
    linearly to its neighbours; the 2-D kernel is the outer product of this with itself.
    """
    offsets = torch.arange(2 * factor - 1, dtype=torch.float32) - (factor - 1)
    return 1 - offsets.abs() / factor


def bilinear_deconv(channels: int, factor: int, learnable: bool) -> nn.ConvTranspose2d:
    """(C, C) transposed convolution initialised to per-channel bilinear upsampling by ``factor``."""
    deconv = nn.ConvTranspose2d(channels, channels, 2 * factor - 1, stride=factor, padding=factor - 1,
                                output_padding=factor - 1, bias=False)
    kernel_1d = bilinear_kernel(factor)
    with torch.no_grad():
        deconv.weight.zero_()
        deconv.weight[range(channels), range(channels)] = torch.outer(kernel_1d, kernel_1d)
    deconv.weight.requires_grad_(learnable)
    return deconv


def interpolation_matrix(size_out: int, size_in: int, factor: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D linear interpolation with input cell i on output position factor*i.

    Row y holds the hat function 1 - |y/factor - i| (clipped at 0); positions past the last cell take its
    value (replicate border).
    """
    position = (torch.arange(size_out, device=like.device, dtype=torch.float32) / factor).clamp(max=size_in - 1)
    cells = torch.arange(size_in, device=like.device, dtype=torch.float32)
    return (1 - (position[:, None] - cells[None, :]).abs()).clamp(min=0).to(like.dtype)


def upsample_aligned(scores: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """Frozen bilinear upsampling by ``factor`` of (N, C, h, w) scores to (N, C, H, W) = ``size``.

    Bilinear interpolation is separable, so it is two small matrix products, rows then columns: on the
    CPU its backward pass is several times cheaper than ``F.interpolate``'s, and it is exact by construction.
    """
    rows = interpolation_matrix(size[0], scores.shape[-2], factor, scores)
    columns = interpolation_matrix(size[1], scores.shape[-1], factor, scores)
    return rows @ scores @ columns.T


def upsample2_onto(deconv: nn.ConvTranspose2d, scores: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Learned x2 upsampling of coarse ``scores`` onto the grid of the finer ``skip`` map (cell i on 2i).

    One replicated cell on the bottom/right lets the last row and column hold the border value (as
    ``upsample_aligned`` does) instead of fading to zero; the result is sliced to the skip map's size. The
    cell is appended by concatenation rather than ``F.pad(mode="replicate")``, whose CUDA backward accumulates
    with atomics and whose backward torch.compile failed to trace on channels-last tensors (torch 2.14).
    """
    scores = torch.cat([scores, scores[..., -1:, :]], dim=-2)
    up = deconv(torch.cat([scores, scores[..., -1:]], dim=-1))
    return up[..., : skip.shape[-2], : skip.shape[-1]]


class ResNet18Trunk(nn.Module):
    """ResNet18 without avgpool/fc; returns the stride-8, -16 and -32 features (128, 256, 512 channels)."""

    def __init__(self, state_dict: dict | None = None):
        super().__init__()
        net = resnet18()
        if state_dict is not None:
            net.load_state_dict(state_dict)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c8 = self.layer2(self.layer1(self.stem(x)))
        c16 = self.layer3(c8)
        return c8, c16, self.layer4(c16)


def _zero_conv1x1(in_channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN32s(nn.Module):
    """Score the stride-32 features, upsample x32 to the input size."""

    def __init__(self, num_classes: int, trunk: ResNet18Trunk):
        super().__init__()
        self.trunk = trunk
        self.score32 = nn.Conv2d(512, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, C, H, W) logits."""
        _, _, c32 = self.trunk(x)
        return upsample_aligned(self.score32(c32), 32, x.shape[-2:])


class FCN16s(FCN32s):
    """FCN32s + scored stride-16 features, fused after a learned x2 upsampling (paper, Fig. 3)."""

    def __init__(self, num_classes: int, trunk: ResNet18Trunk):
        super().__init__(num_classes, trunk)
        self.score16 = _zero_conv1x1(256, num_classes)
        self.up32to16 = bilinear_deconv(num_classes, 2, learnable=True)

    def fuse16(self, c16: torch.Tensor, c32: torch.Tensor) -> torch.Tensor:
        """Stride-16 scores: score16(c16) + up x2 (score32(c32))."""
        return self.score16(c16) + upsample2_onto(self.up32to16, self.score32(c32), c16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c16, c32 = self.trunk(x)
        return upsample_aligned(self.fuse16(c16, c32), 16, x.shape[-2:])


class FCN8s(FCN16s):
    """FCN16s + scored stride-8 features, fused after another learned x2 upsampling."""

    def __init__(self, num_classes: int, trunk: ResNet18Trunk):
        super().__init__(num_classes, trunk)
        self.score8 = _zero_conv1x1(128, num_classes)
        self.up16to8 = bilinear_deconv(num_classes, 2, learnable=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c8, c16, c32 = self.trunk(x)
        fused8 = self.score8(c8) + upsample2_onto(self.up16to8, self.fuse16(c16, c32), c8)
        return upsample_aligned(fused8, 8, x.shape[-2:])


def imagenet_state_dict(backbone_weights: str | None = None) -> dict:
    """ResNet18 ImageNet weights from a local file, or torchvision's (downloaded once to the torch hub cache)."""
    if backbone_weights is not None:
        try:
            state = torch.load(backbone_weights, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for a bad file
            raise UserError(f"{backbone_weights}: cannot load ResNet18 weights ({str(error).splitlines()[0]}); pass "
                            "a state_dict saved with torch.save(resnet18().state_dict(), PATH)") from None
        check_resnet18_weights(state, backbone_weights)
        return state
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except OSError as error:  # URLError and socket errors are OSErrors
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise UserError(f"cannot download ImageNet weights from {weights.url} ({error}); put that file at {cache}, "
                        "or pass --backbone-weights PATH, or --no-pretrained to start from random weights") from None


def check_resnet18_weights(state: object, path: str) -> None:
    """Refuse, naming what the file holds, weights that are not a ResNet18 ImageNet state_dict (checked by key and
    shape before loading, so the error is one line, not load_state_dict's list)."""
    fix = "pass a ResNet18 state_dict, saved with torch.save(resnet18().state_dict(), PATH)"
    if isinstance(state, dict) and "model" in state and "arch" in state:
        raise UserError(f"{path}: holds a checkpoint of this project ({state['arch']}), not ResNet18 weights; start "
                        f"from it with --init-from {path}, or {fix}")
    expected = {key: tuple(value.shape) for key, value in resnet18().state_dict().items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state_dict of tensors; {fix}")
    missing, extra = [key for key in expected if key not in state], [key for key in state if key not in expected]
    wrong = [f"{key} is {tuple(state[key].shape)}, not {shape}" for key, shape in expected.items()
             if key in state and tuple(state[key].shape) != shape]
    if missing or extra or wrong:
        held = f"{len(state)} tensors; " + (wrong[0] if wrong else f"{len(missing)} ResNet18 keys missing, e.g. "
                                            f"{missing[0]}" if missing else f"{len(extra)} keys ResNet18 lacks, e.g. "
                                            f"{extra[0]}")
        raise UserError(f"{path}: not ResNet18 ImageNet weights ({held}; a ResNet-34/50 or another network?); {fix}")


def build_model(arch: str, num_classes: int, pretrained: bool = True, backbone_weights: str | None = None) -> FCN32s:
    """An FCN of ``arch`` ('fcn32' | 'fcn16' | 'fcn8') with ``num_classes`` outputs."""
    classes = {"fcn32": FCN32s, "fcn16": FCN16s, "fcn8": FCN8s}
    if arch not in classes:
        raise UserError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    state_dict = imagenet_state_dict(backbone_weights) if pretrained or backbone_weights else None
    return classes[arch](num_classes, ResNet18Trunk(state_dict))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
