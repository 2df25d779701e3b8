"""Attention JVP on one GPU: scaled.attention's Triton kernel against its peers.

Modes (bf16, H = 16 heads, B chosen so that each tensor holds --elements elements):
  (default)    timing rows for each L in --lengths and D in --dims
  --accuracy   errors against float64 with shared key/value offsets and large logits
  --sweep      configurations per head dim, on Hopper with and without TMA, the A100 (sm80)
               table's among them (--no-sm80: without)
  --configs    compile every table entry for sm80 and sm90 (no GPU needed): Triton's shared
               memory and ptxas' registers and spills, against the estimate
  --precompile N  compile the kernels the other modes use, in N processes (fills Triton's cache)

Candidates of the timing rows, all under torch.no_grad, same inputs:
  sdpa_cudnn    fused SDPA forward (no tangent), cuDNN backend: the default on H100 (torch 2.11)
  sdpa_fa2      fused SDPA forward, FlashAttention-2 backend
  ours          scaled.attention.attention on dual tensors (forward AD, the Triton kernel)
  ours_funcjvp  torch.func.jvp(scaled.attention.attention, ...), one transform per call
  ours_compiled torch.compile of that torch.func.jvp call
  ours_raw      attention_jvp_triton(q, k, v, t_q, t_k, t_v), the kernel launch alone (on Hopper
                at D = 64 to 96: the Gluon kernel of scaled/attention_hopper.py)
  triton_raw    the same with the Triton kernel (the table's first configuration)
  prev_raw      --previous FILE: another version's attention_jvp_triton (e.g. from git history)
  math          SDPA's math backend on dual tensors (materializes L x L)
Dual tensors are made once inside an open forward-AD level, as in a whole network's JVP.
FLOPs: "fwd TFLOP/s" is 4 B H L^2 D (a forward's two matrix products) over the time, the same
numerator for every candidate (an inverse time); "JVP TFLOP/s" is 12 B H L^2 D, the JVP's five
products at the true head dim (padding excluded), the efficiency compared across head dims.
Memory: peak bytes allocated during the call beyond the inputs already resident.

  python benchmarks/attention_jvp.py --previous prev.py --out benchmarks/attention_jvp_h100_v5.json
  python benchmarks/attention_jvp.py --accuracy --out accuracy.json
  python benchmarks/attention_jvp.py --sweep --out sweep.json
  python benchmarks/attention_jvp.py --configs --out configs.json
"""
import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from scaled import attention as A  # noqa: E402

import triton  # noqa: E402

H_BENCH = 16


def make_inputs(B, H, L, D, dtype, seed=0, q_k_scale=1.0, key_offset=0.0, value_offset=0.0,
                t_k_offset=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, t_q, t_k, t_v = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(6))
    xs = (q * q_k_scale, k * q_k_scale + key_offset, v + value_offset, t_q, t_k + t_k_offset, t_v)
    return [x.to(dtype) for x in xs]


def load_previous(path):
    """Another version of scaled/attention.py (e.g. `git show REV:scaled/attention.py`)."""
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("previous_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdpa_with(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


def func_jvp_of_attention(q, k, v, t_q, t_k, t_v):
    return torch.func.jvp(A.attention, (q, k, v), (t_q, t_k, t_v))


# One compilation per shape: torch.compile's automatic dynamic shapes would make the head dim
# symbolic after a recompile, while the kernel needs it as a constant.
COMPILED_JVP = torch.compile(func_jvp_of_attention, dynamic=False)
torch._dynamo.config.cache_size_limit = 64


def triton_config(D, dtype=torch.bfloat16, device="cuda"):
    """The Triton kernel's configuration for this case (its table's first): passing it forces
    the Triton kernel where the Gluon one would run."""
    return A.config_candidates(*A.device_arch(device), D, dtype)[0]


def candidates(xs, previous):
    """name -> (fn, dual). A dual candidate's fn takes dual tensors made once inside an open
    forward-AD level, as inside a network's JVP."""
    q, k, v = xs[:3]
    config = triton_config(q.shape[-1], q.dtype, q.device)

    def on_duals(op):
        return lambda duals: fwAD.unpack_dual(op(*duals))

    fns = {
        "sdpa_cudnn": (lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION)(q, k, v), False),
        "sdpa_fa2": (lambda: sdpa_with(SDPBackend.FLASH_ATTENTION)(q, k, v), False),
        "ours": (on_duals(A.attention), True),
        "ours_funcjvp": (lambda: func_jvp_of_attention(*xs), False),
        "ours_compiled": (lambda: COMPILED_JVP(*xs), False),
        "ours_raw": (lambda: A.attention_jvp_triton(*xs), False),
        "triton_raw": (lambda: A.attention_jvp_triton(*xs, config=config), False),
    }
    if previous is not None:
        fns["prev_raw"] = (lambda: previous.attention_jvp_triton(*xs), False)
    fns["math"] = (on_duals(sdpa_with(SDPBackend.MATH)), True)
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


def reference_t_o(xs, n):
    """float32 tangent by the explicit equations on the first n (batch*head) slices."""
    xs = [x.flatten(0, 1)[:n].unsqueeze(0).float() for x in xs]
    return A.attention_jvp_math(*xs)[1]


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


def environment():
    return dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def bench(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment()
    previous = load_previous(args.previous)
    print(f"{env['card']}, torch {env['torch']}, triton {env['triton']}, bf16, H = {H_BENCH}")
    ceil = ceilings()
    rows = []
    for D in args.dims:
        for L in args.lengths:
            B = max(1, args.elements // (H_BENCH * L * D))
            xs = make_inputs(B, H_BENCH, L, D, torch.bfloat16, seed=L + D)
            n = max(1, min(B * H_BENCH, 2**27 // (L * L)))
            row = dict(L=L, D=D, B=B, H=H_BENCH, fwd_flops=4 * B * H_BENCH * L * L * D)
            with torch.no_grad():
                ref = reference_t_o(xs, n)
                for name, (fn, dual) in candidates(xs, previous).items():
                    if args.candidates and name not in args.candidates:
                        continue
                    if name == "math" and L > args.math_max_len:
                        row[name] = dict(ms=None, mem_mb="skipped")
                        continue
                    try:
                        ms, mem, t_o = measure(fn, dual, xs)
                    except Exception as e:  # report and go on (a compile failure, say)
                        row[name] = dict(ms=None, mem_mb=f"{type(e).__name__}: {str(e)[:2000]}")
                        print(f"D={D} L={L} {name} failed: {row[name]['mem_mb']}", flush=True)
                        continue
                    row[name] = dict(ms=ms, mem_mb=mem)
                    if t_o is not None:
                        row[name]["t_o_rel_err"] = rel(t_o, ref, n)
                    del t_o
                    torch.cuda.empty_cache()
                del ref
            rows.append(row)
            print(json.dumps(row), flush=True)
            del xs
            torch.cuda.empty_cache()
    print_table(env["card"], rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**env, dtype="bfloat16",
                           configs={D: A.config_candidates(*A.device_arch("cuda"), D, torch.bfloat16)[0]
                                    for D in args.dims},
                           previous=args.previous, ceilings=ceil, rows=rows), f, indent=1)


def print_table(card, rows):
    names = ["sdpa_cudnn", "sdpa_fa2", "ours", "ours_funcjvp", "ours_compiled", "ours_raw", "triton_raw", "prev_raw",
             "math"]
    print(f"\n{card}: ms (x sdpa_cudnn) | JVP TFLOP/s (ours*, prev, math) or fwd TFLOP/s (sdpa) "
          f"| extra MB | t_o rel err vs fp32")
    for r in rows:
        base = r["sdpa_cudnn"]["ms"]
        print(f"L={r['L']} D={r['D']} B={r['B']}")
        for n in names:
            e = r.get(n)
            if e is None:
                continue
            if e["ms"] is None:
                print(f"  {n:14} {e['mem_mb']}")
                continue
            flops = r["fwd_flops"] * (1 if n.startswith("sdpa") else 3)
            err = f"{e['t_o_rel_err']:.1e}" if "t_o_rel_err" in e else "-"
            ratio = f"{e['ms'] / base:5.2f}x" if base else "  -  "
            print(f"  {n:14} {e['ms']:8.3f} ms {ratio} {flops / e['ms'] / 1e9:5.0f} TFLOP/s "
                  f"{e['mem_mb']:8.0f} MB  {err}")


#----------------------------------------------------------------------------
# Accuracy: bf16 errors against float64, as in issue 13.

ACCURACY_CASES = {
    "randn": dict(), "keys+4": dict(key_offset=4.0), "keys+16": dict(key_offset=16.0),
    "keys+64": dict(key_offset=64.0), "t_k+16": dict(t_k_offset=16.0), "q,k x3": dict(q_k_scale=3.0),
    "q,k x5": dict(q_k_scale=5.0), "values+16": dict(value_offset=16.0),
}


def accuracy(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment()
    previous = load_previous(args.previous)
    B, H, L = 2, 8, 1024
    results = []
    print(f"{env['card']}: bf16 B={B} H={H} L={L}, ||err|| / ||ref|| against float64 (o | t_o)")
    for D in args.dims:
        for case, kw in ACCURACY_CASES.items():
            xs = make_inputs(B, H, L, D, torch.bfloat16, seed=D, **kw)
            ref_o, ref_t = A.attention_jvp_math(*(x.double() for x in xs))
            config = triton_config(D)
            ops = {
                "ours": lambda: A.attention_jvp_triton(*xs),  # on Hopper at D = 64 to 96 the Gluon kernel
                "triton": lambda: A.attention_jvp_triton(*xs, config=config),
                "sdpa_math": lambda: torch.func.jvp(sdpa_with(SDPBackend.MATH), tuple(xs[:3]), tuple(xs[3:])),
                "math_fallback": lambda: torch.func.jvp(A.attention_math, tuple(xs[:3]), tuple(xs[3:])),
            }
            if previous is not None:
                ops["prev"] = lambda: previous.attention_jvp_triton(*xs)
            row = dict(D=D, case=case)
            with torch.no_grad():
                for name, op in ops.items():
                    try:
                        o, t_o = op()
                    except Exception as e:  # the previous version may not take this head dim
                        print(f"D={D} {case} {name}: {type(e).__name__}", flush=True)
                        continue
                    row[name] = dict(o=((o.double() - ref_o).norm() / ref_o.norm()).item(),
                                     t_o=((t_o.double() - ref_t).norm() / ref_t.norm()).item())
            row["ours_over_sdpa_math"] = row["ours"]["t_o"] / row["sdpa_math"]["t_o"]
            results.append(row)
            print(f"D={D:3} {case:10} " + "  ".join(
                f"{n} {row[n]['o']:.1e} | {row[n]['t_o']:.1e}" for n in ops if n in row)
                + f"  t_o ours/sdpa_math {row['ours_over_sdpa_math']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**env, B=B, H=H, L=L, rows=results), f, indent=1)


#----------------------------------------------------------------------------
# Block configurations: timing on this GPU, the sm80 table's too.

# (BLOCK_M = 64 with 4 warps and at most ~113 KB of shared memory: two programs share an SM)
EXTRA_CONFIGS = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 3), (128, 64, 8, 2),
                 (128, 32, 8, 4), (64, 128, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 4), (64, 32, 4, 3),
                 (64, 32, 4, 2), (64, 16, 4, 4)]
SWEEP_SM80 = True  # --no-sm80: leave out the A100 table's configurations


def sweep_cases(dims, extra_dims):
    """(D, Config) the sweep times: the sm90 and sm80 tables' entries but their last resort
    (32, 32, 4, 1), and for extra_dims a few more, all that fit an H100; on Hopper each sm90 and
    extra one with and without TMA (the A100 table's without: an A100 has no TMA)."""
    has_tma = A.has_tma()
    cases = []
    for D in dims:
        Dp = sum(A.head_dim_split(D))
        hopper = A.CONFIGS["sm90", 2][Dp][:-1] + [A.Config(*c) for c in EXTRA_CONFIGS if D in extra_dims]
        hopper = [A.Config(*c[:4], tma) for c in hopper for tma in ((True, False) if has_tma else (False,))]
        configs = [c for c in hopper + (A.CONFIGS["sm80", 2][Dp][:-1] if SWEEP_SM80 else [])
                   if A.shared_memory_estimate(c, Dp, 2) <= A.SHARED_MEMORY_LIMIT["sm90"]]
        cases += [(D, c) for c in dict.fromkeys(configs)]
    return cases


def sweep(args):
    torch.backends.cuda.matmul.allow_tf32 = False
    env = environment()
    L = args.sweep_len
    previous = load_previous(args.previous)
    results = []
    for D in args.sweep_dims or args.dims:
        B = max(1, args.elements // (H_BENCH * L * D))
        xs = make_inputs(B, H_BENCH, L, D, torch.bfloat16, seed=1)
        base = triton.testing.do_bench(lambda: sdpa_with(SDPBackend.CUDNN_ATTENTION)(*xs[:3]),
                                       warmup=25, rep=100, return_mode="median")
        o_ref, t_o_ref = A.attention_jvp_triton(*xs)
        default = triton_config(D)
        flops = 12 * B * H_BENCH * L * L * D
        Dp = sum(A.head_dim_split(D))
        for _, config in sweep_cases([D], args.dims):
            out = [torch.empty_like(o_ref) for _ in range(2)]
            try:
                kernel = A._launch(*xs, *out, config)
                ms = triton.testing.do_bench(lambda: A._launch(*xs, *out, config),
                                             warmup=25, rep=100, return_mode="median")
            except Exception as e:  # resource limits of a config
                print(f"D={D} {config}: failed {type(e).__name__}: {str(e)[:200]}")
                continue
            res = dict(D=D, L=L, B=B, config=config, ms=ms, sdpa_cudnn_ms=base,
                       jvp_tflops=flops / ms / 1e9, shared=kernel.metadata.shared,
                       estimate=A.shared_memory_estimate(config, Dp, 2),
                       regs=kernel.n_regs, spills=kernel.n_spills,
                       in_sm90_table=config in A.CONFIGS["sm90", 2][Dp],
                       in_sm80_table=config in A.CONFIGS["sm80", 2][Dp],
                       default=config == default,
                       max_diff_o=(out[0].float() - o_ref.float()).abs().max().item(),
                       max_diff_t_o=(out[1].float() - t_o_ref.float()).abs().max().item(),
                       max_t_o=t_o_ref.float().abs().max().item())
            results.append(res)
            print(f"{env['card']} D={D} L={L} B={B} {tuple(config)}: {ms:.3f} ms "
                  f"({ms / base:.2f}x cuDNN fwd {base:.3f} ms), JVP {res['jvp_tflops']:.0f} TFLOP/s, "
                  f"shared {res['shared']} (estimate {res['estimate']}), regs {res['regs']} spills "
                  f"{res['spills']}, max|diff| o {res['max_diff_o']:.1e} t_o {res['max_diff_t_o']:.1e}"
                  f"{' [sm90 table]' if res['in_sm90_table'] else ''}"
                  f"{' [sm80 table]' if res['in_sm80_table'] else ''}", flush=True)
        if previous is not None:
            ms = triton.testing.do_bench(lambda: previous.attention_jvp_triton(*xs), warmup=25, rep=100,
                                         return_mode="median")
            results.append(dict(D=D, L=L, B=B, previous=args.previous, ms=ms, sdpa_cudnn_ms=base))
            print(f"{env['card']} D={D} previous version: {ms:.3f} ms ({ms / base:.2f}x cuDNN fwd)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**env, sweep=results), f, indent=1)


def use_fastest(path, dims):
    """Reorder this process's sm90 table: the sweep's fastest configuration first."""
    with open(path) as f:
        timed = [r for r in json.load(f)["sweep"] if "config" in r]
    for D in dims:
        fastest = A.Config(*min((r for r in timed if r["D"] == D), key=lambda r: r["ms"])["config"])
        table = A.CONFIGS["sm90", 2][sum(A.head_dim_split(D))]
        table.insert(0, table.pop(table.index(fastest)) if fastest in table else fastest)
        print(f"D={D}: fastest swept configuration {fastest} first", flush=True)


#----------------------------------------------------------------------------
# Cross-compilation of the tables (no GPU needed) and a parallel warm-up of Triton's cache.

POINTERS = ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO")
DESCRIPTORS = ("KD0", "TKD0", "VD0", "TVD0", "KD1", "TKD1", "VD1", "TVD1")


def compile_for(capability, D, config, L=4096, H=16):
    """Compile the kernel for a GPU of this compute capability as a launch with bf16
    [B, H, L, D] contiguous tensors would; (Triton's shared bytes, ptxas registers, spill bytes)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    BLOCK_M, BLOCK_N, num_warps, num_stages, tma = A.Config(*config)
    D0, D1 = A.head_dim_split(D)
    align = next(a for a in (8, 4, 2, 1) if D % a == 0)
    kernel = A._attention_jvp_kernel
    target = GPUTarget("cuda", capability, 32)
    divisible_by_16 = make_backend(target).parse_attr("D")
    constants = dict(D=D, D0=D0, D1=D1, MASK_D0=D0 > D, MASK_D1=D0 + D1 > D, ALIGN=align, BLOCK_M=BLOCK_M,
                     BLOCK_N=BLOCK_N, MASK_M=L % BLOCK_M != 0, MASK_N=L % BLOCK_N != 0,
                     INPUT_PRECISION="tf32")
    strides = {"b": H * L * D // align, "h": L * D // align, "m": D // align, "n": D // align}
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = None
        if name in constants:
            signature[name] = "constexpr"
        elif name in DESCRIPTORS:
            width = D0 if name.endswith("D0") else D1
            if tma and width:
                signature[name] = f"tensordesc<bf16[1,1,{BLOCK_N},{width}]>"
            else:
                signature[name], constants[name] = "constexpr", None
        elif name in POINTERS:
            signature[name], value = "*bf16", 16
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            value = {"H": H, "Lq": L, "Lk": L}.get(name, strides.get(name[-1]))
        if value is not None and value % 16 == 0:
            attrs[(i,)] = divisible_by_16
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs), target=target,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        arch = f"sm_{capability}{'a' if capability == 90 else ''}"
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return compiled.metadata.shared, regs, spills


def _compile_job(job):
    arch, D, config = job
    try:
        shared, regs, spills = compile_for(int(arch[2:]), D, config)
    except Exception as e:
        return dict(arch=arch, D=D, config=config, error=f"{type(e).__name__}: {str(e)[-300:]}")
    Dp = sum(A.head_dim_split(D))
    return dict(arch=arch, D=D, Dp=Dp, config=config, shared=shared, regs=regs, spills=spills,
                estimate=A.shared_memory_estimate(config, Dp, 2), limit=A.SHARED_MEMORY_LIMIT[arch])


def configs(args):
    """Every 16-bit table entry, compiled for its architecture."""
    jobs = [(arch, D, config) for arch in ("sm80", "sm90") for D in (16, 32, 48, 64, 72, 96, 128)
            for config in A.CONFIGS[arch, 2][sum(A.head_dim_split(D))]]
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_compile_job, jobs))
    for r in results:
        if "error" in r:
            print(f"{r['arch']} D={r['D']} {r['config']}: FAILED {r['error']}")
        else:
            ok = r["shared"] <= min(r["estimate"], r["limit"])
            print(f"{r['arch']} D={r['D']:3} (padded {r['Dp']:3}) {r['config']}: shared {r['shared']:6} "
                  f"estimate {r['estimate']:6} limit {r['limit']} regs {r['regs']} spills {r['spills']}"
                  f"{'' if ok else '  <-- EXCEEDS'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(triton=triton.__version__, compiled=results), f, indent=1)


def _precompile_job(job):
    D, config, previous = job
    xs = make_inputs(1, H_BENCH, 256, D, torch.bfloat16)
    if config is None:
        load_previous(previous).attention_jvp_triton(*xs)
    else:
        A._launch(*xs, *[torch.empty_like(xs[0]) for _ in range(2)], config)
    torch.cuda.synchronize()
    return D, config


def precompile(args):
    """Compile what --sweep, --accuracy and the rows launch (same specializations: lengths that
    are multiples of 128, 16 heads), in parallel processes that share Triton's disk cache."""
    t = time.time()
    jobs = [(D, c, None) for D, c in sweep_cases(args.sweep_dims or args.dims, args.dims)]
    if args.previous:
        jobs += [(D, None, args.previous) for D in args.dims]
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_precompile_job, jobs):
            print("compiled", done, flush=True)
    print(f"{len(jobs)} kernels in {time.time() - t:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 72, 128])
    p.add_argument("--elements", type=int, default=2**25, help="B*H*L*D per tensor (fills the card)")
    p.add_argument("--math-max-len", type=int, default=4096, help="skip SDPA-math above this L")
    p.add_argument("--previous", help="another version of scaled/attention.py to time beside this one")
    p.add_argument("--candidates", nargs="+", help="time only these candidates (default: all)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--sweep-len", type=int, default=4096)
    p.add_argument("--sweep-dims", type=int, nargs="+", help="head dims of --sweep (default --dims); "
                   "--dims get extra configurations")
    p.add_argument("--best-from", help="a --sweep JSON of this GPU: put its fastest configuration first "
                   "in this run's sm90 table")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for --configs, --precompile")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--accuracy", action="store_true", help="errors with offsets and large logits")
    mode.add_argument("--sweep", action="store_true", help="time block configurations instead")
    mode.add_argument("--configs", action="store_true", help="compile the tables for sm80 and sm90")
    mode.add_argument("--precompile", action="store_true", help="fill Triton's cache in parallel")
    p.add_argument("--no-sm80", action="store_true", help="--sweep, --precompile: without the A100 table")
    args = p.parse_args()
    SWEEP_SM80 = not args.no_sm80
    if args.best_from:
        use_fastest(args.best_from, args.dims)
    {"accuracy": accuracy, "sweep": sweep, "configs": configs, "precompile": precompile}.get(
        next((m for m in ("accuracy", "sweep", "configs", "precompile") if getattr(args, m)), None), bench)(args)
