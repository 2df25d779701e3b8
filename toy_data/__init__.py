"""Seeded 2D toy distributions for sCM, scaled to mean 0 and standard deviation about SIGMA_D.

Each distribution is one function `name(n, rng) -> [n, 2]` in its own raw units; `sample()` looks
it up by name and rescales it with constants measured once on a large fixed-seed draw, so every
draw of a distribution has the same scale and every distribution the same overall spread.
"""

import functools

import numpy as np

from toy_data.metrics import energy_distance, evaluate, knn_precision_recall, knn_support, sliced_wasserstein

SIGMA_D = 0.5  # data standard deviation that TrigFlow assumes (sCM v2, Sec. 3); scm_min.SIGMA_D too

#----------------------------------------------------------------------------
# Distributions in raw units.

def eight_gaussians(n, rng):
    angles = rng.integers(0, 8, n) * (2 * np.pi / 8)
    centers = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centers + 0.1 * rng.standard_normal((n, 2))


def twentyfive_gaussians(n, rng):
    centers = rng.integers(-2, 3, (n, 2)).astype(np.float64)
    return centers + 0.08 * rng.standard_normal((n, 2))


def swiss_roll(n, rng):
    turn = 1.5 * np.pi * (1 + 2 * rng.random(n))
    points = np.stack([turn * np.cos(turn), turn * np.sin(turn)], axis=1)
    return points + 0.4 * rng.standard_normal((n, 2))


def two_moons(n, rng):
    upper = rng.random(n) < 0.5
    angle = np.pi * rng.random(n)
    x = np.where(upper, np.cos(angle), 1 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    return np.stack([x, y], axis=1) + 0.06 * rng.standard_normal((n, 2))


def checkerboard(n, rng):
    # Four columns of width 1 on [-2, 2]; each column fills alternate unit cells.
    x = 4 * rng.random(n) - 2
    y = rng.random(n) + 2 * rng.integers(-1, 1, n)  # one of the cells [-2, -1) or [0, 1)
    y = y + (np.floor(x) % 2)                      # shifted up by one in odd columns
    return np.stack([x, y], axis=1)


def rings(n, rng):
    radius = rng.integers(1, 4, n).astype(np.float64)  # three concentric rings
    angle = 2 * np.pi * rng.random(n)
    points = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    return points + 0.06 * rng.standard_normal((n, 2))


def spirals(n, rng):
    # Two interleaved arms, the second a half-turn rotation of the first.
    length = np.sqrt(rng.random(n)) * 3 * np.pi
    arm = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    points = arm[:, None] * np.stack([length * np.cos(length), length * np.sin(length)], axis=1)
    return points + 0.3 * rng.standard_normal((n, 2))


def pinwheel(n, rng, n_arms=5, radial_std=0.3, tangential_std=0.1, rate=0.25):
    arm = rng.integers(0, n_arms, n)
    features = rng.standard_normal((n, 2)) * [radial_std, tangential_std] + [1.0, 0.0]
    angle = arm * (2 * np.pi / n_arms) + rate * np.exp(features[:, 0])
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([cos * features[:, 0] - sin * features[:, 1],
                     sin * features[:, 0] + cos * features[:, 1]], axis=1)


def gaussian(n, rng):
    # N(0, SIGMA_D^2 I): the case where the teacher and the consistency function have closed forms.
    return rng.standard_normal((n, 2))


DISTRIBUTIONS = {
    "8gaussians": eight_gaussians,
    "25gaussians": twentyfive_gaussians,
    "swissroll": swiss_roll,
    "moons": two_moons,
    "checkerboard": checkerboard,
    "rings": rings,
    "spirals": spirals,
    "pinwheel": pinwheel,
    "gaussian": gaussian,
}

#----------------------------------------------------------------------------
# Lookup and scaling.

@functools.lru_cache(maxsize=None)
def _raw_moments(name):
    # Mean and overall standard deviation of the raw distribution, from one fixed large draw.
    points = DISTRIBUTIONS[name](200_000, np.random.default_rng(12345))
    return points.mean(axis=0), float(points.std())


def sample(name, n, seed=0):
    """n points [n, 2] (float64) of distribution `name`, centered, with std SIGMA_D overall."""
    if name not in DISTRIBUTIONS:
        raise KeyError(f"unknown distribution {name!r}; built-in: {', '.join(DISTRIBUTIONS)}")
    mean, std = _raw_moments(name)
    points = DISTRIBUTIONS[name](n, np.random.default_rng(seed))
    return (points - mean) * (SIGMA_D / std)


__all__ = ["DISTRIBUTIONS", "SIGMA_D", "sample", "sliced_wasserstein", "energy_distance", "knn_precision_recall", "knn_support",
           "evaluate"]
