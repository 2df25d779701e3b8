"""The equations of scm_min.py against references: closed forms, float64 finite differences, and
Gaussian data, for which the teacher and the consistency function are known exactly."""

import math

import pytest
import torch
from torch import nn

import scm_min
from scm_min import SIGMA_D

F64 = torch.float64


class SmoothNet(nn.Module):
    """A network of the tests' own: smooth in x and t, nonlinear in both, float64."""

    def __init__(self, dim=2, hidden=16, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.W1 = nn.Parameter(torch.randn(dim, hidden, generator=generator, dtype=F64))
        self.w_t = nn.Parameter(torch.randn(hidden, generator=generator, dtype=F64))
        self.W2 = nn.Parameter(torch.randn(hidden, dim, generator=generator, dtype=F64) / hidden ** 0.5)

    def forward(self, x, t):
        return torch.tanh(x @ self.W1 + torch.sin(3 * t)[:, None] * self.w_t) @ self.W2 + torch.cos(t)[:, None] * x


def random_batch(n=64, dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, dim, generator=generator, dtype=F64) * SIGMA_D
    z = torch.randn(n, dim, generator=generator, dtype=F64) * SIGMA_D
    t = torch.rand(n, generator=generator, dtype=F64) * 1.5 + 0.02  # inside (0, pi/2)
    return x0, z, t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make_net", [SmoothNet, lambda: scm_min.ToyMLP(width=32, depth=2)])
def test_boundary_condition_is_exact(dtype, make_net):
    torch.manual_seed(1)
    net = make_net().to(dtype)
    x = torch.randn(32, 2, dtype=dtype)
    f = scm_min.consistency_fn(net, x, torch.zeros(32, dtype=dtype))
    assert f.dtype == dtype
    assert torch.equal(f, x)


def test_interpolation_and_velocity_closed_forms():
    x0, z, t = random_batch()
    t = torch.cat([t, torch.tensor([0.0, math.pi / 2], dtype=F64)])
    x0, z = torch.cat([x0, x0[:2]]), torch.cat([z, z[:2]])
    x_t = scm_min.trigflow_interpolate(x0, z, t)
    torch.testing.assert_close(x_t, torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * z, rtol=0, atol=1e-15)
    torch.testing.assert_close(x_t[-2], x0[-2], rtol=0, atol=0)  # t = 0: the data
    torch.testing.assert_close(x_t[-1], z[-1], rtol=0, atol=1e-16)  # t = pi/2: the noise
    # The velocity is the time derivative of the interpolation (central difference, float64).
    h = 1e-6
    fd = (scm_min.trigflow_interpolate(x0, z, t + h) - scm_min.trigflow_interpolate(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(scm_min.trigflow_velocity(x0, z, t), fd, rtol=0, atol=1e-9)


def test_edm_sigma_round_trip():
    t = torch.linspace(0.01, scm_min.T_MAX, 50, dtype=F64)
    torch.testing.assert_close(scm_min.trigflow_time(scm_min.edm_sigma(t)), t)
    assert scm_min.edm_sigma(torch.tensor(scm_min.T_MAX, dtype=F64)).item() == pytest.approx(80.0)


@pytest.mark.parametrize("make_net", [SmoothNet, lambda: scm_min.ToyMLP(width=32, depth=2).double()])
def test_consistency_tangent_matches_finite_difference(make_net):
    torch.manual_seed(2)
    net = make_net()
    x0, z, t = random_batch(seed=3)

    def f_on_trajectory(s):  # f_theta along the trajectory x_s = cos(s) x0 + sin(s) z
        return scm_min.consistency_fn(net, scm_min.trigflow_interpolate(x0, z, s), s)

    F, df_dt = scm_min.consistency_tangent(net, scm_min.trigflow_interpolate(x0, z, t), t,
                                           scm_min.trigflow_velocity(x0, z, t))
    h = 1e-5
    fd = (f_on_trajectory(t + h) - f_on_trajectory(t - h)) / (2 * h)
    torch.testing.assert_close(df_dt, fd, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(F, net(scm_min.trigflow_interpolate(x0, z, t) / SIGMA_D, t), rtol=0, atol=0)
    assert df_dt.abs().max() > 0.1  # a non-trivial derivative was compared


def test_scm_target_is_cos_t_times_df_dt_and_warmup_drops_the_second_term():
    net = SmoothNet()
    x0, z, t = random_batch(seed=4)
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)
    F, df_dt = scm_min.consistency_tangent(net, x_t, t, dxt_dt)
    F_minus, g = scm_min.scm_target(net, x_t, t, dxt_dt, r=1.0)
    torch.testing.assert_close(F_minus, F)
    torch.testing.assert_close(g, torch.cos(t)[:, None] * df_dt)
    _, g0 = scm_min.scm_target(net, x_t, t, dxt_dt, r=0.0)
    torch.testing.assert_close(g0, -torch.cos(t)[:, None] ** 2 * (SIGMA_D * F - dxt_dt))


def test_tangent_normalization_and_warmup():
    g = torch.randn(16, 3, 4, 4, dtype=F64)
    normalized = scm_min.normalize_tangent(g, c=0.1)
    norms = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(normalized.flatten(1).norm(dim=1), norms / (norms + 0.1))
    assert [scm_min.tangent_warmup(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert scm_min.tangent_warmup(0, 0) == 1.0

#----------------------------------------------------------------------------
# Gaussian data x0 ~ N(0, s^2 I): x_t ~ N(0, var_t I) with var_t = cos^2(t) s^2 + sin^2(t) sigma_d^2.
# The teacher velocity is E[v_t | x_t] = cos t sin t (sigma_d^2 - s^2) / var_t x_t, the PF-ODE maps
# x_t to x_0 = x_t s / sqrt(var_t), and F_cm solves f_theta = that map.

def gaussian_var(t, s):
    return torch.cos(t) ** 2 * s ** 2 + torch.sin(t) ** 2 * SIGMA_D ** 2


class GaussianTeacher(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, t):  # x = x_t / sigma_d, F = E[v_t | x_t] / sigma_d
        c = torch.cos(t) * torch.sin(t) * (SIGMA_D ** 2 - self.s ** 2) / gaussian_var(t, self.s)
        return c[:, None] * x


class GaussianConsistency(GaussianTeacher):
    def forward(self, x, t):  # F with cos(t) x_t - sin(t) sigma_d F = x_t s / sqrt(var_t)
        c = (torch.cos(t) - self.s / gaussian_var(t, self.s).sqrt()) / torch.sin(t)
        return c[:, None] * x


@pytest.mark.parametrize("s", [SIGMA_D, 0.3, 0.8])
def test_gaussian_scd_target_vanishes_for_the_exact_consistency_function(s):
    teacher, student = GaussianTeacher(s), GaussianConsistency(s)
    x0, z, t = random_batch(n=256, seed=5)
    x_t = scm_min.trigflow_interpolate(x0 * s / SIGMA_D, z, t)
    dxt_dt = scm_min.pf_ode_velocity(teacher, x_t, t)
    _, g = scm_min.scm_target(student, x_t, t, dxt_dt)
    assert g.abs().max() < 1e-12
    # A slightly wrong student gets a clearly non-zero target, so the check above can fail.
    _, g_wrong = scm_min.scm_target(GaussianConsistency(s * 1.05), x_t, t, dxt_dt)
    assert g_wrong.abs().max() > 1e-3
    # sCT's target, from the data pair instead of the teacher, is zero only on average over z given x_t:
    _, g_sct = scm_min.scm_target(student, x_t, t, scm_min.trigflow_velocity(x0 * s / SIGMA_D, z, t))
    assert g_sct.abs().max() > 1e-3


@pytest.mark.parametrize("s", [SIGMA_D, 0.3, 0.8])
def test_gaussian_one_step_sampler_is_exact_and_teacher_ode_agrees(s):
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(6), dtype=F64) * SIGMA_D
    t_max = torch.tensor(scm_min.T_MAX, dtype=F64)
    exact = z * s / gaussian_var(t_max, s).sqrt()  # the PF-ODE's map from t_max to 0
    one_step = scm_min.sample_consistency(GaussianConsistency(s), z, scm_min.consistency_times(1))
    torch.testing.assert_close(one_step, exact, rtol=1e-12, atol=1e-14)
    heun = scm_min.sample_teacher(GaussianTeacher(s), z, scm_min.teacher_times(100), solver="heun")
    torch.testing.assert_close(heun, exact, rtol=1e-3, atol=1e-4)
    # Convergence orders: doubling the steps halves the error of DDIM and Euler and quarters Heun's.
    for solver, order in (("ddim", 1), ("euler", 1), ("heun", 2)):
        errors = [(scm_min.sample_teacher(GaussianTeacher(s), z, scm_min.teacher_times(n), solver=solver)
                   - exact).abs().max().item() for n in (100, 200)]
        if errors[0] > 1e-12:  # Euler and Heun are exact where F = 0 (s = sigma_d)
            assert 2 ** order * 0.8 < errors[0] / errors[1] < 2 ** order * 1.25, (solver, errors)
    # Two steps re-noise to t_mid and map back: still exact in distribution.
    two_step = scm_min.sample_consistency(GaussianConsistency(s), z, scm_min.consistency_times(2),
                                          generator=torch.Generator().manual_seed(7))
    assert two_step.std().item() == pytest.approx(s, rel=0.03)

#----------------------------------------------------------------------------
# The continuous-time limit (Sec. 4): for the discrete-time CM loss
# L_dt = ||f_theta(x_t, t) - f^-(x_{t-dt}, t-dt)||^2, grad L_dt / dt -> 2 (grad f_theta)^T df^-/dt
#      = D sigma_d tan(t) grad_theta mean_dims((F_theta - F^- - g)^2)  (no normalization, r = 1).

def test_discrete_cm_gradient_approaches_scm_gradient_as_dt_shrinks():
    torch.manual_seed(8)
    net = scm_min.ToyMLP(width=32, depth=2).double()
    x0, z, t = random_batch(n=32, seed=9)
    t = t.clamp(0.1, 1.4)
    dim = x0.shape[1]
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)

    def gradient(loss):
        net.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    error, _ = scm_min.scm_objective(net, x_t, t, dxt_dt, r=1.0, tangent_c=None)
    reference = gradient(error.sum())

    relative_errors = []
    for dt in (1e-2, 1e-3, 1e-4):
        with torch.no_grad():  # the stop-gradient target f^- at the earlier point of the same trajectory
            f_minus = scm_min.consistency_fn(net, scm_min.trigflow_interpolate(x0, z, t - dt), t - dt)
        per_sample = ((scm_min.consistency_fn(net, x_t, t) - f_minus) ** 2).sum(dim=1)
        discrete = gradient((per_sample / (dt * dim * SIGMA_D * torch.tan(t))).sum())
        relative_errors.append(((discrete - reference).norm() / reference.norm()).item())
    assert relative_errors[-1] < 1e-3, relative_errors
    assert relative_errors[0] > 5 * relative_errors[1] > 25 * relative_errors[2], relative_errors


@pytest.mark.parametrize("jvp, single_pass", [(torch.func.jvp, False), (scm_min.toy_jvp, True)])
def test_F_minus_comes_from_the_gradient_pass_under_dropout(jvp, single_pass):
    # With dropout the JVP pass and the gradient pass draw different masks. F^- must be the
    # gradient pass's output (detached), so that F_theta - F^- = 0 at theta = theta^- and the
    # per-sample error is exactly mean(g^2) = ||g||^2 / D.
    torch.manual_seed(0)
    net = scm_min.ToyMLP(width=32, depth=2, dropout=0.5).train()
    x0, z, t = (v.float() for v in random_batch(n=256))
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)
    error, g_norm = scm_min.scm_objective(net, x_t, t, dxt_dt, r=1.0, tangent_c=None, jvp=jvp, single_pass=single_pass)
    torch.testing.assert_close(error, g_norm ** 2 / 2, rtol=1e-5, atol=1e-7)
    error, g_norm = scm_min.scm_objective(net, x_t, t, dxt_dt, r=1.0, tangent_c=0.1, jvp=jvp, single_pass=single_pass)
    torch.testing.assert_close(error, (g_norm / (g_norm + 0.1)) ** 2 / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.09, 0.2])
def test_power_ema_weights_follow_the_power_profile_of_width_sigma_rel(sigma_rel):
    # Feed the EMA the weights 1, 2, ..., n (one scalar): its value is sum_i w_i i, and the
    # recurrence beta_i = (1 - 1/i)^(gamma+1) gives w_i = (1 - beta_i) (i / n)^(gamma+1) exactly.
    net = nn.Linear(1, 1, bias=False).double()
    ema = scm_min.PowerEMA(net, sigma_rel)
    n = 3000
    for i in range(1, n + 1):
        net.weight.data.fill_(float(i))
        ema.update(net)
    gamma = ema.gamma
    i = torch.arange(1, n + 1, dtype=F64)
    beta = (1 - 1 / i) ** (gamma + 1)
    w = (1 - beta) * (i / n) ** (gamma + 1)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(ema.net.weight.data.reshape(()), (w * i).sum(), rtol=1e-10, atol=0)
    # The profile's width relative to the training length is sigma_rel (EDM2, Sec. 3.1).
    mean = (w * i / n).sum()
    torch.testing.assert_close(((w * (i / n - mean) ** 2).sum()).sqrt(), torch.tensor(sigma_rel, dtype=F64),
                               rtol=2e-2, atol=0)


def test_toy_jvp_equals_torch_func_jvp():
    # ToyMLP's hand-derived tangents (the fast JVP pass of the toy run) against torch.func.jvp, in
    # float64, with every affine parameter moved off its initialization.
    torch.manual_seed(0)
    net = scm_min.ToyMLP(width=32, depth=2, max_freq=32.0).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x0, z, t = random_batch(n=128, seed=7)
    x, dx, dt = x0 / SIGMA_D, torch.randn_like(x0), torch.randn_like(t)
    expected = torch.func.jvp(net, (x, t), (dx, dt))
    for mode in (net.eval, net.train):
        mode()
        F, dF = scm_min.toy_jvp(net, (x, t), (dx, dt))
        torch.testing.assert_close(F, expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dF, expected[1], rtol=1e-10, atol=1e-10)


def test_toy_jvp_hands_active_dropout_to_torch_func_jvp():
    # The hand-derived pass has no dropout mask to share with its tangent; with dropout active the
    # call goes to torch.func.jvp, whose tangent uses the primal's mask.
    net = scm_min.ToyMLP(width=32, depth=1, dropout=0.5).double().train()
    x0, z, t = random_batch(n=64, seed=8)
    x, dx, dt = x0 / SIGMA_D, torch.randn_like(x0), torch.ones_like(t)
    torch.manual_seed(1)
    F, dF = scm_min.toy_jvp(net, (x, t), (dx, dt))
    torch.manual_seed(1)
    torch.testing.assert_close((F, dF), torch.func.jvp(net, (x, t), (dx, dt)))


@pytest.mark.parametrize("P_mean, P_std", [(-1.0, 1.4), (0.5, 0.3)])
def test_time_proposal_is_lognormal_in_sigma(P_mean, P_std):
    # t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2): log(sigma_d tan t) has those moments
    # and the normal's quartiles (0.6745 standard deviations from the mean).
    t = scm_min.sample_time(200_000, P_mean, P_std, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert 0 < t.min() and t.max() < math.pi / 2
    tau = torch.log(SIGMA_D * torch.tan(t))
    assert abs(tau.mean().item() - P_mean) < 0.01 and abs(tau.std().item() - P_std) < 0.01 * P_std
    quartiles = torch.quantile(tau[:100_000], torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(quartiles, P_mean + P_std * torch.tensor([-0.6745, 0.6745], dtype=F64),
                               atol=0.01 * P_std, rtol=0)


@pytest.mark.parametrize("jvp", [scm_min.toy_jvp, torch.func.jvp])
def test_single_pass_objective_has_the_two_pass_value_and_gradient(jvp):
    # One call of the JVP with gradient on (its output is F_theta) against the reference: the JVP
    # pass under no_grad with torch.func.jvp, then a separate forward.
    torch.manual_seed(0)
    net = scm_min.ToyMLP(width=32, depth=2).double()
    x0, z, t = random_batch(n=128, seed=9)
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)
    results = []
    for jvp_fn, single_pass in ((torch.func.jvp, False), (jvp, True)):
        net.zero_grad()
        error, g_norm = scm_min.scm_objective(net, x_t, t, dxt_dt, r=0.7, jvp=jvp_fn, single_pass=single_pass)
        error.sum().backward()
        results.append((error.detach(), g_norm, [p.grad.clone() for p in net.parameters()]))
    (error, g_norm, grads), (error_1, g_norm_1, grads_1) = results
    torch.testing.assert_close(error_1, error, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_norm_1, g_norm, rtol=1e-10, atol=1e-12)
    for grad, grad_1 in zip(grads, grads_1):
        torch.testing.assert_close(grad_1, grad, rtol=1e-8, atol=1e-12)
    assert any(grad.abs().max() > 1e-3 for grad in grads)


def test_toy_jvp_with_gradients_on_gives_an_output_with_graph_and_a_tangent_without():
    net = scm_min.ToyMLP(width=16, depth=1)
    x, t = torch.randn(8, 2), torch.rand(8)
    F, dF = scm_min.toy_jvp(net, (x, t), (torch.randn(8, 2), torch.ones(8)))
    assert F.requires_grad and not dF.requires_grad
