"""Runs of `scaled.train` on 1 and N GPUs, summarized into one JSON file and a table.

Runs (--runs, comma-separated):
- cifar: a teacher and then sCD on CIFAR-10 pixels (presets cifar10-teacher and cifar10-scd,
  shortened by --teacher-steps / --scd-steps) on 1 GPU (one process) and on N GPUs (torchrun,
  FSDP2) at the same global batch, hence equal images seen at every step: the loss curves side by
  side, their means over the last half and the spread of each curve there.
- resume: the CIFAR-10 teacher on 1 GPU for --resume-steps iterations, once uninterrupted and once
  killed (SIGKILL) after the checkpoint at half of them and resumed: the largest loss difference.
- scale: sCD steps of --scale-net (teacher 'init', synthetic latents) at --scale-batch per GPU on
  1 GPU and on N GPUs: images/s (median of the logged windows after the first), peak memory per
  GPU, MFU and the scaling efficiency images/s(N) / (N images/s(1)).
- checkpoint: --checkpoint-net sCD on N GPUs: the time to write a checkpoint and to load it.

    python benchmarks/scaled_train.py --runs cifar,resume --cifar PATH --json OUT.json
    python benchmarks/scaled_train.py --runs scale,checkpoint --json OUT.json
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(out, gpus, args):
    """`python -m scaled.train` (1 GPU) or torchrun with `gpus` processes; returns the Popen."""
    os.makedirs(out, exist_ok=True)
    prefix = [sys.executable, "-m", "scaled.train"] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m", "scaled.train"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))), "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(out, "stdout.txt"), "w")
    return subprocess.Popen([*prefix, *args, "--out", out], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def train(out, gpus, args):
    started = time.perf_counter()
    process = launch(out, gpus, args)
    if process.wait() != 0:
        with open(os.path.join(out, "stdout.txt")) as file:
            raise RuntimeError(f"scaled.train failed in {out}: {file.read()[-3000:]}")
    return time.perf_counter() - started


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [json.loads(line) for line in file]


def log_seconds(out, pattern):
    with open(os.path.join(out, "train.log")) as file:
        return [float(x) for x in re.findall(pattern, file.read())]


def curve_summary(recs):
    half = [r["loss"] for r in recs[len(recs) // 2:]]
    return {"steps": [r["step"] for r in recs], "images_seen": [r["images_seen"] for r in recs],
            "loss": [r["loss"] for r in recs], "last_half_mean": statistics.mean(half),
            "last_half_std": statistics.stdev(half) if len(half) > 1 else 0.0,
            "images_per_s": statistics.median(r["images_per_s"] for r in recs[1:]) if len(recs) > 1 else None,
            "memory_gib": max(r["memory_gib"] or 0 for r in recs)}


def run_cifar(args, work):
    result = {}
    for gpus in sorted({1, args.gpus}):
        base = os.path.join(work, f"cifar-{gpus}gpu")
        data = ["--data", f"cifar10:{args.cifar}", "--log-every", str(args.cifar_log_every)]
        seconds_teacher = train(os.path.join(base, "teacher"), gpus,
                                ["--preset", "cifar10-teacher", *data, "--steps", str(args.teacher_steps)])
        seconds_scd = train(os.path.join(base, "scd"), gpus,
                            ["--preset", "cifar10-scd", *data, "--steps", str(args.scd_steps),
                             "--teacher", os.path.join(base, "teacher", "ema.safetensors")])
        result[f"{gpus}gpu"] = {"teacher": curve_summary(records(os.path.join(base, "teacher"))),
                                "scd": curve_summary(records(os.path.join(base, "scd"))),
                                "wall_seconds": {"teacher": seconds_teacher, "scd": seconds_scd}}
    return result


def run_resume(args, work):
    common = ["--preset", "cifar10-teacher", "--data", f"cifar10:{args.cifar}", "--steps", str(args.resume_steps),
              "--log-every", "1", "--checkpoint-every", str(args.resume_steps // 2)]
    whole, killed = os.path.join(work, "resume-whole"), os.path.join(work, "resume-killed")
    train(whole, 1, common)
    process = launch(killed, 1, common)
    target = args.resume_steps // 2 + 2
    while not (os.path.exists(os.path.join(killed, "metrics.jsonl")) and len(records(killed)) >= target):
        if process.poll() is not None:
            raise RuntimeError("the run to be killed ended first")
        time.sleep(0.02)
    process.kill()   # SIGKILL
    process.wait()
    killed_at = len(records(killed))
    train(killed, 1, [*common, "--resume"])
    a, b = records(whole), records(killed)
    differences = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    return {"killed_after_step": killed_at, "resumed_from": args.resume_steps // 2,
            "steps_compared": len(differences), "max_abs_loss_difference": max(differences),
            "max_abs_loss_difference_after_resume": max(differences[args.resume_steps // 2:]),
            "bit_exact": all(x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b)),
            "load_seconds": log_seconds(killed, r"loaded in ([\d.]+) s")}


def run_scale(args, work):
    result = {}
    for gpus in sorted({1, args.gpus}):
        out = os.path.join(work, f"scale-{args.scale_net}-{gpus}gpu")
        seconds = train(out, gpus, ["--mode", "scd", "--teacher", "init", "--net", args.scale_net, "--data", "synthetic",
                                    "--batch-size", str(args.scale_batch * gpus), "--steps", str(args.scale_steps),
                                    "--log-every", "2", "--checkpoint-every", str(10 ** 9), "--adam-eps", "1e-11", "--no-export",
                                    *(["--activation-checkpointing"] if args.scale_checkpointing else [])])
        recs = records(out)[1:]   # the first window holds the warm-up
        result[f"{gpus}gpu"] = {"images_per_s": statistics.median(r["images_per_s"] for r in recs),
                                "mfu": statistics.median(r["mfu"] for r in recs) if recs[0]["mfu"] else None,
                                "memory_gib_per_gpu": max(r["memory_gib"] or 0 for r in recs),
                                "batch_per_gpu": args.scale_batch, "wall_seconds": seconds}
    if args.gpus > 1:
        one, many = result["1gpu"]["images_per_s"], result[f"{args.gpus}gpu"]["images_per_s"]
        result["scaling_efficiency"] = many / (args.gpus * one)
    return result


def run_checkpoint(args, work):
    out = os.path.join(work, f"checkpoint-{args.checkpoint_net}")
    common = ["--mode", "scd", "--teacher", "init", "--net", args.checkpoint_net, "--data", "synthetic",
              "--batch-size", str(2 * args.gpus), "--log-every", "1", "--checkpoint-every", "2", "--keep-checkpoints", "1", "--no-export"]
    train(out, args.gpus, [*common, "--steps", "2"])
    train(out, args.gpus, [*common, "--steps", "3", "--resume"])
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(os.path.join(out, "checkpoints"))
               for name in names)
    return {"gpus": args.gpus, "write_seconds": log_seconds(out, r"written in ([\d.]+) s"),
            "load_seconds": log_seconds(out, r"loaded in ([\d.]+) s"), "checkpoint_gib": size / 2 ** 30}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="cifar,resume,scale,checkpoint")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--cifar", default="data/cifar-10-batches-py")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--scd-steps", type=int, default=100)
    parser.add_argument("--cifar-log-every", type=int, default=10)
    parser.add_argument("--resume-steps", type=int, default=20)
    parser.add_argument("--scale-net", default="unet-xl")
    parser.add_argument("--scale-batch", type=int, default=64)
    parser.add_argument("--scale-steps", type=int, default=12)
    parser.add_argument("--scale-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-net", default="unet-xxl")
    parser.add_argument("--work", default="out/scaled_train_benchmark")
    parser.add_argument("--json", default="benchmarks/results/scaled_train.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
               "gpus": args.gpus, "torch": torch.__version__, "python": platform.python_version(),
               "args": vars(args)}
    runs = {"cifar": run_cifar, "resume": run_resume, "scale": run_scale, "checkpoint": run_checkpoint}
    for name in args.runs.split(","):
        started = time.perf_counter()
        try:
            results[name] = runs[name](args, args.work)
        except Exception as error:   # keep what the other runs measured
            results[name] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
        results[name]["seconds"] = time.perf_counter() - started
        print(name, json.dumps({k: v for k, v in results[name].items() if k not in ("1gpu", "2gpu")} if name == "cifar"
                               else results[name])[:2000], flush=True)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    if "cifar" in results and "error" not in results["cifar"]:
        for phase in ("teacher", "scd"):
            for key, value in results["cifar"].items():
                if key.endswith("gpu"):
                    c = value[phase]
                    print(f"cifar {phase} {key}: loss over the last half {c['last_half_mean']:.4f} +- "
                          f"{c['last_half_std']:.4f}, {c['images_per_s']:.0f} images/s, {c['memory_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
