"""The attention JVP kernel of `scaled.attention` for Hopper (sm90) at head dims 64 to 96, in Gluon.

FlashAttention-3's structure (Shah et al. 2024) on the same equations as the Triton kernel in
scaled/attention.py (each key block centred on its own p-weighted mean, the value sums from
products with a tile of ones, t_o = (acc_t - r o) / lr):
- a producer partition (one warpgroup, 24 registers) loads (k, t_k) and (v, t_v) by TMA into
  rings of NUM_STAGES tiles, with full/empty mbarriers;
- two consumer warpgroups of 64 query rows each (240 registers) share those tiles and take turns
  issuing their products (ping-pong, through two mbarriers), so that one's softmax runs while
  the other's products occupy the tensor cores;
- within a warpgroup, block j's score products and block j-1's value products are issued
  together, and the value products run during block j's softmax;
- q stays in registers where registers allow (at D = 64 with t_q, at D <= 80 with its tail,
  not with a 32-column tail: they would spill), so the score products read less shared memory
  (about 2% faster each).
Everything a warpgroup issues in a block is waited for within the block: a loop-carried
register of a product in flight makes ptxas serialize every product (C7514).

A head dim D in (64, 96] is a 64-wide part and a tail of D1 = 16 or 32 columns with their own
tiles and products; TMA fills the tail's columns past D with zeros, which add nothing to the
scores and give output columns that are not stored (DiT-XL's D = 72 computes at 80, not 128).
At D = 128 a consumer would need more than its 240 registers at BLOCK_N = 64 (it spills), and at
BLOCK_N = 32 it is slower than the Triton kernel, so other head dims take the Triton kernel
(benchmarks/attention_jvp_notes.md, v9 to v11). Gluon has no CPU interpreter: the GPU tests
check this kernel against float64.
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

HEAD_DIM = 64       # the main part of every head dim; a tail of 16 or 32 columns adds up to 96
BLOCK_M = 128       # two consumer warpgroups of 64 rows
BLOCK_N = 64
NUM_STAGES = 2
CONSUMER_REGISTERS = 240
ONES_N = 8          # columns of the tile of ones whose products give the value sums (wgmma's narrowest)


def tail_width(D):
    """Columns of the tail tile for head dim D (0: none), None if this kernel does not take D."""
    if D == HEAD_DIM:
        return 0
    if HEAD_DIM < D <= HEAD_DIM + 32 and D % 8 == 0:  # TMA: rows of a multiple of 16 bytes
        return 16 if D <= HEAD_DIM + 16 else 32
    return None


def supports(q, k, out=None):
    """Whether this kernel computes the call, its tensors aside: Gluon present, a Hopper GPU
    (wgmma is sm90's), D = 64 or a multiple of 8 in (64, 96], 16-bit inputs, Lk a positive
    multiple of 64 and contiguous outputs. The tensors must also be readable by TMA
    (`scaled.attention.tma_usable`)."""
    if gluon is None or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    Lk = k.shape[2]
    return (tail_width(q.shape[-1]) is not None and q.dtype in (torch.float16, torch.bfloat16)
            and Lk >= BLOCK_N and Lk % BLOCK_N == 0
            and (out is None or all(o.is_contiguous() for o in out)))


def attention_jvp(q, k, v, t_q, t_k, t_v, out=None):
    """(o, t_o) for [B, H, L, D] 16-bit CUDA tensors that pass
    `scaled.attention.hopper_kernel_usable`."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    D1 = tail_width(D)
    dtype = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16

    def descriptors(width, xs, rows):
        layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, width], dtype)
        return [TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, rows, width], layout) for x in xs]
    main = descriptors(HEAD_DIM, (q, t_q), 64) + descriptors(HEAD_DIM, (k, t_k, v, t_v), BLOCK_N)
    tail = descriptors(D1, (q, t_q), 64) + descriptors(D1, (k, t_k, v, t_v), BLOCK_N) if D1 else main
    if out is None:
        out = [torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device) for _ in range(2)]
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    _attention_jvp_kernel[grid](*main, *tail, *out, H, Lq, Lk, D ** -0.5, D=D, D0=HEAD_DIM, D1=D1, BLOCK_N=BLOCK_N,
                                NS=NUM_STAGES, ONES_N=ONES_N, CONSUMER_REGS=CONSUMER_REGISTERS, num_warps=4)
    return tuple(out)


if gluon is not None:
    @gluon.jit
    def _load(x_desc, tx_desc, x1_desc, tx1_desc, b, h, row, bar, smem, smem1, i, D1: gl.constexpr):
        """A tile of x and of its tangent (and their tails) into smem.index(i), .index(i + 1) (and
        smem1's), completing bar."""
        tma.async_copy_global_to_shared(x_desc, [b, h, row, 0], bar, smem.index(i))
        tma.async_copy_global_to_shared(tx_desc, [b, h, row, 0], bar, smem.index(i + 1))
        if D1 > 0:
            tma.async_copy_global_to_shared(x1_desc, [b, h, row, x_desc.block_type.shape[3]], bar, smem1.index(i))
            tma.async_copy_global_to_shared(tx1_desc, [b, h, row, x_desc.block_type.shape[3]], bar,
                                            smem1.index(i + 1))

    @gluon.jit
    def _producer(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q1_desc, tq1_desc, k1_desc, tk1_desc, v1_desc,
                  tv1_desc, q_smem, k_smem, v_smem, q1_smem, k1_smem, v1_smem, q_bar, k_full, k_empty, v_full, v_empty,
                  b, h, m0, n_blocks, D1: gl.constexpr, BLOCK_N: gl.constexpr, NS: gl.constexpr):
        # Each ring stage holds a tensor's tile and its tangent's (indices 2 st, 2 st + 1) and has a
        # full barrier (TMA bytes landed) and an empty one (both consumers released it). The first
        # pass over a stage waits on the parity of the phase before the first, which a fresh
        # barrier counts as complete: hence `ph ^ 1`.
        q_bytes: gl.constexpr = q_desc.block_type.nbytes + (q1_desc.block_type.nbytes if D1 > 0 else 0)
        k_bytes: gl.constexpr = k_desc.block_type.nbytes + (k1_desc.block_type.nbytes if D1 > 0 else 0)
        mbarrier.expect(q_bar, 4 * q_bytes)
        for w in gl.static_range(2):
            _load(q_desc, tq_desc, q1_desc, tq1_desc, b, h, m0 + 64 * w, q_bar, q_smem, q1_smem, 2 * w, D1)
        for j in range(n_blocks):
            st = j % NS
            ph = (j // NS) & 1
            mbarrier.wait(k_empty.index(st), ph ^ 1)
            mbarrier.expect(k_full.index(st), 2 * k_bytes)
            _load(k_desc, tk_desc, k1_desc, tk1_desc, b, h, j * BLOCK_N, k_full.index(st), k_smem, k1_smem, 2 * st, D1)
            mbarrier.wait(v_empty.index(st), ph ^ 1)
            mbarrier.expect(v_full.index(st), 2 * k_bytes)
            _load(v_desc, tv_desc, v1_desc, tv1_desc, b, h, j * BLOCK_N, v_full.index(st), v_smem, v1_smem, 2 * st, D1)


    @gluon.jit
    def _round_pairs(x, dtype: gl.constexpr):
        """x rounded to the 16-bit dtype (to nearest even) by one cvt per pair of elements, the
        pairs the products take; `.to(dtype)` rounds one element at a time, and ptxas then spends
        a PRMT per pair putting the halves in order."""
        if dtype == gl.bfloat16:
            return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.bfloat16,
                                             is_pure=True, pack=2)
        else:
            return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=gl.float16,
                                             is_pure=True, pack=2)

    @gluon.jit
    def _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype: gl.constexpr):
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        l_blk = gl.sum(p, 1)
        c_new = gl.where(l_blk > 0, gl.sum(p * ts, 1) * scale / l_blk, c_i)
        delta = c_new - c_i
        p_lo = _round_pairs(p, dtype)
        pts_lo = _round_pairs(p * (ts * scale - c_new[:, None]), dtype)
        return m_new, c_new, alpha, delta, p_lo, pts_lo


    @gluon.jit
    def _tile(smem, i):
        """Tile i of a ring or of the q buffer as a matrix."""
        shape: gl.constexpr = smem.shape
        return smem.index(i).reshape([shape[3], shape[4]])

    @gluon.jit
    def _issue_scores(q, tq, q1, tq1, k_smem, k1_smem, ki, zero_s, D1: gl.constexpr):
        """s = q k^T and t_s = t_q k^T + q t_k^T (unscaled) of one key block, tails included,
        issued, not waited for (q, t_q: shared-memory tiles or A-operand registers)."""
        kT = _tile(k_smem, ki).permute((1, 0))
        s = warpgroup_mma(q, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(tq, kT, zero_s, use_acc=False, is_async=True)
        ts = warpgroup_mma(q, _tile(k_smem, ki + 1).permute((1, 0)), ts, is_async=True)
        if D1 > 0:
            k1T = _tile(k1_smem, ki).permute((1, 0))
            s = warpgroup_mma(q1, k1T, s, is_async=True)
            ts = warpgroup_mma(tq1, k1T, ts, is_async=True)
            ts = warpgroup_mma(q1, _tile(k1_smem, ki + 1).permute((1, 0)), ts, is_async=True)
        return s, ts

    @gluon.jit
    def _as_operands(p_lo, pts_lo, p_ol: gl.constexpr, p_1l: gl.constexpr, p_rl: gl.constexpr):
        """The 16-bit weights as A operands of the value products, the tail's and the value sums
        (one register layout: wgmma's A fragment does not depend on N, so these are no-ops)."""
        return (gl.convert_layout(p_lo, p_ol), gl.convert_layout(pts_lo, p_ol),
                gl.convert_layout(p_lo, p_1l), gl.convert_layout(pts_lo, p_1l),
                gl.convert_layout(p_lo, p_rl), gl.convert_layout(pts_lo, p_rl))

    @gluon.jit
    def _issue_pv(ps, v_smem, v1_smem, vi, ones_smem, acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, D1: gl.constexpr):
        """The value products of one key block (ps: `_as_operands`), issued, not waited for."""
        p_o, pts_o, p_1, pts_1, p_r, pts_r = ps
        v = _tile(v_smem, vi)
        acc_o = warpgroup_mma(p_o, v, acc_o, is_async=True)
        acc_t = warpgroup_mma(p_o, _tile(v_smem, vi + 1), acc_t, is_async=True)
        acc_t = warpgroup_mma(pts_o, v, acc_t, is_async=True)
        if D1 > 0:
            v1 = _tile(v1_smem, vi)
            acc_o1 = warpgroup_mma(p_1, v1, acc_o1, is_async=True)
            acc_t1 = warpgroup_mma(p_1, _tile(v1_smem, vi + 1), acc_t1, is_async=True)
            acc_t1 = warpgroup_mma(pts_1, v1, acc_t1, is_async=True)
        acc_lr = warpgroup_mma(p_r, ones_smem, acc_lr, is_async=True)
        acc_r = warpgroup_mma(pts_r, ones_smem, acc_r, is_async=True)
        return acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r

    @gluon.jit
    def _wait_pv(acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, ps):
        """Waits for the value products; their operands stay live until then."""
        p_o, pts_o, p_1, pts_1, p_r, pts_r = ps
        acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, p_o, pts_o, p_1, pts_1, p_r, pts_r = warpgroup_mma_wait(
            0, deps=(acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, p_o, pts_o, p_1, pts_1, p_r, pts_r))
        return acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, (p_o, pts_o, p_1, pts_1, p_r, pts_r)

    @gluon.jit
    def _rescale(acc_o, acc_t, alpha, delta):
        """The running sums after the centre moved by delta and the maximum by log2(alpha)."""
        alpha = gl.convert_layout(alpha, gl.SliceLayout(1, acc_o.type.layout))[:, None]
        delta = gl.convert_layout(delta, gl.SliceLayout(1, acc_o.type.layout))[:, None]
        return acc_o * alpha, (acc_t - delta * acc_o) * alpha

    @gluon.jit
    def _store(O, TO, acc_o, acc_t, lr, r, o_row, offs_m, Lq, col0, D: gl.constexpr):
        """o = acc_o / lr and t_o = (acc_t - r o) / lr into columns col0... (those < D) of rows
        offs_m (those < Lq)."""
        layout: gl.constexpr = acc_o.type.layout
        rows: gl.constexpr = gl.SliceLayout(1, layout)
        lr = gl.convert_layout(lr, rows)[:, None]
        o = acc_o / lr
        t_o = (acc_t - gl.convert_layout(r, rows)[:, None] * o) / lr
        offs_m = gl.convert_layout(offs_m, rows)
        offs_d = col0 + gl.arange(0, acc_o.shape[1], gl.SliceLayout(0, layout))
        ptrs = (o_row + offs_m.to(gl.int64))[:, None] * D + offs_d[None, :]
        mask = (offs_m < Lq)[:, None] & (offs_d < D)[None, :]
        gl.store(O + ptrs, o.to(O.dtype.element_ty), mask=mask)
        gl.store(TO + ptrs, t_o.to(TO.dtype.element_ty), mask=mask)


    @gluon.jit
    def _consumer(W: gl.constexpr, q_smem, k_smem, v_smem, q1_smem, k1_smem, v1_smem, ones_smem, q_bar, k_full, k_empty,
                  v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D: gl.constexpr, D0: gl.constexpr,
                  D1: gl.constexpr, BLOCK_N: gl.constexpr, NS: gl.constexpr, ONES_N: gl.constexpr):
        dtype: gl.constexpr = q_smem.dtype
        # wgmma accumulators of one warpgroup (64 rows): scores [64, BLOCK_N], values [64, D0] and
        # [64, D1] (the tail), value sums [64, ONES_N]
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D0, 16])
        o1_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, max(D1, 16), 16])
        r_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, ONES_N, 16])
        p_ol: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        p_1l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o1_layout, k_width=2)
        p_rl: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=r_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        # wgmma groups issued after a block's score products: its predecessor's value products
        N_PV: gl.constexpr = 8 if D1 > 0 else 5
        qk_scale = scale * 1.4426950408889634
        zero_s = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
        m_i = gl.full([64], float("-inf"), gl.float32, rows_s)
        c_i = gl.zeros([64], gl.float32, rows_s)
        acc_o = gl.zeros([64, D0], gl.float32, o_layout)
        acc_t = gl.zeros([64, D0], gl.float32, o_layout)
        acc_o1 = gl.zeros([64, max(D1, 16)], gl.float32, o1_layout)  # unused if D1 = 0
        acc_t1 = gl.zeros([64, max(D1, 16)], gl.float32, o1_layout)
        acc_lr = gl.zeros([64, ONES_N], gl.float32, r_layout)
        acc_r = gl.zeros([64, ONES_N], gl.float32, r_layout)
        mbarrier.wait(q_bar, 0)
        q = _tile(q_smem, 2 * W)
        tq = _tile(q_smem, 2 * W + 1)
        q1 = _tile(q1_smem, 2 * W)
        tq1 = _tile(q1_smem, 2 * W + 1)
        # register operands where they fit (module docstring)
        q_rl: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
        if D1 <= 16:
            q = q.load(q_rl)
        if D1 == 0:
            tq = tq.load(q_rl)
        if D1 == 16:
            q1 = q1.load(q_rl)
        # turn.index(W) completes when this warpgroup may issue its next products; it hands the
        # turn to the other one as soon as they are issued (ping-pong). Warpgroup 0 starts.

        # block 0: scores, softmax (no value products yet)
        mbarrier.wait(k_full.index(0), 0)
        mbarrier.wait(turn.index(W), 0)
        s, ts = _issue_scores(q, tq, q1, tq1, k_smem, k1_smem, 0, zero_s, D1)
        mbarrier.arrive(turn.index(1 - W), count=1)
        s, ts = warpgroup_mma_wait(0, deps=(s, ts))
        mbarrier.arrive(k_empty.index(0), count=1)
        m_i, c_i, alpha, delta, p_lo, pts_lo = _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype)
        ps = _as_operands(p_lo, pts_lo, p_ol, p_1l, p_rl)

        for j in range(1, n_blocks):
            st = j % NS
            ph = (j // NS) & 1
            pst = (j - 1) % NS
            pph = ((j - 1) // NS) & 1
            mbarrier.wait(k_full.index(st), ph)
            mbarrier.wait(v_full.index(pst), pph)
            mbarrier.wait(turn.index(W), j & 1)
            s, ts = _issue_scores(q, tq, q1, tq1, k_smem, k1_smem, 2 * st, zero_s, D1)
            acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r = _issue_pv(ps, v_smem, v1_smem, 2 * pst, ones_smem, acc_o,
                                                                    acc_t, acc_o1, acc_t1, acc_lr, acc_r, D1)
            mbarrier.arrive(turn.index(1 - W), count=1)
            s, ts = warpgroup_mma_wait(N_PV, deps=(s, ts))
            mbarrier.arrive(k_empty.index(st), count=1)
            m_i, c_i, alpha, delta, p_lo, pts_lo = _softmax(s, ts, m_i, c_i, scale, qk_scale, dtype)
            acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, ps = _wait_pv(acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, ps)
            mbarrier.arrive(v_empty.index(pst), count=1)
            acc_o, acc_t = _rescale(acc_o, acc_t, alpha, delta)
            if D1 > 0:
                acc_o1, acc_t1 = _rescale(acc_o1, acc_t1, alpha, delta)
            acc_lr, acc_r = _rescale(acc_lr, acc_r, alpha, delta)
            ps = _as_operands(p_lo, pts_lo, p_ol, p_1l, p_rl)

        # the last block's value products (the accumulators were rescaled for it above)
        pst = (n_blocks - 1) % NS
        mbarrier.wait(v_full.index(pst), ((n_blocks - 1) // NS) & 1)
        acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r = _issue_pv(ps, v_smem, v1_smem, 2 * pst, ones_smem, acc_o, acc_t,
                                                                acc_o1, acc_t1, acc_lr, acc_r, D1)
        acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, ps = _wait_pv(acc_o, acc_t, acc_o1, acc_t1, acc_lr, acc_r, ps)
        mbarrier.arrive(v_empty.index(pst), count=1)

        lr = gl.max(acc_lr, 1)
        r = gl.max(acc_r, 1)
        offs_m = m0 + 64 * W + gl.arange(0, 64, gl.SliceLayout(1, r_layout))
        _store(O, TO, acc_o, acc_t, lr, r, o_row, offs_m, Lq, 0, D)
        if D1 > 0:
            _store(O, TO, acc_o1, acc_t1, lr, r, o_row, offs_m, Lq, D0, D)


    @gluon.jit
    def _attention_jvp_kernel(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q1_desc, tq1_desc, k1_desc, tk1_desc,
                              v1_desc, tv1_desc, O, TO, H, Lq, Lk, scale, D: gl.constexpr, D0: gl.constexpr,
                              D1: gl.constexpr, BLOCK_N: gl.constexpr, NS: gl.constexpr, ONES_N: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        num_m = gl.cdiv(Lq, 128)
        pid_m = gl.program_id(0) % num_m
        pid_bh = gl.program_id(0) // num_m
        b = pid_bh // H
        h = pid_bh % H
        m0 = pid_m * 128
        o_row = pid_bh.to(gl.int64) * Lq
        n_blocks = Lk // BLOCK_N
        # q and t_q of both consumers (q, t_q of warpgroup w at 2 w, 2 w + 1); rings of (k, t_k)
        # and (v, t_v) tiles (stage st at 2 st, 2 st + 1); the same for the tails
        q_smem = gl.allocate_shared_memory(dtype, [4, 1, 1, 64, D0], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [2 * NS, 1, 1, BLOCK_N, D0], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2 * NS, 1, 1, BLOCK_N, D0], k_desc.layout)
        if D1 > 0:
            q1_smem = gl.allocate_shared_memory(dtype, [4, 1, 1, 64, D1], q1_desc.layout)
            k1_smem = gl.allocate_shared_memory(dtype, [2 * NS, 1, 1, BLOCK_N, D1], k1_desc.layout)
            v1_smem = gl.allocate_shared_memory(dtype, [2 * NS, 1, 1, BLOCK_N, D1], k1_desc.layout)
        else:
            q1_smem, k1_smem, v1_smem = q_smem, k_smem, v_smem  # unused
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, ONES_N], dtype)
        blocked: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
        ones_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, ONES_N], ones_layout,
                                              gl.full([BLOCK_N, ONES_N], 1.0, dtype, blocked))
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
            (_producer, (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q1_desc, tq1_desc, k1_desc, tk1_desc,
                         v1_desc, tv1_desc, q_smem, k_smem, v_smem, q1_smem, k1_smem, v1_smem, q_bar, k_full, k_empty,
                         v_full, v_empty, b, h, m0, n_blocks, D1, BLOCK_N, NS)),
            (_consumer, (0, q_smem, k_smem, v_smem, q1_smem, k1_smem, v1_smem, ones_smem, q_bar, k_full, k_empty,
                         v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D, D0, D1, BLOCK_N, NS,
                         ONES_N)),
            (_consumer, (1, q_smem, k_smem, v_smem, q1_smem, k1_smem, v1_smem, ones_smem, q_bar, k_full, k_empty,
                         v_full, v_empty, turn, O, TO, o_row, Lq, m0, n_blocks, scale, D, D0, D1, BLOCK_N, NS,
                         ONES_N)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
