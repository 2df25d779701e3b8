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
    assert toy_data.energy_distance(a, b) == pytest.approx(10.0)
    # Unbiased: two independent draws of one distribution score near zero, a shifted one clearly not.
    x, y = toy_data.sample("moons", 3000, seed=0), toy_data.sample("moons", 3000, seed=1)
    assert abs(toy_data.energy_distance(x, y)) < 0.003
    assert toy_data.energy_distance(x, y + 0.2) > 0.02
