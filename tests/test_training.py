"""Short training runs of teacher, sCD and sCT on tiny networks: losses fall, students move away
from the teacher and improve their 1-step samples, and a seed fixes the samples."""

import dataclasses

import numpy as np
import pytest
import torch

import scm_min
import toy_data

TINY = dict(teacher_steps=300, student_steps=150, batch_size=128, width=48, depth=2, n_samples=2000,
            teacher_sample_steps=20, warmup_steps=50, teacher_lr=2e-3, student_lr=5e-4)


@pytest.fixture(scope="module")
def tiny_run():
    cfg = scm_min.ToyConfig(data="8gaussians", **TINY)
    return cfg, scm_min.run(cfg)


def early_and_late(values, k=30):
    return np.mean(values[:k]), np.mean(values[-k:])


@pytest.mark.parametrize("phase", ["teacher", "scd", "sct"])
def test_short_training_reduces_the_loss(tiny_run, phase):
    _, (_, _, histories, _) = tiny_run
    early, late = early_and_late(histories[phase]["loss"])
    assert np.isfinite(histories[phase]["loss"]).all()
    assert late < early - 0.05, (phase, early, late)


def test_outputs_are_finite_with_the_requested_shape_and_metrics(tiny_run):
    cfg, (samples, metrics, _, _) = tiny_run
    assert set(samples) == {"teacher", "scd-1step", "scd-2step", "sct-1step", "sct-2step"}
    for x in samples.values():
        assert x.shape == (cfg.n_samples, 2) and np.isfinite(x).all()
    assert set(metrics["sliced_wasserstein"]) == {"data", *samples}
    # Even a tiny teacher is far closer to the data than a Gaussian blob of the same mean and std.
    sw = metrics["sliced_wasserstein"]
    reference = toy_data.sample("8gaussians", cfg.n_samples, seed=1)
    blob = toy_data.sliced_wasserstein(toy_data.sample("gaussian", cfg.n_samples, seed=2), reference)
    assert sw["data"] < sw["teacher"] < 0.5 * blob


def test_same_seed_same_samples_and_another_seed_differs(tiny_run):
    cfg, (samples, _, _, _) = tiny_run
    small = dataclasses.replace(cfg, teacher_steps=20, student_steps=10)
    first, second = scm_min.run(small)[0], scm_min.run(small)[0]
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    other = scm_min.run(dataclasses.replace(small, seed=1))[0]
    assert not np.allclose(first["teacher"], other["teacher"])


@pytest.mark.parametrize("kind", ["scd", "sct"])
def test_students_move_and_beat_their_starting_point_in_one_step(kind):
    torch.manual_seed(0)
    data = torch.as_tensor(toy_data.sample("8gaussians", 20_000, seed=0), dtype=torch.float32)
    reference = toy_data.sample("8gaussians", 4000, seed=1)
    teacher, _ = scm_min.train(scm_min.ToyMLP(width=48, depth=2), scm_min.TeacherLoss(), data,
                               steps=400, batch_size=256, lr=2e-3, ema_sigma_rel=0.09, seed=0)
    start = scm_min.make_student(teacher)
    loss_fn = scm_min.SCMLoss(teacher if kind == "scd" else None, warmup_steps=50)
    student, history = scm_min.train(scm_min.make_student(teacher), loss_fn, data,
                                     steps=300, batch_size=256, lr=1e-3, ema_sigma_rel=0.09, seed=1)
    moved = max((p - q).abs().max().item() for p, q in zip(student.parameters(), start.parameters()))
    assert moved > 1e-2
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(2)) * scm_min.SIGMA_D
    times = scm_min.consistency_times(1)
    sw_before = toy_data.sliced_wasserstein(scm_min.sample_consistency(start, z, times).numpy(), reference)
    sw_after = toy_data.sliced_wasserstein(scm_min.sample_consistency(student, z, times).numpy(), reference)
    assert sw_after < 0.6 * sw_before, (sw_before, sw_after)
    assert len(history["g_norm"]) == 300 and np.isfinite(history["g_norm"]).all()
