"""The built-in 2D distributions and the sample-quality metrics."""

import numpy as np
import pytest

import toy_data


@pytest.mark.parametrize("name", list(toy_data.DISTRIBUTIONS))
def test_distribution_is_seeded_centered_and_scaled_to_sigma_d(name):
    a = toy_data.sample(name, 20_000, seed=3)
    assert a.shape == (20_000, 2) and a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, toy_data.sample(name, 20_000, seed=3))
    assert not np.allclose(a[:100], toy_data.sample(name, 20_000, seed=4)[:100])
    assert np.abs(a.mean(axis=0)).max() < 0.02
    assert a.std() == pytest.approx(toy_data.SIGMA_D, rel=0.03)


def test_there_are_at_least_eight_distributions_and_unknown_names_are_refused():
    assert len(toy_data.DISTRIBUTIONS) >= 8
    with pytest.raises(KeyError, match="unknown distribution"):
        toy_data.sample("nosuch", 10)


def test_sliced_wasserstein_closed_forms():
    a = toy_data.sample("swissroll", 5000, seed=0)
    assert toy_data.sliced_wasserstein(a, a) == 0.0
    b = toy_data.sample("swissroll", 5000, seed=1)
    assert toy_data.sliced_wasserstein(a, b) == pytest.approx(toy_data.sliced_wasserstein(b, a))
    # A shift d moves every projection by |d . u|; over uniform directions that averages 2|d|/pi.
    shift = np.array([0.3, -0.4])
    assert toy_data.sliced_wasserstein(a, a + shift, n_projections=4096) == pytest.approx(0.5 * 2 / np.pi, rel=0.01)
    # Unequal sizes go through quantiles: a cloud against its own every-other point is near zero.
    assert toy_data.sliced_wasserstein(a, a[::2]) < 0.01


def test_energy_distance_closed_forms():
    # Two point masses at distance r: 2 E|X - Y| - E|X - X'| - E|Y - Y'| = 2 r.
    a, b = np.zeros((50, 2)), np.full((50, 2), [3.0, 4.0])
    assert toy_data.energy_distance(a, b) == pytest.approx(10.0, rel=1e-4)  # quadrature over 64 directions
    # Unbiased: two independent draws of one distribution score near zero, a shifted one clearly not.
    x, y = toy_data.sample("moons", 3000, seed=0), toy_data.sample("moons", 3000, seed=1)
    assert abs(toy_data.energy_distance(x, y)) < 0.003
    assert toy_data.energy_distance(x, y + 0.2) > 0.02


def pairwise_energy_distance(a, b):
    # The O(N^2) definition, for reference: 2 E|X-Y| - E|X-X'| - E|Y-Y'| with i != j in the last two.
    def mean_distance(p, q, same):
        total = np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).sum()
        return total / (len(p) * (len(p) - 1) if same else len(p) * len(q))
    return 2 * mean_distance(a, b, False) - mean_distance(a, a, True) - mean_distance(b, b, True)


@pytest.mark.parametrize("other", ["same distribution", "shifted", "blob"])
def test_energy_distance_by_projections_equals_the_pairwise_sums(other):
    a = toy_data.sample("8gaussians", 1500, seed=0)
    b = {"same distribution": toy_data.sample("8gaussians", 1000, seed=1),
         "shifted": toy_data.sample("8gaussians", 1000, seed=1) + [0.05, -0.02],
         "blob": toy_data.sample("gaussian", 1000, seed=1)}[other]
    reference = pairwise_energy_distance(a, b)
    assert toy_data.energy_distance(a, b) == pytest.approx(reference, rel=1e-3, abs=1e-6)


def eight_gaussians_without_one_mode(n, seed):
    points = toy_data.sample("8gaussians", n * 8 // 7 + 1000, seed=seed)
    kept = points[np.abs(np.arctan2(points[:, 1], points[:, 0])) < np.pi - np.pi / 8]  # drops the mode at angle pi
    return kept[:n]


def test_knn_precision_recall_known_answers():
    n = 4000
    reference = toy_data.sample("8gaussians", n, seed=0)
    # A copy of the reference: every point lies in its own ball.
    assert toy_data.knn_precision_recall(reference, reference) == {"precision": 1.0, "recall": 1.0}
    # A fresh draw: the floor, a little below 1 (a point's k-NN ball misses some of a fresh draw).
    floor = toy_data.knn_precision_recall(toy_data.sample("8gaussians", n, seed=1), reference)
    assert 0.9 < floor["precision"] < 1 and 0.9 < floor["recall"] < 1
    # One of 8 equal modes dropped: recall loses that mode's 1/8 of the data, precision stays.
    dropped = toy_data.knn_precision_recall(eight_gaussians_without_one_mode(n, seed=1), reference)
    assert dropped["recall"] == pytest.approx(7 / 8 * floor["recall"], abs=0.02)
    assert dropped["precision"] == pytest.approx(floor["precision"], abs=0.02)
    # Samples on the modes plus 10% spread uniformly over the square: precision loses about 10%.
    uniform = np.random.default_rng(2).uniform(-1, 1, (n // 10, 2))
    spread = np.concatenate([toy_data.sample("8gaussians", n - len(uniform), seed=1), uniform])
    assert toy_data.knn_precision_recall(spread, reference)["precision"] == pytest.approx(
        0.9 * floor["precision"], abs=0.02)
    # A Gaussian blob with the data's mean and spread: almost none of it sits on the 8 small modes
    # (their balls cover a few % of its mass), though its balls still reach most data points.
    blob = toy_data.knn_precision_recall(toy_data.sample("gaussian", n, seed=1), reference)
    assert blob["precision"] < 0.1 and blob["recall"] > 0.5


def test_evaluate_holds_each_sampler_to_the_floor_of_its_own_size():
    reference, fresh = toy_data.sample("moons", 6000, seed=0), toy_data.sample("moons", 6000, seed=1)
    samples = {"many": toy_data.sample("moons", 6000, seed=2), "few": toy_data.sample("moons", 1500, seed=3)}
    report = toy_data.evaluate(samples, reference, fresh, pr_points=2000)
    assert report["sample_sizes"] == {"reference": 6000, "many": 6000, "few": 1500}
    assert report["floor"]["few"]["sliced_wasserstein"] == toy_data.sliced_wasserstein(fresh[:1500], reference)
    assert report["sliced_wasserstein"]["data"] == toy_data.sliced_wasserstein(fresh, reference)
    for name in samples:
        for metric in ("sliced_wasserstein", "energy_distance"):
            assert report["excess_over_floor"][metric][name] == pytest.approx(
                report[metric][name] - report["floor"][name][metric])
    # Fewer samples, a higher SW floor: both samplers are data, so each sits near its own floor.
    assert report["floor"]["few"]["sliced_wasserstein"] > 1.5 * report["floor"]["many"]["sliced_wasserstein"]
    assert abs(report["excess_over_floor"]["sliced_wasserstein"]["few"]) < report["floor"]["few"]["sliced_wasserstein"]
