"""Runs of `scaled.train` on 1 and N GPUs, summarized into one JSON file and a table.

Runs (--runs, comma-separated):
- cifar: a teacher and then sCD on CIFAR-10 pixels (presets cifar10-teacher and cifar10-scd,
  shortened by --teacher-steps / --scd-steps) for each GPU count of --cifar-gpus (1: one process,
  N: torchrun, FSDP2) at the same global batch, hence equal images seen at every step: the loss
  curves side by side, their means over the last half and the spread of each curve there. With
  --inception, FID of --fid-samples samples from the EMA exports (scm_min's samplers and FID code:
  the teacher's Heun solve, the teacher at 2 NFE, sCD at 1 and 2 steps).
- resume: --resume-net trained on --resume-gpus GPUs for --resume-steps iterations, once
  uninterrupted and once killed (SIGKILL to the whole process group) after the checkpoint at half
  of them and resumed: the loss differences. `cifar10` runs the CIFAR-10 teacher preset; a network
  preset runs sCD from its own initialization on synthetic latents.
- scale: sCD steps of each net of --scale-nets (NET:BATCH_PER_GPU, teacher 'init', synthetic
  latents) for each GPU count of --scale-gpus: images/s (median of the logged windows after the
  first), peak memory per GPU, MFU and the scaling efficiency images/s(N) / (N images/s(1)).
- checkpoint: --checkpoint-net sCD on --checkpoint-gpus GPUs: the time to write a checkpoint, to
  load it on as many processes, and to load it on --reload-gpus processes (DCP resharding).

--first-gpu shifts the GPUs a driver uses, so that several drivers share one machine.

    python benchmarks/scaled_train.py --runs cifar,resume --cifar PATH --json OUT.json
    python benchmarks/scaled_train.py --runs scale,checkpoint --scale-gpus 1,2,4 --checkpoint-gpus 4 --json OUT.json
"""

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def launch(out, gpus, args, first_gpu=0):
    """`python -m scaled.train` (1 GPU) or torchrun with `gpus` processes, in a process group of its
    own (so that a kill reaches every worker); returns the Popen."""
    os.makedirs(out, exist_ok=True)
    prefix = [sys.executable, "-m", "scaled.train"] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), "-m", "scaled.train"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(first_gpu, first_gpu + gpus))),
           "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(out, "stdout.txt"), "a")
    return subprocess.Popen([*prefix, *args, "--out", out], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def train(out, gpus, args, first_gpu=0):
    started = time.perf_counter()
    process = launch(out, gpus, args, first_gpu)
    if process.wait() != 0:
        with open(os.path.join(out, "stdout.txt")) as file:
            raise RuntimeError(f"scaled.train failed in {out}: {file.read()[-3000:]}")
    return time.perf_counter() - started


def records(out):
    """The complete records of OUT/metrics.jsonl (a line cut by a kill is not one)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.endswith("\n")]


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


def gpu_counts(text):
    return [int(n) for n in text.split(",")]

#----------------------------------------------------------------------------
# CIFAR-10: loss curves and FID.

def fid_reference(args, images, inception):
    """(mu, sigma, description) of the training images: --fid-reference if it describes them (the
    key scm_min's CIFAR-10 job writes), else computed."""
    from image_data import fid
    from scm_min import fid_reference_key
    key = fid_reference_key(images)
    if args.fid_reference and os.path.exists(args.fid_reference):
        mu, sigma, description = fid.load_statistics(args.fid_reference)
        if description == key:
            return mu, sigma, description
        print(f"{args.fid_reference} describes {description}, not {key}: computing the statistics", flush=True)
    return (*fid.feature_statistics(fid.inception_features(inception, images)), key)


def cifar_fid(args, base, device):
    """FID of the teacher's and the sCD student's EMA exports in `base` (scm_min's samplers and FID)."""
    import image_data
    import scm_min
    from image_data import fid
    from scaled.networks import freeze
    from scaled.sample import load_weights, net_from_weights
    images, _ = image_data.load_cifar10(args.cifar)
    inception = fid.load_inception(args.inception, device)
    reference = fid_reference(args, images, inception)

    def frozen(phase):
        net, _ = net_from_weights("", *load_weights(os.path.join(base, phase, "ema.safetensors")))
        return freeze(net.to(device), torch.bfloat16)

    cfg = types.SimpleNamespace(out=os.path.join(base, "fid"), fid_samples=args.fid_samples, seed=0, save_samples=False,
                                teacher_sample_steps=18, t_mid=1.1)
    samplers = scm_min.image_samplers(cfg, frozen("teacher"), {"scd": frozen("scd")})
    return scm_min.evaluate_samplers(cfg, samplers, scm_min.ImageBatches(images, device), inception, reference,
                                     lambda message: print(message, flush=True))


def plot_curves(folders, path):
    """Loss against images seen of each phase, one line per run: folders {label: run folder with
    teacher/ and scd/}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, phase in zip(axes, ("teacher", "scd")):
        for label, folder in folders.items():
            recs = records(os.path.join(folder, phase))
            ax.plot([r["images_seen"] / 1000 for r in recs], [r["loss"] for r in recs], label=label, lw=1)
        ax.set(title=f"CIFAR-10 {phase}", xlabel="thousand images seen", ylabel="loss (adaptive-weighted)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cifar(args, work):
    result = {}
    for gpus in gpu_counts(args.cifar_gpus):
        base = os.path.join(work, f"cifar-{gpus}gpu")
        data = ["--data", f"cifar10:{args.cifar}", "--log-every", str(args.cifar_log_every),
                "--batch-size", str(args.cifar_batch)]
        seconds_teacher = train(os.path.join(base, "teacher"), gpus,
                                ["--preset", "cifar10-teacher", *data, "--steps", str(args.teacher_steps)], args.first_gpu)
        seconds_scd = train(os.path.join(base, "scd"), gpus,
                            ["--preset", "cifar10-scd", *data, "--steps", str(args.scd_steps),
                             "--teacher", os.path.join(base, "teacher", "ema.safetensors")], args.first_gpu)
        result[f"{gpus}gpu"] = {"teacher": curve_summary(records(os.path.join(base, "teacher"))),
                                "scd": curve_summary(records(os.path.join(base, "scd"))),
                                "wall_seconds": {"teacher": seconds_teacher, "scd": seconds_scd}}
        if args.inception:
            started = time.perf_counter()
            device = torch.device(f"cuda:{args.first_gpu}" if torch.cuda.is_available() else "cpu")
            result[f"{gpus}gpu"]["fid"] = cifar_fid(args, base, device)
            result[f"{gpus}gpu"]["wall_seconds"]["fid"] = time.perf_counter() - started
    plot_curves({f"{gpus} GPU": os.path.join(work, f"cifar-{gpus}gpu") for gpus in gpu_counts(args.cifar_gpus)},
                os.path.join(work, "cifar_loss_curves.png"))
    return result

#----------------------------------------------------------------------------
# Kill and resume, scaling, checkpoints.

def resume_args(args):
    steps = ["--steps", str(args.resume_steps), "--log-every", "1", "--checkpoint-every", str(args.resume_steps // 2)]
    if args.resume_net == "cifar10":
        return ["--preset", "cifar10-teacher", "--data", f"cifar10:{args.cifar}", *steps]
    return ["--mode", "scd", "--teacher", "init", "--net", args.resume_net, "--data", "synthetic", "--no-export",
            "--batch-size", str(args.resume_batch * args.resume_gpus), "--adam-eps", "1e-11", *steps]


def run_resume(args, work):
    common, gpus = resume_args(args), args.resume_gpus
    whole, killed = os.path.join(work, f"resume-{gpus}gpu-whole"), os.path.join(work, f"resume-{gpus}gpu-killed")
    train(whole, gpus, common, args.first_gpu)
    process = launch(killed, gpus, common, args.first_gpu)
    target = args.resume_steps // 2 + 1
    while len(records(killed)) < target:
        if process.poll() is not None:
            raise RuntimeError("the run to be killed ended first")
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(records(killed))
    train(killed, gpus, [*common, "--resume"], args.first_gpu)
    a, b = records(whole), records(killed)
    half = args.resume_steps // 2
    differences = [abs(x["loss"] - y["loss"]) for x, y in zip(a, b)]
    return {"net": args.resume_net, "gpus": gpus, "killed_after_step": killed_at, "resumed_from": half,
            "steps_compared": len(differences), "losses_whole": [r["loss"] for r in a],
            "losses_killed_and_resumed": [r["loss"] for r in b],
            "max_abs_loss_difference_before_kill": max(differences[:half]),
            "max_abs_loss_difference_after_resume": max(differences[half:]),
            "bit_exact": all(x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b)),
            "load_seconds": log_seconds(killed, r"loaded in ([\d.]+) s")}


def scale_result(out, batch, seconds):
    recs = records(out)[1:]   # the first window holds the warm-up
    return {"images_per_s": statistics.median(r["images_per_s"] for r in recs),
            "mfu": statistics.median(r["mfu"] for r in recs) if recs[0]["mfu"] else None,
            "memory_gib_per_gpu": max(r["memory_gib"] or 0 for r in recs), "batch_per_gpu": batch,
            "windows": [r["images_per_s"] for r in recs], "wall_seconds": seconds}


def run_scale(args, work):
    """Every (net, GPU count) run; with --parallel, runs share the machine's GPUs (each its own
    block of GPUs, started as GPUs come free, the smallest first), else one after another."""
    jobs = []
    for spec in args.scale_nets.split(","):
        net, _, batch = spec.partition(":")
        for gpus in gpu_counts(args.scale_gpus):
            jobs.append((gpus, net, int(batch or 64)))
    jobs.sort(key=lambda job: job[0])
    # One after another: the GPUs from --first-gpu that the largest run needs; in parallel: the machine's.
    last = args.machine_gpus if args.parallel else args.first_gpu + max(job[0] for job in jobs)
    free, running, result = list(range(args.first_gpu, last)), [], {}

    def finish(entry):
        process, (gpus, net, batch), out, gpu_block, started = entry
        seconds = time.perf_counter() - started
        if process.returncode == 0:
            result.setdefault(net, {})[f"{gpus}gpu"] = scale_result(out, batch, seconds)
        else:   # an OOM at one size keeps the others
            with open(os.path.join(out, "stdout.txt")) as file:
                result.setdefault(net, {})[f"{gpus}gpu"] = {"error": file.read()[-1500:]}
        free.extend(gpu_block)
        free.sort()

    for job in jobs:
        gpus, net, batch = job
        while running and (len(free) < gpus or not args.parallel):
            for entry in list(running):
                if entry[0].poll() is not None:
                    running.remove(entry)
                    finish(entry)
            time.sleep(0.5)
        gpu_block, free[:gpus] = free[:gpus], []
        out = os.path.join(work, f"scale-{net}-{gpus}gpu")
        process = launch(out, gpus, ["--mode", "scd", "--teacher", "init", "--net", net, "--data", "synthetic",
                                     "--batch-size", str(batch * gpus), "--steps", str(args.scale_steps),
                                     "--log-every", "2", "--checkpoint-every", "0", "--adam-eps", "1e-11", "--no-export",
                                     "--threads", "4",   # torchrun's workers get 1 by default, one process all
                                     *(["--activation-checkpointing"] if args.scale_checkpointing else []),
                                     *shlex.split(args.scale_args)],
                         gpu_block[0] if gpu_block else args.first_gpu)
        running.append((process, job, out, gpu_block, time.perf_counter()))
    for entry in running:
        entry[0].wait()
        finish(entry)
    for rows in result.values():
        one = rows.get("1gpu", {}).get("images_per_s")
        for key, row in rows.items():
            if one and key != "1gpu" and "images_per_s" in row:
                row["scaling_efficiency"] = row["images_per_s"] / (int(key[:-3]) * one)
    result["parallel"] = args.parallel
    return result


def run_checkpoint(args, work):
    gpus, reload_gpus = args.checkpoint_gpus, args.reload_gpus
    out = os.path.join(work, f"checkpoint-{args.checkpoint_net}")
    common = ["--mode", "scd", "--teacher", "init", "--net", args.checkpoint_net, "--data", "synthetic",
              "--batch-size", str(2 * gpus), "--log-every", "1", "--checkpoint-every", "2", "--keep-checkpoints", "1",
              "--no-export"]
    train(out, gpus, [*common, "--steps", "2"], args.first_gpu)
    train(out, gpus, [*common, "--steps", "3", "--resume"], args.first_gpu)
    size = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(os.path.join(out, "checkpoints"))
               for name in names)
    train(out, reload_gpus, [*common, "--steps", "4", "--resume"], args.first_gpu)
    return {"gpus": gpus, "reload_gpus": reload_gpus, "checkpoint_gib": size / 2 ** 30,
            "write_seconds": log_seconds(out, r"written in ([\d.]+) s"),
            "load_seconds": log_seconds(out, r"loaded in ([\d.]+) s"),
            "note": f"writes: {gpus} processes at steps 2 and 3, {reload_gpus} at step 4; loads: {gpus} processes "
                    f"(step 2), then {reload_gpus} (step 3, written by {gpus})"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="cifar,resume,scale,checkpoint")
    parser.add_argument("--first-gpu", type=int, default=0, help="the first GPU index this driver uses")
    parser.add_argument("--cifar", default="data/cifar-10-batches-py")
    parser.add_argument("--cifar-gpus", default="1,2")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--scd-steps", type=int, default=100)
    parser.add_argument("--cifar-log-every", type=int, default=10)
    parser.add_argument("--cifar-batch", type=int, default=256, help="global batch (the presets' 256)")
    parser.add_argument("--inception", default="", help="TF-Inception default_1.pt: FID of the CIFAR-10 exports")
    parser.add_argument("--fid-reference", default="", help="cached statistics of the training images (scm_min's)")
    parser.add_argument("--fid-samples", type=int, default=5000)
    parser.add_argument("--resume-net", default="cifar10", help="cifar10 or a network preset (sCD, synthetic)")
    parser.add_argument("--resume-gpus", type=int, default=1)
    parser.add_argument("--resume-batch", type=int, default=2, help="per GPU, for a network preset")
    parser.add_argument("--resume-steps", type=int, default=20)
    parser.add_argument("--scale-nets", default="unet-xl:64", help="NET:BATCH_PER_GPU,...")
    parser.add_argument("--scale-gpus", default="1,2")
    parser.add_argument("--scale-steps", type=int, default=12)
    parser.add_argument("--scale-checkpointing", action="store_true")
    parser.add_argument("--scale-args", default="", help="more scaled.train flags for the scale runs, e.g. --keep-gathered")
    parser.add_argument("--parallel", action="store_true", help="scale: runs share the machine's GPUs")
    parser.add_argument("--machine-gpus", type=int, default=torch.cuda.device_count(),
                        help="GPUs that --parallel shares out (default: all; on a CPU, how many runs at once)")
    parser.add_argument("--checkpoint-net", default="unet-xxl")
    parser.add_argument("--checkpoint-gpus", type=int, default=2)
    parser.add_argument("--reload-gpus", type=int, default=1)
    parser.add_argument("--work", default="out/scaled_train_benchmark")
    parser.add_argument("--json", default="benchmarks/results/scaled_train.json")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
               "gpus_on_machine": torch.cuda.device_count(), "torch": torch.__version__,
               "python": platform.python_version(), "args": vars(args)}
    runs = {"cifar": run_cifar, "resume": run_resume, "scale": run_scale, "checkpoint": run_checkpoint}
    for name in args.runs.split(","):
        started = time.perf_counter()
        try:
            results[name] = runs[name](args, args.work)
        except Exception as error:   # keep what the other runs measured
            results[name] = {"error": f"{type(error).__name__}: {error}"[-3000:]}
        results[name]["seconds"] = time.perf_counter() - started
        shown = {k: v for k, v in results[name].items() if not k.endswith("gpu")} if name == "cifar" else results[name]
        print(name, json.dumps(shown)[:3000], flush=True)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json + ".partial", "w") as file:
            json.dump(results, file, indent=1)
        os.replace(args.json + ".partial", args.json)
    for key, value in results.get("cifar", {}).items():
        if key.endswith("gpu"):
            for phase in ("teacher", "scd"):
                c = value[phase]
                print(f"cifar {phase} {key}: loss over the last half {c['last_half_mean']:.4f} +- "
                      f"{c['last_half_std']:.4f}, {c['images_per_s'] or 0:.0f} images/s, {c['memory_gib']:.1f} GiB")
            for sampler, value_fid in value.get("fid", {}).get("fid", {}).items():
                print(f"cifar FID {key} {sampler}: {value_fid:.2f}")
    for net, rows in results.get("scale", {}).items():
        for key, row in rows.items() if isinstance(rows, dict) and net != "error" else ():
            if "images_per_s" in row:
                print(f"scale {net} {key}: {row['images_per_s']:.1f} images/s, MFU {row['mfu'] or 0:.1%}, "
                      f"{row['memory_gib_per_gpu']:.1f} GiB, efficiency {row.get('scaling_efficiency', 1):.3f}")


if __name__ == "__main__":
    main()
