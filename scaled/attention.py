"""Attention with a forward-mode JVP that never materializes the L x L matrix.

`attention(q, k, v)` is softmax(q k^T / sqrt(D)) v for q [B, H, Lq, D], k and v [B, H, Lk, D].
- Without tangents it is PyTorch's fused SDPA (forward and backward).
- Under forward-mode AD (`torch.func.jvp`, `torch.autograd.forward_ad`) on CUDA it returns the
  primal o and its tangent t_o from one Triton kernel, flash-style (sCM v2, App. F), with
  O(L) extra memory.
- Where the kernel cannot run (CPU, no Triton, unsupported head dim) it falls back to the
  plain math path `attention_math`, whose JVP autograd derives (it materializes L x L).

Tangent equations (sCM v2, App. F), with scale = 1/sqrt(D):
  s   = q k^T scale                 p = softmax(s)           o = p v
  t_s = (t_q k^T + q t_k^T) scale   t_p = p (t_s - sum_j p_j t_s_j)
  t_o = t_p v + p t_v = p (t_s v + t_v) - (sum_j p_j t_s_j) o
One pass over key blocks keeps, per query row, the running max m, the normalizer
l = sum p~, mu = sum p~ t_s, acc_o = sum p~ v and acc_t = sum p~ (t_s v + t_v), all
rescaled by exp(m_old - m_new) like the flash forward. At the end o = acc_o / l and
t_o = acc_t / l - (mu / l) o.
"""
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines without Triton use the math path.
    triton = None

__all__ = ["attention", "attention_math", "attention_jvp_triton", "kernel_supported"]

HEAD_DIMS = (16, 32, 64, 128)  # powers of two the kernel handles; others take the math path
# Tests set this to run the kernel on CPU tensors in Triton's interpreter, which needs
# TRITON_INTERPRET=1 in the environment before triton is first imported.
INTERPRET_ON_CPU = False


#----------------------------------------------------------------------------
# Reference path.

def attention_math(q, k, v):
    """softmax(q k^T / sqrt(D)) v in plain ops; autograd derives its JVP (L x L memory)."""
    scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-2, -1)) * scale          # [B, H, Lq, Lk]
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()                                         # softmax in fp32 for half types
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v)                                 # [B, H, Lq, D]


#----------------------------------------------------------------------------
# Triton kernel: (o, t_o) in one flash pass.

if triton is not None:
    def _attention_jvp_kernel(
        Q, K, V, TQ, TK, TV, O, TO,
        sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
        stqb, stqh, stqm, stkb, stkh, stkn, stvb, stvh, stvn,
        sob, soh, som, stob, stoh, stom,
        H, Lq, Lk, scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        # One grid axis (no 65535 limit on B*H); query blocks of one head run next to each
        # other, so their shared k, v, t_k, t_v stay in L2.
        num_m = tl.cdiv(Lq, BLOCK_M)
        pid_m = tl.program_id(0) % num_m
        pid_bh = tl.program_id(0) // num_m
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        mask_m = offs_m[:, None] < Lq

        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]
        tq_ptrs = TQ + b * stqb + h * stqh + offs_m[:, None] * stqm + offs_d[None, :]
        if EVEN_M:
            q = tl.load(q_ptrs)                                   # [BLOCK_M, D]
            tq = tl.load(tq_ptrs)
        else:
            q = tl.load(q_ptrs, mask=mask_m, other=0.0)
            tq = tl.load(tq_ptrs, mask=mask_m, other=0.0)
        k_base = K + b * skb + h * skh + offs_d[None, :]
        v_base = V + b * svb + h * svh + offs_d[None, :]
        tk_base = TK + b * stkb + h * stkh + offs_d[None, :]
        tv_base = TV + b * stvb + h * stvh + offs_d[None, :]

        qk_scale = scale * 1.4426950408889634                     # exp(x) = exp2(x log2 e)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)       # running max of s log2 e
        l_i = tl.zeros([BLOCK_M], tl.float32)                     # sum p~
        mu_i = tl.zeros([BLOCK_M], tl.float32)                    # sum p~ t_s
        acc_o = tl.zeros([BLOCK_M, D], tl.float32)                # sum p~ v
        acc_t = tl.zeros([BLOCK_M, D], tl.float32)                # sum p~ (t_s v + t_v)

        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + offs_n0
            if EVEN_N:
                k = tl.load(k_base + offs_n[:, None] * skn)       # [BLOCK_N, D]
                tk = tl.load(tk_base + offs_n[:, None] * stkn)
                v = tl.load(v_base + offs_n[:, None] * svn)
                tv = tl.load(tv_base + offs_n[:, None] * stvn)
            else:
                mask_n = offs_n[:, None] < Lk
                k = tl.load(k_base + offs_n[:, None] * skn, mask=mask_n, other=0.0)
                tk = tl.load(tk_base + offs_n[:, None] * stkn, mask=mask_n, other=0.0)
                v = tl.load(v_base + offs_n[:, None] * svn, mask=mask_n, other=0.0)
                tv = tl.load(tv_base + offs_n[:, None] * stvn, mask=mask_n, other=0.0)
            kT = tl.trans(k)
            s = tl.dot(q, kT, input_precision=INPUT_PRECISION)            # q k^T, [BLOCK_M, BLOCK_N]
            t_s = tl.dot(tq, kT, input_precision=INPUT_PRECISION)         # t_q k^T + q t_k^T
            t_s = tl.dot(q, tl.trans(tk), t_s, input_precision=INPUT_PRECISION)
            if not EVEN_N:
                s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])                    # p~ = exp(s - m)
            p_ts = p * (t_s * scale)                                      # p~ t_s (masked cols: p~ = 0)
            l_i = l_i * alpha + tl.sum(p, 1)
            mu_i = mu_i * alpha + tl.sum(p_ts, 1)
            acc_o = acc_o * alpha[:, None]
            acc_t = acc_t * alpha[:, None]
            p_lo = p.to(v.dtype)
            acc_o = tl.dot(p_lo, v, acc_o, input_precision=INPUT_PRECISION)
            acc_t = tl.dot(p_lo, tv, acc_t, input_precision=INPUT_PRECISION)
            acc_t = tl.dot(p_ts.to(v.dtype), v, acc_t, input_precision=INPUT_PRECISION)
            m_i = m_new

        o = acc_o / l_i[:, None]
        t_o = acc_t / l_i[:, None] - (mu_i / l_i)[:, None] * o
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
        to_ptrs = TO + b * stob + h * stoh + offs_m[:, None] * stom + offs_d[None, :]
        if EVEN_M:
            tl.store(o_ptrs, o.to(O.dtype.element_ty))
            tl.store(to_ptrs, t_o.to(TO.dtype.element_ty))
        else:
            tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=mask_m)
            tl.store(to_ptrs, t_o.to(TO.dtype.element_ty), mask=mask_m)


_KERNELS = {}


def _kernel(interpret):
    """The jitted kernel, or Triton's CPU interpreter of it (TRITON_INTERPRET=1, CPU tensors)."""
    if interpret not in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _KERNELS[interpret] = InterpretedFunction(_attention_jvp_kernel)
        else:
            _KERNELS[interpret] = triton.jit(_attention_jvp_kernel)
    return _KERNELS[interpret]


def _default_config(D, dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), picked by the H100 sweep in benchmarks/."""
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if D <= 64:
        return 128, 128, 8, 3   # (128, 64, 4, 3) spilled 84 registers: 2.5x slower
    return 128, 64, 8, 2


def attention_jvp_triton(q, k, v, t_q, t_k, t_v, out=None, config=None):
    """(o, t_o) of softmax(q k^T / sqrt(D)) v along (t_q, t_k, t_v), one Triton pass.

    Tensors [B, H, L, D] of one dtype on one device, any strides with a unit last stride;
    a tangent may be None (zero). `out` optionally gives the (o, t_o) tensors to write;
    `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the tuned default.
    CPU tensors run in Triton's interpreter.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    assert k.shape == (B, H, Lk, D) and v.shape == (B, H, Lk, D), "q, k, v must be [B, H, L, D]"
    t_q, t_k, t_v = (torch.zeros_like(x) if t is None else t.to(x.dtype).expand_as(x)
                     for x, t in ((q, t_q), (k, t_k), (v, t_v)))
    q, k, v, t_q, t_k, t_v = (x if x.stride(-1) == 1 else x.contiguous()
                              for x in (q, k, v, t_q, t_k, t_v))
    if out is None:
        out = [torch.empty(B, H, Lq, D, dtype=q.dtype, device=q.device) for _ in range(2)]
    o, t_o = out
    interpret = not q.is_cuda
    BLOCK_M, BLOCK_N, num_warps, num_stages = config or _default_config(D, q.dtype)
    if q.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpret else "ieee"
    else:
        precision = "tf32"  # ignored for 16-bit operands
    grid = (triton.cdiv(Lq, BLOCK_M) * B * H,)
    strides = [s for x in (q, k, v, t_q, t_k, t_v, o, t_o) for s in x.stride()[:3]]
    _kernel(interpret)[grid](
        q, k, v, t_q, t_k, t_v, o, t_o, *strides, H, Lq, Lk, D ** -0.5,
        D=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EVEN_M=Lq % BLOCK_M == 0,
        EVEN_N=Lk % BLOCK_N == 0, INPUT_PRECISION=precision,
        **({} if interpret else dict(num_warps=num_warps, num_stages=num_stages)))
    return o, t_o


def kernel_supported(q, k, v):
    """Whether the Triton kernel can compute this call's JVP (else: math path)."""
    on_device = q.is_cuda or (INTERPRET_ON_CPU and q.device.type == "cpu")
    return (triton is not None and on_device and q.dim() == k.dim() == v.dim() == 4
            and q.shape[-1] in HEAD_DIMS and k.shape[-1] == q.shape[-1] == v.shape[-1]
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
            and k.shape[:2] == q.shape[:2] == v.shape[:2] and k.shape[2] == v.shape[2]
            and k.shape[2] > 0 and q.shape[2] > 0)


#----------------------------------------------------------------------------
# Autograd plumbing. The tangents travel into forward as extra inputs, so that forward, which
# runs on plain tensors under torch.func.jvp too, computes (o, t_o) in one launch; jvp only
# hands back the saved t_o.

class _AttentionJVP(torch.autograd.Function):

    @staticmethod
    def forward(q, k, v, t_q, t_k, t_v):
        return attention_jvp_triton(q, k, v, t_q, t_k, t_v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        o, t_o = output
        ctx.mark_non_differentiable(t_o)
        ctx.set_materialize_grads(False)  # jvp ignores its tangents: don't fill zeros for them
        ctx.save_for_forward(t_o)
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, *tangents):
        t_o, = ctx.saved_tensors
        return t_o, None

    @staticmethod
    def backward(ctx, grad_o, grad_t_o):
        # Reverse mode of o through fused SDPA; t_o itself is not differentiable.
        q, k, v = ctx.saved_tensors
        if grad_o is None:
            return None, None, None, None, None, None
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v)
        return *torch.autograd.grad(o, (q, k, v), grad_o), None, None, None


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
