"""Benchmark: a toy recipe of scm_min.py on every built-in distribution, over several seeds.

Each (distribution, seed) is one `python scm_min.py --data NAME --seed S` run (with the --set
options), measured as the main job measures: the 1-2 step samplers and the reference draw at
`n_samples` (100k by default), the teacher at `teacher_samples`, each against the data-vs-data
floor at its own sample size. The summary gives mean +- sd over seeds of sliced Wasserstein-1 (SW),
its excess over the floor, energy distance and k-NN precision/recall, and checks the targets of
issue 10 on the SW excess:
  sCD 2-step: within 10% of the teacher's excess, or within one seed-sd of the teacher;
  sCT 1-step: within 25% of the teacher's excess, or within one seed-sd of the teacher.

    python benchmarks/toy_quality.py --label default --seeds 0 1 2 --jobs 2
    python benchmarks/toy_quality.py --label today --set student_steps=2000 ... --only rings moons

Runs are resumable: each writes its outputs to RUNS_OUT/LABEL/NAME/seedS/ and is skipped when its
metrics.json there has the same configuration. With --jobs N, N runs train at once, each with
cores // N threads. `--data-files a.npy b.npy` adds point clouds of your own, reported apart.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scm_min  # noqa: E402
import toy_data  # noqa: E402

SAMPLERS = ["teacher", "scd-1step", "scd-2step", "sct-1step", "sct-2step"]
METRICS = ["sliced_wasserstein", "energy_distance", "precision", "recall"]
TARGETS = {"scd-2step": 1.10, "sct-1step": 1.25}  # allowed ratio of SW excess to the teacher's


def options_to_config(items):
    """A ToyConfig from FIELD=VALUE strings (later ones win), through scm_min's own command line so
    that they are parsed and checked alike; booleans take true/false."""
    options = dict(item.split("=", 1) for item in items)
    args = []
    for field, value in options.items():
        flag = "--" + field.replace("_", "-")
        if isinstance(getattr(scm_min.ToyConfig, field, None), bool):
            args += [flag] if value.lower() in ("1", "true", "yes") else []
        else:
            args.append(f"{flag}={value}")
    return scm_min.parse_args(args)


def check_or_exit(configs, data_files=()):
    """Every configuration and point-cloud file checked before anything trains: one error line, exit 2."""
    try:
        for cfg in configs:
            scm_min.validate(cfg)
        for path in data_files:
            scm_min.load_points(path)
    except scm_min.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def same_recipe(saved, cfg):
    """Whether a saved configuration (a dict) trains and samples what cfg does (threads aside)."""
    ignored = ("threads", "dry_run")
    current = dataclasses.asdict(cfg)
    return {k: v for k, v in saved.items() if k not in ignored} == {k: v for k, v in current.items() if k not in ignored}


def run_one(cfg, threads):
    """One run of the main job (skipped when its outputs with this configuration exist)."""
    path = os.path.join(cfg.out, "metrics.json")
    if os.path.exists(path):
        with open(path) as file:
            metrics = json.load(file)
        if same_recipe(metrics["config"], cfg):
            return metrics
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    samples, metrics, histories, reference = scm_min.run(cfg, log_path=os.path.join(cfg.out, "train.log"))
    metrics["run_seconds"] = time.perf_counter() - start
    metrics["load_average_1min"] = [load_before, os.getloadavg()[0]]
    metrics["threads"] = threads
    scm_min.write_outputs(cfg, samples, metrics, histories, reference)
    with open(path) as file:
        return json.load(file)


def summarize(runs):
    """mean and sd over seeds of every metric of every sampler (and of the floors and excesses), and
    the targets."""
    summary = {metric: {name: stats([r[metric][name] for r in runs]) for name in ["data", *SAMPLERS]}
               for metric in METRICS}
    summary["floor"] = {name: {metric: stats([r["floor"][name][metric] for r in runs]) for metric in METRICS}
                        for name in SAMPLERS}
    summary["sw_excess"] = {name: stats([r["excess_over_floor"]["sliced_wasserstein"][name] for r in runs])
                            for name in SAMPLERS}
    teacher = summary["sw_excess"]["teacher"]
    summary["targets"] = {}
    for name, allowed in TARGETS.items():
        student = summary["sw_excess"][name]
        ratio = student["mean"] / teacher["mean"] if teacher["mean"] > 0 else float("inf")
        within_sd = student["mean"] - teacher["mean"] <= teacher["sd"]
        summary["targets"][name] = {"excess_ratio_to_teacher": ratio, "allowed_ratio": allowed,
                                    "within_one_teacher_sd": bool(within_sd),
                                    "met": bool(ratio <= allowed or within_sd)}
    summary["seeds"] = [r["config"]["seed"] for r in runs]
    return summary


def stats(values):
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def print_table(title, summaries):
    print(f"\n{title}: SW excess over the floor (mean +- sd over seeds), precision/recall means, targets")
    print(f"{'distribution':<14}" + "".join(f"{name:>17}" for name in SAMPLERS) +
          f"{'P/R sCD2':>12}{'P/R sCT1':>12}{'sCD2/T':>8}{'sCT1/T':>8}")
    for name, s in summaries.items():
        cells = "".join(f"{s['sw_excess'][k]['mean']:>9.4f}+-{s['sw_excess'][k]['sd']:<6.4f}" for k in SAMPLERS)
        pr = "".join(f"{s['precision'][k]['mean']:>6.3f}/{s['recall'][k]['mean']:.3f}"[-12:].rjust(12)
                     for k in ("scd-2step", "sct-1step"))
        marks = "".join(f"{s['targets'][k]['excess_ratio_to_teacher']:>7.2f}{'*' if s['targets'][k]['met'] else ' '}"
                        for k in TARGETS)
        print(f"{name:<14}{cells}{pr}{marks}")
    print("(* target met: within the allowed ratio of the teacher's excess or within one teacher seed-sd)")


def plot_overview(path, runs_out, names, label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["data", *SAMPLERS]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(1.8 * len(columns), 1.8 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        folder = os.path.join(runs_out, name)
        seed_folder = os.path.join(folder, sorted(os.listdir(folder))[0])
        panels = {k: np.load(os.path.join(seed_folder, "samples", f"{k}.npy"))[:3000] for k in SAMPLERS}
        cfg = json.load(open(os.path.join(seed_folder, "metrics.json")))["config"]
        panels["data"] = scm_min.load_data(cfg["data"], 3000, cfg["seed"])[1][:3000]
        center, lim = panels["data"].mean(0), np.quantile(np.abs(panels["data"] - panels["data"].mean(0)), 0.999) * 1.15
        for col, sampler in enumerate(columns):
            ax = axes[row, col]
            x = panels[sampler]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, color=scm_min.PHASE_COLORS[sampler.split("-")[0]])
            ax.set(xlim=(center[0] - lim, center[0] + lim), ylim=(center[1] - lim, center[1] + lim), xticks=[], yticks=[])
            if row == 0:
                ax.set_title(sampler, fontsize=8)
            if col == 0:
                ax.set_ylabel(os.path.basename(name), fontsize=8)
    fig.suptitle(f"Toy recipe '{label}', first seed of each distribution (3000 points a panel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="default", help="name of the recipe (output file names)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each distribution")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the summary JSON and figure")
    parser.add_argument("--runs-out", default="out/toy_quality", help="folder for each run's own outputs")
    parser.add_argument("--only", nargs="*", default=list(toy_data.DISTRIBUTIONS), help="built-in distributions")
    parser.add_argument("--data-files", nargs="*", default=[], help=".npy point clouds of your own, reported apart")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="scm_min.py options without their dashes, e.g. student_steps=4000")
    args = parser.parse_args()
    base_cfg = options_to_config(args.set)
    check_or_exit([base_cfg], args.data_files)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs_out = os.path.join(args.runs_out, args.label)
    names = [*args.only, *args.data_files]
    configs = {(name, seed): dataclasses.replace(base_cfg, data=name, seed=seed,
                                                 out=os.path.join(runs_out, os.path.basename(name), f"seed{seed}"))
               for name in names for seed in args.seeds}
    runs = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, cfg, threads): key for key, cfg in configs.items()}
        for future in concurrent.futures.as_completed(futures):
            runs[futures[future]] = metrics = future.result()
            name, seed = futures[future]
            print(f"done {name} seed {seed}: {metrics['run_seconds']:.0f} s, SW excess " +
                  " ".join(f"{k} {metrics['excess_over_floor']['sliced_wasserstein'][k]:.4f}" for k in SAMPLERS),
                  flush=True)

    summaries = {}
    for name in names:
        seeds = [runs[name, seed] for seed in args.seeds]
        summaries[name] = {**summarize(seeds), "run_seconds": stats([r["run_seconds"] for r in seeds]),
                           "phase_seconds": {phase: stats([r["seconds"][phase] for r in seeds])
                                             for phase in seeds[0]["seconds"]},
                           "load_average_1min": [r["load_average_1min"] for r in seeds]}
    print_table(f"recipe '{args.label}', built-in distributions", {n: summaries[n] for n in args.only})
    if args.data_files:
        print_table(f"recipe '{args.label}', your point clouds", {n: summaries[n] for n in args.data_files})
    report = {"label": args.label,
              "metrics": "SW: sliced Wasserstein-1 (model units, std 0.5), energy distance: lower is better; "
                         "precision, recall: k-NN (k = 3, 10k points), higher is better; floor: fresh data vs "
                         "the reference at the sampler's sample size; sw_excess = SW - floor",
              "config": {k: v for k, v in dataclasses.asdict(base_cfg).items() if k not in ("data", "out", "seed")},
              "machine": {"cpu_count": os.cpu_count(), "jobs": args.jobs, "threads_per_job": threads,
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
              "built_in": {n: summaries[n] for n in args.only},
              "own_point_clouds": {n: summaries[n] for n in args.data_files}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"toy_quality_{args.label}.json"), "w") as file:
        json.dump(report, file, indent=2)
    plot_overview(os.path.join(args.out, f"toy_quality_{args.label}.png"),
                  runs_out, [os.path.basename(n) for n in names], args.label)
    print(f"wrote {args.out}/toy_quality_{args.label}.json and .png")


if __name__ == "__main__":
    main()
