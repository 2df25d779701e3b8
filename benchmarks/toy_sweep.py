"""Recipe sweep: one factor at a time around a base recipe, judged as toy_quality.py judges.

For each distribution and seed, every variant (the base, then each value of each --vary factor with
the others at the base) is trained and measured like `python scm_min.py` (scm_min.train_toy,
sample_toy, toy_data.evaluate). Variants that change only the students reuse the teacher of the
base, and variants that change only sampling (t_mid) reuse its students: each phase seeds its own
RNG, so the result is what a full run of that variant gives.

    python benchmarks/toy_sweep.py --label lr --only 8gaussians rings --seeds 0 1 \\
        --base student_steps=4000 --vary student_lr=1e-4,3e-4 t_mid=0.8,1.1

Prints, for every variant, the SW excess over the floor (mean +- sd over seeds) of the teacher,
sCD 2-step and sCT 1-step on each distribution, and writes benchmarks/results/toy_sweep_LABEL.json.
Resumable: each (distribution, seed, variant) is saved under RUNS_OUT/LABEL/ and skipped when done.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scm_min  # noqa: E402
import toy_data  # noqa: E402
from toy_quality import options_to_config  # noqa: E402

SAMPLING_FIELDS = {"t_mid"}
TEACHER_FIELDS = {"data", "seed", "teacher_steps", "batch_size", "teacher_lr", "lr_decay", "ema_sigma_rel", "width",
                  "depth", "max_freq", "teacher_P_mean", "teacher_P_std"}
SHOWN = ["teacher", "scd-2step", "sct-1step"]


def variants(base_options, vary):
    """[(name, config)]: the base, then one factor changed at a time."""
    base = options_to_config(base_options)
    result = [("base", base)]
    for item in vary:
        field, values = item.split("=", 1)
        for value in values.split(","):
            cfg = options_to_config([*base_options, f"{field}={value}"])
            if cfg != base:
                result.append((f"{field}={value}", cfg))
    return base, result


def measure(cfg, samples, standardizer, reference, fresh):
    to_model = standardizer.to_model
    return toy_data.evaluate(samples, to_model(reference), to_model(fresh))


def sweep_one(name, seed, configs, runs_out, threads):
    """Every variant on one distribution and seed, reusing teachers and students where it may."""
    torch.set_num_threads(threads)
    folder = os.path.join(runs_out, os.path.basename(name), f"seed{seed}")
    os.makedirs(folder, exist_ok=True)
    train_points, reference, fresh, _ = scm_min.load_data(name, configs[0][1].n_samples, seed)
    standardizer = scm_min.Standardizer(train_points)
    data = torch.as_tensor(standardizer.to_model(train_points), dtype=torch.float32)
    teachers, students, results = {}, {}, {}
    for variant, cfg in configs:
        cfg = dataclasses.replace(cfg, data=name, seed=seed, out=folder)
        path = os.path.join(folder, f"{variant}.json")
        if os.path.exists(path):
            saved = json.load(open(path))
            if saved["config"] == dataclasses.asdict(cfg):
                results[variant] = saved
                continue
        start = time.perf_counter()
        config = dataclasses.asdict(cfg)
        teacher_key = json.dumps({k: v for k, v in config.items() if k in TEACHER_FIELDS}, sort_keys=True)
        student_key = json.dumps({k: v for k, v in config.items() if k not in SAMPLING_FIELDS}, sort_keys=True)
        log_path = os.path.join(folder, f"{variant}.log")
        if student_key in students:
            networks, teacher_samples = students[student_key]
        else:
            cached = teachers.get(teacher_key)
            networks, _, _ = scm_min.train_toy(cfg, data, log_path, teacher=cached[0] if cached else None)
            teacher_samples = cached[1] if cached else None
        if teacher_samples is None:
            samples = scm_min.sample_toy(cfg, networks, data.shape[1])
        else:  # the teacher's samples are the first draws of the same generator: sample 2 and reuse
            samples = scm_min.sample_toy(dataclasses.replace(cfg, teacher_samples=2), networks, data.shape[1])
            samples["teacher"] = teacher_samples
        teachers.setdefault(teacher_key, (networks["teacher"], samples["teacher"]))
        students.setdefault(student_key, (networks, samples["teacher"]))
        results[variant] = {"config": config, "seconds": time.perf_counter() - start,
                            **measure(cfg, samples, standardizer, reference, fresh)}
        with open(path, "w") as file:
            json.dump(results[variant], file)
    return name, seed, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="name of the sweep (output file names)")
    parser.add_argument("--only", nargs="+", default=list(toy_data.DISTRIBUTIONS), help="distributions or .npy files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="(distribution, seed) pairs run at once")
    parser.add_argument("--base", nargs="*", default=[], metavar="FIELD=VALUE", help="the base recipe")
    parser.add_argument("--vary", nargs="*", default=[], metavar="FIELD=V1,V2", help="factors, one at a time")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--runs-out", default="out/toy_sweep")
    args = parser.parse_args()
    try:
        base, configs = variants(args.base, args.vary)
        for _, cfg in configs:
            scm_min.validate(cfg)
    except scm_min.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs_out = os.path.join(args.runs_out, args.label)
    results = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(sweep_one, name, seed, configs, runs_out, threads) for name in args.only for seed in args.seeds]
        for future in concurrent.futures.as_completed(futures):
            name, seed, results[name, seed] = future.result()
            print(f"done {name} seed {seed}", flush=True)

    summary = {}
    for variant, _ in configs:
        summary[variant] = {}
        for name in args.only:
            runs = [results[name, seed][variant] for seed in args.seeds]
            excess = {k: [r["excess_over_floor"]["sliced_wasserstein"][k] for r in runs] for k in SHOWN}
            summary[variant][name] = {
                "sw_excess": {k: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                              for k, v in excess.items()},
                "precision": {k: float(np.mean([r["precision"][k] for r in runs])) for k in SHOWN},
                "recall": {k: float(np.mean([r["recall"][k] for r in runs])) for k in SHOWN},
                "seconds": float(np.mean([r["seconds"] for r in runs]))}
    print(f"\nSW excess over the floor, mean over seeds {args.seeds} (teacher / sCD 2-step / sCT 1-step)")
    print(f"{'variant':<24}" + "".join(f"{os.path.basename(n)[:22]:>24}" for n in args.only))
    for variant, by_name in summary.items():
        cells = "".join(f"{s['sw_excess']['teacher']['mean']:>8.4f}{s['sw_excess']['scd-2step']['mean']:>8.4f}"
                        f"{s['sw_excess']['sct-1step']['mean']:>8.4f}" for s in by_name.values())
        print(f"{variant:<24}{cells}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"toy_sweep_{args.label}.json")
    with open(path, "w") as file:
        json.dump({"label": args.label, "seeds": args.seeds, "base": dataclasses.asdict(base),
                   "variants": {v: {k: val for k, val in dataclasses.asdict(c).items() if val != getattr(base, k)}
                                for v, c in configs},
                   "machine": {"cpu_count": os.cpu_count(), "jobs": args.jobs, "torch": torch.__version__},
                   "summary": summary}, file, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
