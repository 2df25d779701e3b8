"""Benchmark: the default toy recipe of scm_min.py on every built-in distribution.

For each distribution it trains teacher, sCD and sCT exactly as `python scm_min.py --data NAME`
does, then prints a table of sliced Wasserstein-1 (data vs fresh data, teacher, sCD and sCT with
1 and 2 steps), the students' ratios to the teacher, and the wall time; writes JSON and an
overview figure. Targets (issue 2): sCD 2-step within 10% of the teacher, sCT 1-step within 25%.

    python benchmarks/toy_quality.py --jobs 2 --out benchmarks/results

With --jobs N, N distributions train at once, each limited to cores // N threads, so their wall
times are those of a machine with cores // N cores; the JSON records it.
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


def run_one(base_cfg, name, threads, out):
    torch.set_num_threads(threads)
    cfg = dataclasses.replace(base_cfg, data=name, out=os.path.join(out, name))
    start = time.perf_counter()
    samples, metrics, histories, reference = scm_min.run(cfg)
    seconds = time.perf_counter() - start
    scm_min.write_outputs(cfg, samples, metrics, histories, reference)
    thumbnails = {k: v[:3000] for k, v in {"data": reference, **samples}.items()}
    return name, {"sliced_wasserstein": metrics["sliced_wasserstein"],
                  "energy_distance": metrics["energy_distance"],
                  "phase_seconds": metrics["seconds"], "seconds": seconds}, thumbnails


def plot_overview(path, thumbnails, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["data", *SAMPLERS]
    fig, axes = plt.subplots(len(thumbnails), len(columns), figsize=(1.8 * len(columns), 1.8 * len(thumbnails)),
                             squeeze=False)
    for row, (name, panels) in enumerate(thumbnails.items()):
        lim = np.quantile(np.abs(panels["data"]), 0.999) * 1.15
        for col, sampler in enumerate(columns):
            ax = axes[row, col]
            x = panels[sampler]
            ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.4, color=scm_min.PHASE_COLORS[sampler.split("-")[0]])
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"SW {results[name]['sliced_wasserstein'][sampler]:.4f}"
            ax.set_title(f"{sampler}\n{title}" if row == 0 else title, fontsize=7)
            if col == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle("Default toy recipe on every distribution (sliced Wasserstein-1 to fresh data above each panel)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="distributions trained at once")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the figure")
    parser.add_argument("--runs-out", default="out/toy_quality", help="folder for each run's own outputs")
    parser.add_argument("--only", nargs="*", default=list(toy_data.DISTRIBUTIONS), help="distributions to run")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="scm_min.py options without their dashes, e.g. student_steps=4000 (for "
                             "experiments; the committed results use none)")
    args = parser.parse_args()
    # The options go through scm_min's own command line, so they are parsed and checked alike.
    options = [item.split("=", 1) for item in args.set]
    base_cfg = scm_min.parse_args([f"--{key.replace('_', '-')}={value}" for key, value in options])
    try:
        scm_min.validate(base_cfg)
    except scm_min.InputError as error:
        sys.exit(f"error: {error}")
    if base_cfg.n_samples < 20_000:
        sys.exit("error: the benchmark measures with at least 20000 samples")

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    results, thumbnails = {}, {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, base_cfg, name, threads, args.runs_out) for name in args.only]
        for future in concurrent.futures.as_completed(futures):
            name, result, thumbnails[name] = future.result()
            results[name] = result
            print(f"done {name} in {result['seconds']:.0f} s", flush=True)
    results = {name: results[name] for name in args.only}
    thumbnails = {name: thumbnails[name] for name in args.only}

    header = f"{'distribution':<13}" + "".join(f"{c:>11}" for c in ["data", *SAMPLERS]) + \
        f"{'sCD2/T':>8}{'sCT1/T':>8}{'seconds':>9}"
    print(header)
    for name, result in results.items():
        sw = result["sliced_wasserstein"]
        result["scd2_over_teacher"] = sw["scd-2step"] / sw["teacher"]
        result["sct1_over_teacher"] = sw["sct-1step"] / sw["teacher"]
        result["targets_met"] = {"scd2_within_10pct": result["scd2_over_teacher"] <= 1.10,
                                 "sct1_within_25pct": result["sct1_over_teacher"] <= 1.25}
        print(f"{name:<13}" + "".join(f"{sw[c]:>11.4f}" for c in ["data", *SAMPLERS]) +
              f"{result['scd2_over_teacher']:>8.2f}{result['sct1_over_teacher']:>8.2f}{result['seconds']:>9.0f}")

    os.makedirs(args.out, exist_ok=True)
    report = {"metric": "sliced Wasserstein-1 to a fresh data draw, model units (std 0.5), lower is better",
              "config": {k: v for k, v in dataclasses.asdict(base_cfg).items() if k not in ("data", "out")},
              "machine": {"cpu_count": os.cpu_count(), "jobs": args.jobs, "threads_per_job": threads,
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
              "results": results}
    with open(os.path.join(args.out, "toy_quality.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot_overview(os.path.join(args.out, "toy_quality.png"), thumbnails, results)
    print(f"wrote {args.out}/toy_quality.json and toy_quality.png")


if __name__ == "__main__":
    main()
