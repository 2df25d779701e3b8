"""Benchmark: one training step of the toy recipe, today's code against the baseline commit.

Times the loop body of `train()` (batch draw, loss with its JVP pass, backward, Adam, EMA) for the
teacher, sCD and sCT phases of `python scm_min.py`, built as each version's `run()` builds them,
on the default network (ToyMLP width 128, depth 3, batch 512). The baseline is `scm_min.py` as of
BASELINE (read from git), so both run in one process: rounds alternate baseline and current, each
round a block of steps per phase, so that load from other processes hits both alike. A step's time
is the interval between two consecutive calls of the loss; each round reports the median of its
block, and the ratio is taken per round (baseline median / current median).

    python benchmarks/toy_step.py                 # threads 1 and 2, writes benchmarks/results/toy_step.json

The JSON also records the load: the 1-minute load average before and after, and the share of the
machine's CPU time that other processes used during the run (from /proc/stat).
"""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import scm_min  # noqa: E402
import toy_data  # noqa: E402

BASELINE = "108edb3"  # scm_min.py before this benchmark's changes: torch.func.jvp, per-tensor Adam and EMA
PHASES = ["teacher", "scd", "sct"]


def load_baseline(commit):
    """scm_min.py at `commit`, imported as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{commit}:scm_min.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"error: cannot read scm_min.py at commit {commit} with git ({error}); "
                 "this benchmark needs the repository's history")
    path = os.path.join(tempfile.mkdtemp(), "scm_min_baseline.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("scm_min_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Stopwatch:
    """Wraps a loss: records the time of each call, so consecutive calls bound one training step."""

    def __init__(self, loss_fn):
        self.loss_fn, self.logvar, self.stamps = loss_fn, loss_fn.logvar, []

    def __call__(self, *args, **kwargs):
        self.stamps.append(time.perf_counter())
        return self.loss_fn(*args, **kwargs)


def make_loss(module, phase, teacher):
    """The loss of `phase` as `module.run()` builds it with the default configuration."""
    cfg = module.ToyConfig()
    if phase == "teacher":
        return module.TeacherLoss(cfg.teacher_P_mean, cfg.teacher_P_std)
    options = {"jvp": module.toy_jvp, "single_pass": True} if hasattr(module, "toy_jvp") else {}
    return module.SCMLoss(teacher if phase == "scd" else None, cfg.P_mean, cfg.P_std, cfg.warmup_steps,
                          cfg.tangent_c, **options)


def time_block(module, phase, teacher, data, steps):
    """Median seconds of one training step over a block of `steps` steps (plus one to close the last)."""
    cfg = module.ToyConfig()
    net = module.ToyMLP(width=cfg.width, depth=cfg.depth) if phase == "teacher" else module.make_student(teacher)
    lr = cfg.teacher_lr if phase == "teacher" else cfg.student_lr
    loss = Stopwatch(make_loss(module, phase, teacher))
    module.train(net, loss, data, steps + 1, cfg.batch_size, lr, cfg.ema_sigma_rel, seed=0, desc=phase)
    return float(np.median(np.diff(loss.stamps)))


def cpu_times():
    """(busy, total) jiffies of the whole machine, and this process's own CPU seconds."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values), time.process_time()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--steps", type=int, default=30, help="steps per block")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds per phase and thread count")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "toy_step.json"))
    args = parser.parse_args()

    baseline, current = load_baseline(BASELINE), scm_min
    data = torch.as_tensor(toy_data.sample("8gaussians", 100_000, seed=0), dtype=torch.float32)
    torch.manual_seed(0)
    teachers = {module: module.ToyMLP() for module in (baseline, current)}  # untrained: timing only
    load_before = os.getloadavg()[0]
    busy0, total0, own0 = cpu_times()
    rows = []
    print(f"{'phase':<8}{'threads':>8}{'baseline ms':>13}{'current ms':>12}{'speedup':>9}  (per-round range)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for phase in PHASES:
            seconds = {"baseline": [], "current": []}
            for _ in range(args.rounds):
                for name, module in (("baseline", baseline), ("current", current)):
                    seconds[name].append(time_block(module, phase, teachers[module], data, args.steps))
            ratios = np.array(seconds["baseline"]) / np.array(seconds["current"])
            row = {"phase": phase, "threads": threads,
                   "baseline_ms": 1e3 * float(np.median(seconds["baseline"])),
                   "current_ms": 1e3 * float(np.median(seconds["current"])),
                   "speedup_median": float(np.median(ratios)),
                   "speedup_min": float(ratios.min()), "speedup_max": float(ratios.max()),
                   "rounds_ms": {k: [1e3 * v for v in vs] for k, vs in seconds.items()}}
            rows.append(row)
            print(f"{phase:<8}{threads:>8}{row['baseline_ms']:>13.2f}{row['current_ms']:>12.2f}"
                  f"{row['speedup_median']:>8.2f}x  ({row['speedup_min']:.2f}-{row['speedup_max']:.2f})", flush=True)
    busy1, total1, own1 = cpu_times()
    ticks = os.sysconf("SC_CLK_TCK")
    others_share = max(0.0, (busy1 - busy0) - (own1 - own0) * ticks) / max(total1 - total0, 1)
    report = {"what": "median seconds of one train() step, default toy network and batch; "
                      "speedup = baseline / current per alternating round",
              "baseline_commit": BASELINE, "steps_per_block": args.steps, "rounds": args.rounds,
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "load_average_1min_before": load_before,
                          "load_average_1min_after": os.getloadavg()[0],
                          "cpu_share_of_other_processes": others_share},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(report, file, indent=2)
    print(f"other processes used {100 * others_share:.0f}% of the machine's CPU time during the run; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
