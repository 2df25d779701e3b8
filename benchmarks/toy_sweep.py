"""Recipe sweep: one factor at a time around a base recipe, judged as toy_quality.py judges.

For each distribution and seed, every variant (the base, then each value of each --vary factor with
the others at the base) is trained and measured like `python scm_min.py` (scm_min.train_toy,
sample_toy, toy_data.evaluate). Variants that change only the students reuse the teacher of the
base, and variants that change only sampling (t_mid) reuse its students: each phase seeds its own
RNG, so the result is what a full run of that variant gives.

    python benchmarks/toy_sweep.py --label lr --only 8gaussians rings --seeds 0 1 \\
        --base student_steps=4000 --vary student_lr=1e-4,3e-4 t_mid=0.8,1.1

Prints, for every variant, toy_quality.py's table (SW excess over the floor, mean +- sd over seeds,
precision/recall, targets) and writes benchmarks/results/toy_sweep_LABEL.json. Teachers (with their
samples) are saved under RUNS_OUT/teachers/ and reused by later sweeps with the same teacher options.
Resumable: each (distribution, seed, variant) is saved under RUNS_OUT/LABEL/ and skipped when done.
"""

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import scm_min  # noqa: E402
import toy_data  # noqa: E402
from toy_quality import check_or_exit, options_to_config, print_table, same_recipe, stats, summarize  # noqa: E402

SAMPLING_FIELDS = {"t_mid"}
# What the teacher and its samples depend on (the students' draws of z also depend on n_samples).
TEACHER_FIELDS = {"data", "seed", "teacher_steps", "batch_size", "teacher_lr", "lr_decay", "ema_sigma_rel", "width",
                  "depth", "max_freq", "teacher_P_mean", "teacher_P_std", "teacher_samples", "teacher_sample_steps",
                  "teacher_solver", "n_samples"}


def variants(base_options, vary):
    """(base config, [(name, config)]): the base, then one factor changed at a time (FIELD=V1,V2
    gives a variant per value); FIELD=V;FIELD2=V2 is one variant that changes several fields."""
    base = options_to_config(base_options)
    result = [("base", base)]
    for item in vary:
        if ";" in item:
            alternatives = [item.split(";")]
        else:
            field, values = item.split("=", 1)
            alternatives = [[f"{field}={value}"] for value in values.split(",")]
        for options in alternatives:
            cfg = options_to_config([*base_options, *options])
            if cfg != base:
                result.append((";".join(options), cfg))
    return base, result


def measure(cfg, samples, standardizer, reference, fresh):
    to_model = standardizer.to_model
    return toy_data.evaluate(samples, to_model(reference), to_model(fresh))


def cached_teacher(path, cfg, dim):
    """(teacher network, its samples) saved by an earlier sweep, or None."""
    if not os.path.exists(path):
        return None
    saved = torch.load(path)
    teacher = scm_min.ToyMLP(dim=dim, width=cfg.width, depth=cfg.depth, max_freq=cfg.max_freq)
    teacher.load_state_dict(saved["state_dict"])
    return teacher.eval().requires_grad_(False), saved["samples"].numpy()


def sweep_one(name, seed, configs, runs_out, teachers_out, threads):
    """Every variant on one distribution and seed, reusing teachers (also those saved by earlier
    sweeps in teachers_out) and students where it may."""
    torch.set_num_threads(threads)
    os.makedirs(teachers_out, exist_ok=True)
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
            if same_recipe(saved["config"], cfg):
                results[variant] = saved
                continue
        start = time.perf_counter()
        config = dataclasses.asdict(cfg)
        teacher_key = json.dumps({k: v for k, v in config.items() if k in TEACHER_FIELDS}, sort_keys=True)
        student_key = json.dumps({k: v for k, v in config.items() if k not in SAMPLING_FIELDS | {"threads"}},
                                 sort_keys=True)
        log_path = os.path.join(folder, f"{variant}.log")
        teacher_path = os.path.join(teachers_out, f"{os.path.basename(name)}-seed{seed}-"
                                    f"{hashlib.sha1(teacher_key.encode()).hexdigest()[:12]}.pt")
        if teacher_key not in teachers and (cached := cached_teacher(teacher_path, cfg, data.shape[1])):
            teachers[teacher_key] = cached
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
        if teacher_key not in teachers:
            teachers[teacher_key] = networks["teacher"], samples["teacher"]
            torch.save({"state_dict": networks["teacher"].state_dict(), "samples": torch.as_tensor(samples["teacher"]),
                        "key": teacher_key}, teacher_path)
        students.setdefault(student_key, (networks, samples["teacher"]))
        results[variant] = {"config": config, "variant_seconds": time.perf_counter() - start,
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
    base, configs = variants(args.base, args.vary)
    check_or_exit([cfg for _, cfg in configs], [name for name in args.only if name not in toy_data.DISTRIBUTIONS])

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    runs_out = os.path.join(args.runs_out, args.label)
    results = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(sweep_one, name, seed, configs, runs_out, os.path.join(args.runs_out, "teachers"), threads)
                   for name in args.only for seed in args.seeds]
        for future in concurrent.futures.as_completed(futures):
            name, seed, results[name, seed] = future.result()
            print(f"done {name} seed {seed}", flush=True)

    summary = {variant: {name: {**summarize([results[name, seed][variant] for seed in args.seeds]),
                                "variant_seconds": stats([results[name, seed][variant]["variant_seconds"]
                                                          for seed in args.seeds])}
                         for name in args.only} for variant, _ in configs}
    for variant, by_name in summary.items():
        print_table(f"variant '{variant}'", {os.path.basename(n): s for n, s in by_name.items()})
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
