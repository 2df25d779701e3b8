"""The networks sCM trains at scale, for 64x64x4 latents (ImageNet 512 in SD-VAE space).

`make_net(preset, **overrides)` builds one of `PRESETS`. Every net is called as
`net(x, t, class_labels=None, guidance=None)` with scm_min's convention: x = x_t / SIGMA_D
[B, C, H, W], t [B] in TrigFlow time, returns F of x's shape and dtype. `class_labels` are int64 [B]
in [0, label_dim), -1 meaning "no class" (the unconditional branch of classifier-free guidance);
None is no class for the whole batch. `guidance` [B] is the guidance scale of a student distilled
from a guided teacher (nets built with guidance_embedding=True).

- `UNet`: the magnitude-preserving U-Net of EDM2 (Karras et al. 2024, "Analyzing and Improving the
  Training Dynamics of Diffusion Models"), with sCM's changes (sCM v2, Sec. 4.1): c_noise(t) = t
  through a positional embedding, adaptive double normalization in place of the (1 + s) scaling,
  a log-variance head `net.logvar` for adaptive weighting (Sec. 4.2).
- `DiT`: a DiT/SiT-style transformer (Peebles & Xie 2023) on 2x2 patches, with a parameter-free
  RMS norm and adaptive double normalization in place of adaLN's scale and shift.

Precision: parameters are the fp32 master weights. The trunk computes in `net.dtype` (bf16 by
default; set it to torch.float32 for an fp32 step); the time, class and guidance embeddings and
every modulation derived from them run in the parameters' own precision (fp32), as sCM needs for
stable tangents (sCM v2, Sec. 4.1). `freeze(net)` gives the copy a teacher or a sampler uses.

Forced weight normalization (EDM2) is `project_weights_(net)`, an in-place step called after the
optimizer step; inside the network the weights are only normalized functionally, so the JVP pass
never writes to a parameter (torch.func.jvp refuses such writes).
"""

import copy
import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from scaled.attention import attention
from scm_min import AdaptiveWeight, TimeEmbedding, adaptive_double_norm, pixel_norm

__all__ = ["PRESETS", "PAPER_PARAMS", "make_net", "freeze", "project_weights_", "run_block", "run_region", "weight_op",
           "UNet", "DiT"]

#----------------------------------------------------------------------------
# Magnitude-preserving operations (EDM2): each keeps unit-variance inputs at unit variance.

MP_SILU_GAIN = 0.596  # sqrt(E[silu(z)^2]) for z ~ N(0, 1)


def mp_silu(x):
    return F.silu(x) / MP_SILU_GAIN


def mp_sum(a, b, t):
    """(1 - t) a + t b, rescaled to unit magnitude for uncorrelated unit-magnitude a and b."""
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, t, dim=1):
    """Concatenation along `dim` in which b carries the fraction t of the total magnitude."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (c * (1 - t) / math.sqrt(n_a)), b * (c * t / math.sqrt(n_b))], dim=dim)


def is_functorch_wrapped(x):
    return isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x)


def weight_op(op, x, w, *args):
    """op(x, w, *args) for a linear map op in x (F.linear, F.conv2d) whose extra args (bias,
    padding) do not depend on x. Under forward-mode AD (torch.autograd.forward_ad) with a constant
    weight, the tangent is op(t_x, w) without the bias: PyTorch's own rule also multiplies x by
    the weight's tangent, a zero tensor it does not skip (one more matmul: 3 forwards for a JVP
    instead of 2, measured on torch 2.13)."""
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is None or fwAD.unpack_dual(w).tangent is not None or (
            not torch.compiler.is_compiling() and is_functorch_wrapped(x)):   # torch.func.jvp: its own rule
        return op(x, w, *args)
    output = op(primal, w, *args)
    if op is F.linear:
        return fwAD.make_dual(output, F.linear(tangent, w))
    return fwAD.make_dual(output, op(tangent, w, None, *args[1:]))


def unit_rows(w):
    """w with every output row (all dims but the first) at RMS 1."""
    return pixel_norm(w.flatten(1)).view_as(w)


class MPConv(nn.Module):
    """Magnitude-preserving k x k convolution (kernel=0: linear layer), no bias. The effective weight
    is each row normalized to unit norm, times `gain` (EDM2's forced weight normalization, applied
    functionally here). `fp32` marks a layer of the embedding path, which a frozen copy keeps in
    the parameters' precision."""

    def __init__(self, in_channels, out_channels, kernel=0, fp32=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *([kernel] * 2 if kernel else [])))
        self.fp32, self.baked = fp32, False

    def effective_weight(self, gain=1.0):
        if self.baked:
            return self.weight  # normalized and multiplied by its gain once, by bake_
        return unit_rows(self.weight) * (gain / math.sqrt(self.weight[0].numel()))

    def forward(self, x, gain=1.0):
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return weight_op(F.linear, x, w)
        return weight_op(F.conv2d, x, w, None, 1, w.shape[-1] // 2)

    @torch.no_grad()
    def project_(self):
        # A weight sharded by fully_shard holds whole rows (dim 0) on each rank: normalizing the local
        # rows is exact and skips DTensor's dispatch (5x faster for a 30M U-Net, measured on a CPU).
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        weight.copy_(unit_rows(weight))

    @torch.no_grad()
    def bake_(self, dtype, gain=1.0):
        w = self.effective_weight(gain)
        self.weight = nn.Parameter(w if self.fp32 else w.to(dtype), requires_grad=False)
        self.baked = True


class Linear(nn.Linear):
    """nn.Linear whose fp32 master weights are cast to the input's dtype at each call; `fp32` as in
    MPConv."""

    def __init__(self, in_features, out_features, bias=True, fp32=False):
        super().__init__(in_features, out_features, bias)
        self.fp32 = fp32

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return weight_op(F.linear, x, self.weight.to(x.dtype), bias)

    @torch.no_grad()
    def bake_(self, dtype):
        if not self.fp32:
            for name, p in list(self.named_parameters(recurse=False)):
                setattr(self, name, nn.Parameter(p.to(dtype), requires_grad=False))


def class_one_hot(class_labels, label_dim, batch, dtype, device):
    """One-hot rows [B, label_dim] scaled to unit magnitude; label -1 (or None: all) gives zeros."""
    if class_labels is None:
        return torch.zeros(batch, label_dim, dtype=dtype, device=device)
    onehot = F.one_hot(class_labels.clamp(min=0), label_dim).to(dtype) * (class_labels >= 0)[:, None].to(dtype)
    return onehot * math.sqrt(label_dim)


# Hooks for scaled.step.prepare, which may attach a runner to each block (activation
# checkpointing, compiled regions). A block is the unit of checkpointing and of a compiled forward;
# in the JVP pass, the pieces of a block between its attention calls are the compiled units, and
# attention runs its own (o, t_o) kernel between them.

def run_block(block, *args):
    """block(*args), through the block's runner if one is attached."""
    runner = getattr(block, "runner", None)
    return block(*args) if runner is None else runner.block(block, *args)


def run_region(block, name, *args):
    """getattr(block, name)(*args): a piece of a block without attention, which returns a tensor
    or a tuple of tensors; through the block's runner if one is attached."""
    runner = getattr(block, "runner", None)
    return getattr(block, name)(*args) if runner is None else runner.region(block, name, *args)

#----------------------------------------------------------------------------
# EDM2-style U-Net.

class UNetBlock(nn.Module):
    """Residual block of the U-Net: optional resampling, two 3x3 convolutions modulated by the
    embedding through adaptive double normalization, optional self-attention. Encoder blocks
    normalize their input (EDM2's pixel norm); decoder blocks take a skip connection, concatenated
    by the caller."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor, resample=None, attention=False,
                 takes_skip=False, channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3,
                 clip_act=256):
        super().__init__()
        self.flavor, self.resample, self.takes_skip = flavor, resample, takes_skip
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, 3)
        self.emb_linear = MPConv(emb_channels, 2 * out_channels, fp32=True)   # s(c) and b(c)
        self.conv_res1 = MPConv(out_channels, out_channels, 3)
        self.conv_skip = MPConv(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.heads = out_channels // channels_per_head if attention else 0
        if self.heads:
            self.attn_qkv = MPConv(out_channels, 3 * out_channels, 1)
            self.attn_proj = MPConv(out_channels, out_channels, 1)

    def forward(self, x, emb):
        if not self.heads:
            return run_region(self, "residual", x, emb)
        x, q, k, v = run_region(self, "residual_and_qkv", x, emb)
        return run_region(self, "attention_output", x, attention(q, k, v))

    def residual(self, x, emb):
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        s, b = self.emb_linear(emb)[:, :, None, None].chunk(2, dim=1)          # [B, C, 1, 1] each
        # Each term has unit magnitude; 1/sqrt(2) keeps their sum at unit magnitude.
        y = adaptive_double_norm(pixel_norm(y, dim=1), s, b, dim=1) / math.sqrt(2)
        y = F.dropout(mp_silu(y), self.dropout, self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        return x.clamp(-self.clip_act, self.clip_act)

    # Self-attention over pixels with cosine similarity: q, k, v pixel-normalized per head (EDM2).
    def residual_and_qkv(self, x, emb):
        x = self.residual(x, emb)
        B, C, H, W = x.shape
        qkv = self.attn_qkv(x).permute(0, 2, 3, 1).reshape(B, H * W, 3, self.heads, C // self.heads)
        q, k, v = pixel_norm(qkv).permute(2, 0, 3, 1, 4).unbind(0)             # [B, heads, HW, D] each
        return x, q, k, v

    def attention_output(self, x, y):
        B, C, H, W = x.shape
        y = y.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2)      # [B, C, H, W]
        x = mp_sum(x, self.attn_proj(y), self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act)


class UNet(nn.Module):
    """EDM2's U-Net layout: levels of `channels * channel_mult` channels at resolutions
    img_resolution / 2^level, `num_blocks` encoder and num_blocks + 1 decoder blocks per level,
    attention at `attn_resolutions` and in the first block of the bottleneck, an embedding of
    `channels * channel_mult_emb` channels."""

    def __init__(self, img_resolution=64, img_channels=4, label_dim=1000, channels=192, channel_mult=(1, 2, 3, 4),
                 channel_mult_emb=2, num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64, dropout=0.0,
                 guidance_embedding=False, time_max_freq=32.0, guidance_max_freq=8.0, logvar_channels=128,
                 label_balance=0.5, concat_balance=0.5, channels_last=True, dtype=torch.bfloat16):
        super().__init__()
        self.img_channels, self.label_dim, self.concat_balance, self.label_balance = \
            img_channels, label_dim, concat_balance, label_balance
        self.channels_last, self.dtype = channels_last, dtype
        cblock = [channels * m for m in channel_mult]
        # Each block maps the embedding to s and b, twice the outputs of EDM2's one scale; an
        # embedding of 2 x channels (EDM2: 4 x channels) keeps EDM2's parameter counts.
        cnoise, cemb = cblock[0], channels * channel_mult_emb
        block_args = dict(emb_channels=cemb, channels_per_head=channels_per_head, dropout=dropout)

        self.time_features = TimeEmbedding(cnoise, time_max_freq)
        self.emb_noise = MPConv(cnoise, cemb, fp32=True)
        self.emb_label = MPConv(label_dim, cemb, fp32=True) if label_dim else None
        if guidance_embedding:
            self.guidance_features = TimeEmbedding(cnoise, guidance_max_freq)
            self.emb_guidance = MPConv(cnoise, cemb, fp32=True)
            self.guidance_gain = nn.Parameter(torch.zeros([1]))  # 0: starts as the unguided net; 1-D: fully_shard refuses scalars
        else:
            self.emb_guidance = None

        self.stem = MPConv(img_channels + 1, cblock[0], 3)   # input plus a constant channel (EDM2)
        enc, skips, cout = [], [cblock[0]], cblock[0]
        for level, width in enumerate(cblock):
            res = img_resolution >> level
            if level > 0:
                enc.append(UNetBlock(cout, cout, flavor="enc", resample="down", **block_args))
                skips.append(cout)
            for _ in range(num_blocks):
                enc.append(UNetBlock(cout, width, flavor="enc", attention=res in attn_resolutions, **block_args))
                cout = width
                skips.append(cout)
        dec = []
        for level, width in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                dec.append(UNetBlock(cout, cout, flavor="dec", attention=True, **block_args))
                dec.append(UNetBlock(cout, cout, flavor="dec", **block_args))
            else:
                dec.append(UNetBlock(cout, cout, flavor="dec", resample="up", **block_args))
            for _ in range(num_blocks + 1):
                dec.append(UNetBlock(cout + skips.pop(), width, flavor="dec", takes_skip=True,
                                     attention=res in attn_resolutions, **block_args))
                cout = width
        self.enc, self.dec = nn.ModuleList(enc), nn.ModuleList(dec)
        self.out_conv = MPConv(cout, img_channels, 3)
        self.out_gain = nn.Parameter(torch.zeros([1]))  # 0: F = 0 at initialization (EDM2); 1-D: fully_shard refuses scalars
        self.logvar = AdaptiveWeight(logvar_channels)

    def regions(self):
        """The blocks that checkpointing, compiled regions (and later sharding) apply to."""
        return [*self.enc, *self.dec]

    def embed(self, t, class_labels, guidance):
        """Embedding [B, cemb] of c_noise(t) = t, the class and the guidance scale, in the
        parameters' precision. The features have RMS 1/sqrt(2); sqrt(2) brings them to 1."""
        dtype = self.emb_noise.weight.dtype
        emb = self.emb_noise(self.time_features(t.to(dtype)) * math.sqrt(2))
        if self.emb_label is not None:
            onehot = class_one_hot(class_labels, self.label_dim, len(t), dtype, t.device)
            emb = mp_sum(emb, self.emb_label(onehot), self.label_balance)
        elif class_labels is not None:
            raise ValueError("this network has no class embedding (label_dim=0)")
        if self.emb_guidance is not None:
            if guidance is not None:
                features = self.guidance_features(guidance.to(dtype)) * math.sqrt(2)
                emb = emb + self.emb_guidance(features, gain=self.guidance_gain)
        elif guidance is not None:
            raise ValueError("this network has no guidance embedding (make_net(..., guidance_embedding=True))")
        return mp_silu(emb)

    def forward(self, x, t, class_labels=None, guidance=None):
        emb = self.embed(t, class_labels, guidance)
        h = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).to(self.dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        h = self.stem(h)
        skips = [h]
        for block in self.enc:
            h = run_block(block, h, emb)
            skips.append(h)
        for block in self.dec:
            if block.takes_skip:
                h = mp_cat(h, skips.pop(), self.concat_balance)
            h = run_block(block, h, emb)
        return self.out_conv(h, gain=self.out_gain).to(x.dtype)

    @torch.no_grad()
    def bake_(self, dtype):
        gains = {self.out_conv: self.out_gain}
        if self.emb_guidance is not None:
            gains[self.emb_guidance] = self.guidance_gain
        for module in self.modules():
            if isinstance(module, MPConv):
                module.bake_(dtype, gain=gains.get(module, 1.0))

#----------------------------------------------------------------------------
# DiT/SiT-style transformer.

def sincos_2d(width, side):
    """Fixed 2D sine-cosine position embedding [side * side, width]: half the channels encode the
    row, half the column, each at width / 4 frequencies 10000^(-k / (width / 4))."""
    freqs = 10000.0 ** (-torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    angles = torch.arange(side, dtype=torch.float64)[:, None] * freqs                   # [side, width/4]
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)                               # [side, width/2]
    rows, cols = axis[:, None].expand(side, side, -1), axis[None, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, width).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block: attention and MLP, each on an input normalized by RMS norm and
    adaptive double normalization, each added back through a gate computed from the embedding
    (adaLN-Zero's gate, zero at initialization)."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.heads = heads
        self.modulation = Linear(width, 6 * width, fp32=True)   # s, b, gate for attention, then MLP
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.fc1, self.fc2 = Linear(width, hidden), Linear(hidden, width)
        for layer in (self.qkv, self.proj, self.fc1, self.fc2):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        for gate in (slice(2 * width, 3 * width), slice(5 * width, 6 * width)):
            nn.init.zeros_(self.modulation.weight.data[gate])
            nn.init.zeros_(self.modulation.bias.data[gate])

    def forward(self, x, c):
        modulation, q, k, v = run_region(self, "attention_inputs", x, c)
        return run_region(self, "attention_output_and_mlp", x, modulation, attention(q, k, v))

    def attention_inputs(self, x, c):
        modulation = self.modulation(F.silu(c))[:, None]                       # [B, 1, 6 width]
        s_attn, b_attn = modulation.chunk(6, dim=-1)[:2]
        y = adaptive_double_norm(pixel_norm(x), s_attn, b_attn)
        q, k, v = self.qkv(y).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, heads, L, D]
        return modulation, q, k, v

    def attention_output_and_mlp(self, x, modulation, o):
        gate_attn, s_mlp, b_mlp, gate_mlp = modulation.chunk(6, dim=-1)[2:]
        x = x + gate_attn.to(x.dtype) * self.proj(o.transpose(1, 2).flatten(2))
        y = adaptive_double_norm(pixel_norm(x), s_mlp, b_mlp)
        return x + gate_mlp.to(x.dtype) * self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


class DiT(nn.Module):
    """Transformer on patch x patch tokens with a fixed 2D position embedding; the time (c_noise(t)
    = t), class and guidance embeddings are summed into one conditioning vector c (in fp32)."""

    def __init__(self, img_resolution=64, img_channels=4, label_dim=1000, patch=2, width=1152, depth=28, heads=16,
                 mlp_ratio=4.0, freq_dim=256, guidance_embedding=False, time_max_freq=32.0, guidance_max_freq=8.0,
                 logvar_channels=128, dtype=torch.bfloat16):
        super().__init__()
        self.img_channels, self.patch, self.label_dim, self.dtype = img_channels, patch, label_dim, dtype
        self.patch_embed = Linear(img_channels * patch * patch, width)
        self.register_buffer("pos_embed", sincos_2d(width, img_resolution // patch), persistent=False)
        self.time_features = TimeEmbedding(freq_dim, time_max_freq)
        self.time_mlp = nn.Sequential(Linear(freq_dim, width, fp32=True), nn.SiLU(), Linear(width, width, fp32=True))
        self.label_embed = nn.Embedding(label_dim + 1, width) if label_dim else None   # row label_dim: no class
        if guidance_embedding:
            self.guidance_features = TimeEmbedding(freq_dim, guidance_max_freq)
            self.guidance_mlp = nn.Sequential(Linear(freq_dim, width, fp32=True), nn.SiLU(),
                                              Linear(width, width, fp32=True))
            nn.init.zeros_(self.guidance_mlp[2].weight)   # starts as the unguided net
            nn.init.zeros_(self.guidance_mlp[2].bias)
        else:
            self.guidance_mlp = None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_modulation = Linear(width, 2 * width, fp32=True)
        self.final_linear = Linear(width, patch * patch * img_channels)
        nn.init.zeros_(self.final_linear.weight)   # F = 0 at initialization
        nn.init.zeros_(self.final_linear.bias)
        self.logvar = AdaptiveWeight(logvar_channels)

    def regions(self):
        return list(self.blocks)

    def embed(self, t, class_labels, guidance):
        """Conditioning c [B, width] in the parameters' precision."""
        dtype = self.time_mlp[0].weight.dtype
        c = self.time_mlp(self.time_features(t.to(dtype)))
        if self.label_embed is not None:
            labels = torch.full_like(t, self.label_dim, dtype=torch.long) if class_labels is None else \
                torch.where(class_labels >= 0, class_labels, self.label_dim)
            c = c + self.label_embed(labels).to(dtype)
        elif class_labels is not None:
            raise ValueError("this network has no class embedding (label_dim=0)")
        if self.guidance_mlp is not None:
            if guidance is not None:
                c = c + self.guidance_mlp(self.guidance_features(guidance.to(dtype)))
        elif guidance is not None:
            raise ValueError("this network has no guidance embedding (make_net(..., guidance_embedding=True))")
        return c

    def forward(self, x, t, class_labels=None, guidance=None):
        c = self.embed(t, class_labels, guidance)
        B, C, H, W = x.shape
        p = self.patch
        tokens = x.to(self.dtype).reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        h = self.patch_embed(tokens.reshape(B, -1, C * p * p)) + self.pos_embed.to(self.dtype)   # [B, L, width]
        for block in self.blocks:
            h = run_block(block, h, c)
        s, b = self.final_modulation(F.silu(c))[:, None].chunk(2, dim=-1)
        h = self.final_linear(adaptive_double_norm(pixel_norm(h), s, b))                         # [B, L, p*p*C]
        h = h.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        return h.reshape(B, C, H, W).to(x.dtype)

    @torch.no_grad()
    def bake_(self, dtype):
        for module in self.modules():
            if isinstance(module, Linear):
                module.bake_(dtype)

#----------------------------------------------------------------------------
# Presets and helpers.

PRESETS = {
    # EDM2's ImageNet-512 U-Nets S to XXL, the sizes sCM v2 trains (Sec. 6).
    "unet-s": dict(arch="unet", channels=192),
    "unet-m": dict(arch="unet", channels=256),
    "unet-l": dict(arch="unet", channels=320),
    "unet-xl": dict(arch="unet", channels=384),
    "unet-xxl": dict(arch="unet", channels=448),
    # DiT-XL/2 and DiT-B/2 on 64x64x4 latents (1024 tokens).
    "dit-xl": dict(arch="dit", width=1152, depth=28, heads=16),
    "dit-b": dict(arch="dit", width=768, depth=12, heads=12),
    # For CPU tests: 8x8x4 inputs, 10 classes.
    "unet-tiny": dict(arch="unet", img_resolution=8, label_dim=10, channels=16, channel_mult=(1, 2), num_blocks=1,
                      attn_resolutions=(4,), channels_per_head=8),
    "dit-tiny": dict(arch="dit", img_resolution=8, label_dim=10, width=32, depth=2, heads=2, freq_dim=32,
                     logvar_channels=16),
}

# Parameter counts sCM v2 states for its ImageNet-512 models (EDM2's), and DiT-XL/2's and DiT-B/2's.
PAPER_PARAMS = {"unet-s": 280e6, "unet-m": 498e6, "unet-l": 778e6, "unet-xl": 1119e6, "unet-xxl": 1523e6,
                "dit-xl": 675e6, "dit-b": 130e6}


def make_net(preset, **overrides):
    """The network of a preset name in PRESETS, with constructor arguments overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    config = {**PRESETS[preset], **overrides}
    arch = config.pop("arch")
    return {"unet": UNet, "dit": DiT}[arch](**config)


def freeze(net, dtype=torch.bfloat16):
    """A frozen copy of `net` for a teacher or a sampler: eval mode, no gradients, weights
    normalized once and stored in `dtype` (the embedding path keeps the parameters' precision)."""
    frozen = copy.deepcopy(net).eval().requires_grad_(False)
    frozen.bake_(dtype)
    frozen.dtype = dtype
    return frozen


@torch.no_grad()
def project_weights_(net):
    """EDM2's forced weight normalization: rescale every stored MPConv weight row to unit
    RMS. Call after each optimizer step, never inside a forward or JVP pass."""
    for module in net.modules():
        if isinstance(module, MPConv) and not module.baked:
            module.project_()
