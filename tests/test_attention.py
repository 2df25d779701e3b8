"""scaled.attention: the flash JVP kernel and its math fallback against torch.func.jvp of
math attention in float64. Kernel tests run in Triton's CPU interpreter where Triton is
installed, and natively on a CUDA GPU where there is one."""
import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scaled import attention as A

HAS_CUDA = torch.cuda.is_available()  # without CUDA, conftest.py has set TRITON_INTERPRET=1

HAS_TRITON = A.triton is not None


def _interpreter_ready():
    if not HAS_TRITON:
        return False, "Triton is not installed"
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(A.triton.language.standard.sum, InterpretedFunction):
        return False, "triton was imported before TRITON_INTERPRET=1 was set (see tests/conftest.py)"
    return True, ""


INTERPRETER_OK, INTERPRETER_WHY = _interpreter_ready()
needs_triton = pytest.mark.skipif(not INTERPRETER_OK, reason=INTERPRETER_WHY)
needs_gpu = pytest.mark.skipif(not (HAS_TRITON and HAS_CUDA), reason="needs Triton and a CUDA GPU")

# ||out - ref|| / ||ref|| bounds for (o, t_o) and elementwise assert_close tolerances per dtype.
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
CLOSE_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
             torch.bfloat16: dict(atol=6e-2, rtol=6e-2)}


def fresh_seed():
    """A new seed each run (printed, so that a failure can be replayed); global RNG untouched."""
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return seed


def random_qkv(B, H, Lq, Lk, D, dtype=torch.float32, device="cpu"):
    """Fresh (q, k, v, t_q, t_k, t_v); scaled so that softmax is neither flat nor one-hot."""
    g = torch.Generator().manual_seed(fresh_seed())
    shapes = [(B, H, L, D) for L in (Lq, Lk, Lk)] * 2
    xs = [torch.randn(s, generator=g, dtype=torch.float64) * 1.5 for s in shapes]
    return [x.to(device=device, dtype=dtype) for x in xs]


def reference_jvp(q, k, v, t_q, t_k, t_v):
    """torch.func.jvp of math attention in float64 on the CPU."""
    xs = [x.detach().to("cpu", torch.float64) for x in (q, k, v, t_q, t_k, t_v)]
    return torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:]))


def rel_err(out, ref):
    return ((out.detach().cpu().double() - ref).norm() / ref.norm()).item()


def poisoned(B, H, L, D, dtype, device):
    return [torch.full((B, H, L, D), float("nan"), dtype=dtype, device=device) for _ in range(2)]


def forbid_math_path(monkeypatch):
    def fail(*args):
        raise AssertionError("math path taken where the kernel should run")
    monkeypatch.setattr(A, "attention_math", fail)


class Block(torch.nn.Module):
    """Pre-norm transformer block calling scaled.attention (q, k, v are strided views)."""

    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.qkv, self.proj = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(C, 4 * C), torch.nn.GELU(), torch.nn.Linear(4 * C, C))

    @staticmethod
    def norm(x):
        # Not nn.LayerNorm: on CUDA (torch 2.11) its bf16 JVP returns a float32 tangent.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, x, attn=A.attention):
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, L, 3, self.H, C // self.H).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attn(q, k, v).transpose(1, 2).reshape(B, L, C))
        return x + self.mlp(self.norm(x))


def block_jvp_check(C, H, L, dtype, device, monkeypatch):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fresh_seed())
        block = Block(C, H)
        x, t_x = torch.randn(2, 2, L, C, dtype=torch.float64)
    block64 = Block(C, H).double()
    block64.load_state_dict(block.state_dict())
    block = block.to(device=device, dtype=dtype)
    ref_y, ref_t = torch.func.jvp(lambda x: block64(x, A.attention_math), (x,), (t_x,))
    forbid_math_path(monkeypatch)
    with torch.no_grad():
        y, t_y = torch.func.jvp(block, (x.to(device, dtype),), (t_x.to(device, dtype),))
    return rel_err(y, ref_y), rel_err(t_y, ref_t)


#----------------------------------------------------------------------------
# Math path and dispatch (plain CPU, no Triton needed).

def test_math_path_jvp_matches_finite_differences():
    q, k, v, t_q, t_k, t_v = random_qkv(2, 3, 11, 7, 8, torch.float64)
    _, t_o = torch.func.jvp(A.attention_math, (q, k, v), (t_q, t_k, t_v))
    eps = 1e-6
    plus = A.attention_math(q + eps * t_q, k + eps * t_k, v + eps * t_v)
    minus = A.attention_math(q - eps * t_q, k - eps * t_k, v - eps * t_v)
    torch.testing.assert_close(t_o, (plus - minus) / (2 * eps), atol=1e-7, rtol=1e-6)


def test_no_tangent_is_sdpa_forward_and_backward():
    q, k, v = (x.requires_grad_() for x in random_qkv(2, 2, 13, 9, 16, torch.float64)[:3])
    o = A.attention(q, k, v)
    o_ref = A.attention_math(q, k, v)
    torch.testing.assert_close(o, o_ref)
    do = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(fresh_seed()))
    grads = torch.autograd.grad(o, (q, k, v), do)
    grads_ref = torch.autograd.grad(o_ref, (q, k, v), do)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_cpu_without_interpreter_falls_back_to_math(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", False)
    q, k, v, t_q, t_k, t_v = random_qkv(1, 2, 10, 12, 16, torch.float64)
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    o, t_o = torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))
    assert rel_err(o, ref_o) < REL_TOL[torch.float64] and rel_err(t_o, ref_t) < REL_TOL[torch.float64]


#----------------------------------------------------------------------------
# The kernel in Triton's interpreter on the CPU (float32 operands, exact dots).

@needs_triton
@pytest.mark.parametrize("B, H, Lq, Lk, D, config", [
    (1, 2, 37, 45, 32, (16, 32, 4, 2)),      # neither length a multiple of a block
    (2, 1, 64, 96, 16, (32, 32, 4, 2)),      # both multiples: the unmasked code path
    (1, 1, 19, 70, 64, (16, 16, 4, 2)),      # Lk > Lq, several key blocks and a tail
    (1, 1, 50, 9, 16, (16, 16, 4, 2)),       # one partial key block
])
def test_kernel_interpreter_matches_float64_reference(B, H, Lq, Lk, D, config, monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    xs = random_qkv(B, H, Lq, Lk, D)
    out = poisoned(B, H, Lq, D, torch.float32, "cpu")
    o, t_o = A.attention_jvp_triton(*xs, out=out, config=config)
    assert o is out[0] and t_o is out[1]
    assert torch.isfinite(o).all() and torch.isfinite(t_o).all(), "some output left unwritten"
    ref_o, ref_t = reference_jvp(*xs)
    assert rel_err(o, ref_o) < REL_TOL[torch.float32]
    assert rel_err(t_o, ref_t) < REL_TOL[torch.float32]
    torch.testing.assert_close(t_o.double(), ref_t, **CLOSE_TOL[torch.float32])


@needs_triton
def test_kernel_interpreter_under_func_jvp_forward_ad_and_grad(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    q, k, v, t_q, t_k, t_v = random_qkv(2, 2, 33, 21, 32)
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    ref_tq = reference_jvp(q, k, v, t_q, torch.zeros_like(k), torch.zeros_like(v))[1]
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(fresh_seed()))
    q64 = q.double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(A.attention_math(q64, k.double(), v.double()), q64, do.double())
    forbid_math_path(monkeypatch)
    with torch.no_grad():
        o, t_o = torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))
    assert rel_err(o, ref_o) < REL_TOL[torch.float32] and rel_err(t_o, ref_t) < REL_TOL[torch.float32]
    with fwAD.dual_level():  # only q carries a tangent
        o, t_o = fwAD.unpack_dual(A.attention(fwAD.make_dual(q, t_q), k, v))
    assert rel_err(o, ref_o) < REL_TOL[torch.float32] and rel_err(t_o, ref_tq) < REL_TOL[torch.float32]
    # Reverse mode through o still works when the JVP ran with grad enabled.
    q_ = q.clone().requires_grad_()
    o, _ = torch.func.jvp(lambda q: A.attention(q, k, v), (q_,), (t_q,))
    (grad,) = torch.autograd.grad(o, q_, do)
    assert rel_err(grad, grad_ref) < REL_TOL[torch.float32]


@needs_triton
def test_kernel_interpreter_inside_transformer_block_jvp(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    err_y, err_t = block_jvp_check(C=64, H=2, L=40, dtype=torch.float32, device="cpu",
                                   monkeypatch=monkeypatch)
    # Tighter than REL_TOL: the residual stream dilutes the attention's share of the error.
    assert err_y < 1e-6 and err_t < 1e-6


def test_unsupported_head_dim_takes_math_path(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    q, k, v, t_q, t_k, t_v = random_qkv(1, 1, 9, 9, 24)  # 24 is no power of two
    assert not A.kernel_supported(q, k, v)
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    o, t_o = torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))
    assert rel_err(t_o, ref_t) < REL_TOL[torch.float32]


#----------------------------------------------------------------------------
# The kernel on a CUDA GPU, per dtype.

GPU_SHAPES = [(2, 3, 200, 200, 32), (1, 4, 333, 517, 64), (2, 2, 1000, 130, 128), (1, 2, 256, 256, 64)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B, H, Lq, Lk, D", GPU_SHAPES)
def test_kernel_gpu_matches_float64_reference(B, H, Lq, Lk, D, dtype):
    xs = random_qkv(B, H, Lq, Lk, D, dtype, "cuda")
    out = poisoned(B, H, Lq, D, dtype, "cuda")
    o, t_o = A.attention_jvp_triton(*xs, out=out)
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(t_o).all(), "some output left unwritten"
    ref_o, ref_t = reference_jvp(*xs)
    assert rel_err(o, ref_o) < REL_TOL[dtype]
    assert rel_err(t_o, ref_t) < REL_TOL[dtype]
    torch.testing.assert_close(t_o.double().cpu(), ref_t, **CLOSE_TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_gpu_inside_transformer_block_jvp(dtype, monkeypatch):
    err_y, err_t = block_jvp_check(C=256, H=4, L=300, dtype=dtype, device="cuda",
                                   monkeypatch=monkeypatch)
    # The block's own linear layers in low precision add their rounding to the attention's.
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert err_y < tol and err_t < tol


@needs_gpu
def test_kernel_gpu_forward_ad_and_no_tangent_path():
    q, k, v, t_q, t_k, t_v = random_qkv(2, 2, 300, 300, 64, torch.bfloat16, "cuda")
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in ((q, t_q), (k, t_k), (v, t_v))]
        o, t_o = fwAD.unpack_dual(A.attention(*duals))
    assert rel_err(o, ref_o) < REL_TOL[torch.bfloat16] and rel_err(t_o, ref_t) < REL_TOL[torch.bfloat16]
    assert rel_err(A.attention(q, k, v), ref_o) < REL_TOL[torch.bfloat16]


@needs_gpu
def test_kernel_gpu_many_heads_beyond_one_grid_axis_limit():
    # B * H = 70000 programs' worth of heads: more than CUDA's 65535 on a second grid axis.
    xs = random_qkv(700, 100, 17, 9, 16, torch.float16, "cuda")
    out = poisoned(700, 100, 17, 16, torch.float16, "cuda")
    o, t_o = A.attention_jvp_triton(*xs, out=out)
    assert torch.isfinite(o).all() and torch.isfinite(t_o).all(), "some output left unwritten"
    sample = slice(None, None, 97)  # every 97th batch entry against float64
    ref_o, ref_t = reference_jvp(*(x[sample] for x in xs))
    assert rel_err(o[sample], ref_o) < REL_TOL[torch.float16]
    assert rel_err(t_o[sample], ref_t) < REL_TOL[torch.float16]
