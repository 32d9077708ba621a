"""The ADM UNet ("Diffusion Models Beat GANs"), key-compatible with openai/guided-diffusion.

The module tree, parameter names, shapes, initialisation and forward semantics follow
guided-diffusion's `UNetModel`, so its checkpoints load with `load_state_dict(strict=True)` and
give the same outputs to float32 rounding (see shared/reference/README.md for the exact rules).

Differences from guided-diffusion (only the last changes any number, and only random draws):

* 2-D only, float32 parameters (no `dims`, no `use_fp16`; use torch autocast for low precision).
* No gradient checkpointing (`use_checkpoint`): guided-diffusion's custom checkpoint function does
  not support double backward, and Hessian-vector products (flatness measures, SAM variants)
  need `torch.autograd.grad(..., create_graph=True)` through the whole network.
* Attention runs through `torch.nn.functional.scaled_dot_product_attention` by default
  ("sdpa"), whose fused CPU kernel has no double backward (autograd raises). The explicit
  matmul/softmax "math" backend reproduces the reference computation step by step and is twice
  differentiable on every device; select it with `model.set_attention_backend("math")` before
  taking Hessian-vector products.
* On CPU, dropout draws its mask with torch.rand (faster than F.dropout's sampler there), so
  training-mode outputs use a different random stream; the distribution is the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "math")


# ----------------------------------------------------------------------------------------------
# Small helpers.


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """
    Sinusoidal timestep embeddings, exactly as guided-diffusion computes them in float32.

    :param timesteps: (B,) timesteps (int64 or float), one per sample; may be fractional.
    :param dim: width of the embedding.
    :param max_period: controls the lowest frequency.
    :return: (B, dim) float32 tensor laid out as [cos(args), sin(args)], cos first, plus one
             zero column when dim is odd.
    """
    half = dim // 2
    # Multiplying by -ln(max_period) before dividing by `half` matches the reference rounding.
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * exponents / half)
    args = timesteps.to(torch.float32)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) float32 and cast back to the input dtype.

    Keeps bf16/fp16 activations (autocast) from losing the statistics' precision; float32 and
    float64 inputs pass through without a copy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        out = F.group_norm(
            x.to(compute_dtype),
            self.num_groups,
            self.weight.to(compute_dtype),
            self.bias.to(compute_dtype),
            self.eps,
        )
        return out.to(x.dtype)


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """The ADM normalisation layer: GroupNorm with 32 groups (ADM's only choice) and eps 1e-5.

    Fewer groups let a CPU-sized network go below 32 channels (the `fmnist16` preset)."""
    return GroupNorm32(groups, channels, eps=1e-5)


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask comes from torch.rand, which is about 2.5x faster than the
    bernoulli_ sampler F.dropout uses there; other devices keep the fused F.dropout kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p >= 1:
            return super().forward(x)
        keep = torch.rand_like(x) >= self.p  # P(keep) = 1 - p
        return x * keep * (1.0 / (1.0 - self.p))


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W) by nearest-neighbour repetition."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample_average(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/2, W/2) by 2x2 average pooling."""
    return F.avg_pool2d(x, kernel_size=2, stride=2)


# ----------------------------------------------------------------------------------------------
# Blocks.


class TimestepBlock(nn.Module):
    """Marker base: forward takes (x, emb), the timestep embedding as a second argument."""


class TimestepEmbedSequential(nn.Sequential):
    """A sequential container that hands `emb` to the children that are TimestepBlocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """
    Nearest-neighbour x2 upsampling, optionally followed by a 3x3 convolution (key `conv`).

    :param channels: input channels.
    :param use_conv: apply the convolution after upsampling.
    :param out_channels: output channels (only with use_conv); defaults to `channels`.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', 2H, 2W)."""
        x = upsample_nearest(x)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """
    x2 downsampling (key `op`): a stride-2 3x3 convolution, or 2x2 average pooling.

    :param channels: input channels.
    :param use_conv: use the strided convolution instead of pooling.
    :param out_channels: output channels (only with use_conv); defaults to `channels`.
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        elif out_channels != channels:
            raise ValueError("Downsample without a convolution cannot change the channel count")
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C', H/2, W/2)."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """
    A residual block conditioned on the timestep embedding, optionally resampling by 2.

    :param channels: input channels.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout rate before the last convolution.
    :param out_channels: output channels; defaults to `channels`. A 1x1 convolution maps the
                         skip path when it differs.
    :param use_scale_shift_norm: condition by h = norm(h) * (1 + scale) + shift (FiLM) instead of
                                 adding the embedding projection before the second norm.
    :param up: upsample (nearest x2) both paths.
    :param down: downsample (2x2 average) both paths.
    :param norm_groups: GroupNorm groups of both norms.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = upsample_nearest if up else downsample_average if down else None

        # SiLU after a norm overwrites the norm's fresh output (inplace): one pass over memory and one
        # buffer less, bit-identical values and gradients (the norm's backward keeps its input).
        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(inplace=True),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels, norm_groups),
            nn.SiLU(inplace=True),
            Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """
        :param x: (B, C, H, W) features.
        :param emb: (B, E) timestep embeddings.
        :return: (B, C', H', W') features (H' = 2H, H/2 or H).
        """
        norm_in, act_in, conv_in = self.in_layers
        norm_out, act_out, dropout, conv_out = self.out_layers

        # Resampling sits between the first activation and the first convolution.
        h = act_in(norm_in(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = conv_in(h)

        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, norm_out(h), 1 + scale)
        else:
            h = norm_out(h + emb_out)
        h = conv_out(dropout(act_out(h)))
        return self.skip_connection(x) + h


# ----------------------------------------------------------------------------------------------
# Attention.


def split_heads(qkv: torch.Tensor, num_heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """
    Unpack per-token projections into queries, keys and values.

    :param qkv: (B, T, 3 * H * d), the qkv convolution's output channels last. With `new_order`
                the channels are [q; k; v], each split into H heads of d consecutive channels;
                otherwise (guided-diffusion's legacy order) head h owns channels
                [3dh, 3d(h+1)) = [q_h; k_h; v_h].
    :param num_heads: H.
    :param new_order: which channel layout `qkv` uses.
    :return: q, k, v, each a (B, H, T, d) view.
    """
    batch, length, width = qkv.shape
    head_dim = width // (3 * num_heads)
    if new_order:
        qkv = qkv.view(batch, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        qkv = qkv.view(batch, length, num_heads, 3, head_dim).permute(3, 0, 2, 1, 4)
    return qkv.unbind(0)


def attention_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """
    softmax(q k^T / sqrt(d)) v over the token axis.

    :param q, k, v: (B, H, T, d).
    :param backend: "sdpa" (fused kernel) or "math" (explicit product, twice differentiable).
    :return: (B, H, T, d).
    """
    if backend == "sdpa":
        # Its default scale 1/sqrt(d) equals the reference's d^-1/4 applied to q and to k.
        return F.scaled_dot_product_attention(q, k, v)
    if backend != "math":
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")

    # Scaling q and k separately keeps fp16/bf16 logits in range (as in the reference).
    scale = q.shape[-1] ** -0.25
    logits = torch.matmul(q * scale, (k * scale).transpose(-1, -2))  # (B, H, T_query, T_key)
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
    weights = torch.softmax(logits.to(softmax_dtype), dim=-1).to(logits.dtype)
    return torch.matmul(weights, v)


class AttentionBlock(nn.Module):
    """
    Spatial self-attention with a residual connection: x + proj_out(attention(qkv(norm(x)))).

    :param channels: feature channels C.
    :param num_heads: number of heads, used when num_head_channels is -1.
    :param num_head_channels: channels per head; if not -1, heads = C / num_head_channels.
    :param use_new_attention_order: channel layout of `qkv` (see `split_heads`).
    :param attention_backend: "sdpa" or "math" (see `attention_product`).
    :param norm_groups: GroupNorm groups of the input norm.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        attention_backend: str = "sdpa",
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels are not divisible by {self.num_heads} heads")
        self.use_new_attention_order = use_new_attention_order
        self.attention_backend = _check_backend(attention_backend)

        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)

        # The 1x1 convolutions run as token-major linear maps, so each head's q, k and v come out
        # with unit stride along d, the layout the fused attention kernels want.
        tokens = self.norm(x).transpose(1, 2)  # (B, T, C)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)
        q, k, v = split_heads(qkv, self.num_heads, self.use_new_attention_order)
        h = attention_product(q, k, v, self.attention_backend)  # (B, H, T, d)
        h = h.transpose(1, 2).reshape(batch, -1, channels)  # heads concatenated in head order
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)
        return (x + h.transpose(1, 2)).reshape(batch, channels, *spatial)


def _check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    return backend


# ----------------------------------------------------------------------------------------------
# The network.


class UNetModel(nn.Module):
    """
    The ADM UNet with attention and timestep embedding (guided-diffusion's `UNetModel`, 2-D).

    :param image_size: nominal image side (recorded only; any side divisible by
                       2 ** (len(channel_mult) - 1) works).
    :param in_channels: channels of the input image.
    :param model_channels: base channel count.
    :param out_channels: output channels (2 * in_channels with learned sigma).
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: DOWNSAMPLE FACTORS at which to use attention (2 means the
                                  level at image_size / 2), not pixel resolutions.
    :param dropout: dropout rate inside the residual blocks.
    :param channel_mult: channel multiplier per level; its length sets the number of levels.
    :param conv_resample: resample with learned convolutions (only without resblock_updown).
    :param num_classes: if set, the model is class-conditional with this many classes.
    :param num_heads: attention heads, used when num_head_channels is -1.
    :param num_head_channels: if not -1, a fixed channel width per head (overrides num_heads).
    :param num_heads_upsample: heads in the output blocks when num_head_channels is -1;
                               -1 means num_heads.
    :param use_scale_shift_norm: FiLM-like conditioning in the residual blocks.
    :param resblock_updown: resample with residual blocks instead of Upsample/Downsample.
    :param use_new_attention_order: qkv channel layout (see `split_heads`).
    :param attention_backend: "sdpa" (fast, default) or "math" (twice differentiable).
    :param norm_groups: GroupNorm groups (ADM: 32; must divide every level's channel count).

    Gradient checkpointing is not offered: Hessian-vector products need double backward, which
    recomputation-based checkpointing does not support.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        attention_backend: str = "sdpa",
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = frozenset(int(ds) for ds in attention_resolutions)
        channel_mult = tuple(int(m) for m in channel_mult)
        reachable = {2**level for level in range(len(channel_mult))}
        if not attention_resolutions <= reachable:
            raise ValueError(
                f"attention_resolutions {sorted(attention_resolutions)} are downsample factors and "
                f"must be among {sorted(reachable)} for {len(channel_mult)} levels "
                "(convert pixel resolutions with image_size // resolution)"
            )
        _check_backend(attention_backend)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.norm_groups = norm_groups

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res_block(ch_in: int, ch_out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch_in, time_embed_dim, dropout, out_channels=ch_out,
                use_scale_shift_norm=use_scale_shift_norm, up=up, down=down, norm_groups=norm_groups,
            )

        def attention(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, num_heads=heads, num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order, attention_backend=attention_backend,
                norm_groups=norm_groups,
            )

        # Encoder: every block's output channel count is remembered for the skip connections.
        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # Bottleneck: attention regardless of attention_resolutions.
        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attention(ch, num_heads),
            res_block(ch, ch),
        )

        # Decoder: one more block per level than the encoder, each consuming one skip.
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res_block(ch + skip_ch, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, norm_groups),
            nn.SiLU(inplace=True),  # overwrites the norm's fresh output, as in ResBlock
            zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1)),
        )

    @property
    def attention_backend(self) -> str:
        """The backend of the attention blocks ("sdpa" or "math")."""
        backends = {m.attention_backend for m in self.modules() if isinstance(m, AttentionBlock)}
        return backends.pop() if len(backends) == 1 else "mixed"

    def set_attention_backend(self, backend: str) -> UNetModel:
        """Route every attention block through `backend` ("sdpa" or "math"); returns self."""
        _check_backend(backend)
        for module in self.modules():
            if isinstance(module, AttentionBlock):
                module.attention_backend = backend
        return self

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """
        Apply the model to a batch.

        :param x: (B, in_channels, H, W) inputs; H and W divisible by 2 ** (levels - 1).
        :param timesteps: (B,) timesteps as the diffusion process numbers them (original, not
                          respaced, indices; int64).
        :param y: (B,) int64 class labels if the model is class-conditional, else None.
        :return: (B, out_channels, H, W) outputs.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"image side {tuple(x.shape[-2:])} is not divisible by {factor}")

        dtype = self.input_blocks[0][0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y)

        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            # Current features first, skip second: the channel order the weights expect.
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
