"""Check on the CPU that sCD learns on CIFAR-10 images: the distillation error of the student's 1-step
sample against the teacher's Heun solve (18 steps) from the same noise, as training goes on.

A tiny U-Net (32 channels, 1.2M parameters) trains a teacher, then an sCD student with the job's
student settings; after every quarter of the student's iterations the script prints and records
  relative error = mean((f_student(z, t_max) - x_teacher)^2) / mean(x_teacher^2)
for the EMA and the raw student. It needs no Inception network and shows progress long before FID.

    python benchmarks/cifar_distillation_check.py --data-path ZIP --out benchmarks/results/cifar_distillation_cpu.json

The defaults took 29 minutes on one thread of a loaded 2-core machine.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import image_data  # noqa: E402
import scm_min  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True)
    parser.add_argument("--out", default="benchmarks/results/cifar_distillation_cpu.json")
    parser.add_argument("--images", type=int, default=10_000, help="training images used (the first ones)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--student-lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, description = image_data.load_cifar10(args.data_path)
    batches = scm_min.ImageBatches(images[:args.images], torch.device("cpu"))
    start = time.perf_counter()
    net = scm_min.UNet(channels=32, channel_mult=(1, 2, 2), blocks=1)
    teacher, history = scm_min.train(net, scm_min.TeacherLoss(-1.2, 1.2), batches, args.teacher_steps, args.batch_size,
                                     1e-3, 0.05, seed=0, lr_warmup=100, desc="teacher")
    z = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * scm_min.SIGMA_D
    x_teacher = scm_min.sample_teacher(teacher, z, scm_min.teacher_times(18))

    def error(net):
        x = scm_min.sample_consistency(net, z, scm_min.consistency_times(1))
        return ((x - x_teacher) ** 2).mean().item() / (x_teacher ** 2).mean().item()

    student = scm_min.make_student(teacher)
    result = {"data": description, "images": args.images, "batch_size": args.batch_size,
              "teacher_steps": args.teacher_steps, "student_lr": args.student_lr,
              "teacher_loss_first_last_50": [sum(history["loss"][:50]) / 50, sum(history["loss"][-50:]) / 50],
              "curve": [{"step": 0, "ema": error(student), "raw": error(student)}]}
    print(result["curve"][-1], flush=True)
    loss_fn = scm_min.SCMLoss(teacher, warmup_steps=100)
    checkpoint = tempfile.mktemp(suffix=".pt")
    try:
        for quarter in range(1, 5):  # train() resumes from its checkpoint, so each call adds a quarter
            steps = args.student_steps * quarter // 4
            ema, _ = scm_min.train(student, loss_fn, batches, steps, args.batch_size, args.student_lr, 0.05, seed=1,
                                   lr_warmup=100, desc="scd", checkpoint=checkpoint)
            result["curve"].append({"step": steps, "ema": error(ema), "raw": error(student)})
            print(result["curve"][-1], flush=True)
    finally:
        if os.path.exists(checkpoint):
            os.remove(checkpoint)
    result["seconds"] = time.perf_counter() - start
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
