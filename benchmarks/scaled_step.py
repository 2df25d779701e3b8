"""Benchmark of the sCM step and few-step sampling for scaled.networks' presets on one GPU.

For each preset, at the largest batch that fits (found from the peak memory of two small batches,
then checked), eager or with compiled regions, with or without activation checkpointing:
- the sCD step (teacher velocity + JVP pass + gradient pass + Adam, frozen bf16 teacher of the
  same preset) and the teacher's diffusion step (forward + backward + Adam) on the same net and
  batch: time per step (median of CUDA-event timings), their ratio, images/s, peak memory;
- MFU: counted FLOPs per step / time / the card's bf16 matmul rate measured here (8192^3).

FLOP-counting rule: torch.utils.flop_counter on the meta device counts the matrix work of the
ops each pass executes (convolutions, linear layers, attention products), per sample, nothing
elementwise: teacher forward F; JVP pass = primal + tangent (2 F for convolutions and linear
layers, 3 x the forward's attention products for attention, counted on the math path, which
does the kernel's products); gradient pass = forward + backward (3 F). sCD step = the three;
teacher step = the last. Activation-checkpointing recomputation is not counted (MFU, not HFU).

Also: the bf16 step's g and loss against an fp32 step (TF32 off) on the same batch; the compiled
JVP's tangents against eager ones (both against fp32; a mismatch fails the run loudly); a
per-phase time breakdown and the top CUDA kernels of one eager sCD step; the 2-step sampling
time of a frozen net at batch 1 and 64, eager and replayed from a CUDA graph.

    python benchmarks/scaled_step.py --out benchmarks/results/scaled_step_h100.json
    python benchmarks/scaled_step.py --runs dit-b:eager,dit-b:compile,sampling:unet-s
    python benchmarks/scaled_step.py --device cpu --runs unet-tiny:eager,dit-tiny:compile --batch 2   # dry run

Writes the JSON after each measurement (a killed run keeps what it measured) and prints a table.
"""

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import scm_min  # noqa: E402
from image_data.fid import full_float32  # noqa: E402
from scaled import attention as attention_module  # noqa: E402
from scaled.networks import PRESETS, freeze, make_net, project_weights_  # noqa: E402
from scaled.step import (RecordingJVP, TrainStep, forward_ad_jvp, prepare, sample_few_step, scm_loss,  # noqa: E402
                         teacher_loss)

MODES = {"eager": dict(compile=False, checkpoint=False), "ckpt": dict(compile=False, checkpoint=True),
         "compile": dict(compile=True, checkpoint=False), "compile+ckpt": dict(compile=True, checkpoint=True)}


class CompiledTangentMismatch(RuntimeError):
    """The compiled JVP pass does not reproduce the eager tangents (pytorch#192985 and kin)."""

#----------------------------------------------------------------------------
# Measuring.

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timestamped_log(start):
    """print(message) prefixed with the seconds since `start` (perf_counter), flushed at once."""
    return lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)


def write_json(path, results):
    """Write results to path atomically: a run stopped at its time limit keeps the last whole file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, path)


def cuda_graph(fn, device):
    """A CUDA graph of fn() (warmed up on a side stream) and its static output."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def time_calls(fn, device, warmup=2, repeat=5):
    """Median seconds per call of fn() (CUDA events on a GPU), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    times.sort()
    return times[len(times) // 2], times


def matmul_rate(device):
    """bf16 (GPU) or fp32 (CPU) matrix-product rate in FLOP/s on random 8192^3 (CPU: 1024^3)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    seconds, _ = time_calls(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n ** 3 / seconds


def net_resolution(preset, overrides):
    return {**PRESETS[preset], **overrides}.get("img_resolution", 64)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def make_batch(net, resolution, n, device, seed=1):
    """x0 ~ N(0, SIGMA_D^2) [n, C, resolution, resolution] and random class labels."""
    generator = torch.Generator(device).manual_seed(seed)
    x0 = torch.randn(n, net.img_channels, resolution, resolution, device=device, generator=generator)
    labels = torch.randint(0, net.label_dim, (n,), device=device, generator=generator)
    return x0 * scm_min.SIGMA_D, labels


@torch.no_grad()
def trained_like(net):
    """Parameters that start at zero (output gains, output layers, DiT's gates) set as in a trained
    net (gains 1, the rest N(0, 0.02^2)), so that F and its tangent depend on every layer."""
    for p in net.parameters():
        if p.numel() == 1:
            p.fill_(1.0) if p == 0 else None
        else:
            zero_rows = (p.reshape(len(p), -1) == 0).all(dim=1)
            p[zero_rows] = torch.randn_like(p[zero_rows]) * 0.02
    return net


class Setup:
    """Student (fp32 master weights, bf16 trunk), frozen bf16 teacher, data, the two steps."""

    def __init__(self, preset, device, mode, overrides, seed=0):
        torch.manual_seed(seed)
        with torch.device(device):
            self.student = make_net(preset, **overrides)
        self.teacher = freeze(self.student)
        prepare(self.student, **MODES[mode])
        prepare(self.teacher, compile=MODES[mode]["compile"])
        self.device, self.resolution = device, net_resolution(preset, overrides)
        self.scd = TrainStep(self.student, scm_loss(self.student, self.teacher))
        self.diffusion = None

    def batch(self, n, seed=1):
        return make_batch(self.student, self.resolution, n, self.device, seed)

    def scd_step(self, x0, labels):
        return self.scd(x0, 10_000, class_labels=labels)

    def teacher_step(self, x0, labels):
        if self.diffusion is None:   # its own Adam state, once the sCD step and teacher are dropped
            self.scd = self.teacher = None
            reset_memory(self.device)
            self.diffusion = TrainStep(self.student, teacher_loss(self.student))
        return self.diffusion(x0, 0, class_labels=labels)


def peak_of_step(setup, batch, steps=2):
    """Peak GiB over `steps` sCD steps at `batch` (the first allocates Adam's state), or None on OOM."""
    x0, labels = setup.batch(batch)
    reset_memory(setup.device)
    try:
        for _ in range(steps):
            setup.scd_step(x0, labels)
        synchronize(setup.device)
    except torch.OutOfMemoryError:
        return None
    finally:
        del x0, labels
    return peak_gib(setup.device)


def predicted_batch(setup, capacity_gib, probe=(4, 8), limit=256):
    """Largest batch (a multiple of 8, at most `limit`) predicted to fit in 92% of the card: the
    sCD step's peak memory is linear in the batch; fit it on two small batches."""
    peaks = [peak_of_step(setup, b) for b in probe]
    if None in peaks:
        return None, {}
    per_sample = (peaks[1] - peaks[0]) / (probe[1] - probe[0])
    fixed = peaks[0] - probe[0] * per_sample
    batch = min(limit, int((0.92 * capacity_gib - fixed) / per_sample) // 8 * 8)
    return batch, dict(fixed_gib=round(fixed, 2), per_sample_gib=round(per_sample, 4),
                       predicted_peak_gib=round(fixed + batch * per_sample, 1), limit=limit)


def step_breakdown(setup, batch):
    """Seconds of each phase of one sCD step: teacher forward, JVP pass, the rest of the loss (the
    gradient pass's forward), backward, Adam + forced weight normalization."""
    events = {}

    def mark(name):
        if setup.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            events[name] = event
        else:
            events[name] = time.perf_counter()

    def timed(fn, before, after):
        def wrapped(*args, **kwargs):
            mark(before)
            output = fn(*args, **kwargs)
            mark(after)
            return output
        return wrapped

    loss_fn = setup.scd.loss_fn
    teacher, jvp = loss_fn.teacher, loss_fn.jvp
    loss_fn.teacher, loss_fn.jvp = timed(teacher, "teacher0", "teacher1"), timed(jvp, "jvp0", "jvp1")
    x0, labels = setup.batch(batch)
    try:
        for _ in range(2):
            mark("loss0")
            loss, _ = loss_fn(setup.student, x0, 10_000, class_labels=labels)
            mark("backward0")
            setup.scd.optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            mark("optimizer0")
            setup.scd.optimizer.step()
            project_weights_(setup.student)
            mark("end")
            synchronize(setup.device)
    finally:
        loss_fn.teacher, loss_fn.jvp = teacher, jvp

    def seconds(a, b):
        if setup.device.type == "cuda":
            return events[a].elapsed_time(events[b]) / 1e3
        return events[b] - events[a]

    return {"teacher_forward": seconds("teacher0", "teacher1"), "jvp_pass": seconds("jvp0", "jvp1"),
            "other_loss_work_and_grad_forward": seconds("loss0", "backward0") - seconds("teacher0", "teacher1")
            - seconds("jvp0", "jvp1"),
            "backward": seconds("backward0", "optimizer0"), "adam_and_weight_normalization": seconds("optimizer0", "end")}


def top_kernels(setup, batch, count=15):
    """The CUDA kernels that take most of one sCD step's time (torch.profiler)."""
    x0, labels = setup.batch(batch)
    setup.scd_step(x0, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        setup.scd_step(x0, labels)
        synchronize(setup.device)
    rows = [(e.key, e.device_time_total / 1e3, e.count) for e in profiler.key_averages()]
    rows.sort(key=lambda row: -row[1])
    total = sum(row[1] for row in rows)
    return [dict(kernel=key[:120], ms=round(ms, 2), share=round(ms / total, 4), calls=calls)
            for key, ms, calls in rows[:count]]

#----------------------------------------------------------------------------
# Accuracy checks.

def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def scd_quantities(student, teacher, x0, labels, seed=3):
    """(g, per-sample loss, gradient) of one sCD loss evaluation; t and z drawn from `seed`."""
    jvp = RecordingJVP()
    torch.manual_seed(seed)
    student.zero_grad(set_to_none=True)
    loss, _ = scm_loss(student, teacher, warmup_steps=0, jvp=jvp)(student, x0, 0, class_labels=labels)
    loss.mean().backward()
    (_, _, _, (F, tangent)), = jvp.calls
    _, g = jvp.target()
    grad = torch.cat([p.grad.flatten() for name, p in student.named_parameters()
                      if p.grad is not None and not name.startswith("logvar.")])   # the network's, not the weighting head's
    return dict(g=g.detach(), loss=loss.detach(), grad=grad, tangent=tangent)


def precision_check(preset, device, overrides, batch=4):
    """Relative error of the bf16 step (bf16 trunk, bf16 teacher) against fp32 (TF32 off)."""
    torch.manual_seed(0)
    with torch.device(device):
        net = trained_like(make_net(preset, **overrides))
    x0, labels = make_batch(net, net_resolution(preset, overrides), batch, device)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        net.dtype = dtype
        with full_float32() if dtype == torch.float32 else contextlib.nullcontext():
            results[dtype] = scd_quantities(net, freeze(net, dtype), x0, labels)
    return {key: relative_error(results[torch.bfloat16][key], results[torch.float32][key])
            for key in ("g", "loss", "grad", "tangent")}


def compiled_tangent_check(net, x0, labels):
    """The JVP pass's tangent with compiled regions against eager, both in bf16, each against fp32
    eager (TF32 off), on `net` (left prepared with compiled regions). Raises
    CompiledTangentMismatch unless the compiled error is within 1.5x eager's + 1e-3."""
    t = torch.full((len(x0),), 0.8, device=x0.device)
    x, t_x = x0 / scm_min.SIGMA_D, torch.randn_like(x0)
    tangents = {}
    for name, dtype, compile in (("fp32", torch.float32, False), ("eager", torch.bfloat16, False),
                                 ("compiled", torch.bfloat16, True)):
        net.dtype = dtype
        prepare(net, compile=compile)
        with torch.no_grad(), (full_float32() if dtype == torch.float32 else contextlib.nullcontext()):
            tangents[name] = forward_ad_jvp(functools.partial(net, class_labels=labels), (x, t),
                                            (t_x, torch.ones_like(t)))[1]
    errors = {name: relative_error(tangents[name], tangents["fp32"]) for name in ("eager", "compiled")}
    errors["compiled_vs_eager"] = relative_error(tangents["compiled"], tangents["eager"])
    if not errors["compiled"] <= 1.5 * errors["eager"] + 1e-3:
        raise CompiledTangentMismatch(f"compiled JVP tangent error {errors['compiled']:.3g} against fp32, "
                                      f"eager {errors['eager']:.3g}")
    return errors


#----------------------------------------------------------------------------
# Runs.

def run_preset(preset, mode, device, capacity_gib, peak_flops, args, log):
    overrides = {}
    result = dict(preset=preset, mode=mode)
    with torch.device("meta"):
        channels = make_net(preset, **overrides).img_channels
    counts = flops_per_sample(preset, (channels, *2 * [net_resolution(preset, overrides)]), **overrides)
    result["gflop_per_sample"] = {name: round(value / 1e9, 2) for name, value in counts.items()}
    reset_memory(device)
    setup = Setup(preset, device, mode, overrides)
    result["params_m"] = round(sum(p.numel() for p in setup.student.parameters()) / 1e6, 2)
    if args.batch:
        batch = args.batch
    elif mode.startswith("compile") and args.batch_from.get(preset):
        batch = args.batch_from[preset]   # the eager search's batch (a new batch would recompile)
    else:   # probe without cuDNN's autotuning, which the two probe batches would pay for twice
        torch.backends.cudnn.benchmark = False
        batch, result["memory_model"] = predicted_batch(setup, capacity_gib, limit=args.max_batch)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        if batch is None:
            result["error"] = "does not fit at batch 8"
            return result
    while True:   # the first step at the predicted batch checks the prediction (back off 15%)
        log(f"  batch {batch}")
        x0, labels = setup.batch(batch)
        compile_start = time.perf_counter()
        try:
            setup.scd_step(x0, labels)
            synchronize(device)
            break
        except torch.OutOfMemoryError:
            del x0, labels
            reset_memory(device)
            batch = int(batch * 0.85) // 8 * 8
            if batch < 8 or args.batch:
                result["error"] = "out of memory"
                return result
    result["first_step_s"] = round(time.perf_counter() - compile_start, 1)
    if mode.startswith("compile"):   # at the timed batch: the compiled JVP graphs are the timed ones
        trained_like(setup.student)
        result["compiled_tangents"] = compiled_tangent_check(setup.student, x0, labels)
        log(f"  compiled tangents: {result['compiled_tangents']}")
        prepare(setup.student, **MODES[mode])
    if not mode.startswith("compile"):
        args.batch_from.setdefault(preset, batch)
    result["batch"] = batch
    reset_memory(device)
    scd_s, scd_all = time_calls(lambda: setup.scd_step(x0, labels), device, warmup=1, repeat=args.repeat)
    result["scd_peak_gib"] = round(peak_gib(device), 2)
    if args.breakdown and mode == "eager":
        result["scd_breakdown_s"] = {k: round(v, 4) for k, v in step_breakdown(setup, batch).items()}
    if args.profile and mode == "eager" and preset in args.profile:
        result["top_kernels"] = top_kernels(setup, batch)
    setup.teacher_step(x0, labels)
    reset_memory(device)
    teacher_s, teacher_all = time_calls(lambda: setup.teacher_step(x0, labels), device, warmup=1, repeat=args.repeat)
    result["teacher_peak_gib"] = round(peak_gib(device), 2)
    result.update(
        scd_step_s=round(scd_s, 4), teacher_step_s=round(teacher_s, 4), scd_over_teacher=round(scd_s / teacher_s, 3),
        scd_step_all_s=[round(s, 4) for s in scd_all], teacher_step_all_s=[round(s, 4) for s in teacher_all],
        scd_images_per_s=round(batch / scd_s, 1), teacher_images_per_s=round(batch / teacher_s, 1),
        scd_mfu=round(counts["scd_step"] * batch / scd_s / peak_flops, 4),
        teacher_mfu=round(counts["teacher_step"] * batch / teacher_s / peak_flops, 4))
    del setup, x0, labels
    reset_memory(device)
    return result


def run_sampling(preset, device, batches):
    """2-step sampling of a frozen bf16 net (two network evaluations): eager and a CUDA graph."""
    torch.manual_seed(0)
    with torch.device(device):
        net = freeze(make_net(preset))
    resolution = net_resolution(preset, {})
    rows = []
    for batch in batches:
        z = torch.randn(batch, net.img_channels, resolution, resolution, device=device) * scm_min.SIGMA_D
        labels = torch.randint(0, net.label_dim, (batch,), device=device)
        sample = functools.partial(sample_few_step, net, z, 2, class_labels=labels)
        row = dict(preset=preset, batch=batch, eager_s=round(time_calls(sample, device, warmup=2, repeat=5)[0], 5))
        if device.type == "cuda":
            graph, graphed_output = cuda_graph(sample, device)
            replay_s, _ = time_calls(graph.replay, device, warmup=3, repeat=20)
            graph.replay()
            eager_output = sample()   # fresh noise in each; compare magnitudes only
            row.update(cuda_graph_s=round(replay_s, 5),
                       output_std_graph_eager=[round(graphed_output.float().std().item(), 4),
                                               round(eager_output.float().std().item(), 4)])
            del graph, graphed_output
        rows.append(row)
        del z, labels
    del net
    reset_memory(device)
    return rows


def environment(device):
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(device))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(card=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info.update(card=platform.processor() or "cpu", memory_gib=float("nan"))
    return info


def print_table(results):
    header = (f"{'preset':9s} {'mode':8s} {'params':>8s} {'batch':>5s} {'sCD s':>7s} {'teach s':>7s} {'ratio':>6s} "
              f"{'img/s':>7s} {'peak GiB':>8s} {'MFU sCD':>7s} {'MFU tch':>7s}")
    print(header)
    for r in results["steps"]:
        if "scd_step_s" not in r:
            print(f"{r['preset']:9s} {r['mode']:8s} {r.get('error', 'not run')}")
            continue
        print(f"{r['preset']:9s} {r['mode']:8s} {r['params_m']:7.1f}M {r['batch']:5d} {r['scd_step_s']:7.3f} "
              f"{r['teacher_step_s']:7.3f} {r['scd_over_teacher']:6.2f} {r['scd_images_per_s']:7.1f} "
              f"{r['scd_peak_gib']:8.1f} {r['scd_mfu']:7.1%} {r['teacher_mfu']:7.1%}")
    for r in results["sampling"]:
        graph = f", CUDA graph {r['cuda_graph_s'] * 1e3:.1f} ms" if "cuda_graph_s" in r else ""
        print(f"2-step sampling {r['preset']} batch {r['batch']}: eager {r['eager_s'] * 1e3:.1f} ms{graph}")
    for name, errors in results["precision"].items():
        print(f"bf16 vs fp32 {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    for r in results["steps"]:
        if "compiled_tangents" in r:
            results["compiled_tangents"][r["preset"]] = r["compiled_tangents"]
    for name, errors in results["compiled_tangents"].items():
        print(f"compiled vs eager tangents {name}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                                                for k, v in errors.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="dit-xl:eager,unet-xl:eager,dit-xl:compile,sampling:unet-xxl,unet-xxl:eager,"
                        "unet-xxl:ckpt,unet-xl:ckpt,dit-xl:ckpt,dit-b:eager,unet-s:eager,unet-m:eager,unet-l:eager",
                        help="comma-separated PRESET:MODE (modes: " + ", ".join(MODES) + ") or sampling:PRESET, "
                             "in the order to run (compile runs use the batch of an earlier eager run)")
    parser.add_argument("--sampling-batches", default="1,64")
    parser.add_argument("--precision", default="unet-s,dit-b", help="presets of the bf16-vs-fp32 check")
    parser.add_argument("--profile", default="unet-xl,dit-xl", help="presets whose eager sCD step is profiled")
    parser.add_argument("--breakdown", type=int, default=1, help="time each phase of an eager sCD step")
    parser.add_argument("--batch", type=int, default=0, help="fixed batch instead of the largest that fits")
    parser.add_argument("--max-batch", type=int, default=256, help="largest batch the search may pick")
    parser.add_argument("--repeat", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--time-budget", type=float, default=1e9, help="skip what starts after this many seconds")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results/scaled_step.json")
    args = parser.parse_args(argv)
    split = lambda text: [x for x in text.split(",") if x]
    runs = [tuple(run.split(":", 1)) for run in split(args.runs)]
    for run in runs:
        if len(run) != 2 or run[0] != "sampling" and run[1] not in MODES:
            print(f"error: bad run {':'.join(run)!r}; write PRESET:MODE (modes: {', '.join(MODES)}) or "
                  "sampling:PRESET", file=sys.stderr)
            return 2
    for preset in [run[1] if run[0] == "sampling" else run[0] for run in runs] + split(args.precision):
        if preset not in PRESETS:
            print(f"error: unknown preset {preset!r}; presets: {', '.join(PRESETS)}", file=sys.stderr)
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.batch_from, args.profile = {}, split(args.profile)
    start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    log = timestamped_log(start)

    def save():
        write_json(out, results)

    def within_budget(what):
        if time.perf_counter() - start < args.time_budget:
            return True
        results["skipped"].append(what)
        log(f"skipped (time budget): {what}")
        return False

    results = dict(environment=environment(device), flop_rule=__doc__.split("FLOP-counting rule: ")[1].split("\n\n")[0],
                   steps=[], sampling=[], precision={}, compiled_tangents={}, skipped=[], failures=[])
    results["environment"]["matmul_flops"] = peak_flops = matmul_rate(device)
    results["environment"]["kernel_head_dim_max"] = getattr(attention_module, "HEAD_DIM_MAX", None)
    capacity = results["environment"]["memory_gib"]
    log(f"{results['environment']}")
    save()
    for preset in split(args.precision):
        if within_budget(f"precision {preset}"):
            try:
                results["precision"][preset] = precision_check(preset, device, {})
                log(f"bf16 vs fp32 {preset}: {results['precision'][preset]}")
            except Exception as error:
                traceback.print_exc()
                results["failures"].append(f"precision {preset}: {type(error).__name__}: {error}")
            save()
    for first, second in runs:
        what = f"{first} {second}"
        if not within_budget(what):
            continue
        log(what)
        try:
            if first == "sampling":
                results["sampling"] += run_sampling(second, device, [int(b) for b in split(args.sampling_batches)])
                log(json.dumps(results["sampling"][-1]))
            else:
                results["steps"].append(run_preset(first, second, device, capacity, peak_flops, args, log))
                log(json.dumps({k: v for k, v in results["steps"][-1].items() if k != "top_kernels"}))
        except CompiledTangentMismatch as error:
            print(f"FAILED: {first}: {error}", file=sys.stderr, flush=True)
            results["compiled_tangents"][first] = dict(failed=str(error))
            results["failures"].append(f"{first}: {error}")
        except Exception as error:   # keep measuring the other runs; the JSON says what broke
            traceback.print_exc()
            results["failures"].append(f"{what}: {type(error).__name__}: {error}")
            reset_memory(device)
        save()
    results["total_s"] = round(time.perf_counter() - start, 1)
    save()
    print_table(results)
    print(f"wrote {out}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
