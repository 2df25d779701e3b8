"""scaled.attention: the flash JVP kernel and its math fallback against torch.func.jvp of
math attention in float64. Kernel tests run in Triton's CPU interpreter where Triton is
installed, and natively on a CUDA GPU where there is one."""
import os
import subprocess
import sys
import textwrap
import types

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
# The kernel's 16-bit error may exceed that of a float32 computation rounded once (what SDPA's
# math backend returns) by this factor (issue 13's goal).
ERROR_RATIO_MAX = 1.5


def error_ratio_max(case):
    """ERROR_RATIO_MAX, but 2 for q, k x 7.5 (rows nearly one-hot): there the ratio has a tail
    over fresh seeds (fp16 interpreter, 2 heads x 128 rows: mean 1.2, above 1.5 for 1 of 200
    seeds with the v7 kernel and 8 of 200 with v8, at most 1.59), while the defect this guards
    against gave 10-40x. The benchmark reports the bf16 ratio at scale (1.07-1.09 at x3, x5)."""
    return 2.0 if case.get("q_k_scale", 0) > 5 else ERROR_RATIO_MAX


def fresh_seed():
    """A new seed each run (printed, so that a failure can be replayed); global RNG untouched."""
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)
    return seed


def random_qkv(B, H, Lq, Lk, D, dtype=torch.float32, device="cpu", q_k_scale=1.5, key_offset=0.0,
               value_offset=0.0):
    """Fresh (q, k, v, t_q, t_k, t_v); scaled so that softmax is neither flat nor one-hot, or
    with large logits (q_k_scale) and offsets shared by all keys or values."""
    g = torch.Generator().manual_seed(fresh_seed())
    shapes = [(B, H, L, D) for L in (Lq, Lk, Lk)] * 2
    q, k, v, t_q, t_k, t_v = (torch.randn(s, generator=g, dtype=torch.float64) for s in shapes)
    xs = [q * q_k_scale, k * q_k_scale + key_offset, v * 1.5 + value_offset, t_q * 1.5, t_k * 1.5, t_v * 1.5]
    return [x.to(device=device, dtype=dtype) for x in xs]


def reference_jvp(q, k, v, t_q, t_k, t_v):
    """torch.func.jvp of math attention in float64 on the CPU."""
    xs = [x.detach().to("cpu", torch.float64) for x in (q, k, v, t_q, t_k, t_v)]
    return torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:]))


def float32_rounded_jvp(q, k, v, t_q, t_k, t_v):
    """(o, t_o) computed in float32 and rounded once to the inputs' dtype, as SDPA-math does."""
    xs = [x.float() for x in (q, k, v, t_q, t_k, t_v)]
    return (y.to(q.dtype) for y in torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:])))


def rel_err(out, ref):
    return ((out.detach().cpu().double() - ref).norm() / ref.norm()).item()


def assert_within_float32_math(o, t_o, xs, bound=ERROR_RATIO_MAX):
    """o's and t_o's errors against float64 at most `bound` times those of a float32 computation
    rounded once to the inputs' dtype (SDPA's math backend)."""
    ref_o, ref_t = reference_jvp(*xs)
    float32_o, float32_t = float32_rounded_jvp(*xs)
    assert rel_err(o, ref_o) <= bound * rel_err(float32_o, ref_o)
    assert rel_err(t_o, ref_t) <= bound * rel_err(float32_t, ref_t)


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


def tangent_loss_grads(attn, xs, w_o, w_t):
    """Gradients of sum(w_o o) + sum(w_t t_o) in q, k, v and the tangents, (o, t_o) by torch.func.jvp."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, t_o = torch.func.jvp(attn, tuple(xs[:3]), tuple(xs[3:]))
    grads = torch.autograd.grad((o * w_o).sum() + (t_o * w_t).sum(), xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


#----------------------------------------------------------------------------
# Math path and dispatch (plain CPU, no Triton needed).

def test_math_path_jvp_matches_finite_differences():
    q, k, v, t_q, t_k, t_v = random_qkv(2, 3, 11, 7, 8, torch.float64)
    _, t_o = torch.func.jvp(A.attention_math, (q, k, v), (t_q, t_k, t_v))
    eps = 1e-6
    plus = A.attention_math(q + eps * t_q, k + eps * t_k, v + eps * t_v)
    minus = A.attention_math(q - eps * t_q, k - eps * t_k, v - eps * t_v)
    torch.testing.assert_close(t_o, (plus - minus) / (2 * eps), atol=1e-7, rtol=1e-6)


def test_explicit_tangent_equations_match_func_jvp():
    xs = random_qkv(2, 3, 11, 7, 8, torch.float64)
    o, t_o = A.attention_jvp_math(*xs)
    ref_o, ref_t = reference_jvp(*xs)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(t_o, ref_t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_math_path_half_precision_as_accurate_as_float32_rounded_once(dtype):
    # Issue 13 (5): with 16-bit scores and weights, large logits cost 20-40x the error.
    xs = random_qkv(1, 2, 64, 64, 32, dtype, q_k_scale=7.5)
    ref_o, ref_t = reference_jvp(*xs)
    o, t_o = torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:]))
    assert o.dtype == t_o.dtype == dtype
    floor_o, floor_t = (rel_err(ref.to(dtype), ref) for ref in (ref_o, ref_t))
    assert rel_err(o, ref_o) <= ERROR_RATIO_MAX * floor_o
    assert rel_err(t_o, ref_t) <= ERROR_RATIO_MAX * floor_t


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
# Head-dim split and configuration tables (issue 15), plain CPU.

def test_head_dim_split_is_a_power_of_two_chunk_and_a_small_padded_tail():
    assert [A.head_dim_split(D) for D in (16, 32, 48, 64, 72, 80, 96, 128)] == [
        (16, 0), (32, 0), (32, 16), (64, 0), (64, 16), (64, 16), (64, 32), (128, 0)]
    for D in range(1, A.HEAD_DIM_MAX + 1):
        D0, D1 = A.head_dim_split(D)
        assert D0 >= 16 and D0 & (D0 - 1) == 0 and D1 < D0 and D0 + D1 >= D
        assert D1 == 0 or (D1 >= 16 and D1 & (D1 - 1) == 0 and D0 < D)
        assert D0 + D1 <= max(16, 1 << (D - 1).bit_length())  # never wider than the next power of two
        assert D0 + D1 in A.CONFIGS["sm80", 2]


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_every_table_entry_fits_its_architecture(arch, elem_bytes):
    table = A.CONFIGS[arch, elem_bytes]
    assert set(table) == {sum(A.head_dim_split(D)) for D in range(1, A.HEAD_DIM_MAX + 1)}
    for Dp, configs in table.items():
        for BLOCK_M, BLOCK_N, num_warps, num_stages, tma in configs:
            assert all(x >= 16 and x & (x - 1) == 0 for x in (BLOCK_M, BLOCK_N))
            assert num_warps in (4, 8) and 1 <= num_stages <= 4
            assert not (BLOCK_M == 64 and num_warps == 8)  # the estimate's one exception
            assert not tma or arch == "sm90"  # an A100 has no TMA
        estimates = [A.shared_memory_estimate(c, Dp, elem_bytes) for c in configs]
        assert max(estimates) <= A.SHARED_MEMORY_LIMIT[arch], (Dp, configs, estimates)
        assert estimates[-1] == min(estimates) <= 99 * 1024  # the last fallback fits sm86/sm89


@needs_triton
def test_under_torch_compile_the_kernel_is_one_custom_operator(monkeypatch):
    # Dynamo can trace neither the Gluon launch nor the TMA checks' data_ptr: a compiled graph
    # holds the custom operator scaled::attention_jvp, which runs the eager dispatch (the same
    # kernel as eager, the same bits).
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    xs = random_qkv(1, 2, 40, 64, 32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        o, t_o = torch.func.jvp(A.attention, tuple(xs[:3]), tuple(xs[3:]))
        o_c, t_o_c = torch.compile(lambda *x: torch.func.jvp(A.attention, x[:3], x[3:]), backend=backend)(*xs)
    assert torch.equal(o_c, o) and torch.equal(t_o_c, t_o)
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert any("scaled.attention_jvp" in t for t in targets), targets
    config = A.Config(16, 16, 4, 1)  # an explicit configuration passes through the operator
    expected = A.attention_jvp_triton(*xs, config=config)
    got = torch.compile(lambda *x: A.attention_jvp_triton(*x, config=config), backend=backend)(*xs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("major, minor, optin, arch", [
    (9, 0, 232448, "sm90"), (8, 0, 166912, "sm80"), (8, 6, 101376, "sm80"), (8, 9, 101376, "sm80")])
def test_device_arch_and_candidates_follow_the_device(major, minor, optin, arch, monkeypatch):
    props = types.SimpleNamespace(major=major, minor=minor, shared_memory_per_block_optin=optin)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.delenv("SCALED_ATTENTION_ARCH", raising=False)
    assert A.device_arch("cuda:0") == (arch, optin)
    for D in (16, 32, 48, 64, 72, 80, 96, 128):
        for dtype in (torch.bfloat16, torch.float32):
            candidates = A.config_candidates(arch, optin, D, dtype)
            Dp = sum(A.head_dim_split(D))
            assert candidates and all(A.shared_memory_estimate(c, Dp, dtype.itemsize) <= optin
                                      for c in candidates)
    if major == 9:  # an H100 forced to the A100 table and limit
        monkeypatch.setenv("SCALED_ATTENTION_ARCH", "sm80")
        assert A.device_arch("cuda:0") == ("sm80", A.SHARED_MEMORY_LIMIT["sm80"])
        monkeypatch.setenv("SCALED_ATTENTION_ARCH", "sm75")
        with pytest.raises(ValueError, match="SCALED_ATTENTION_ARCH"):
            A.device_arch("cuda:0")


def test_a_configuration_that_does_not_compile_falls_back_to_the_next(monkeypatch):
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(A, "_FAILED_CONFIGS", set())
    candidates = A.CONFIGS["sm80", 2][64]
    tried = []

    def launch(config):
        tried.append(config)
        if config != candidates[-1]:
            raise OutOfResources(300000, 166912, "shared memory")
        return "launched"

    assert A.first_that_launches(candidates, "case", launch) == "launched"
    assert tried == candidates
    tried.clear()
    assert A.first_that_launches(candidates, "case", launch) == "launched"
    assert tried == candidates[-1:]  # failures are remembered per case
    with pytest.raises(RuntimeError, match="no attention JVP configuration"):
        A.first_that_launches(candidates[:-1], "another case", launch)


#----------------------------------------------------------------------------
# The kernel in Triton's interpreter on the CPU (float32 operands, exact dots).

@needs_triton
@pytest.mark.parametrize("B, H, Lq, Lk, D, config", [
    (1, 2, 37, 45, 32, (16, 32, 4, 2)),      # neither length a multiple of a block
    (2, 1, 64, 96, 16, (32, 32, 4, 2)),      # both multiples: the unmasked code path
    (1, 1, 19, 70, 64, (16, 16, 4, 2)),      # Lk > Lq, several key blocks and a tail
    (1, 1, 50, 9, 16, (16, 16, 4, 2)),       # one partial key block
    (1, 2, 33, 40, 72, (16, 16, 4, 2)),      # DiT-XL's head dim: 64 + 8 padded to 16
    (1, 1, 32, 48, 48, (16, 16, 4, 2)),      # 32 + 16, no padding
    (1, 1, 20, 30, 80, (16, 16, 4, 2)),      # 64 + 16
    (1, 1, 20, 30, 96, (16, 16, 4, 2)),      # 64 + 32
    (1, 1, 20, 30, 40, (16, 16, 4, 2)),      # 32 + 8 padded to 16 (Stable Diffusion)
    (1, 1, 20, 30, 8, (16, 16, 4, 2)),       # one chunk of 16, half of it padding
    (1, 1, 20, 30, 100, (16, 16, 4, 2)),     # one masked chunk of 128
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
def test_kernel_interpreter_strided_views_with_odd_strides(monkeypatch):
    # Rows of 72 + 4 elements: strides divisible by 4, not 8 (ALIGN = 4); t_k broadcast (stride 0).
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    q, k, v, t_q, t_k, t_v = (x[..., 2:74] for x in random_qkv(1, 2, 40, 40, 76))
    t_k = t_k[:, :1].expand_as(t_k)
    o, t_o = A.attention_jvp_triton(q, k, v, t_q, t_k, t_v, config=(16, 16, 4, 2))
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    assert rel_err(o, ref_o) < REL_TOL[torch.float32] and rel_err(t_o, ref_t) < REL_TOL[torch.float32]


@needs_triton
@pytest.mark.parametrize("case", [dict(key_offset=16.0), dict(key_offset=64.0), dict(q_k_scale=7.5),
                                  dict(value_offset=16.0), dict(value_offset=64.0)])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("D", [64, 72])  # 72: the value sums come from the tail chunk's padding
def test_kernel_interpreter_fp16_offsets_and_large_logits(case, tma, D, monkeypatch):
    # Issue 13 (2): a key offset shared by all keys (or large logits) adds to t_s a part common
    # to all keys, cancelled only after rounding; before the fix t_o's error grew 10-40x. A value
    # offset shared by all values did the same through the 16-bit p~ (t_s - c) summing to r != 0
    # (9x and 34x at +16 and +64 before the value sums).
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    xs = random_qkv(1, 2, 128, 128, D, torch.float16, **case)
    o, t_o = A.attention_jvp_triton(*xs, config=(64, 64, 4, 2), tma=tma)
    assert_within_float32_math(o, t_o, xs, error_ratio_max(case))


@needs_triton
def test_a_gluon_kernel_that_fails_falls_back_to_the_triton_kernel(monkeypatch):
    # Gluon is experimental: where its kernel does not compile (another Triton), the Triton
    # kernel answers, with a warning, and the failure is remembered.
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(A, "_FAILED_HOPPER", set())
    calls = []

    def fail(*args):
        calls.append(1)
        raise TypeError("an API this Triton does not have")
    monkeypatch.setattr(A, "hopper_kernel_usable", lambda *args: True)
    monkeypatch.setattr(A.attention_hopper, "attention_jvp", fail)
    xs = random_qkv(1, 2, 40, 64, 64)
    with pytest.warns(UserWarning, match="Gluon kernel failed"):
        o, t_o = A.attention_jvp_triton(*xs)
    A.attention_jvp_triton(*xs)
    assert calls == [1]
    ref_o, ref_t = reference_jvp(*xs)
    assert rel_err(o, ref_o) < REL_TOL[torch.float32] and rel_err(t_o, ref_t) < REL_TOL[torch.float32]


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
def test_kernel_interpreter_gradient_through_the_tangent(monkeypatch):
    # Issue 13 (4): a loss on t_o (MeanFlow, TVM) got the o-only gradient, 81-90% off, silently.
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    xs = random_qkv(1, 2, 24, 40, 16)
    g = torch.Generator().manual_seed(fresh_seed())
    w_o, w_t = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(2))
    ref = tangent_loss_grads(A.attention_math, [x.double() for x in xs], w_o.double(), w_t.double())
    grads = tangent_loss_grads(A.attention, xs, w_o, w_t)
    for grad, grad_ref in zip(grads, ref):
        assert rel_err(grad, grad_ref) < REL_TOL[torch.float32]
    # A loss on t_o alone, and torch.func.grad around the JVP.
    grads = tangent_loss_grads(A.attention, xs, torch.zeros_like(w_o), w_t)
    ref = tangent_loss_grads(A.attention_math, [x.double() for x in xs], 0 * w_o.double(), w_t.double())
    for grad, grad_ref in zip(grads, ref):
        assert rel_err(grad, grad_ref) < REL_TOL[torch.float32]

    def loss_of_q(q):
        o, t_o = torch.func.jvp(A.attention, (q, *xs[1:3]), tuple(xs[3:]))
        return (t_o * w_t).sum()
    assert rel_err(torch.func.grad(loss_of_q)(xs[0]), ref[0]) < REL_TOL[torch.float32]


@needs_triton
def test_kernel_interpreter_jvp_of_jvp_is_refused(monkeypatch):
    # The kernel has no second order; nested forward AD must fail, not return a wrong tangent.
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    q, k, v, t_q, t_k, t_v = random_qkv(1, 1, 16, 16, 16)
    inner = lambda q: torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))[1]
    with pytest.raises(RuntimeError, match="forward mode AD"):
        torch.func.jvp(inner, (q,), (t_q,))


@needs_triton
@pytest.mark.parametrize("C, H", [(64, 2), (144, 2)])  # head dims 32 and 72
def test_kernel_interpreter_inside_transformer_block_jvp(C, H, monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    err_y, err_t = block_jvp_check(C=C, H=H, L=40, dtype=torch.float32, device="cpu",
                                   monkeypatch=monkeypatch)
    # Tighter than REL_TOL: the residual stream dilutes the attention's share of the error.
    assert err_y < 1e-6 and err_t < 1e-6


def test_head_dim_above_the_kernel_takes_math_path(monkeypatch):
    monkeypatch.setattr(A, "INTERPRET_ON_CPU", True)
    q, k, v, t_q, t_k, t_v = random_qkv(1, 1, 9, 9, A.HEAD_DIM_MAX + 32)
    assert not A.kernel_supported(q, k, v)
    ref_o, ref_t = reference_jvp(q, k, v, t_q, t_k, t_v)
    o, t_o = torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))
    assert rel_err(t_o, ref_t) < REL_TOL[torch.float32]


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_compiles_with_a_float64_scale():
    # Issue 13 (3): torch.compile (Inductor) hands the kernel the Python float scale as fp64,
    # which made the accumulators fp64 and broke compilation at tl.dot. Compiles for sm90 with
    # Triton's own ptxas, no GPU needed, in a fresh interpreter (this one may run Triton's
    # interpreter, which cannot compile).
    script = textwrap.dedent("""
        import os, sys
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from scaled import attention as A
        kernel = A._attention_jvp_kernel
        constants = dict(D=72, D0=64, D1=16, MASK_D0=False, MASK_D1=True, ALIGN=8, BLOCK_M=64,
                         BLOCK_N=32, MASK_M=True, MASK_N=True, INPUT_PRECISION="tf32")
        descriptors = {name + chunk: f"tensordesc<bf16[1,1,32,{width}]>"  # TMA loads of the key side
                       for name in ("K", "TK", "V", "TV") for chunk, width in (("D0", 64), ("D1", 16))}
        signature = {name: "constexpr" if name in constants else "fp64" if name == "scale"
                     else descriptors[name] if name in descriptors
                     else "*bf16" if name in ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO") else "i32"
                     for name in kernel.arg_names}
        triton.compile(ASTSource(kernel, signature, constexprs=constants),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        print("compiled")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    if "compiled" not in run.stdout and ("ptxas" in run.stderr and "No such file" in run.stderr
                                         or "0 compatible backends" in run.stderr):
        pytest.skip("this Triton cannot compile for NVIDIA GPUs here")
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


#----------------------------------------------------------------------------
# The kernel on a CUDA GPU, per dtype.

GPU_SHAPES = [(2, 3, 200, 200, 32), (1, 4, 333, 517, 64), (2, 2, 1000, 130, 128), (1, 2, 256, 256, 72),
              (2, 2, 300, 260, 48), (1, 2, 130, 300, 80), (1, 2, 256, 512, 96), (1, 2, 100, 100, 16)]


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
@pytest.mark.parametrize("D", [64, 72, 128])
@pytest.mark.parametrize("case", [dict(), dict(key_offset=16.0), dict(key_offset=64.0), dict(q_k_scale=7.5),
                                  dict(value_offset=16.0), dict(value_offset=64.0)])
@pytest.mark.parametrize("kernel", ["default", "triton"])
def test_kernel_gpu_bf16_error_within_float32_math(D, case, kernel):
    # Issue 13 (2): against the error of a float32 computation rounded once to bf16 (SDPA-math).
    # "default" is the Gluon kernel at D = 64 and 72 on Hopper; a configuration forces the Triton one.
    xs = random_qkv(2, 4, 512, 512, D, torch.bfloat16, "cuda", **case)
    config = A.config_candidates(*A.device_arch("cuda"), D, torch.bfloat16)[0] if kernel == "triton" else None
    o, t_o = A.attention_jvp_triton(*xs, config=config)
    assert_within_float32_math(o, t_o, xs, error_ratio_max(case))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("C, H", [(256, 4), (288, 4)])  # head dims 64 and 72
def test_kernel_gpu_inside_transformer_block_jvp(C, H, dtype, monkeypatch):
    err_y, err_t = block_jvp_check(C=C, H=H, L=300, dtype=dtype, device="cuda",
                                   monkeypatch=monkeypatch)
    # The block's own linear layers in low precision add their rounding to the attention's.
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert err_y < tol and err_t < tol


@needs_gpu
@pytest.mark.parametrize("where", ["jvp_of_compiled_block", "compiled_jvp"])
def test_kernel_gpu_torch_compile_matches_eager(where, monkeypatch):
    # Issue 13 (3): Inductor passed scale as fp64 (CompilationError); a compiled graph may also
    # drop a custom jvp rule and return other tangents without an error (pytorch#192985): the
    # compiled tangent must equal eager's, with the kernel (not the math path) under both.
    torch._dynamo.reset()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fresh_seed())
        block = Block(288, 4).cuda()  # head dim 72
        x, t_x = torch.randn(2, 2, 300, 288, device="cuda")
    forbid_math_path(monkeypatch)
    with torch.no_grad():
        y, t_y = torch.func.jvp(block, (x,), (t_x,))
        if where == "jvp_of_compiled_block":
            y_c, t_y_c = torch.func.jvp(torch.compile(block), (x,), (t_x,))
        else:
            y_c, t_y_c = torch.compile(lambda x, t_x: torch.func.jvp(block, (x,), (t_x,)))(x, t_x)
    torch.testing.assert_close(y_c, y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t_y_c, t_y, atol=1e-4, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("D", [64, 72])
def test_kernel_gpu_torch_compile_runs_the_eager_kernel(D, monkeypatch):
    # bf16 (on Hopper: the Gluon kernel, TMA loads) under torch.compile: the custom operator
    # runs the eager dispatch, so the same kernel and the same bits as eager.
    torch._dynamo.reset()
    xs = random_qkv(2, 4, 512, 512, D, torch.bfloat16, "cuda")
    forbid_math_path(monkeypatch)
    with torch.no_grad():
        o, t_o = A.attention_jvp_triton(*xs)
        o_c, t_o_c = torch.compile(lambda *x: torch.func.jvp(A.attention, x[:3], x[3:]))(*xs)
    assert torch.equal(o_c, o) and torch.equal(t_o_c, t_o)


@needs_gpu
def test_kernel_gpu_gradient_through_the_tangent():
    xs = random_qkv(2, 2, 300, 200, 72, torch.float32, "cuda")
    g = torch.Generator().manual_seed(fresh_seed())
    w_o, w_t = (torch.randn(2, 2, 300, 72, generator=g).cuda() for _ in range(2))
    ref = tangent_loss_grads(A.attention_math, [x.double() for x in xs], w_o.double(), w_t.double())
    for grad, grad_ref in zip(tangent_loss_grads(A.attention, xs, w_o, w_t), ref):
        assert rel_err(grad, grad_ref.cpu()) < 1e-4  # TF32 off by default; SDPA's backward


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
@pytest.mark.parametrize("D", [16, 32, 48, 64, 72, 80, 96, 128])
def test_kernel_gpu_sm80_table_fits_and_agrees(D):
    # Issue 15: each A100 configuration, run on this GPU, fits the A100's shared memory by
    # Triton's own count and gives the result of this GPU's default configuration.
    xs = random_qkv(1, 4, 384, 384, D, torch.bfloat16, "cuda")
    o, t_o = A.attention_jvp_triton(*xs)
    Dp = sum(A.head_dim_split(D))
    for config in A.CONFIGS["sm80", 2][Dp]:
        out = poisoned(1, 4, 384, D, torch.bfloat16, "cuda")
        kernel = A._launch(*xs, *out, config)
        assert kernel.metadata.shared <= A.SHARED_MEMORY_LIMIT["sm80"], (config, kernel.metadata.shared)
        assert kernel.metadata.shared <= A.shared_memory_estimate(config, Dp, 2), config
        torch.testing.assert_close(out[0], o, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out[1], t_o, atol=5e-2, rtol=5e-2)


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


#----------------------------------------------------------------------------
# The Gluon kernel for Hopper at D = 64 to 96 (scaled/attention_hopper.py; no CPU interpreter).

needs_hopper = pytest.mark.skipif(
    not (HAS_TRITON and HAS_CUDA and A.attention_hopper.gluon is not None
         and torch.cuda.get_device_capability()[0] == 9), reason="needs Gluon and a Hopper GPU")


@needs_hopper
@pytest.mark.parametrize("D", [64, 72, 80, 88, 96])  # above 64: a tail tile of 16 or 32 columns that
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # TMA fills with zeros past D
@pytest.mark.parametrize("B, H, Lq, Lk, case", [
    (2, 3, 256, 256, dict()),
    (1, 2, 200, 320, dict()),                # Lq not a multiple of the 128-row tile: masked stores
    (1, 1, 64, 64, dict()),                  # one key block, the second warpgroup's rows all past Lq
    (2, 2, 1000, 512, dict(key_offset=64.0)),
    (1, 2, 384, 448, dict(q_k_scale=7.5)),
    (1, 2, 256, 256, dict(value_offset=64.0)),
])
def test_hopper_kernel_within_float32_math(B, H, Lq, Lk, case, dtype, D):
    xs = random_qkv(B, H, Lq, Lk, D, dtype, "cuda", **case)
    assert A.hopper_kernel_usable(*xs)
    out = poisoned(B, H, Lq, D, dtype, "cuda")
    o, t_o = A.attention_hopper.attention_jvp(*xs, out=out)
    assert o is out[0] and t_o is out[1]
    assert_within_float32_math(o, t_o, xs, error_ratio_max(case))


@needs_hopper
@pytest.mark.parametrize("D", [64, 72])
def test_hopper_kernel_takes_strided_views_and_is_the_default(monkeypatch, D):
    # q, k, v as a network makes them (a qkv projection split into heads): 4-D TMA descriptors
    # read them in place; at D = 72 the tail's columns past D are the next head's in memory
    # and must read as zeros. The default path picks this kernel where `hopper_kernel_usable`
    # allows.
    B, L, H = 2, 256, 4
    g = torch.Generator(device="cuda").manual_seed(fresh_seed())
    qkv, t_qkv = (torch.randn(B, L, 3, H, D, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    xs = [*qkv.permute(2, 0, 3, 1, 4).unbind(0), *t_qkv.permute(2, 0, 3, 1, 4).unbind(0)]
    assert not xs[0].is_contiguous() and A.hopper_kernel_usable(*xs)
    o, t_o = A.attention_hopper.attention_jvp(*xs)
    assert_within_float32_math(o, t_o, xs)
    calls = []
    monkeypatch.setattr(A.attention_hopper, "attention_jvp", lambda *a, **k: calls.append(1) or (o, t_o))
    A.attention_jvp_triton(*xs)
    assert calls == [1]
    assert not A.hopper_kernel_usable(*random_qkv(1, 2, 128, 100, 64, torch.bfloat16, "cuda"))  # Lk % 64
    for other_D in (48, 100, 104, 128):  # not 64 or a multiple of 8 in (64, 96]
        assert not A.hopper_kernel_usable(*random_qkv(1, 2, 128, 128, other_D, torch.bfloat16, "cuda"))
    assert not A.hopper_kernel_usable(*random_qkv(1, 2, 128, 128, 64, torch.float32, "cuda"))   # fp32


#----------------------------------------------------------------------------
# benchmarks/attention_trained_block.py on tiny data (the real run needs CIFAR-10 and a GPU).

def test_trained_block_benchmark_runs_end_to_end_on_tiny_data(tmp_path):
    import io
    import json
    import zipfile
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for i in range(16):
            buffer = io.BytesIO()
            pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(buffer, format="PNG")
            archive.writestr(f"train/c{i % 2}/{i:04d}.png", buffer.getvalue())
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "attention_trained_block.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = lambda *args: subprocess.run([sys.executable, script, *args, "--dir", str(tmp_path / "net"), "--threads", "1"],
                                       capture_output=True, text=True, env=env, timeout=300)
    missing = run("accuracy", "--allow-cpu")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "capture" in missing.stderr
    data = ["--data", str(tmp_path / "images.zip")]
    for args in (["train", *data, "--steps", "2", "--batch-size", "4", "--depth", "1", "--heads", "1"],
                 ["capture", *data, "--t", "0.5", "1.0"],
                 ["accuracy", "--allow-cpu", "--out", str(tmp_path / "accuracy.json")]):
        result = run(*args)
        assert result.returncode == 0, (args[0], result.stderr[-2000:])
    rows = json.load(open(tmp_path / "accuracy.json"))["rows"]
    assert len(rows) == 1 and all(0 < rows[0][n]["t_o"] < 1e-2 for n in ("ours", "sdpa_math", "math_fallback"))
