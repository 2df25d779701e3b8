"""scaled.networks and scaled.step on the CPU: preset sizes, the sCM step's tangent against finite
differences in float64, conditioning, training on a fixed batch, bf16 against fp32."""

import copy
import functools

import pytest
import torch

import scm_min
from scaled.networks import PAPER_PARAMS, PRESETS, MPConv, freeze, make_net, project_weights_
from scaled.step import (RecordingJVP, TrainStep, classifier_free_guidance, prepare, sample_few_step, scm_loss,
                         teacher_loss)

TINY = ["unet-tiny", "dit-tiny"]


def tiny_net(name, dtype=torch.float32, seed=0, **overrides):
    """A tiny preset with every parameter perturbed: at initialization F = 0 (zero output gain or
    layer), which would hide most mistakes."""
    torch.manual_seed(seed)
    net = make_net(name, dtype=dtype, guidance_embedding=True, **overrides).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if hasattr(net, "out_gain"):
            net.out_gain.fill_(1.0)
    return net


def batch(n=4, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=generator, dtype=dtype) * scm_min.SIGMA_D
    labels = torch.randint(0, 10, (n,), generator=generator)
    guidance = 1 + 3 * torch.rand(n, generator=generator, dtype=dtype)
    return x0, dict(class_labels=labels, guidance=guidance)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", [name for name in PAPER_PARAMS])
def test_preset_parameter_counts_are_the_papers(name):
    with torch.device("meta"):
        net = make_net(name)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.03, (name, count)


@pytest.mark.parametrize("name", TINY)
def test_step_tangent_matches_a_float64_central_difference_along_the_trajectory(name):
    net = tiny_net(name, torch.float64)
    teacher = freeze(tiny_net(name, torch.float64, seed=1), torch.float64)
    x0, cond = batch(dtype=torch.float64)
    jvp = RecordingJVP()
    scm_loss(net, teacher, warmup_steps=0, jvp=jvp)(net, x0, step=0, **cond)
    (fn, (x, t), (t_x, t_t), (F, tangent)), = jvp.calls
    # The step's JVP: F(x_t / sigma_d, t) and cos t sin t dF/dt, dF/dt along (dx_t/dt, 1).
    h = 1e-6
    difference = (fn(x + h * t_x, t + h * t_t) - fn(x - h * t_x, t - h * t_t)) / (2 * h)
    assert relative_error(tangent, difference) < 1e-6
    torch.testing.assert_close(F, fn(x, t))
    # And g = cos t df/dt of the consistency function f = cos t x_t - sin t sigma_d F along the
    # teacher's trajectory.
    x_t, t, dxt_dt = jvp.trajectory()
    _, g = jvp.target()
    f = functools.partial(scm_min.consistency_fn, fn)
    df_dt = (f(x_t + h * dxt_dt, t + h) - f(x_t - h * dxt_dt, t - h)) / (2 * h)
    assert relative_error(g, torch.cos(t)[:, None, None, None] * df_dt) < 1e-6


@pytest.mark.parametrize("name", TINY)
def test_class_labels_and_guidance_change_the_output(name):
    net = tiny_net(name)
    x0, cond = batch()
    t = torch.full((len(x0),), 0.7)
    F = net(x0, t, **cond)
    other_labels = (cond["class_labels"] + 1) % 10
    for changed in (dict(cond, class_labels=other_labels), dict(cond, class_labels=None),
                    dict(cond, guidance=cond["guidance"] + 1), dict(cond, guidance=None)):
        assert relative_error(net(x0, t, **changed), F) > 1e-3
    # Label -1 is "no class", per sample.
    no_class = torch.full_like(cond["class_labels"], -1)
    torch.testing.assert_close(net(x0, t, no_class, cond["guidance"]), net(x0, t, None, cond["guidance"]))


@pytest.mark.parametrize("name", TINY)
def test_unknown_conditioning_and_presets_are_refused(name):
    net = make_net(name, dtype=torch.float32)
    x0, cond = batch()
    with pytest.raises(ValueError, match="guidance"):
        net(x0, torch.rand(len(x0)), guidance=cond["guidance"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_net(name + "-typo")


@pytest.mark.parametrize("name", TINY)
def test_scd_steps_on_a_fixed_batch_shrink_the_tangent_and_a_frozen_net_does_not(name):
    """sCD drives the student's df/dt along the teacher's ODE to zero; the sCM loss value itself is
    ||g_normalized||^2 at theta = theta^- and says little, so the test follows ||g|| (r = 1)."""
    x0, cond = batch(8)

    def g_norms(lr, steps=8):
        net = tiny_net(name)
        teacher = freeze(net, torch.float32)
        step = TrainStep(net, scm_loss(net, teacher, warmup_steps=0), lr=lr)
        norms = []
        for i in range(steps):
            torch.manual_seed(0)   # same t and z every step
            _, logs = step(x0, i, **cond)
            norms.append(logs["g_norm"].item())
        return norms

    trained, frozen = g_norms(3e-3), g_norms(0.0)
    assert trained[-1] < 0.92 * trained[0], trained   # measured: 0.88 (unet-tiny), 0.5 (dit-tiny)
    assert frozen[-1] == pytest.approx(frozen[0], rel=1e-4), frozen


@pytest.mark.parametrize("name", TINY)
def test_bf16_and_fp32_steps_agree(name):
    """Same weights, batch, t and z: g, the loss and the gradient of a bf16 step against fp32."""
    x0, cond = batch(8)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = tiny_net(name, dtype)
        teacher = freeze(tiny_net(name, dtype, seed=1), dtype)
        jvp = RecordingJVP()
        torch.manual_seed(0)
        loss, logs = scm_loss(net, teacher, warmup_steps=0, jvp=jvp)(net, x0, step=0, **cond)
        loss.mean().backward()
        (_, _, _, (F, tangent)), = jvp.calls
        grad = torch.cat([p.grad.flatten() for name, p in net.named_parameters()
                          if p.grad is not None and not name.startswith("logvar.")])
        results[dtype] = dict(g=jvp.target()[1], loss=loss, grad=grad, F=F)
        assert F.dtype == tangent.dtype == loss.dtype == torch.float32   # F, g and the loss in fp32
    errors = {key: relative_error(results[torch.bfloat16][key], results[torch.float32][key]) for key in results[dtype]}
    assert errors["g"] < 0.03 and errors["loss"] < 0.03 and errors["grad"] < 0.1, errors
    assert errors["F"] > 1e-4, errors   # the student really ran in bf16 (F depends on it alone)


@pytest.mark.parametrize("name", TINY)
def test_checkpointing_gives_the_eager_gradients_and_the_jvp_pass_writes_no_weight(name):
    x0, cond = batch()
    grads = []
    for checkpoint in (False, True):
        net = prepare(tiny_net(name), checkpoint=checkpoint)
        before = copy.deepcopy(net.state_dict())
        torch.manual_seed(0)
        loss, _ = scm_loss(net, None)(net, x0, step=0, **cond)
        loss.mean().backward()
        grads.append([p.grad for p in net.parameters() if p.grad is not None])
        for key, value in net.state_dict().items():
            assert torch.equal(value, before[key]), key
    for eager, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, eager)


def test_forced_weight_normalization_keeps_the_function_and_freeze_bakes_it():
    net = tiny_net("unet-tiny", torch.float64)
    x0, cond = batch(dtype=torch.float64)
    t = torch.full((len(x0),), 0.9, dtype=torch.float64)
    F = net(x0, t, **cond)
    layers = [m for m in net.modules() if isinstance(m, MPConv)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(3.0)   # the forward normalizes rows: their scale does not matter
    assert relative_error(net(x0, t, **cond), F) < 1e-3   # (only the eps of the normalization sees it)
    project_weights_(net)
    for layer in layers:
        rms = layer.weight.flatten(1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-4)
    assert relative_error(net(x0, t, **cond), F) < 1e-3
    F = net(x0, t, **cond)
    torch.testing.assert_close(freeze(net, torch.float64)(x0, t, **cond), F)
    frozen = freeze(net)
    assert frozen.stem.weight.dtype == torch.bfloat16 and frozen.emb_noise.weight.dtype == torch.float64
    assert relative_error(frozen(x0, t, **cond), F) < 0.05


@pytest.mark.parametrize("name", TINY)
def test_teacher_loss_trains_and_guidance_and_samplers_run(name):
    net = tiny_net(name)
    x0, cond = batch(8)
    step = TrainStep(net, teacher_loss(net), lr=1e-3)
    loss, _ = step(x0, 0, class_labels=cond["class_labels"])
    assert torch.isfinite(loss)
    t = torch.full((len(x0),), 1.0)
    labels = cond["class_labels"]
    guided = classifier_free_guidance(net, scale=1.0)
    torch.testing.assert_close(guided(x0, t, labels), net(x0, t, labels), rtol=1e-5, atol=1e-5)
    unguided = classifier_free_guidance(net, scale=0.0)
    torch.testing.assert_close(unguided(x0, t, labels), net(x0, t, None), rtol=1e-5, atol=1e-5)
    z = torch.randn_like(x0) * scm_min.SIGMA_D
    for n_steps in (1, 2):
        samples = sample_few_step(net, z, n_steps, **cond, generator=torch.Generator().manual_seed(0))
        assert samples.shape == z.shape and torch.isfinite(samples).all()


def test_presets_build_and_tiny_ones_run_forward():
    for name in PRESETS:
        with torch.device("meta"):
            make_net(name)
    for name in TINY:
        x0, cond = batch()
        assert make_net(name, guidance_embedding=True)(x0, torch.rand(len(x0)), **cond).shape == x0.shape
