"""GroupNorm for channels-last activations on the CPU, where PyTorch's own kernel is slow.

The sample stage and the measures without autograd (LPF, perturbation, surface, exposure) run the
UNet channels-last on the CPU (`channels_last_inference`) because oneDNN's convolutions are faster
in that layout. PyTorch's GroupNorm kernel for channels-last input is not: on one thread, for the
fmnist16 preset at batch 250, it takes 29% of the forward against 5% for the same norm in NCHW
(bench/group_norm.py), which cancels the convolutions' gain.

`group_norm_channels_last` computes the same function from the NHWC memory without changing the
layout: per-channel sums over the pixels (a contiguous reduction), then the group's mean, a second
pass over the centred values for the variance (as exact as a one-pass Welford, with no
cancellation), and one fused multiply-add for normalisation and affine. Its error against a
float64 GroupNorm is that of PyTorch's kernels (a few 1e-8 on the forward; tests/test_unet.py),
but the bits differ from theirs, so a model sampled through it gives (slightly) different images
than through nn.GroupNorm.

`use_channels_last_group_norm(model)` swaps every GroupNorm32 of a model for one that takes this
path for fp32 channels-last CPU input and PyTorch's kernel for anything else (NCHW, CUDA,
reduced precision, autograd, and forwards compiled by torch.compile, where inductor fuses
PyTorch's norm with the SiLU after it and ours ran slower: bench/overhead.py). The parameters stay the same tensors, so in-place weight edits
reach the new modules.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.nn.unet import GroupNorm32


def group_norm_channels_last(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """GroupNorm of a channels-last (N, C, H, W) tensor; the result is channels-last too.

    :param x: (N, C, H, W) float tensor, contiguous in torch.channels_last.
    :param weight, bias: (C,) affine parameters.
    """
    n, c, h, w = x.shape
    per_group = c // num_groups
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # the NHWC memory itself: no copy
    count = h * w * per_group
    mean = pixels.sum(1).view(n, num_groups, per_group).sum(-1, keepdim=True) / count  # (N, G, 1)
    buffer = pixels - mean.expand(n, num_groups, per_group).reshape(n, 1, c)  # centred values
    var = buffer.square_().sum(1).view(n, num_groups, per_group).sum(-1, keepdim=True) / count
    scale = weight.view(num_groups, per_group) * torch.rsqrt(var + eps)  # (N, G, C/G)
    shift = bias.view(num_groups, per_group) - mean * scale
    # The output reuses the buffer: one large allocation per call, not two.
    out = torch.addcmul(shift.view(n, 1, c), pixels, scale.view(n, 1, c), out=buffer)
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


class ChannelsLastGroupNorm(GroupNorm32):
    """GroupNorm32 that normalises fp32 channels-last CPU input with group_norm_channels_last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile, PyTorch's norm: inductor fuses it with its neighbours, ours it does not.
        if (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and self.affine
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return group_norm_channels_last(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


def use_channels_last_group_norm(model: nn.Module) -> nn.Module:
    """Replace every GroupNorm32 of `model` (in place) by a ChannelsLastGroupNorm sharing its
    parameters; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GroupNorm32:
                norm = ChannelsLastGroupNorm(child.num_groups, child.num_channels, eps=child.eps,
                                             affine=child.affine)
                norm.weight, norm.bias = child.weight, child.bias
                norm.train(child.training)
                setattr(parent, name, norm)
    return model


def channels_last_inference(model: nn.Module) -> nn.Module:
    """`model` (in place) with channels-last parameters and ChannelsLastGroupNorm: the CPU layout
    for forwards without autograd (sampling, the loss-based measures, exposure).

    The parameters stay the same Parameter objects, now strided NHWC, so in-place perturbations
    (p.copy_, p.add_) reach the forward; their logical values are unchanged. Inputs may stay NCHW:
    a channels-last first-layer weight makes the first convolution's output channels-last.
    """
    return use_channels_last_group_norm(model.to(memory_format=torch.channels_last))
