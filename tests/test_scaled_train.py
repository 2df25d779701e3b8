"""scaled.train and scaled.data on the CPU: the JVP pass and the gradient of a model sharded over
2 gloo processes (FSDP2) against torch.func.jvp on the unsharded model in float64; a run killed
with SIGKILL and resumed gives the uninterrupted run's losses bit for bit; a checkpoint of 2
processes loads on 1; non-finite steps are skipped on every rank; bad input exits 2 and
overwrites nothing; the data order."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp

import scm_min
from scaled import data as scaled_data
from scaled import train as scaled_train
from scaled.data import DataOrder, SyntheticLatents
from scaled.networks import MPConv, make_net, project_weights_
from scaled.step import RecordingJVP, forward_ad_jvp, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--threads", "1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_env(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))


def perturbed(net, seed):
    """A net whose zero-initialized parts (output gain) are set, so that F depends on every layer."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        net.out_gain.fill_(1.0)
    return net


def scd_pieces(x0, z, t, labels, net, teacher, jvp):
    """The sCD loss of scm_min's pieces with the given noise: per-sample loss and the JVP's output."""
    recording = RecordingJVP(jvp)
    x_t = scm_min.trigflow_interpolate(x0, z, t)
    with torch.no_grad():
        dxt_dt = scm_min.pf_ode_velocity(functools.partial(teacher, class_labels=labels), x_t, t)
    error, _ = scm_min.scm_objective(functools.partial(net, class_labels=labels), x_t, t, dxt_dt, 0.5, 0.1, recording)
    logvar = net.logvar(t)
    return error * torch.exp(-logvar) + logvar, recording.calls[0][3]


def fixed_batch(n=8):
    generator = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, 4, 8, 8, generator=generator, dtype=torch.float64) * scm_min.SIGMA_D
    z = torch.randn(n, 4, 8, 8, generator=generator, dtype=torch.float64) * scm_min.SIGMA_D
    t = scm_min.sample_time(n, -0.8, 1.6, generator=generator, dtype=torch.float64)
    return x0, z, t, torch.randint(0, 10, (n,), generator=generator)


def reference_nets():
    kwargs = dict(img_channels=4, img_resolution=8, label_dim=10, dtype=torch.float64)
    torch.manual_seed(2)
    student = perturbed(make_net("unet-tiny", **kwargs).double(), 0)
    teacher = perturbed(make_net("unet-tiny", **kwargs).double(), 1)
    return student, teacher


def sharded_jvp_worker(rank, world_size, port, out, keep_gathered):
    distributed_env(rank, world_size, port)
    torch.set_num_threads(1)
    cfg = scaled_train.TrainConfig(net="unet-tiny", precision="fp64", data="synthetic:4,8,8,10",
                                   keep_gathered=keep_gathered)
    _, _, device = scaled_train.init_distributed()
    mesh = scaled_train.init_device_mesh("cpu", (world_size,))
    kwargs, _ = scaled_train.net_kwargs(cfg, {}, SyntheticLatents((4, 8, 8), 10))
    student, teacher = reference_nets()
    buffers = dict(student.named_buffers())
    net = scaled_train.build_sharded(cfg, kwargs, mesh, device, buffers)
    scaled_train.load_full_state(net, student.state_dict())
    prepare(net, checkpoint=True)         # activation checkpointing around the sharded blocks, too
    frozen = scaled_train.build_sharded(cfg, kwargs, mesh, device, buffers, trainable=False)
    scaled_train.load_full_state(frozen, teacher.state_dict())
    half = slice(rank * 4, rank * 4 + 4)   # each rank takes its half of the batch
    loss, (F, tangent) = scd_pieces(*(x[half] for x in fixed_batch()), net, frozen, forward_ad_jvp)
    loss.mean().backward()
    grads = {name: p.grad.full_tensor() for name, p in net.named_parameters()}   # collective: on every rank
    torch.save({"F": F, "tangent": tangent, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    scaled_train.dist.destroy_process_group()


@pytest.mark.parametrize("keep_gathered", [False, True])
def test_sharded_jvp_and_gradient_equal_torch_func_jvp_on_the_unsharded_model(tmp_path, keep_gathered):
    """2 gloo processes, float64, FSDP2 per block with activation checkpointing: the tangent of the
    JVP pass (dual tensors through the sharded blocks) and the gradient of the sCD loss (each rank
    half the batch, gradients averaged by FSDP's reduce-scatter) equal torch.func.jvp and autograd
    on one unsharded model; also with the parameters kept gathered from the JVP pass to the backward."""
    mp.spawn(sharded_jvp_worker, args=(2, free_port(), str(tmp_path), keep_gathered), nprocs=2)
    student, teacher = reference_nets()
    loss, (F, tangent) = scd_pieces(*fixed_batch(), student, teacher, torch.func.jvp)
    loss.mean().backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["tangent"] for r in results]), tangent, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["F"] for r in results]), F, rtol=1e-10, atol=1e-12)
    for name, p in student.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name
        for r in results:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def torchrun(out, *args):
    """2 processes of `python -m scaled.train` through torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "scaled.train", *TINY, "--out", str(out), *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def descendants(pid):
    """Process ids of every descendant of `pid` (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as file:
                    parents[int(entry)] = int(file.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def records(out):
    with open(os.path.join(out, "metrics.jsonl")) as file:
        return [{k: r[k] for k in ("step", "images_seen", "loss", "grad_norm", "g_norm", "error", "lr")}
                for r in map(json.loads, file)]


RESUME_RUN = ["--mode", "scd", "--teacher", "init", "--steps", "8", "--log-every", "1", "--checkpoint-every", "3",
              "--warmup-steps", "4", "--net-args", '{"dropout": 0.1}']


def test_sigkill_and_resume_equals_the_uninterrupted_run_and_2_process_checkpoint_loads_on_1(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    full_run = torchrun(whole, *RESUME_RUN)
    assert full_run.wait(timeout=300) == 0, full_run.stdout.read()
    # The same run, killed (every process, SIGKILL) once iteration 4 is logged, after the checkpoint at 3.
    run = torchrun(killed, *RESUME_RUN)
    deadline = time.time() + 300
    while not (os.path.exists(killed / "metrics.jsonl") and len(records(killed)) >= 4):
        assert run.poll() is None and time.time() < deadline, run.stdout.read()
        time.sleep(0.02)
    workers = descendants(run.pid)                  # torchrun starts each worker in a session of its own
    for pid in [run.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    run.wait()
    while any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.01)
    assert not os.path.exists(killed / "ema.safetensors"), "the run finished before it was killed"
    assert [os.path.basename(d) for d in scaled_train.checkpoint_dirs(killed)] == ["step-00000003"]
    resumed = torchrun(killed, *RESUME_RUN, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert records(killed) == records(whole)           # losses, gradient norms, ||g||: bit for bit
    assert len(records(whole)) == 8

    # The 2-process checkpoint at iteration 8, loaded by 1 process (DCP reshards), exports the same EMA.
    single = tmp_path / "single"
    os.makedirs(single / "checkpoints")
    os.rename(whole / "checkpoints" / "step-00000008", single / "checkpoints" / "step-00000008")
    assert scaled_train.main([*TINY, *RESUME_RUN, "--out", str(single), "--resume", "--export-only"]) == 0
    from safetensors.torch import load_file
    one, two = load_file(single / "ema.safetensors"), load_file(whole / "ema.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.equal(one[name], two[name]), name


class NonFinite:
    """SyntheticLatents whose batches on rank `rank` are NaN from the `after`-th batch on (all of them
    with every=1, else only that one)."""

    def __init__(self, rank, after, every=0):
        self.inner, self.rank, self.after, self.every, self.calls = SyntheticLatents((4, 8, 8), 10), rank, after, every, 0
        self.shape, self.num_classes = self.inner.shape, self.inner.num_classes

    def __len__(self):
        return len(self.inner)

    def batch(self, indices, generator):
        x, labels = self.inner.batch(indices, generator)
        self.calls += 1
        bad = self.calls == self.after or (self.every and self.calls >= self.after)
        if bad and int(os.environ.get("RANK", 0)) == self.rank:
            x = x * float("nan")
        return x, labels


def skip_worker(rank, world_size, port, out):
    distributed_env(rank, world_size, port)
    torch.set_num_threads(1)
    cfg = scaled_train.parse_config(["--preset", "tiny", "--out", out])
    trainer = scaled_train.Trainer(cfg)
    loss_fn = trainer.loss_fn

    def nan_loss_on_rank_1_at_the_second_step(net, x0, step, **cond):
        # A non-finite loss with finite gradients (the NaN is a constant): only the all-reduce of the
        # loss tells rank 0 (non-finite data would reach every rank through the gradient reduction).
        loss, logs = loss_fn(net, x0, step, **cond)
        return (loss + float("nan") if rank == 1 and step == 1 else loss), logs

    trainer.loss_fn = nan_loss_on_rank_1_at_the_second_step
    assert not trainer.train_step()["skipped"]
    before = [p.to_local().clone() for p in [*trainer.net.parameters(), *trainer.ema.net.parameters()]]
    adam_steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    logs = trainer.train_step()
    assert logs["skipped"] and trainer.skipped == 1 and trainer.step == 2
    after = [p.to_local() for p in [*trainer.net.parameters(), *trainer.ema.net.parameters()]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_steps
    logs = trainer.train_step()
    assert not logs["skipped"] and trainer.consecutive_skips == 0
    assert not all(torch.equal(a, b.to_local()) for a, b in zip(before, trainer.net.parameters()))
    # Forced weight normalization of sharded weights: rows scaled by 3 come back to RMS 1.
    layers = [m for m in trainer.net.modules() if isinstance(m, MPConv)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.to_local().mul_(3)
    project_weights_(trainer.net)
    for layer in layers:
        rms = layer.weight.full_tensor().flatten(1).pow(2).mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=0)
    scaled_train.dist.destroy_process_group()


def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(tmp_path):
    mp.spawn(skip_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)


def test_consecutive_non_finite_steps_stop_the_run_with_one_line_and_keep_the_checkpoint(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setitem(scaled_data.DATASETS, "nan", lambda path: NonFinite(rank=0, after=5, every=1))
    argv = [*TINY, "--data", "nan", "--out", str(tmp_path), "--checkpoint-every", "2", "--max-skips", "3"]
    assert scaled_train.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: 3 consecutive iterations with a non-finite loss")
    assert [os.path.basename(d) for d in scaled_train.checkpoint_dirs(tmp_path)] == ["step-00000002", "step-00000004", "step-00000006"]
    lines = open(tmp_path / "train.log").read()
    assert "iteration 5: non-finite" in lines and "skipped (3 in all, 3 in a row)" in lines


def snapshot(folder):
    return {os.path.join(root, name): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def test_bad_input_exits_2_with_one_line_and_overwrites_nothing(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert scaled_train.main([*TINY, "--out", out, "--steps", "2", "--checkpoint-every", "1",
                              "--keep-checkpoints", "1"]) == 0
    before = snapshot(out)
    fresh = str(tmp_path / "fresh")
    bad = [(fresh, ["--mode", "scd"], "--mode scd needs --teacher"),
           (fresh, ["--mode", "scd", "--teacher", str(tmp_path / "missing.safetensors")], "teacher file not found"),
           (fresh, ["--data", "cifar10:" + str(tmp_path / "nothing")], "CIFAR-10 data not found"),
           (fresh, ["--data", "imagenet"], "unknown dataset"),
           (fresh, ["--net-args", "{channels"], "--net-args is not JSON"),
           (fresh, ["--batch-size", "0"], "--steps and --batch-size"),
           (fresh, ["--preset", "nope"], "unknown --preset"),
           (out, [], "holds checkpoints"),                                   # without --resume
           (out, ["--resume", "--lr", "1e-3"], "other settings (lr)")]
    for folder, args, message in bad:
        assert scaled_train.main([*TINY, "--out", folder, "--steps", "3", *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)
    assert snapshot(out) == before and not os.path.exists(fresh)
    # A corrupt checkpoint: its metadata truncated.
    checkpoint, = scaled_train.checkpoint_dirs(out)
    with open(os.path.join(checkpoint, ".metadata"), "r+b") as file:
        file.truncate(10)
    before = snapshot(out)
    assert scaled_train.main([*TINY, "--out", out, "--steps", "3", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot read checkpoint")
    assert snapshot(out) == before


def test_dry_run_prints_the_config_parameters_and_memory(capsys):
    assert scaled_train.main(["--preset", "imagenet512-xl-scd", "--teacher", "t.safetensors", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["net"] == "unet-xl" and report["config"]["adam_eps"] == 1e-11
    assert abs(report["parameters"] / 1119e6 - 1) < 0.03
    # 24 bytes a parameter (weights, gradients, Adam, EMA, teacher) on one GPU; student and teacher
    # gathered whole in bf16 (keep_gathered, the default).
    memory = report["memory_per_gpu_gib"]
    assert abs(memory["state_gib"] - report["parameters"] * 24 / 2 ** 30) < 0.01
    assert abs(memory["gathered_gib"] - report["parameters"] * 4 / 2 ** 30) < 0.01
    # A preset's True (activation checkpointing) holds, and --no-FLAG turns a True off.
    assert report["config"]["activation_checkpointing"] and report["config"]["keep_gathered"]
    assert scaled_train.main(["--preset", "imagenet512-xl-scd", "--teacher", "t.safetensors", "--dry-run",
                              "--no-activation-checkpointing", "--no-keep-gathered"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["config"]["activation_checkpointing"] and not report["config"]["keep_gathered"]
    assert report["memory_per_gpu_gib"]["gathered_gib"] < memory["gathered_gib"] / 5


def test_boolean_flags_and_their_negations(tmp_path):
    # Every boolean option has --FLAG and --no-FLAG; --no-export (of the option `export`) writes no EMA file.
    assert scaled_train.main([*TINY, "--steps", "1", "--no-export", "--out", str(tmp_path / "a")]) == 0
    assert os.path.exists(tmp_path / "a" / "train.log") and not os.path.exists(tmp_path / "a" / "ema.safetensors")
    assert scaled_train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "b")]) == 0
    assert os.path.exists(tmp_path / "b" / "ema.safetensors")


def test_teacher_label_dropout_and_learning_rate_schedule(tmp_path):
    cfg = scaled_train.parse_config([*TINY, "--out", str(tmp_path), "--label-dropout", "0.5", "--lr-ref-steps", "4",
                                     "--lr-warmup", "2", "--batch-size", "400"])
    trainer = scaled_train.Trainer(cfg)
    try:
        _, cond = trainer.next_batch(torch.Generator().manual_seed(0))
        dropped = (cond["class_labels"] == -1).float().mean().item()
        assert 0.4 < dropped < 0.6
        assert [trainer.learning_rate(s) for s in (0, 1, 4, 16)] == pytest.approx([5e-5, 1e-4, 1e-4, 5e-5])
    finally:
        scaled_train.dist.destroy_process_group()


def test_data_order_is_a_permutation_per_epoch_shared_out_by_rank():
    length, batch = 10, 4
    single = DataOrder(length, seed=3, global_batch=batch, rank=0, world_size=1)
    ranks = [DataOrder(length, seed=3, global_batch=batch, rank=r, world_size=2) for r in range(2)]
    stream = torch.cat([single.next_indices() for _ in range(5)])           # 20 samples: two epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])                      # a new permutation each epoch
    split = torch.cat([torch.cat([order.next_indices() for order in ranks]) for _ in range(5)])
    assert torch.equal(split, stream)                                      # 2 ranks read what 1 process reads
    resumed = DataOrder(length, seed=3, global_batch=batch, rank=0, world_size=1, position=8)
    assert torch.equal(resumed.next_indices(), stream[8:12])


def test_synthetic_samples_depend_only_on_their_index():
    data = SyntheticLatents((4, 8, 8), 10, length=100)
    x, labels = data.batch(torch.tensor([3, 7]), torch.Generator())
    x2, _ = data.batch(torch.tensor([7]), torch.Generator().manual_seed(1))
    assert x.shape == (2, 4, 8, 8) and torch.equal(x[1], x2[0]) and labels.tolist() == [3, 7]
    assert abs(x.std().item() - scm_min.SIGMA_D) < 0.1


def test_gradient_clipping_scales_the_global_norm(tmp_path):
    cfg = scaled_train.parse_config([*TINY, "--out", str(tmp_path), "--grad-clip", "0.01"])
    trainer = scaled_train.Trainer(cfg)
    try:
        norms, optimizer_step = [], trainer.optimizer.step

        def step_and_record():
            norms.append(torch.stack([p.grad.to_local().norm() for p in trainer.net.parameters()]).norm().item())
            optimizer_step()

        trainer.optimizer.step = step_and_record
        logs = trainer.train_step()
        assert logs["grad_norm"] > 0.05 and norms == pytest.approx([0.01], rel=1e-4)
    finally:
        scaled_train.dist.destroy_process_group()

def test_guidance_range_trains_a_guidance_input_student_from_an_unguided_teacher(tmp_path, capsys):
    """sCD with --guidance-range: the student (a guidance embedding added, its gain starting at 0)
    starts as the teacher export and learns to use w; the teacher export has no guidance input."""
    teacher_out, student_out = tmp_path / "teacher", tmp_path / "student"
    assert scaled_train.main([*TINY, "--out", str(teacher_out), "--steps", "2"]) == 0
    teacher_file = str(teacher_out / "ema.safetensors")
    student = [*TINY, "--mode", "scd", "--teacher", teacher_file, "--steps", "3", "--lr", "1e-2"]
    assert scaled_train.main([*student, "--guidance-range", "1,2", "--out", str(student_out)]) == 0
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(student_out / "ema.safetensors"), "pt") as file:
        assert json.loads(file.metadata()["net_kwargs"])["guidance_embedding"] is True
    exported, teacher = load_file(str(student_out / "ema.safetensors")), load_file(teacher_file)
    assert set(exported) - set(teacher) and all("guidance" in k for k in set(exported) - set(teacher))
    assert exported["guidance_gain"].abs().item() > 0     # the scale reached the student: its gain moved
    # Without classes, with a fixed scale, or outside sCD: one line, exit 2.
    for args, message in [(["--guidance-range", "2,1"], "1 <= LOW <= HIGH"),
                          (["--guidance-range", "1,2", "--guidance", "1.5"], "no fixed --guidance"),
                          (["--guidance-range", "1,2", "--data", "synthetic:4,8,8"], "needs class labels")]:
        assert scaled_train.main([*student, *args, "--out", str(tmp_path / "bad")]) == 2, args
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert scaled_train.main([*TINY, "--guidance-range", "1,2", "--out", str(tmp_path / "bad")]) == 2
    assert not os.path.exists(tmp_path / "bad")


def test_a_net_trained_on_pixels_samples_to_pngs_without_a_vae_and_their_fid(tmp_path, monkeypatch):
    """The export of a run on pixel data carries the data's normalization; scaled.sample inverts it
    (the model's x = (pixels / 255 - mean) * scale) instead of decoding latents with a VAE, and
    with --fid-reference writes the FID of the images it wrote."""
    from scaled import sample as scaled_sample

    class Pixels(SyntheticLatents):
        pixel_normalization = (0.25, 2.0)

    out, samples = tmp_path / "run", tmp_path / "samples"
    cfg = scaled_train.parse_config([*TINY, "--data", "synthetic:3,8,8", "--steps", "2", "--out", str(out)])
    try:
        scaled_train.run(cfg, Pixels((3, 8, 8), 0, length=64))
    finally:
        scaled_train.dist.destroy_process_group()
    weights = str(out / "ema.safetensors")
    assert json.loads(scaled_sample.load_weights(weights)[1]["pixel_normalization"]) == [0.25, 2.0]
    # FID against stored statistics, with a stand-in for the Inception network (features: mean colours).
    from image_data import fid

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": MeanColour())
    fid.save_statistics(tmp_path / "reference.npz", np.zeros(3), np.eye(3), "three colours")
    argv = ["--weights", weights, "--out", str(samples), "--n", "3", "--sampler", "2", "--device", "cpu",
            "--vae", str(tmp_path / "no-vae-here"),           # a VAE would fail to load: none is asked for
            "--fid-reference", str(tmp_path / "reference.npz")]
    assert scaled_sample.main(argv) == 0
    images = [np.asarray(PIL.Image.open(samples / "images" / f"{i:06d}.png")) for i in range(3)]
    assert all(image.shape == (8, 8, 3) and image.dtype == np.uint8 for image in images)
    features = fid.inception_features(MeanColour(), np.stack(images).transpose(0, 3, 1, 2))
    expected = fid.frechet_distance(*fid.feature_statistics(features), np.zeros(3), np.eye(3))
    reported = json.load(open(samples / "fid.json"))
    assert reported["samples"] == 3 and reported["reference"] == "three colours"
    assert reported["fid"] == pytest.approx(expected, rel=1e-5) and expected > 0
    # Missing statistics: one line, exit 2, before anything is sampled.
    bad = [*argv[:3], str(tmp_path / "bad"), *argv[4:-1], str(tmp_path / "missing.npz")]
    assert scaled_sample.main(bad) == 2 and not os.path.exists(tmp_path / "bad")
    # The inverse normalization: model units -> pixels, and back.
    x = torch.linspace(-0.5, 1.5, 11)       # pixels 0 ... 255
    pixels = scm_min.pixels_from_model_units(x, 0.25, 2.0)
    assert torch.allclose((pixels.float() / 255 - 0.25) * 2.0, x, atol=2.0 / 255)
