"""Attention with a forward-mode JVP that never materializes the L x L matrix.

`attention(q, k, v)` is softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k and v [B, H, Lk, D].
- Without tangents it is PyTorch's fused SDPA (forward and backward).
- Under forward-mode AD (`torch.func.jvp`, `torch.autograd.forward_ad`) on CUDA it returns the
  primal o and its tangent t_o from one Triton kernel, flash-style (sCM v2, App. F), with
  O(L) extra memory, for any head dim D <= 128 (on Hopper at D = 64 to 96 the warp-specialized
  Gluon kernel of `scaled.attention_hopper`, same equations; under torch.compile either runs
  inside one custom operator).
- Where the kernel cannot run (CPU, no Triton, D > 128) it falls back to the plain math path
  `attention_math`, whose JVP autograd derives (it materializes L x L).

Tangent equations (sCM v2, App. F), with scale = 1/sqrt(D):
  s   = q k^T scale                 p = softmax(s)           o = p v
  t_s = (t_q k^T + q t_k^T) scale   t_p = p (t_s - sum_j p_j t_s_j)
  t_o = t_p v + p t_v = p ((t_s - c) v + t_v) - (sum_j p_j (t_s_j - c)) o   for any row constant c
One pass over key blocks keeps, per query row, the running max m, a centre c,
acc_o = sum p~ v and acc_t = sum p~ ((t_s - c) v + t_v), both rescaled by exp(m_old - m_new)
like the flash forward. Each block moves c to its own p-weighted mean of t_s (acc_t -=
delta acc_o follows the move exactly). The same products with value columns of ones (and
t_v = 0) give the sums lr of the 16-bit p~ and r of the 16-bit p~ (t_s - c) that entered them,
and at the end o = acc_o / lr and t_o = (acc_t - r o) / lr: the equation above, with the sums
of exactly what was rounded and multiplied.

Why the centre: the product p~ (t_s - c) v runs on 16-bit operands. A key offset shared by all
keys (k + a, t_k + a), or large logits, give t_s a part that is (nearly) the same for every key;
rounded to 16 bits before the product and cancelled only at the end, it multiplied t_o's error
(issue 13). Centring each block on its own mean keeps the rounded values small. Why the sums of
the rounded values: an offset shared by all values (v + a, a qkv bias say) puts a r into acc_t;
a sum r of the unrounded values would leave a times their difference in t_o (bf16, a = 16: 13x
the error of SDPA's math path), the sum of the rounded ones removes it exactly.
"""
import os
import warnings
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from scaled import attention_hopper

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without Triton use the math path.
    triton = None
try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: pointer loads only
    TensorDescriptor = None

__all__ = ["attention", "attention_math", "attention_jvp_triton", "kernel_supported"]

HEAD_DIM_MAX = 128  # the kernel takes any head dim up to this; larger ones take the math path
# Tests set this to run the kernel on CPU tensors in Triton's interpreter, which needs
# TRITON_INTERPRET=1 in the environment before triton is first imported.
INTERPRET_ON_CPU = False


#----------------------------------------------------------------------------
# Reference path.

def attention_math(q, k, v):
    """softmax(q k^T / sqrt(D)) v in plain ops; autograd derives its JVP (L x L memory).

    16-bit inputs are computed in float32 and rounded once at the end, as SDPA's math backend
    does: 16-bit scores and weights lose much of t_o's accuracy with large logits (issue 13).
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5   # [B, H, Lq, Lk]
    return torch.matmul(torch.softmax(s, dim=-1), v).to(dtype)      # [B, H, Lq, D]


def attention_jvp_math(q, k, v, t_q, t_k, t_v):
    """(o, t_o) by the tangent equations above in plain ops (float32 for 16-bit inputs).

    Reverse mode through t_o differentiates this (L x L memory); torch.func.jvp of
    `attention_math` gives the same (o, t_o).
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v, t_q, t_k, t_v = (x.float() for x in (q, k, v, t_q, t_k, t_v))
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)         # [B, H, Lq, Lk]
    t_s = (torch.matmul(t_q, k.transpose(-2, -1)) + torch.matmul(q, t_k.transpose(-2, -1))) * scale
    t_p = p * (t_s - (p * t_s).sum(-1, keepdim=True))
    o = torch.matmul(p, v)
    t_o = torch.matmul(t_p, v) + torch.matmul(p, t_v)
    return o.to(dtype), t_o.to(dtype)


#----------------------------------------------------------------------------
# Triton kernel: (o, t_o) in one flash pass.

if triton is not None:
    @triton.jit
    def _load_tile(ptr, offs_rows, offs_cols, row_stride, n_rows, n_cols,
                   MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        """A [rows, cols] tile, zero past n_rows rows and n_cols columns where masked."""
        ptrs = ptr + offs_rows[:, None] * row_stride + offs_cols[None, :]
        if MASK_ROWS or MASK_COLS:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols),
                           other=0.0)
        else:
            tile = tl.load(ptrs)
        return tile

    @triton.jit
    def _store_tile(ptr, tile, offs_rows, offs_cols, row_stride, n_rows, n_cols,
                    MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        ptrs = ptr + offs_rows[:, None] * row_stride + offs_cols[None, :]
        if MASK_ROWS or MASK_COLS:
            tl.store(ptrs, tile.to(ptr.dtype.element_ty),
                     mask=(offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols))
        else:
            tl.store(ptrs, tile.to(ptr.dtype.element_ty))

    @triton.jit
    def _key_tile(ptr, desc, b, h, start_n, offs_n, col, offs_d, row_stride, Lk, D,
                  MASK_N: tl.constexpr, MASK_D: tl.constexpr, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
        """Rows start_n + [0, BLOCK_N) and columns col + [0, WIDTH) of a key-side tensor (k, t_k,
        v, t_v) of head (b, h), zero past Lk and D: by TMA where the host made a descriptor."""
        if desc is None:
            tile = _load_tile(ptr, offs_n, offs_d, row_stride, Lk, D, MASK_N, MASK_D)
        else:
            tile = desc.load([b, h, start_n, col]).reshape(BLOCK_N, WIDTH)
        return tile

    @triton.jit
    def _scores(q0, tq0, q1, tq1, K, TK, KD0, TKD0, KD1, TKD1, b32, h32, start_n, offs_n0, offs_d0, offs_d1,
                skn, stkn, Lk, D, D0: tl.constexpr, D1: tl.constexpr, MASK_N: tl.constexpr,
                MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, BLOCK_N: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
        """s = q k^T and t_s = t_q k^T + q t_k^T (unscaled) of the key block at start_n; s is
        -inf past Lk."""
        offs_n = start_n + offs_n0
        k0 = _key_tile(K, KD0, b32, h32, start_n, offs_n, 0, offs_d0, skn, Lk, D, MASK_N, MASK_D0, BLOCK_N, D0)
        tk0 = _key_tile(TK, TKD0, b32, h32, start_n, offs_n, 0, offs_d0, stkn, Lk, D, MASK_N, MASK_D0, BLOCK_N,
                        D0)
        kT0 = tl.trans(k0)
        s = tl.dot(q0, kT0, input_precision=INPUT_PRECISION)                # [BLOCK_M, BLOCK_N]
        t_s = tl.dot(tq0, kT0, input_precision=INPUT_PRECISION)
        t_s = tl.dot(q0, tl.trans(tk0), t_s, input_precision=INPUT_PRECISION)
        if D1 > 0:
            k1 = _key_tile(K, KD1, b32, h32, start_n, offs_n, D0, offs_d1, skn, Lk, D, MASK_N, MASK_D1, BLOCK_N,
                           D1)
            tk1 = _key_tile(TK, TKD1, b32, h32, start_n, offs_n, D0, offs_d1, stkn, Lk, D, MASK_N, MASK_D1, BLOCK_N,
                            D1)
            kT1 = tl.trans(k1)
            s = tl.dot(q1, kT1, s, input_precision=INPUT_PRECISION)
            t_s = tl.dot(tq1, kT1, t_s, input_precision=INPUT_PRECISION)
            t_s = tl.dot(q1, tl.trans(tk1), t_s, input_precision=INPUT_PRECISION)
        if MASK_N:
            s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
        return s, t_s

    @triton.jit
    def _accumulate(acc_o, acc_t, p_lo, p_ts_lo, alpha, delta, v, t_v, INPUT_PRECISION: tl.constexpr):
        """One head-dim chunk: acc_o += p~ v and acc_t += p~ t_v + p~ (t_s - c) v, after the
        rescale by alpha and the move of c by delta (t_v None: zero)."""
        acc_t = (acc_t - delta[:, None] * acc_o) * alpha[:, None]
        acc_o = tl.dot(p_lo, v, acc_o * alpha[:, None], input_precision=INPUT_PRECISION)
        if t_v is not None:
            acc_t = tl.dot(p_lo, t_v, acc_t, input_precision=INPUT_PRECISION)
        acc_t = tl.dot(p_ts_lo, v, acc_t, input_precision=INPUT_PRECISION)
        return acc_o, acc_t

    @triton.jit
    def _attention_jvp_kernel(
        Q, K, V, TQ, TK, TV, O, TO, KD0, TKD0, VD0, TVD0, KD1, TKD1, VD1, TVD1,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
        stqb, stqh, stqm, stkb, stkh, stkn, stvb, stvh, stvn,
        sob, soh, som, stob, stoh, stom,
        H, Lq, Lk, scale,
        D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASK_D0: tl.constexpr,
        MASK_D1: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        MASK_M: tl.constexpr, MASK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        # The head dim is a power-of-two chunk D0 plus, if D0 < D, a power-of-two tail D1 padded
        # with zeros (72 = 64 + 8 -> 16): each matrix product is one dot per chunk.
        # Strides arrive divided by ALIGN, so that Triton sees rows aligned for vector loads
        # (it only infers alignment from integers divisible by 16; 72 is not).
        scale = tl.cast(scale, tl.float32)  # torch.compile (Inductor) passes a Python float as fp64
        # One grid axis (no 65535 limit on B*H); query blocks of one head run next to each
        # other, so their shared k, v, t_k, t_v stay in L2.
        num_m = tl.cdiv(Lq, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        pid_bh = tl.program_id(0) // num_m
        b32 = pid_bh // H
        h32 = pid_bh % H
        b = b32.to(tl.int64)
        h = h32.to(tl.int64)
        Q += (b * sqb + h * sqh) * ALIGN
        K += (b * skb + h * skh) * ALIGN
        V += (b * svb + h * svh) * ALIGN
        TQ += (b * stqb + h * stqh) * ALIGN
        TK += (b * stkb + h * stkh) * ALIGN
        TV += (b * stvb + h * stvh) * ALIGN
        O += (b * sob + h * soh) * ALIGN
        TO += (b * stob + h * stoh) * ALIGN
        sqm, skn, svn, stqm, stkn, stvn = sqm * ALIGN, skn * ALIGN, svn * ALIGN, stqm * ALIGN, stkn * ALIGN, stvn * ALIGN
        som, stom = som * ALIGN, stom * ALIGN
        dtype = Q.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        q0 = _load_tile(Q, offs_m, offs_d0, sqm, Lq, D, MASK_M, MASK_D0)          # [BLOCK_M, D0]
        tq0 = _load_tile(TQ, offs_m, offs_d0, stqm, Lq, D, MASK_M, MASK_D0)
        acc_o0 = tl.zeros([BLOCK_M, D0], tl.float32)                               # sum p~ v
        acc_t0 = tl.zeros([BLOCK_M, D0], tl.float32)                               # sum p~ ((t_s - c) v + t_v)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            q1 = _load_tile(Q, offs_m, offs_d1, sqm, Lq, D, MASK_M, MASK_D1)      # [BLOCK_M, D1]
            tq1 = _load_tile(TQ, offs_m, offs_d1, stqm, Lq, D, MASK_M, MASK_D1)
            acc_o1 = tl.zeros([BLOCK_M, D1], tl.float32)
            acc_t1 = tl.zeros([BLOCK_M, D1], tl.float32)
        else:
            offs_d1, q1, tq1 = offs_d0, q0, tq0  # unused

        qk_scale = scale * 1.4426950408889634                     # exp(x) = exp2(x log2 e)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)       # running max of s log2 e
        c_i = tl.zeros([BLOCK_M], tl.float32)                     # centre c of t_s
        # The value sums: acc_o and acc_t of value columns of ones (and t_v = 0) are, in each
        # such column, lr and r. The zero padding of a tail chunk serves (72 = 64 + 8 -> 16);
        # without one, a [BLOCK_N, 16] chunk of ones takes its own products.
        ONES_IN_TAIL: tl.constexpr = D1 > 0 and MASK_D1
        if not ONES_IN_TAIL:
            ones = tl.full([BLOCK_N, 16], 1.0, dtype)
            acc_lr = tl.zeros([BLOCK_M, 16], tl.float32)
            acc_r = tl.zeros([BLOCK_M, 16], tl.float32)

        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + offs_n0
            s, t_s = _scores(q0, tq0, q1, tq1, K, TK, KD0, TKD0, KD1, TKD1, b32, h32, start_n, offs_n0, offs_d0,
                             offs_d1, skn, stkn, Lk, D, D0, D1, MASK_N, MASK_D0, MASK_D1, BLOCK_N, INPUT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            m_i = m_new
            p = tl.exp2(s * qk_scale - m_i[:, None])                          # p~ = exp(s - m); 0 on masked columns
            # c moves to this block's p-weighted mean of t_s (stays where all its p~ underflowed)
            l_block = tl.sum(p, 1)
            c_new = tl.where(l_block > 0, tl.sum(p * t_s, 1) * scale / l_block, c_i)
            delta = c_new - c_i
            c_i = c_new
            p_lo = p.to(dtype)
            p_ts_lo = (p * (t_s * scale - c_i[:, None])).to(dtype)           # p~ (t_s - c)
            if not ONES_IN_TAIL:
                acc_lr, acc_r = _accumulate(acc_lr, acc_r, p_lo, p_ts_lo, alpha, delta, ones, None, INPUT_PRECISION)
            v0 = _key_tile(V, VD0, b32, h32, start_n, offs_n, 0, offs_d0, svn, Lk, D, MASK_N, MASK_D0, BLOCK_N,
                           D0)
            t_v0 = _key_tile(TV, TVD0, b32, h32, start_n, offs_n, 0, offs_d0, stvn, Lk, D, MASK_N, MASK_D0,
                             BLOCK_N, D0)
            acc_o0, acc_t0 = _accumulate(acc_o0, acc_t0, p_lo, p_ts_lo, alpha, delta, v0, t_v0, INPUT_PRECISION)
            if D1 > 0:
                v1 = _key_tile(V, VD1, b32, h32, start_n, offs_n, D0, offs_d1, svn, Lk, D, MASK_N, MASK_D1,
                               BLOCK_N, D1)
                if ONES_IN_TAIL:
                    v1 = tl.where(offs_d1[None, :] < D, v1, 1.0).to(dtype)
                t_v1 = _key_tile(TV, TVD1, b32, h32, start_n, offs_n, D0, offs_d1, stvn, Lk, D, MASK_N, MASK_D1,
                                 BLOCK_N, D1)
                acc_o1, acc_t1 = _accumulate(acc_o1, acc_t1, p_lo, p_ts_lo, alpha, delta, v1, t_v1,
                                             INPUT_PRECISION)

        # o = acc_o / lr, normalized by the 16-bit p~ that entered it. acc_t is relative to the
        # last block's c, about which the p~ (t_s - c) of all blocks do not sum to 0; r is that
        # sum over the 16-bit values that entered acc_t, hence t_o = (acc_t - r o) / lr. Being
        # their exact sum, it also removes what an offset shared by all values (v + a) put into
        # acc_t through them (issue 13).
        if ONES_IN_TAIL:  # equal columns; max is exact
            lr = tl.max(tl.where(offs_d1[None, :] < D, float("-inf"), acc_o1), 1)
            r = tl.max(tl.where(offs_d1[None, :] < D, float("-inf"), acc_t1), 1)
        else:
            lr = tl.max(acc_lr, 1)  # 16 equal columns
            r = tl.max(acc_r, 1)
        o0 = acc_o0 / lr[:, None]
        t_o0 = (acc_t0 - r[:, None] * o0) / lr[:, None]
        _store_tile(O, o0, offs_m, offs_d0, som, Lq, D, MASK_M, MASK_D0)
        _store_tile(TO, t_o0, offs_m, offs_d0, stom, Lq, D, MASK_M, MASK_D0)
        if D1 > 0:
            o1 = acc_o1 / lr[:, None]
            t_o1 = (acc_t1 - r[:, None] * o1) / lr[:, None]
            _store_tile(O, o1, offs_m, offs_d1, som, Lq, D, MASK_M, MASK_D1)
            _store_tile(TO, t_o1, offs_m, offs_d1, stom, Lq, D, MASK_M, MASK_D1)

    _LAUNCH_ERRORS = tuple(getattr(triton.runtime.errors, name) for name in ("OutOfResources", "PTXASError")
                           if hasattr(triton.runtime.errors, name))


def head_dim_split(D):
    """(D0, D1): the head dim as a power-of-two chunk D0 >= 16 and a padded power-of-two tail
    D1 >= 16 (0 if none); D0 + D1 >= D is the width the kernel computes with."""
    D0 = max(16, 1 << (D.bit_length() - 1))         # largest power of two <= D
    if D <= D0:
        return D0, 0
    D1 = max(16, 1 << (D - D0 - 1).bit_length())    # smallest power of two >= D - D0
    return (2 * D0, 0) if D1 == D0 else (D0, D1)    # two equal chunks: one masked chunk instead


#----------------------------------------------------------------------------
# Configurations per architecture, dtype size and padded head dim D0 + D1, best first; later
# entries need less shared memory and are the fallbacks. Picked by the sweeps in
# benchmarks/attention_jvp_notes.md.

class Config(NamedTuple):
    """How the kernel runs: tile sizes, warps, software-pipeline stages, and whether k, t_k, v,
    t_v arrive by TMA (sm90 and later, where the tensors allow it; else by pointer loads)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False


SHARED_MEMORY_LIMIT = {"sm80": 166912, "sm90": 232448}  # bytes per block (opt-in): A100, H100
TMA = True  # an entry (..., TMA) reads k, t_k, v, t_v by TMA

CONFIGS = {
    ("sm90", 2): {
        16: [(64, 64, 4, 2, TMA), (64, 64, 4, 2), (32, 32, 4, 1)],
        32: [(64, 64, 4, 2, TMA), (128, 64, 8, 3), (32, 32, 4, 1)],
        48: [(128, 64, 8, 3), (64, 32, 4, 3), (32, 32, 4, 1)],
        64: [(128, 128, 8, 2, TMA), (128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 1)],
        80: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (32, 32, 4, 1)],
        96: [(64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 1)],
        128: [(128, 64, 8, 2, TMA), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3), (32, 32, 4, 1)],
    },
    ("sm80", 2): {  # chosen by compiling for sm80 (no spills) and timing on the H100
        16: [(128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 1)],
        32: [(128, 64, 8, 3), (64, 64, 4, 2), (32, 32, 4, 1)],
        48: [(64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 1)],
        64: [(64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 1)],
        80: [(64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 1)],
        96: [(64, 16, 4, 3), (128, 16, 8, 3), (32, 32, 4, 1)],
        128: [(128, 16, 8, 3), (32, 32, 4, 2), (32, 32, 4, 1)],
    },
}
for _arch in ("sm80", "sm90"):  # float32 (slow in any case: 2x the bytes, tf32 or exact products)
    CONFIGS[_arch, 4] = {Dp: [(64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 1)] if Dp <= 96 else
                         [(32, 32, 4, 2), (32, 16, 4, 1)] for Dp in CONFIGS[_arch, 2]}
CONFIGS = {case: {Dp: [Config(*c) for c in configs] for Dp, configs in table.items()}
           for case, table in CONFIGS.items()}


def shared_memory_estimate(config, Dp, elem_bytes):
    """Bytes of shared memory a configuration needs: num_stages buffers of the four key-side
    tiles (k, t_k, v, t_v), q and t_q, the ones tile of the value sums [BLOCK_N, 16], and 1 KB
    for the barriers of TMA loads. Triton 3.6 reports that less the 1 KB for the compiled kernel
    on sm90 (56-64 bytes more with TMA), less on sm80 (benchmarks/attention_jvp.py --configs
    and --sweep), except BLOCK_M = 64 with 8 warps, 4 KB more on sm90: no table entry has that."""
    c = Config(*config)
    tiles = (4 * c.num_stages * c.block_n + 2 * c.block_m) * Dp + 16 * c.block_n
    return tiles * elem_bytes + 1024


def device_arch(device):
    """('sm80' or 'sm90', shared-memory bytes per block) of a CUDA device.

    Hopper and later take the sm90 table, Ampere and Ada the sm80 one, both cut to the card's
    own limit (99 KB on sm86/sm89). SCALED_ATTENTION_ARCH=sm80 forces the A100 table and limit
    (to check them on an H100).
    """
    props = torch.cuda.get_device_properties(torch.device(device).index or 0)
    arch = os.environ.get("SCALED_ATTENTION_ARCH") or ("sm90" if props.major >= 9 else "sm80")
    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"SCALED_ATTENTION_ARCH={arch!r}: expected one of {sorted(SHARED_MEMORY_LIMIT)}")
    limit = getattr(props, "shared_memory_per_block_optin", SHARED_MEMORY_LIMIT[arch])
    return arch, min(limit, SHARED_MEMORY_LIMIT[arch])


def config_candidates(arch, limit, D, dtype):
    """The table's configurations for this case whose estimate fits `limit` bytes, best first."""
    Dp = sum(head_dim_split(D))
    return [c for c in CONFIGS[arch, min(dtype.itemsize, 4)][Dp]
            if shared_memory_estimate(c, Dp, dtype.itemsize) <= limit]


_FAILED_CONFIGS = set()  # (case, config) that did not compile or launch here
_FAILED_HOPPER = set()   # (device, dtype, D) where the Gluon kernel did not compile or launch


def first_that_launches(candidates, case, launch):
    """launch(config) for the first candidate that compiles and launches; one that runs out of
    shared memory or registers is remembered for `case` and the next, smaller one tried."""
    for config in candidates:
        if (case, config) in _FAILED_CONFIGS:
            continue
        try:
            return launch(config)
        except _LAUNCH_ERRORS:
            _FAILED_CONFIGS.add((case, config))
    raise RuntimeError(f"no attention JVP configuration compiles for {case}")


def attention_jvp_triton(q, k, v, t_q, t_k, t_v, out=None, config=None, tma=None):
    """(o, t_o) of softmax(q k^T / sqrt(D)) v along (t_q, t_k, t_v), one Triton pass.

    Tensors [B, H, L, D] of one dtype on one device, any strides with a unit last stride;
    a tangent may be None (zero). `out` optionally gives the (o, t_o) tensors to write;
    `config` (a `Config` or its fields) overrides the device's table; `tma` forces TMA loads of
    k, t_k, v, t_v on or off (default: as the configuration says, where `tma_usable`).
    On Hopper at D = 64 to 96 the warp-specialized Gluon kernel of `scaled.attention_hopper` runs
    instead, where it can (`hopper_kernel_usable`) and neither `config` nor `tma` is given.
    Under torch.compile the call is one custom operator (`torch.ops.scaled.attention_jvp`) that
    runs this function eagerly: Dynamo can trace neither the Gluon launch nor the TMA checks'
    data_ptr. CPU tensors run in Triton's interpreter.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape == (B, H, Lk, D) and v.shape == (B, H, Lk, D), "q, k, v must be [B, H, L, D]"
    assert D <= HEAD_DIM_MAX, f"head dim {D} > {HEAD_DIM_MAX}: use attention_math"
    t_q, t_k, t_v = (torch.zeros_like(x) if t is None else t.to(x.dtype).expand_as(x)
                     for x, t in ((q, t_q), (k, t_k), (v, t_v)))
    q, k, v, t_q, t_k, t_v = (x if x.stride(-1) == 1 else x.contiguous()
                              for x in (q, k, v, t_q, t_k, t_v))
    if torch.compiler.is_compiling():
        config = None if config is None else [int(x) for x in Config(*config)]
        o, t_o = torch.ops.scaled.attention_jvp(q, k, v, t_q, t_k, t_v, config, tma)
        if out is None:
            return o, t_o
        out[0].copy_(o)
        out[1].copy_(t_o)
        return tuple(out)
    if (config is None and tma is None
            and (q.device, q.dtype, D) not in _FAILED_HOPPER and hopper_kernel_usable(q, k, v, t_q, t_k, t_v, out)):
        try:
            return attention_hopper.attention_jvp(q, k, v, t_q, t_k, t_v, out)
        except Exception as e:  # Gluon is experimental: a Triton whose Gluon differs takes the Triton kernel
            _FAILED_HOPPER.add((q.device, q.dtype, D))
            warnings.warn(f"scaled.attention: the Gluon kernel failed ({type(e).__name__}: {e}); "
                          "using the Triton kernel")
    if out is None:
        out = [torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device) for _ in range(2)]
    launch = lambda config: _launch(q, k, v, t_q, t_k, t_v, *out, config, tma)
    if config is not None:
        launch(config)
    elif not q.is_cuda:  # the interpreter runs any configuration
        launch(Config(32, 32, 4, 1))
    else:
        first_that_launches(config_candidates(*device_arch(q.device), D, q.dtype), (q.device, q.dtype, D), launch)
    return tuple(out)


@torch.library.custom_op("scaled::attention_jvp", mutates_args=())
def _attention_jvp_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t_q: torch.Tensor, t_k: torch.Tensor,
                      t_v: torch.Tensor, config: Optional[List[int]], tma: Optional[bool]
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    if config is not None:
        config = Config(*config[:4], bool(config[4]))
    return attention_jvp_triton(q, k, v, t_q, t_k, t_v, config=config, tma=tma)


@_attention_jvp_op.register_fake
def _(q, k, v, t_q, t_k, t_v, config, tma):
    return q.new_empty(q.shape), q.new_empty(q.shape)


def has_tma(device=None):
    """Whether this Triton and this CUDA device can load by TMA (Hopper and later)."""
    return TensorDescriptor is not None and torch.cuda.get_device_capability(device)[0] >= 9


def tma_usable(*xs):
    """Whether these tensors can be read by TMA (`has_tma`): descriptors need 16-byte aligned
    bases and strides and a unit last stride; a broadcast (stride 0) tensor takes pointer loads."""
    return (xs[0].is_cuda and has_tma(xs[0].device)
            and all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0
                    and all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:3]) for x in xs))


def hopper_kernel_usable(q, k, v, t_q, t_k, t_v, out=None):
    """Whether the Gluon kernel of `scaled.attention_hopper` can compute this call: a case it
    supports, with all six tensors readable by TMA."""
    return attention_hopper.supports(q, k, out) and tma_usable(q, k, v, t_q, t_k, t_v)


def _launch(q, k, v, t_q, t_k, t_v, o, t_o, config, tma=None):
    """Launches the kernel; returns Triton's compiled kernel (None in the interpreter).
    tma: read k, t_k, v, t_v through TMA descriptors (default: config.tma, where `tma_usable`)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    BLOCK_M, BLOCK_N, num_warps, num_stages, config_tma = Config(*config)
    D0, D1 = head_dim_split(D)
    interpret = not q.is_cuda
    if tma is None:
        tma = config_tma and tma_usable(k, t_k, v, t_v)
    descriptors = [None] * 8
    if tma:
        descriptors[:4] = [TensorDescriptor.from_tensor(x, [1, 1, BLOCK_N, D0]) for x in (k, t_k, v, t_v)]
        if D1 > 0:
            descriptors[4:] = [TensorDescriptor.from_tensor(x, [1, 1, BLOCK_N, D1]) for x in (k, t_k, v, t_v)]
    if q.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpret else "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    strides = [s for x in (q, k, v, t_q, t_k, t_v, o, t_o) for s in x.stride()[:3]]
    align = 8  # the largest of 8, 4, 2, 1 that divides every stride
    for s in strides:
        while s % align:
            align //= 2
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    return _attention_jvp_kernel[grid](
        q, k, v, t_q, t_k, t_v, o, t_o, *descriptors, *[s // align for s in strides], H, Lq, Lk, D ** -0.5,
        D=D, D0=D0, D1=D1, MASK_D0=D0 > D, MASK_D1=D0 + D1 > D, ALIGN=align,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MASK_M=Lq % BLOCK_M != 0, MASK_N=Lk % BLOCK_N != 0,
        INPUT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages)


def kernel_supported(q, k, v):
    """Whether the Triton kernel can compute this call's JVP (else: math path)."""
    on_device = q.is_cuda or (INTERPRET_ON_CPU and q.device.type == "cpu")
    return (triton is not None and on_device and q.dim() == k.dim() == v.dim() == 4
            and 0 < q.shape[-1] <= HEAD_DIM_MAX and k.shape[-1] == q.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
            and k.shape[:2] == q.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and k.shape[2] > 0 and q.shape[2] > 0)


#----------------------------------------------------------------------------
# Autograd plumbing. The tangents travel into forward as extra inputs, so that forward, which
# runs on plain tensors under torch.func.jvp too, computes (o, t_o) in one launch; jvp only
# hands back the saved t_o. Reverse mode: through o by fused SDPA; through t_o (methods that
# train on the tangent, e.g. MeanFlow) by recomputing on the math path, with L x L memory.

class _AttentionJVP(torch.autograd.Function):

    @staticmethod
    def forward(q, k, v, t_q, t_k, t_v):
        return attention_jvp_triton(q, k, v, t_q, t_k, t_v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        o, t_o = output
        ctx.mark_non_differentiable(t_o)
        ctx.set_materialize_grads(False)  # jvp ignores its tangents: don't fill zeros for them
        ctx.save_for_forward(t_o, *inputs)
        ctx.save_for_backward(*inputs[:3])

    @staticmethod
    def jvp(ctx, *tangents):
        t_o, *inputs = ctx.saved_tensors
        if not torch.is_grad_enabled():  # nothing can differentiate t_o: spare the second Function's cost
            return t_o, None
        return _AttentionTangent.apply(t_o, *inputs), None

    @staticmethod
    def backward(ctx, grad_o, grad_t_o):
        if grad_o is None:
            return (None,) * 6
        _, sdpa_vjp = torch.func.vjp(F.scaled_dot_product_attention, *ctx.saved_tensors)
        return *sdpa_vjp(grad_o), None, None, None


class _AttentionTangent(torch.autograd.Function):
    """The kernel's t_o as a function of (q, k, v, t_q, t_k, t_v), for reverse mode through the
    tangent: forward hands t_o back, backward differentiates the math path's t_o."""

    @staticmethod
    def forward(t_o, q, k, v, t_q, t_k, t_v):
        return t_o

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad_t_o):
        _, math_vjp = torch.func.vjp(lambda *xs: attention_jvp_math(*xs)[1], *ctx.saved_tensors)
        return None, *math_vjp(grad_t_o)


def _plain(x):
    """x without torch.func's grad/jvp wrappers, or None if another transform (vmap) wraps it."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if not functorch.is_gradtrackingtensor(x):
            return None
        x = functorch.get_unwrapped(x)
    return x


def attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v, q [B, H, Lq, D], k and v [B, H, Lk, D].

    Fused SDPA normally; under forward-mode AD the Triton (o, t_o) kernel where it can run,
    else the math path.
    """
    tangents = [fwAD.unpack_dual(x).tangent for x in (q, k, v)]
    if all(t is None for t in tangents):
        return F.scaled_dot_product_attention(q, k, v)
    plain = [_plain(x) for x in [q, k, v] + [t for t in tangents if t is not None]]
    if all(x is not None for x in plain) and kernel_supported(*plain[:3]):
        t_q, t_k, t_v = (torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents))
        return _AttentionJVP.apply(q, k, v, t_q, t_k, t_v)[0]
    return attention_math(q, k, v)
