"""The attention JVP kernel of `scaled.attention` for Hopper (sm90) at head dim 64, in Gluon.

FlashAttention-3's structure (Shah et al. 2024) on the same equations as the Triton kernel in
scaled/attention.py (each key block centred on its own p-weighted mean, the value sums from
products with a tile of ones, t_o = (acc_t - r o) / lr):
- a producer partition (one warpgroup, 24 registers) loads (k, t_k) and (v, t_v) by TMA into
  rings of NUM_STAGES tiles, with full/empty mbarriers;
- two consumer warpgroups of 64 query rows each (240 registers) share those tiles and take turns
  issuing their products (ping-pong, through two mbarriers), so that one's softmax runs while
  the other's products occupy the tensor cores;
- within a warpgroup, block j's score products and block j-1's value products are issued
  together, and the value products run during block j's softmax.
Everything a warpgroup issues in a block is waited for within the block: a loop-carried
register of a product in flight makes ptxas serialize every product (C7514).

At D = 64 it runs 4-11% faster than the Triton kernel on an H100 (benchmarks/attention_jvp_notes.md,
v9). At D = 128 a consumer would need about 300 registers at BLOCK_N = 64, and at BLOCK_N = 32 it
is slower than the Triton kernel, so other head dims take the Triton kernel. Gluon has no CPU
interpreter: the GPU tests check this kernel against float64.
"""
import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (
        tma, mbarrier, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)
except ImportError:  # no Triton, or a Triton without Gluon (before 3.5): the Triton kernel serves
    gluon = None

HEAD_DIM = 64
BLOCK_M = 128       # two consumer warpgroups of 64 rows
BLOCK_N = 64
NUM_STAGES = 2
CONSUMER_REGISTERS = 240


def supports(q, k, out=None):
    """Whether this kernel computes the call, its tensors aside: Gluon present, a Hopper GPU
    (wgmma is sm90's), D = 64, 16-bit inputs, Lk a positive multiple of 64 and contiguous
    outputs. The tensors must also be readable by TMA (`scaled.attention.tma_usable`)."""
    if gluon is None or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    Lk = k.shape[2]
    return (q.shape[-1] == HEAD_DIM and q.dtype in (torch.float16, torch.bfloat16)
            and Lk >= BLOCK_N and Lk % BLOCK_N == 0
            and (out is None or all(o.is_contiguous() for o in out)))


def attention_jvp(q, k, v, t_q, t_k, t_v, out=None):
    """(o, t_o) for [B, H, L, 64] 16-bit CUDA tensors that pass
    `scaled.attention.hopper_kernel_usable`."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    q_layout = gl.NVMMASharedLayout.get_default_for([1, 1, 64, D], dtype)
    k_layout = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, D], dtype)
    descriptors = [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, 64, D], q_layout) for x in (q, t_q)]
    descriptors += [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, BLOCK_N, D], k_layout)
                    for x in (k, t_k, v, t_v)]
    if out is None:
        out = [torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device) for _ in range(2)]
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    _attention_jvp_kernel[grid](*descriptors, *out, H, Lq, Lk, D ** -0.5, D=D, BLOCK_N=BLOCK_N, NS=NUM_STAGES,
                                CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return tuple(out)


if gluon is not None:
    @gluon.jit
    def _producer(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem,
                  q_bar, k_full, k_empty, v_full, v_empty, b, h, m0, n_blocks, BLOCK_N: gl.constexpr,
                  NS: gl.constexpr):
        # Each ring stage has a full barrier (TMA bytes landed) and an empty one (both consumers
        # released it). The first pass over a stage waits on the parity of the phase before
        # the first, which a fresh barrier counts as complete: hence `ph ^ 1`.
        mbarrier.expect(q_bar, 4 * q_desc.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [b, h, m0 + 64 * w, 0], q_bar, q_smem.index(w))
            tma.async_copy_global_to_shared(tq_desc, [b, h, m0 + 64 * w, 0], q_bar, tq_smem.index(w))
        for j in range(n_blocks):
            st = j % NS
            ph = (j // NS) & 1
            n0 = j * BLOCK_N
            mbarrier.wait(k_empty.index(st), ph ^ 1)
            mbarrier.expect(k_full.index(st), 2 * k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, h, n0, 0], k_full.index(st), k_smem.index(st))
            tma.async_copy_global_to_shared(tk_desc, [b, h, n0, 0], k_full.index(st), tk_smem.index(st))
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            mbarrier.expect(v_full.index(st), 2 * v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, h, n0, 0], v_full.index(st), v_smem.index(st))
            tma.async_copy_global_to_shared(tv_desc, [b, h, n0, 0], v_full.index(st), tv_smem.index(st))


    @gluon.jit
    def _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype: gl.constexpr):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_blk = gl.sum(p, 1)
        c_new = gl.where(l_blk > 0, gl.sum(p * ts, 1) * scale / l_blk, c_i)
        delta = c_new - c_i
        p_lo = p.to(dtype)
        pts_lo = (p * (ts * scale - c_new[:, None])).to(dtype)
        return m_new, c_new, alpha, delta, p_lo, pts_lo


    @gluon.jit
    def _issue_scores(q, tq, k, tk, zero_s):
        """s = q k^T and t_s = t_q k^T + q t_k^T (unscaled) of one key block, issued, not waited for."""
        kT = k.permute((1, 0))
        s = warpgroup_mma(q, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(tq, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(q, tk.permute((1, 0)), ts, is_async=True)
        return s, ts

    @gluon.jit
    def _as_operands(p_lo, pts_lo, p_ol: gl.constexpr, p_rl: gl.constexpr):
        """The 16-bit weights as A operands of the value products and of the value sums."""
        return (gl.convert_layout(p_lo, p_ol), gl.convert_layout(pts_lo, p_ol),
                gl.convert_layout(p_lo, p_rl), gl.convert_layout(pts_lo, p_rl))

    @gluon.jit
    def _issue_pv(p_o, pts_o, p_r, pts_r, v, tv, ones_smem, acc_o, acc_t, acc_lr, acc_r):
        acc_o = warpgroup_mma(p_o, v, acc_o, is_async=True)
        acc_t = warpgroup_mma(p_o, tv, acc_t, is_async=True)
        acc_t = warpgroup_mma(pts_o, v, acc_t, is_async=True)
        acc_lr = warpgroup_mma(p_r, ones_smem, acc_lr, is_async=True)
        acc_r = warpgroup_mma(pts_r, ones_smem, acc_r, is_async=True)
        return acc_o, acc_t, acc_lr, acc_r


    @gluon.jit
    def _consumer(W: gl.constexpr, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ones_smem, q_bar, k_full, k_empty,
                  v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D: gl.constexpr, BLOCK_N: gl.constexpr,
                  NS: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        # wgmma accumulators of one warpgroup (64 rows): scores [64, BLOCK_N], values [64, D], value sums [64, 16]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, 16])
        r_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, 16, 16])
        p_ol: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        p_rl: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=r_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        rows_r: gl.constexpr = gl.SliceLayout(1, r_layout)
        qk_scale = scale * 1.4426950408889634
        q = q_smem.index(W).reshape([64, D])
        tq = tq_smem.index(W).reshape([64, D])
        zero_s = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([64], float("-inf"), gl.float32, rows_s)
        c_i = gl.zeros([64], gl.float32, rows_s)
        acc_o = gl.zeros([64, D], gl.float32, o_layout)
        acc_t = gl.zeros([64, D], gl.float32, o_layout)
        acc_lr = gl.zeros([64, 16], gl.float32, r_layout)
        acc_r = gl.zeros([64, 16], gl.float32, r_layout)
        mbarrier.wait(q_bar, 0)
        # turn.index(W) completes when this warpgroup may issue its next products; it hands the
        # turn to the other one as soon as they are issued (ping-pong). Warpgroup 0 starts.

        # block 0: scores, softmax (no value products yet)
        mbarrier.wait(k_full.index(0), 0)
        mbarrier.wait(turn.index(W), 0)
        s, ts = _issue_scores(q, tq, k_smem.index(0).reshape([BLOCK_N, D]), tk_smem.index(0).reshape([BLOCK_N, D]),
                              zero_s)
        mbarrier.arrive(turn.index(1 - W), count=1)
        s, ts = warpgroup_mma_wait(0, deps=(s, ts))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i, c_i, alpha, delta, p_lo, pts_lo = _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype)
        p_o, pts_o, p_r, pts_r = _as_operands(p_lo, pts_lo, p_ol, p_rl)

        for j in range(1, n_blocks):
            st = j % NS
            ph = (j // NS) & 1
            pst = (j - 1) % NS
            pph = ((j - 1) // NS) & 1
            mbarrier.wait(k_full.index(st), ph)
            mbarrier.wait(v_full.index(pst), pph)
            mbarrier.wait(turn.index(W), j & 1)
            s, ts = _issue_scores(q, tq, k_smem.index(st).reshape([BLOCK_N, D]),
                                  tk_smem.index(st).reshape([BLOCK_N, D]), zero_s)
            acc_o, acc_t, acc_lr, acc_r = _issue_pv(p_o, pts_o, p_r, pts_r, v_smem.index(pst).reshape([BLOCK_N, D]),
                                                    tv_smem.index(pst).reshape([BLOCK_N, D]), ones_smem,
                                                    acc_o, acc_t, acc_lr, acc_r)
            mbarrier.arrive(turn.index(1 - W), count=1)
            s, ts = warpgroup_mma_wait(5, deps=(s, ts))
            mbarrier.arrive(k_empty.index(st), count=1)
            m_i, c_i, alpha, delta, p_lo, pts_lo = _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype)
            acc_o, acc_t, acc_lr, acc_r, p_o, pts_o, p_r, pts_r = warpgroup_mma_wait(
                0, deps=(acc_o, acc_t, acc_lr, acc_r, p_o, pts_o, p_r, pts_r))
            mbarrier.arrive(v_empty.index(pst), count=1)
            alpha_o = gl.convert_layout(alpha, rows_o)
            delta_o = gl.convert_layout(delta, rows_o)
            acc_t = (acc_t - delta_o[:, None] * acc_o) * alpha_o[:, None]
            acc_o = acc_o * alpha_o[:, None]
            alpha_r = gl.convert_layout(alpha, rows_r)
            delta_r = gl.convert_layout(delta, rows_r)
            acc_r = (acc_r - delta_r[:, None] * acc_lr) * alpha_r[:, None]
            acc_lr = acc_lr * alpha_r[:, None]
            p_o, pts_o, p_r, pts_r = _as_operands(p_lo, pts_lo, p_ol, p_rl)

        # the last block's value products (the accumulators were rescaled for it above)
        pst = (n_blocks - 1) % NS
        mbarrier.wait(v_full.index(pst), ((n_blocks - 1) // NS) & 1)
        acc_o, acc_t, acc_lr, acc_r = _issue_pv(p_o, pts_o, p_r, pts_r, v_smem.index(pst).reshape([BLOCK_N, D]),
                                                tv_smem.index(pst).reshape([BLOCK_N, D]), ones_smem,
                                                acc_o, acc_t, acc_lr, acc_r)
        acc_o, acc_t, acc_lr, acc_r, p_o, pts_o, p_r, pts_r = warpgroup_mma_wait(
            0, deps=(acc_o, acc_t, acc_lr, acc_r, p_o, pts_o, p_r, pts_r))
        mbarrier.arrive(v_empty.index(pst), count=1)

        lr = gl.convert_layout(gl.max(acc_lr, 1), rows_o)
        r = gl.convert_layout(gl.max(acc_r, 1), rows_o)
        o = acc_o / lr[:, None]
        t_o = (acc_t - r[:, None] * o) / lr[:, None]
        offs_m = m0 + 64 * W + gl.arange(0, 64, rows_o)
        offs_d = gl.arange(0, D, gl.SliceLayout(0, o_layout))
        ptrs = (o_row + offs_m.to(gl.int64))[:, None] * D + offs_d[None, :]
        mask = (offs_m < Lq)[:, None]
        gl.store(O + ptrs, o.to(dtype), mask=mask)
        gl.store(TO + ptrs, t_o.to(dtype), mask=mask)


    @gluon.jit
    def _attention_jvp_kernel(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, O, TO, H, Lq, Lk, scale,
                          D: gl.constexpr, BLOCK_N: gl.constexpr, NS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        num_m = gl.cdiv(Lq, 128)
        pid_m = gl.program_id(0) % num_m
        pid_bh = gl.program_id(0) // num_m
        b = pid_bh // H
        h = pid_bh % H
        m0 = pid_m * 128
        o_row = pid_bh.to(gl.int64) * Lq
        n_blocks = Lk // BLOCK_N
        q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, 64, D], q_desc.layout)
        tq_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, 64, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NS, 1, 1, BLOCK_N, D], k_desc.layout)
        tk_smem = gl.allocate_shared_memory(dtype, [NS, 1, 1, BLOCK_N, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NS, 1, 1, BLOCK_N, D], k_desc.layout)
        tv_smem = gl.allocate_shared_memory(dtype, [NS, 1, 1, BLOCK_N, D], k_desc.layout)
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], dtype)
        blocked: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
        ones_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, 16], ones_layout,
                                              gl.full([BLOCK_N, 16], 1.0, dtype, blocked))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_full = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        v_full = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [NS, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NS):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)
            mbarrier.init(v_empty.index(i), count=2)
        mbarrier.init(turn.index(0), count=1)
        mbarrier.init(turn.index(1), count=1)
        mbarrier.arrive(turn.index(0), count=1)  # warpgroup 0 goes first
        fence_async_shared()
        gl.warp_specialize([
            (_producer, (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_smem, tq_smem, k_smem, tk_smem, v_smem,
                         tv_smem, q_bar, k_full, k_empty, v_full, v_empty, b, h, m0, n_blocks, BLOCK_N, NS)),
            (_consumer, (0, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ones_smem, q_bar, k_full, k_empty,
                         v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D, BLOCK_N, NS)),
            (_consumer, (1, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ones_smem, q_bar, k_full, k_empty,
                         v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D, BLOCK_N, NS)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
