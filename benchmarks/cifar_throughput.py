"""Benchmark: seconds per training step of each CIFAR-10 phase (teacher, sCD, sCT) on a GPU, for the
U-Net sizes that the budgets use, in bfloat16 autocast and in float32; sampling throughput; how long
the data takes to load; and the bfloat16 / TF32 error of the JVP tangent on a briefly trained teacher.
These numbers size the `short` budget and give the `paper` budget's GPU-hours.

    python benchmarks/cifar_throughput.py --data-path PATH --out benchmarks/results/cifar_throughput_h100.json

Each timing runs scm_min.train (the loop the job runs: loss, backward, optimizer, EMA) for --steps
steps after --warmup steps on real CIFAR-10 batches, with torch.cuda.synchronize around it.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import image_data  # noqa: E402
import scm_min  # noqa: E402


def step_seconds(cfg, kind, batches, teacher, steps, warmup, device):
    """Seconds per step of `kind` (teacher, scd or sct) with cfg's network and batch size."""
    def phase(n):
        torch.manual_seed(0)
        if kind == "teacher":
            net, loss_fn = scm_min.cifar_unet(cfg, cfg.teacher_dropout, device), scm_min.TeacherLoss(-1.2, 1.2)
        else:
            net = scm_min.set_dropout(scm_min.make_student(teacher), cfg.student_dropout)
            loss_fn = scm_min.SCMLoss(teacher if kind == "scd" else None, warmup_steps=10)
        loss_fn.logvar.to(device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        scm_min.train(net, loss_fn, batches, n, cfg.batch_size, lr=1e-4, ema_sigma_rel=0.05, seed=0, desc=kind)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    phase(warmup)
    torch.cuda.reset_peak_memory_stats()
    seconds = phase(steps) / steps
    return seconds, torch.cuda.max_memory_allocated() / 2 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--out", default="benchmarks/results/cifar_throughput_h100.json")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--teacher-steps", type=int, default=400, help="steps of the teacher for the tangent check")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": getattr(__import__("triton"), "__version__", None), "steps": args.steps}

    start = time.perf_counter()
    images, description = image_data.load_cifar10(args.data_path)
    result["load_seconds"], result["data"] = time.perf_counter() - start, description
    batches = scm_min.ImageBatches(images, device)
    short = scm_min.CifarConfig()
    paper = scm_min.CifarConfig(**scm_min.CIFAR_BUDGETS["paper"])

    # A teacher trained briefly, for the sCD timings (its weights do not change the cost) and the tangent check.
    start = time.perf_counter()
    torch.manual_seed(0)
    net = scm_min.cifar_unet(short, 0.0, device)
    loss_fn = scm_min.TeacherLoss(short.teacher_P_mean, short.teacher_P_std)
    loss_fn.logvar.to(device)
    teacher, history = scm_min.train(net, loss_fn, batches, args.teacher_steps, short.batch_size, short.teacher_lr,
                                     short.ema_sigma_rel, seed=0, lr_warmup=short.lr_warmup, desc="teacher")
    result["short_teacher"] = {"steps": args.teacher_steps, "seconds": time.perf_counter() - start,
                               "loss_first_20": sum(history["loss"][:20]) / 20, "loss_last_20": sum(history["loss"][-20:]) / 20}
    x0 = batches(64, torch.Generator().manual_seed(1))
    result["tangent_precision"] = scm_min.tangent_precision(teacher, x0)

    rows = []
    variants = [("short c64", dataclasses.replace(short, channels=64), ["teacher"]),
                ("short c96 (default)", short, ["teacher", "scd", "sct"]),
                ("short c96 fp32", dataclasses.replace(short, fp32=True), ["teacher", "sct"]),
                ("short c128", dataclasses.replace(short, channels=128), ["teacher", "scd", "sct"]),
                ("paper", paper, ["teacher", "scd", "sct"])]
    for name, cfg, kinds in variants:
        if cfg.fp32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        phase_teacher = scm_min.cifar_unet(cfg, 0.0, device).eval()
        params = sum(p.numel() for p in phase_teacher.parameters())
        for kind in kinds:
            seconds, memory = step_seconds(cfg, kind, batches, phase_teacher, args.steps, args.warmup, device)
            rows.append({"variant": name, "phase": kind, "params_M": params / 1e6, "batch": cfg.batch_size,
                         "ms_per_step": 1000 * seconds, "images_per_s": cfg.batch_size / seconds, "peak_GiB": memory})
            print(f"{name:22s} {kind:8s} {params / 1e6:5.1f}M batch {cfg.batch_size:4d} {1000 * seconds:7.1f} ms/step "
                  f"{cfg.batch_size / seconds:7.0f} img/s {memory:5.1f} GiB", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    result["steps_table"] = rows

    # Sampling: forward passes of the default net under no_grad, batch 1000.
    z = torch.randn(1000, 3, 32, 32, device=device) * scm_min.SIGMA_D
    t = torch.full((1000,), 1.0, device=device)
    with torch.no_grad():
        for _ in range(3):
            teacher(z, t)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            teacher(z, t)
        torch.cuda.synchronize()
    result["sampling_forwards_per_s"] = 10_000 / (time.perf_counter() - start)
    print(json.dumps({k: v for k, v in result.items() if k != "steps_table"}, indent=2))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
