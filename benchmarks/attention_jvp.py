"""Attention JVP on one GPU: scaled.attention's Triton kernel against its peers.

Candidates, all in bf16 under torch.no_grad, same inputs:
  sdpa_fwd      plain fused SDPA forward (no tangent): the floor
  ours          scaled.attention.attention on dual tensors (forward AD, the Triton kernel)
  ours_funcjvp  torch.func.jvp(scaled.attention.attention, ...), one transform per call
  ours_raw      attention_jvp_triton(q, k, v, t_q, t_k, t_v), the kernel launch alone
  jfa           jvp_flash_attention's JVPAttn.fwd_dual on dual tensors (optional package)
  jfa_funcjvp   torch.func.jvp(JVPAttn.fwd_dual, ...)
  math          SDPA's math backend on dual tensors (materializes L x L)
Dual tensors are made once inside an open forward-AD level, as in a whole network's JVP;
the *_funcjvp rows add torch.func.jvp's own set-up to every call.
FLOPs: "fwd TFLOP/s" is 4 B H L^2 D (the two matrix products of a forward) over the time,
the same numerator for every candidate, so it is an inverse time; the JVP kernel itself does
3x that in matrix products (q k^T, t_q k^T + q t_k^T, p v, p t_v, (p t_s) v = 12 B H L^2 D).
Memory: peak bytes allocated during the call beyond the inputs already resident.

  python benchmarks/attention_jvp.py --out benchmarks/attention_jvp_h100.json
  python benchmarks/attention_jvp.py --sweep   # block-size sweep of the kernel
  python benchmarks/attention_jvp.py --check   # per-dtype errors against float64
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scaled import attention as A  # noqa: E402

try:
    from jvp_flash_attention.jvp_attention import JVPAttn
except ImportError:
    JVPAttn = None

import triton  # noqa: E402


def make_inputs(B, H, L, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for _ in range(6)]


def candidates(q, k, v, t_q, t_k, t_v):
    """name -> (fn, dual). A dual candidate's fn takes dual tensors made once inside an open
    forward-AD level, as inside a network's JVP; the *_funcjvp ones pay torch.func.jvp's own
    set-up (about 0.2-0.6 ms of CPU per call) on top, every call."""
    def on_duals(op):
        def fn(duals):
            o, t_o = fwAD.unpack_dual(op(*duals))
            return o, t_o
        return fn

    def math_op(*xs):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*xs)

    fns = {
        "sdpa_fwd": (lambda: F.scaled_dot_product_attention(q, k, v), False),
        "ours": (on_duals(A.attention), True),
        "ours_funcjvp": (lambda: torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v)), False),
        "ours_raw": (lambda: A.attention_jvp_triton(q, k, v, t_q, t_k, t_v), False),
    }
    if JVPAttn is not None:
        fns["jfa"] = (on_duals(JVPAttn.fwd_dual), True)
        fns["jfa_funcjvp"] = (lambda: torch.func.jvp(JVPAttn.fwd_dual, (q, k, v), (t_q, t_k, t_v)), False)
    fns["math"] = (on_duals(math_op), True)
    return fns


def measure(fn, dual, xs):
    """(median ms, extra peak MB, t_o) or (None, 'OOM', None)."""
    with fwAD.dual_level() if dual else contextlib.nullcontext():
        if dual:
            duals = [fwAD.make_dual(x, t) for x, t in zip(xs[:3], xs[3:])]
            call = lambda: fn(duals)
        else:
            call = fn
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            out = call()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            t_o = out[1] if isinstance(out, tuple) else None
            del out
            ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None, "OOM", None
    return ms, peak, t_o


def reference_t_o(q, k, v, t_q, t_k, t_v, n):
    """fp32 math-path JVP on the first n (batch*head) slices."""
    xs = [x.flatten(0, 1)[:n].unsqueeze(0).float() for x in (q, k, v, t_q, t_k, t_v)]
    return torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:]))[1]


def rel(x, ref, n):
    x = x.flatten(0, 1)[:n].unsqueeze(0).float()
    return ((x - ref).norm() / ref.norm()).item()


def ceilings():
    """Measured ceilings (METHOD.md): bf16 matrix product rate and device-to-device copy."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    x = torch.randn(2**28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms_copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    c = dict(bf16_matmul_tflops=2 * 8192**3 / ms / 1e9, copy_tb_s=2 * x.numel() * 4 / ms_copy / 1e9)
    print(f"ceilings: bf16 8192^3 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"copy {c['copy_tb_s']:.2f} TB/s (read + write)", flush=True)
    return c


def bench(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    rows = []
    print(f"card: {card}, torch {torch.__version__}, triton {triton.__version__}, bf16, H = 16")
    ceil = ceilings()
    for D in args.dims:
        for L in args.lengths:
            H = 16
            B = max(1, args.elements // (H * L * D))
            xs = make_inputs(B, H, L, D, torch.bfloat16, seed=L + D)
            fns = candidates(*xs)
            n = max(1, min(B * H, 2**27 // (L * L)))
            with torch.no_grad():
                ref = reference_t_o(*xs, n)
                row = dict(L=L, D=D, B=B, H=H, fwd_flops=4 * B * H * L * L * D)
                for name, (fn, dual) in fns.items():
                    if name == "math" and L > args.math_max_len:
                        row[name] = dict(ms=None, mem_mb="skipped")
                        continue
                    ms, mem, t_o = measure(fn, dual, xs)
                    row[name] = dict(ms=ms, mem_mb=mem)
                    if t_o is not None:
                        row[name]["t_o_rel_err"] = rel(t_o, ref, n)
                    del t_o
                    torch.cuda.empty_cache()
                del ref
            rows.append(row)
            print_row(row)
            del xs, fns
            torch.cuda.empty_cache()
    print_table(card, rows)
    mem_rows = memory_series(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=card, torch=torch.__version__, triton=triton.__version__,
                           dtype="bfloat16", time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                           configs={D: A._default_config(D, torch.bfloat16) for D in args.dims},
                           ceilings=ceil, rows=rows, memory_series=mem_rows), f, indent=1)


def print_row(row):
    print(json.dumps(row), flush=True)


def print_table(card, rows):
    names = ["sdpa_fwd", "ours", "ours_funcjvp", "ours_raw", "jfa", "jfa_funcjvp", "math"]
    print(f"\n{card}: ms | fwd-TFLOP/s | x sdpa_fwd | extra MB | t_o rel err vs fp32")
    print(f"{'L':>6} {'D':>4} {'B':>4} " + " ".join(f"{n:>34}" for n in names))
    for r in rows:
        cells = []
        base = r["sdpa_fwd"]["ms"]
        for n in names:
            e = r.get(n)
            if e is None or e["ms"] is None:
                cells.append(f"{'-' if e is None else str(e['mem_mb']):>34}")
                continue
            tf = r["fwd_flops"] / e["ms"] / 1e9
            err = f"{e['t_o_rel_err']:.1e}" if "t_o_rel_err" in e else "-"
            cells.append(f"{e['ms']:7.3f} {tf:5.0f} {e['ms'] / base:5.1f}x {e['mem_mb']:7.0f} {err:>7}")
        print(f"{r['L']:>6} {r['D']:>4} {r['B']:>4} " + " ".join(cells))


def sweep(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    L = args.sweep_len
    configs = {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                    (128, 32, 4, 3), (64, 128, 4, 2), (128, 64, 4, 2), (64, 32, 4, 4),
                    (128, 64, 8, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3)],
               128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3),
                     (128, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 1), (128, 32, 4, 2),
                     (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 128, 8, 2)]}
    results = []
    for D in args.dims:
        B = max(1, args.elements // (16 * L * D))
        xs = make_inputs(B, 16, L, D, torch.bfloat16, seed=1)
        base = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(*xs[:3]),
                                       warmup=25, rep=100, return_mode="median")
        ref = reference_t_o(*xs, 2)
        for cfg in configs[D]:
            try:
                fn = lambda: A.attention_jvp_triton(*xs, config=cfg)
                t_o = fn()[1]
                err = rel(t_o, ref, 2)
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # resource limits of a config
                print(f"{card} D={D} L={L} cfg={cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            tf = 12 * B * 16 * L * L * D / ms / 1e9
            print(f"{card} D={D} L={L} B={B} cfg(BM,BN,warps,stages)={cfg}: {ms:.3f} ms, "
                  f"{ms / base:.2f}x sdpa_fwd ({base:.3f} ms), JVP-matmul {tf:.0f} TFLOP/s, err {err:.1e}",
                  flush=True)
            results.append(dict(D=D, L=L, B=B, config=cfg, ms=ms, sdpa_fwd_ms=base, rel_err=err))
    try:  # registers and spills of what was compiled
        for dev_cache in A._kernel(False).device_caches.values():
            for key, kern in dev_cache[0].items():
                md = kern.metadata
                print(f"compiled: warps={md.num_warps} stages={md.num_stages} shared={md.shared} "
                      f"regs={getattr(kern, 'n_regs', '?')} spills={getattr(kern, 'n_spills', '?')}")
    except Exception as e:
        print("no register report:", e)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(card=card, sweep=results), f, indent=1)


def memory_series(args):
    """Extra peak memory at fixed B = 1, H = 16, D = 64 as L grows (linear for a flash JVP)."""
    rows = []
    for L in args.lengths:
        xs = make_inputs(1, 16, L, 64, torch.bfloat16, seed=L)
        row = dict(L=L, B=1, H=16, D=64)
        with torch.no_grad():
            for name, (fn, dual) in candidates(*xs).items():
                if name == "math" and L > args.math_max_len or name.endswith(("_funcjvp", "_raw")):
                    continue
                row[name + "_mb"] = measure(fn, dual, xs)[1]
                torch.cuda.empty_cache()
        print("memory", json.dumps(row), flush=True)
        rows.append(row)
    return rows


def check(args):
    """Max errors of the kernel per dtype against torch.func.jvp of math attention in float64."""
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (B, H, Lq, Lk, D) in [(2, 3, 200, 200, 32), (1, 4, 333, 517, 64), (2, 2, 1000, 130, 128)]:
            xs = [torch.randn(B, H, L, D, device="cuda", dtype=dtype) for L in (Lq, Lk, Lk) * 2]
            o, t_o = A.attention_jvp_triton(*xs)
            x64 = [x.double() for x in xs]
            ro, rt = torch.func.jvp(A.attention_math, tuple(x64[:3]), tuple(x64[3:]))
            print(f"{card} {str(dtype):15} B={B} H={H} Lq={Lq} Lk={Lk} D={D}: "
                  f"o max|err| {(o.double() - ro).abs().max().item():.1e} "
                  f"rel {((o.double() - ro).norm() / ro.norm()).item():.1e}; "
                  f"t_o max|err| {(t_o.double() - rt).abs().max().item():.1e} "
                  f"rel {((t_o.double() - rt).norm() / rt.norm()).item():.1e} (max|t_o| {rt.abs().max().item():.1f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--elements", type=int, default=2**25, help="B*H*L*D per tensor (fills the card)")
    p.add_argument("--math-max-len", type=int, default=16384, help="skip SDPA-math above this L")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--sweep", action="store_true", help="time block configurations instead")
    p.add_argument("--sweep-len", type=int, default=4096)
    p.add_argument("--check", action="store_true", help="per-dtype errors instead")
    args = p.parse_args()
    check(args) if args.check else sweep(args) if args.sweep else bench(args)
