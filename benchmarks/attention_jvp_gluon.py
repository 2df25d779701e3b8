"""Experiment (removed in the next commit): the attention JVP as a Gluon kernel for Hopper.

Block j+1's score products are issued before block j's softmax and run on the tensor cores while
it runs; block j's value products follow; everything is waited for at the end of the block, so
that no loop-carried register belongs to a product in flight (an earlier version kept block j's
value products in flight across the loop's back edge, and ptxas serialized every wgmma: C7514).
One warpgroup per 64 query rows (BLOCK_M = 64, 4 warps) or two (128, 8 warps); TMA rings of two
stages for (k, t_k) and (v, t_v); Lq % BLOCK_M == 0, Lk % BLOCK_N == 0, D in {64, 128}, 16-bit.
Same centring and value sums as scaled/attention.py (v8); its errors equal the Triton kernel's.

H100, L = 4096, bf16, 16 heads, 32M elements per tensor (python benchmarks/attention_jvp_gluon.py):
D = 64, BLOCK_N = 64: 3.73 ms (BLOCK_M = 64; 3.81 with every product waited for at once) and
4.14 ms (BLOCK_M = 128), against 3.32 ms for the Triton kernel's (128, 128, 8, 2, TMA) in the same run and 3.85
for its own (64, 64, 4, 2, TMA) in the v8 sweep (another run); D = 128, BLOCK_N = 32: 3.66 ms and 4.25 ms against 3.18.
Larger tiles run out of registers (BLOCK_N = 128 at D = 64 and 64 at D = 128 spill, and ptxas
serializes the products again: C7511/C7512).
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import tma, mbarrier, fence_async_shared, warpgroup_mma, \
    warpgroup_mma_wait


@gluon.jit
def _load_k(k_desc, tk_desc, k_smem, tk_smem, k_bars, row, block):
    st = block % 2
    bar = k_bars.index(st)
    mbarrier.expect(bar, 2 * k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_smem.index(st))
    tma.async_copy_global_to_shared(tk_desc, [row, 0], bar, tk_smem.index(st))


@gluon.jit
def _load_v(v_desc, tv_desc, v_smem, tv_smem, v_bars, row, block):
    st = block % 2
    bar = v_bars.index(st)
    mbarrier.expect(bar, 2 * v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_smem.index(st))
    tma.async_copy_global_to_shared(tv_desc, [row, 0], bar, tv_smem.index(st))


@gluon.jit
def _issue_scores(q_smem, tq_smem, k_smem, tk_smem, k_bars, block, s_layout: gl.constexpr, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr):
    st = block % 2
    mbarrier.wait(k_bars.index(st), (block // 2) % 2)
    kT = k_smem.index(st).permute((1, 0))
    tkT = tk_smem.index(st).permute((1, 0))
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, kT, zero, use_acc=False, is_async=True)
    ts = warpgroup_mma(tq_smem, kT, zero, use_acc=False, is_async=True)
    ts = warpgroup_mma(q_smem, tkT, ts, is_async=True)
    return s, ts


@gluon.jit
def _block(state, j, n_blocks, kv_row, scale, qk_scale, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem, ones_smem,
           k_bars, v_bars, k_desc, tk_desc, v_desc, tv_desc, s_layout: gl.constexpr, o_layout: gl.constexpr,
           r_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HAS_NEXT: gl.constexpr,
           SERIAL: gl.constexpr):
    # Enters with block j's scores done and nothing in flight; leaves the same way for block j+1,
    # so that no loop-carried register belongs to a product in flight (ptxas would serialize).
    m_i, c_i, acc_o, acc_t, acc_lr, acc_r, s, ts = state
    dtype: gl.constexpr = q_smem.dtype
    p_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    p_r: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=r_layout, k_width=2)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows_r: gl.constexpr = gl.SliceLayout(1, r_layout)
    # block j+1's scores, on the tensor cores while this block's softmax runs
    if j >= 1:
        if j + 1 < n_blocks:
            _load_v(v_desc, tv_desc, v_smem, tv_smem, v_bars, kv_row + (j + 1) * BLOCK_N, j + 1)
    if HAS_NEXT:
        s_next, ts_next = _issue_scores(q_smem, tq_smem, k_smem, tk_smem, k_bars, j + 1, s_layout, BLOCK_M, BLOCK_N)
        if SERIAL:
            s_next, ts_next = warpgroup_mma_wait(0, deps=(s_next, ts_next))
    if j + 2 < n_blocks:
        _load_k(k_desc, tk_desc, k_smem, tk_smem, k_bars, kv_row + (j + 2) * BLOCK_N, j + 2)
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    l_blk = gl.sum(p, 1)
    c_new = gl.where(l_blk > 0, gl.sum(p * ts, 1) * scale / l_blk, c_i)
    delta = c_new - c_i
    p_lo = p.to(dtype)
    pts_lo = (p * (ts * scale - c_new[:, None])).to(dtype)
    alpha_o = gl.convert_layout(alpha, rows_o)
    delta_o = gl.convert_layout(delta, rows_o)
    acc_t = (acc_t - delta_o[:, None] * acc_o) * alpha_o[:, None]
    acc_o = acc_o * alpha_o[:, None]
    alpha_r = gl.convert_layout(alpha, rows_r)
    delta_r = gl.convert_layout(delta, rows_r)
    acc_r = (acc_r - delta_r[:, None] * acc_lr) * alpha_r[:, None]
    acc_lr = acc_lr * alpha_r[:, None]
    # block j's value products
    st = j % 2
    mbarrier.wait(v_bars.index(st), (j // 2) % 2)
    p_op = gl.convert_layout(p_lo, p_o)
    pts_op = gl.convert_layout(pts_lo, p_o)
    p_opr = gl.convert_layout(p_lo, p_r)
    pts_opr = gl.convert_layout(pts_lo, p_r)
    acc_o = warpgroup_mma(p_op, v_smem.index(st), acc_o, is_async=True)
    acc_t = warpgroup_mma(p_op, tv_smem.index(st), acc_t, is_async=True)
    acc_t = warpgroup_mma(pts_op, v_smem.index(st), acc_t, is_async=True)
    acc_lr = warpgroup_mma(p_opr, ones_smem, acc_lr, is_async=True)
    acc_r = warpgroup_mma(pts_opr, ones_smem, acc_r, is_async=True)
    if HAS_NEXT:
        acc_o, acc_t, acc_lr, acc_r, s, ts, p_op, pts_op, p_opr, pts_opr = warpgroup_mma_wait(
            0, deps=(acc_o, acc_t, acc_lr, acc_r, s_next, ts_next, p_op, pts_op, p_opr, pts_opr))
    else:
        acc_o, acc_t, acc_lr, acc_r, p_op, pts_op, p_opr, pts_opr = warpgroup_mma_wait(
            0, deps=(acc_o, acc_t, acc_lr, acc_r, p_op, pts_op, p_opr, pts_opr))
    return m_new, c_new, acc_o, acc_t, acc_lr, acc_r, s, ts


@gluon.jit
def _attention_jvp_gluon(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, O, TO, Lq, Lk, scale,
                         D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SERIAL: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    q_row = pid_bh * Lq + pid_m * BLOCK_M
    kv_row = pid_bh * Lk
    n_blocks = Lk // BLOCK_N

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1], instr_shape=[16, D, 16])
    r_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[BLOCK_M // 16, 1], instr_shape=[16, 16, 16])
    p_o: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    p_r: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=r_layout, k_width=2)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows_r: gl.constexpr = gl.SliceLayout(1, r_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    tq_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], k_desc.layout)
    tk_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], k_desc.layout)
    tv_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D], k_desc.layout)
    ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], dtype)
    blocked: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [BLOCK_M // 16, 1], [1, 0])
    ones_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, 16], ones_layout,
                                          gl.full([BLOCK_N, 16], 1.0, dtype, blocked))
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    tma.async_copy_global_to_shared(tq_desc, [q_row, 0], q_bar, tq_smem)
    _load_k(k_desc, tk_desc, k_smem, tk_smem, k_bars, kv_row, 0)
    _load_v(v_desc, tv_desc, v_smem, tv_smem, v_bars, kv_row, 0)
    if n_blocks > 1:
        _load_k(k_desc, tk_desc, k_smem, tk_smem, k_bars, kv_row + BLOCK_N, 1)
        _load_v(v_desc, tv_desc, v_smem, tv_smem, v_bars, kv_row + BLOCK_N, 1)
    mbarrier.wait(q_bar, 0)

    qk_scale = scale * 1.4426950408889634
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, rows_s)
    c_i = gl.zeros([BLOCK_M], gl.float32, rows_s)
    acc_o = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    acc_t = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    acc_lr = gl.zeros([BLOCK_M, 16], gl.float32, r_layout)
    acc_r = gl.zeros([BLOCK_M, 16], gl.float32, r_layout)

    s, ts = _issue_scores(q_smem, tq_smem, k_smem, tk_smem, k_bars, 0, s_layout, BLOCK_M, BLOCK_N)
    s, ts = warpgroup_mma_wait(0, deps=(s, ts))
    state = (m_i, c_i, acc_o, acc_t, acc_lr, acc_r, s, ts)
    for j in range(n_blocks - 1):
        state = _block(state, j, n_blocks, kv_row, scale, qk_scale, q_smem, tq_smem, k_smem, tk_smem, v_smem, tv_smem,
                       ones_smem, k_bars, v_bars, k_desc, tk_desc, v_desc, tv_desc, s_layout, o_layout, r_layout,
                       BLOCK_M, BLOCK_N, True, SERIAL)
    state = _block(state, n_blocks - 1, n_blocks, kv_row, scale, qk_scale, q_smem, tq_smem, k_smem, tk_smem, v_smem,
                   tv_smem, ones_smem, k_bars, v_bars, k_desc, tk_desc, v_desc, tv_desc, s_layout, o_layout, r_layout,
                   BLOCK_M, BLOCK_N, False, SERIAL)
    m_i, c_i, acc_o, acc_t, acc_lr, acc_r, s, ts = state

    lr = gl.convert_layout(gl.max(acc_lr, 1), rows_o)
    r = gl.convert_layout(gl.max(acc_r, 1), rows_o)
    o = acc_o / lr[:, None]
    t_o = (acc_t - r[:, None] * o) / lr[:, None]
    offs_m = q_row + gl.arange(0, BLOCK_M, rows_o)
    offs_d = gl.arange(0, D, gl.SliceLayout(0, o_layout))
    ptrs = offs_m.to(gl.int64)[:, None] * D + offs_d[None, :]
    gl.store(O + ptrs, o.to(dtype))
    gl.store(TO + ptrs, t_o.to(dtype))


def attention_jvp_gluon(q, k, v, t_q, t_k, t_v, BLOCK_N=64, BLOCK_M=64, SERIAL=False):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert Lq % BLOCK_M == 0 and Lk % BLOCK_N == 0 and D in (64, 128)
    gdt = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
    flat = [x.contiguous().view(-1, D) for x in (q, t_q, k, t_k, v, t_v)]
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, D], gdt)
    k_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, D], gdt)
    descs = [TensorDescriptor.from_tensor(x, [BLOCK_M, D], q_layout) for x in flat[:2]]
    descs += [TensorDescriptor.from_tensor(x, [BLOCK_N, D], k_layout) for x in flat[2:]]
    o = torch.empty_like(q)
    t_o = torch.empty_like(q)
    grid = (Lq // BLOCK_M, B * H)
    _attention_jvp_gluon[grid](*descs, o, t_o, Lq, Lk, D ** -0.5, D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SERIAL=SERIAL,
                               num_warps=BLOCK_M // 16)
    return o, t_o


if __name__ == "__main__":
    import os, sys, traceback
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from scaled import attention as A
    H = 16
    print(torch.cuda.get_device_name(), flush=True)
    for D, BN, BM, SER in [(64, 64, 64, False), (64, 64, 128, False), (64, 64, 64, True), (128, 32, 64, False), (128, 32, 128, False)]:
        for L in [4096]:
            B = max(1, 2**25 // (H * L * D))
            g = torch.Generator(device="cuda").manual_seed(L + D)
            xs = [torch.randn(B, H, L, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(6)]
            n = max(1, min(B * H, 2**27 // (L * L)))
            ref = A.attention_jvp_math(*[x.flatten(0, 1)[:n].unsqueeze(0).float() for x in xs])
            def err(out):
                return [((y.flatten(0, 1)[:n].unsqueeze(0).float() - r).norm() / r.norm()).item() for y, r in zip(out, ref)]
            try:
                out_g = attention_jvp_gluon(*xs, BLOCK_N=BN, BLOCK_M=BM, SERIAL=SER)
                torch.cuda.synchronize()
                e_g = err(out_g)
            except Exception as e:
                print(f"D={D} L={L}: gluon failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                traceback.print_exc()
                break
            e_t = err(A.attention_jvp_triton(*xs))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                base = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(*xs[:3]), warmup=25, rep=100, return_mode="median")
            t_g = triton.testing.do_bench(lambda: attention_jvp_gluon(*xs, BLOCK_N=BN, BLOCK_M=BM, SERIAL=SER), warmup=25, rep=100, return_mode="median")
            t_t = triton.testing.do_bench(lambda: A.attention_jvp_triton(*xs), warmup=25, rep=100, return_mode="median")
            print(f"D={D} BN={BN} BM={BM} serial={SER} L={L} B={B}: gluon {t_g:.3f} ms ({t_g / base:.2f}x cuDNN) triton {t_t:.3f} ms ({t_t / base:.2f}x) "
                  f"cuDNN {base:.3f}; err o|t_o gluon {e_g[0]:.1e}|{e_g[1]:.1e} triton {e_t[0]:.1e}|{e_t[1]:.1e}", flush=True)
