"""Datasets for scaled.train: one interface, a registry, and the trainer's data order.

A dataset is an object with
- `shape`: (C, H, W) of one sample; `num_classes`: the number of class labels (0: unconditional);
- `__len__()`: the number of samples;
- `batch(indices, generator) -> (x, labels)`: the samples at `indices` (int64 [B]) as float32
  [B, C, H, W] in model units (data standard deviation SIGMA_D) and their labels, int64 [B], or
  None for an unconditional dataset. All randomness (flips, posterior draws) comes from
  `generator` (a CPU torch.Generator), so that a batch is a function of the indices and the seed;
- optionally `pixel_normalization`: (mean, scale) of a dataset of pixels, x = (pixels / 255 - mean)
  * scale. The trainer exports it with the weights, and scaled.sample then writes the net's output
  as pixels (no VAE).

`DATASETS` maps a name to a constructor `(path or None) -> dataset`; `make_dataset("NAME[:PATH]")`
builds one from the command line's `--data`. The trainer owns the order (`DataOrder`): a
permutation per epoch drawn from the seed, the global batch cut into one slice per rank, and the
position (samples consumed) saved in checkpoints. Bad input raises `DataError` (one line, exit 2).
"""

import numpy as np
import torch

import image_data
from scm_min import SIGMA_D, ImageBatches

__all__ = ["DataError", "SyntheticLatents", "CIFAR10", "DATASETS", "make_dataset", "DataOrder", "derived_seed"]


class DataError(ValueError):
    """Missing or unusable data or a bad --data value."""


def derived_seed(*keys):
    """A 63-bit seed that depends on every key (ints), for independent streams per (seed, step, rank)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SyntheticLatents:
    """Gaussian latents N(0, SIGMA_D^2) of any shape, for throughput runs and tests: sample i is drawn
    from a generator seeded by (seed, i) and its label is i mod num_classes, so that it is the
    same whichever rank or batch reads it."""

    def __init__(self, shape=(4, 64, 64), num_classes=1000, length=1_281_167, seed=0):
        self.shape, self.num_classes, self.length, self.seed = tuple(shape), num_classes, length, seed

    def __len__(self):
        return self.length

    def batch(self, indices, generator):
        x = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(derived_seed(self.seed, i)))
                         for i in indices.tolist()])
        labels = indices % self.num_classes if self.num_classes else None
        return x * SIGMA_D, labels


def synthetic(path):
    """`synthetic` (4x64x64, 1000 classes: ImageNet-512 latents) or `synthetic:C,H,W[,CLASSES]`."""
    if path is None:
        return SyntheticLatents()
    try:
        values = [int(v) for v in path.split(",")]
    except ValueError:
        values = []
    if len(values) not in (3, 4) or min(values[:3]) < 1 or (len(values) == 4 and values[3] < 0):
        raise DataError(f"--data synthetic:{path}: expected synthetic:C,H,W or synthetic:C,H,W,CLASSES (positive sizes)")
    return SyntheticLatents(values[:3], values[3] if len(values) == 4 else 0)


class CIFAR10:
    """The CIFAR-10 training images (any layout image_data.load_cifar10 reads), scaled to data std
    SIGMA_D and flipped at random (scm_min.ImageBatches), unconditional: image_data's loader keeps
    no labels."""

    num_classes = 0

    def __init__(self, path):
        if path is None:
            raise DataError("--data cifar10 needs a path: --data cifar10:PATH (the cifar-10-batches-py folder, "
                            "its .tar.gz, or an image zip or folder)")
        try:
            images, self.description = image_data.load_cifar10(path)
        except image_data.ImageDataError as error:
            raise DataError(str(error)) from None
        self.images = ImageBatches(images, torch.device("cpu"))
        self.shape = tuple(images.shape[1:])
        self.pixel_normalization = (self.images.mean, self.images.scale)

    def __len__(self):
        return len(self.images.images)

    def batch(self, indices, generator):
        return self.images.at(indices, generator), None


def latents(path):
    """SD-VAE latent shards written by `python -m scaled.encode` (scaled/latents.py)."""
    if not path:
        raise DataError("--data latents needs the folder of scaled.encode's shards: --data latents:PATH")
    from scaled.latents import LatentDataset  # its module needs no diffusers; imported only when used
    return LatentDataset(path)


DATASETS = {"synthetic": synthetic, "cifar10": CIFAR10, "latents": latents}


def make_dataset(spec):
    """The dataset of `--data NAME[:PATH]`."""
    name, _, path = spec.partition(":")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} in --data {spec}; datasets: {', '.join(DATASETS)}")
    return DATASETS[name](path or None)


class DataOrder:
    """The order in which training reads a dataset: the concatenation of one random permutation per
    epoch (drawn from the seed and the epoch), read `global_batch` samples a step, rank r taking
    the r-th slice of each global batch. `position` (samples consumed) is all the state there is."""

    def __init__(self, length, seed, global_batch, rank, world_size, position=0):
        if global_batch % world_size:
            raise DataError(f"the global batch {global_batch} is not divisible by the {world_size} processes")
        self.length, self.seed, self.global_batch, self.rank, self.world_size = length, seed, global_batch, rank, world_size
        self.position = position
        self._epoch, self._permutation = None, None

    def permutation(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, 1, epoch))
            self._epoch, self._permutation = epoch, torch.randperm(self.length, generator=generator)
        return self._permutation

    def next_indices(self):
        """This rank's indices (int64 [global_batch / world_size]) of the next step; advances position."""
        per_rank = self.global_batch // self.world_size
        start = self.position + self.rank * per_rank
        positions = torch.arange(start, start + per_rank)
        epochs, offsets = positions // self.length, positions % self.length
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            indices[mask] = self.permutation(epoch)[offsets[mask]]
        self.position += self.global_batch
        return indices
