"""The image side of scm_min.py on the CPU: the U-Net's consistency tangent against a float64 finite
difference, its bfloat16 path, one training step of each loss on the tiny preset, checkpoint resume,
and the CIFAR-10 command line end to end on a tiny generated data set."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import scm_min
from scm_min import SIGMA_D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # These nets are tiny: two threads only add synchronization, which costs seconds per step on a
    # loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(dtype=torch.float32, dropout=0.0, seed=0):
    """The tiny preset's U-Net with every weight random, the zero-initialized output layers included
    (with them at zero, F would not depend on x and every tangent would vanish)."""
    torch.manual_seed(seed)
    net = scm_min.UNet(channels=8, channel_mult=(1, 2), blocks=1, dropout=dropout).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return net


def image_batch(n=4, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, 32, 32, generator=generator, dtype=dtype) * SIGMA_D
    z = torch.randn(n, 3, 32, 32, generator=generator, dtype=dtype) * SIGMA_D
    t = torch.rand(n, generator=generator, dtype=dtype) * 1.4 + 0.1
    return x0, z, t


def test_unet_consistency_tangent_matches_float64_finite_difference():
    net = tiny_unet(F64).eval()
    x0, z, t = image_batch(dtype=F64)
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)
    F, df_dt = scm_min.consistency_tangent(net, x_t, t, dxt_dt)
    # Fourth-order central difference of f_theta along the trajectory (x_t + h dx_t/dt, t + h): the
    # time features reach frequency 32, so f has large high derivatives, and a two-point difference
    # (error h^2 f'''/6) would need a step so small that rounding takes over.
    h = 1e-4
    f = lambda s: scm_min.consistency_fn(net, x_t + s * dxt_dt, t + s)  # noqa: E731
    fd = (-f(2 * h) + 8 * f(h) - 8 * f(-h) + f(-2 * h)) / (12 * h)
    assert df_dt.abs().max() > 0.1  # a tangent that is not trivially zero
    torch.testing.assert_close(df_dt, fd, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(F, net(x_t / SIGMA_D, t))


def test_bfloat16_path_stays_close_to_float32():
    # On the CPU, mixed precision is bfloat16 autocast too; tangent_precision compares it with float32.
    net = tiny_unet()
    x0, _, _ = image_batch(8)
    net.mixed_precision = True
    assert net(x0, torch.full((8,), 0.5)).dtype == torch.float32
    errors = scm_min.tangent_precision(net, x0)
    assert net.mixed_precision  # restored
    assert 0 < errors["bf16 cos_sin_dF_dt"]["max"] < 0.05 and 0 < errors["bf16 g"]["max"] < 0.05, errors
    assert errors["tf32 g"]["max"] == 0  # TF32 does not exist on the CPU


def tiny_images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def test_image_batches_flip_and_scale_to_sigma_d():
    images = tiny_images(64)
    batches = scm_min.ImageBatches(images, torch.device("cpu"))
    x = batches(512, torch.Generator().manual_seed(0))
    assert x.shape == (512, 3, 32, 32) and x.dtype == torch.float32
    full = batches.to_model(torch.as_tensor(images))
    assert full.mean().abs() < 1e-5 and full.std().item() == pytest.approx(SIGMA_D, rel=1e-4)
    torch.testing.assert_close(batches.to_pixels(full), torch.as_tensor(images), rtol=0, atol=0)
    originals = {tuple(im.flatten()[:50].tolist()) for im in full}
    flipped = {tuple(im.flip(2).flatten()[:50].tolist()) for im in full}
    drawn = [tuple(im.flatten()[:50].tolist()) for im in x]
    assert all(d in originals or d in flipped for d in drawn)
    assert 0.3 < np.mean([d in flipped for d in drawn]) < 0.7


@pytest.mark.parametrize("kind", ["teacher", "scd", "sct"])
def test_one_training_step_of_each_loss_on_the_tiny_preset(kind):
    cfg = scm_min.CifarConfig(**scm_min.CIFAR_BUDGETS["tiny"])
    batches = scm_min.ImageBatches(tiny_images(), torch.device("cpu"))
    torch.manual_seed(0)
    teacher = scm_min.cifar_unet(cfg, 0.0, torch.device("cpu"))
    if kind == "teacher":
        net, loss_fn = teacher, scm_min.TeacherLoss(cfg.teacher_P_mean, cfg.teacher_P_std)
    else:
        teacher = tiny_unet().eval()
        net = scm_min.set_dropout(scm_min.make_student(teacher), 0.2)  # the paper's sCT dropout
        loss_fn = scm_min.SCMLoss(teacher if kind == "scd" else None, warmup_steps=1)
    before = [p.detach().clone() for p in net.parameters()]
    ema, history = scm_min.train(net, loss_fn, batches, steps=1, batch_size=4, lr=1e-3, ema_sigma_rel=0.05, seed=0)
    assert np.isfinite(history["loss"]).all() and len(history["loss"]) == 1
    assert max((p - q).abs().max().item() for p, q in zip(net.parameters(), before)) > 1e-4
    assert ("g_norm" in history) == (kind != "teacher")


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    batches = scm_min.ImageBatches(tiny_images(), torch.device("cpu"))
    settings = dict(steps=4, batch_size=2, lr=1e-3, ema_sigma_rel=0.05, seed=3, lr_warmup=2, checkpoint_every=1)

    def run(path, data, meta={"preset": "test"}):
        torch.manual_seed(0)
        net = tiny_unet().train()
        return scm_min.train(net, scm_min.SCMLoss(None, warmup_steps=2), data, checkpoint=str(path),
                             checkpoint_meta=meta, **settings)

    uninterrupted, history = run(tmp_path / "whole.pt", batches)
    draws = []

    def interrupted_at_the_third_batch(n, generator):
        draws.append(n)
        if len(draws) == 3:
            raise KeyboardInterrupt
        return batches(n, generator)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt", interrupted_at_the_third_batch)
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["step"] == 2
    resumed, resumed_history = run(tmp_path / "cut.pt", batches)
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert resumed_history == history and len(history["loss"]) == 4
    with pytest.raises(scm_min.InputError, match="other settings"):
        run(tmp_path / "cut.pt", batches, meta={"preset": "another"})

class CountingInception(torch.nn.Module):
    """Stands in for the Inception network: counts the images it sees; features are channel means."""

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        self.seen += len(x)
        return x.mean(dim=(2, 3))  # [N, 3]


def test_fid_sees_exactly_fid_samples_images_and_every_sampler_gets_the_same_noise(tmp_path):
    cfg = scm_min.CifarConfig(**{**scm_min.CIFAR_BUDGETS["tiny"], "fid_samples": 10, "out": str(tmp_path),
                                 "save_samples": True})
    batches = scm_min.ImageBatches(tiny_images(), torch.device("cpu"))
    samplers = {"teacher-heun1": (2, lambda z, g: z), "same": (1, lambda z, g: z.clone()), "negated": (1, lambda z, g: -z)}
    inception = CountingInception()
    reference = (np.full(3, 0.1), np.eye(3), "test")
    results = scm_min.evaluate_samplers(cfg, samplers, batches, inception, reference, log=lambda message: None)
    assert inception.seen == 3 * 10
    assert results["nfe"] == {"teacher-heun1": 2, "same": 1, "negated": 1}
    assert results["fid"]["same"] == results["fid"]["teacher-heun1"] != results["fid"]["negated"]
    assert results["fid_ratio_to_teacher_heun"]["same"] == 1.0
    grids = {name: (tmp_path / "grids" / f"{name}.png").read_bytes() for name in samplers}
    assert grids["same"] == grids["teacher-heun1"] != grids["negated"]
    saved = np.load(tmp_path / "samples" / "negated.npz")["images"]
    assert saved.shape == (10, 3, 32, 32) and saved.dtype == np.uint8

def test_cached_reference_statistics_are_used_only_for_the_same_images(tmp_path):
    from image_data import fid
    default = scm_min.CifarConfig(out=str(tmp_path))
    assert scm_min.cached_fid_reference(default, "these images") is None  # nothing cached yet
    fid.save_statistics(tmp_path / "fid_reference.npz", np.zeros(3), np.eye(3), "these images")
    mu, sigma, key = scm_min.cached_fid_reference(default, "these images")
    assert key == "these images" and sigma.shape == (3, 3)
    assert scm_min.cached_fid_reference(default, "other images") is None  # the default cache is recomputed
    named = scm_min.CifarConfig(out=str(tmp_path), fid_reference=str(tmp_path / "fid_reference.npz"))
    with pytest.raises(scm_min.InputError, match="not of these other images"):
        scm_min.cached_fid_reference(named, "other images")  # a file the user named is never overwritten

#----------------------------------------------------------------------------
# The command line.

def tiny_zip(path, n=24):
    from PIL import Image
    import io
    with zipfile.ZipFile(path, "w") as archive:
        for i, image in enumerate(tiny_images(n)):
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buffer, format="PNG")
            archive.writestr(f"train/c{i % 2}/{i:04d}.png", buffer.getvalue())
    return str(path)


def scm(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, os.path.join(ROOT, "scm_min.py"), "--data", "cifar10", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def test_without_a_gpu_it_says_how_long_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = scm("--data-path", tiny_zip(tmp_path / "d.zip"), "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: CIFAR-10 training needs a CUDA GPU"), result.stderr
    assert "hours" in lines[0] and "--allow-cpu" in lines[0]
    assert not out.exists()


def test_tiny_job_end_to_end_then_resumes_from_its_checkpoints(tmp_path):
    out = tmp_path / "out"
    data = tiny_zip(tmp_path / "d.zip")
    result = scm("--budget", "tiny", "--allow-cpu", "--data-path", data, "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = ["teacher-heun1", "teacher-ddim2", "scd-1step", "scd-2step", "sct-1step", "sct-2step"]
    assert sorted(os.listdir(out / "grids")) == sorted(f"{n}.png" for n in names)
    assert sorted(os.listdir(out / "checkpoints")) == ["scd.pt", "sct.pt", "teacher.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["nfe"] == {"teacher-heun1": 2, "teacher-ddim2": 2, "scd-1step": 1, "scd-2step": 2,
                              "sct-1step": 1, "sct-2step": 2}
    assert metrics["config"]["channels"] == 8 and metrics["fid"] == {}
    assert "teacher 3/3" in (out / "train.log").read_text()
    grid_before = (out / "grids" / "sct-2step.png").read_bytes()
    # Run again: every phase is finished, so nothing trains and the same samples come out.
    again = scm("--budget", "tiny", "--allow-cpu", "--data-path", data, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert (out / "grids" / "sct-2step.png").read_bytes() == grid_before
    assert (out / "train.log").read_text().count("teacher 3/3") == 1
    # Other training settings in the same folder: refused, with nothing overwritten.
    refused = scm("--budget", "tiny", "--allow-cpu", "--data-path", data, "--out", str(out), "--teacher-lr", "1e-2")
    assert refused.returncode == 2 and "other settings" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, expected", [
    (["--data-path", "/nonexistent/cifar"], "not found"),
    (["--budget", "huge"], "--budget must be one of"),
    (["--channel-mult", "1,x"], "--channel-mult"),
    (["--fid-samples", "1"], "--fid-samples"),
    (["--inception", "/nonexistent/default_1.pt", "--fid-samples", "10"], "Inception network for FID not found"),
])
def test_bad_input_gives_one_error_line_exit_2_and_writes_nothing(tmp_path, args, expected):
    out = tmp_path / "out"
    base = ["--budget", "tiny", "--allow-cpu", "--data-path", tiny_zip(tmp_path / "d.zip"), "--out", str(out)]
    result = scm(*base, *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not out.exists()


def test_dry_run_resolves_the_preset_and_flags():
    result = scm("--budget", "paper", "--student-steps", "7", "--dry-run")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["student_steps"] == 7 and config["batch_size"] == 512 and config["student_optimizer"] == "radam"
