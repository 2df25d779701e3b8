"""Three point clouds unlike the nine built-in distributions, as a user would bring them (.npy, [N, 2],
in their own units): uneven mode weights, thin curves, many small clusters. Seeded; 200k points
each, so that the halves `scm_min.load_data` splits a file into (reference and data-vs-data floor)
hold 100k points like the built-in reference draws.

    python benchmarks/own_point_clouds.py out/point_clouds
    python benchmarks/toy_quality.py --data-files out/point_clouds/*.npy --only ...
"""

import os
import sys

import numpy as np


def uneven_modes(n, rng):
    # Five Gaussian modes with weights from 50% down to 3% and spreads from 0.05 to 0.3.
    weights = np.array([0.50, 0.25, 0.15, 0.07, 0.03])
    centers = np.array([[0.0, 0.0], [3.0, 1.0], [-2.0, 2.5], [1.0, -3.0], [-3.0, -2.0]])
    spreads = np.array([0.3, 0.15, 0.1, 0.05, 0.2])
    mode = rng.choice(len(weights), n, p=weights)
    return centers[mode] + spreads[mode, None] * rng.standard_normal((n, 2))


def thin_curves(n, rng):
    # A circle and a sine wave crossing it, each 0.02 thick (in units where the circle has radius 1).
    on_circle = rng.random(n) < 0.5
    angle, s = 2 * np.pi * rng.random(n), 4 * rng.random(n) - 2
    points = np.where(on_circle[:, None], np.stack([np.cos(angle), np.sin(angle)], axis=1),
                      np.stack([s, 0.5 * np.sin(3 * s)], axis=1))
    return points + 0.02 * rng.standard_normal((n, 2))


def many_clusters(n, rng):
    # 64 small clusters at fixed random places in the unit square, each of std 0.01.
    centers = np.random.default_rng(1234).random((64, 2))
    return centers[rng.integers(0, 64, n)] + 0.01 * rng.standard_normal((n, 2))


CLOUDS = {"uneven_modes": uneven_modes, "thin_curves": thin_curves, "many_clusters": many_clusters}


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else "out/point_clouds"
    os.makedirs(folder, exist_ok=True)
    for seed, (name, make) in enumerate(CLOUDS.items()):
        path = os.path.join(folder, f"{name}.npy")
        np.save(path, make(200_000, np.random.default_rng(seed)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
