"""ImageNet-512 in SD-VAE latent space: the stored latents, their normalization, the VAE.

`python -m scaled.encode` writes a folder of shards; `LatentDataset(folder)` serves batches from
it to the trainer; `decode_to_pixels` turns the model's latents back into images.

Folder layout (format "scaled-latents-1"):
- `manifest.json`: the plan, written before any shard: classes (synset folder names in sorted
  order, index = line number of `classes.txt`), image count, shard size, resolution, VAE, dtype.
- `classes.txt`: one synset a line; line k (from 0) is class index k.
- `shard-00000.npy`: float32 (or float16) [n, 2 C, h, w], the VAE posterior of each image: channels
  0..C-1 its mean, C..2C-1 its standard deviation (EDM2's "raw latents" layout), h = w =
  resolution / 8. Memory-mapped when read.
- `shard-00000.json`: written last, atomically: a shard counts as done only once its record
  exists and the .npy has the recorded size. It holds the labels, the source files, and the
  per-channel sums of the posterior's first two moments (the measured normalization).

Normalization: a latent drawn from the posterior, x_raw = mean + std * n, becomes
x = (x_raw - LATENT_MEAN) / LATENT_STD * SIGMA_D per channel, so that the data has standard
deviation SIGMA_D as TrigFlow assumes (sCM v2, Sec. 3).
"""

import json
import os

import numpy as np
import torch

from scm_min import SIGMA_D, InputError

__all__ = ["FORMAT", "LATENT_MEAN", "LATENT_STD", "DEFAULT_VAE", "LatentDataset", "load_vae", "read_manifest",
           "shard_paths", "shard_is_done", "measured_normalization", "normalize", "denormalize", "to_pixels",
           "decode_to_pixels"]

FORMAT = "scaled-latents-1"
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"

# Per-channel mean and standard deviation of SD-VAE (ft-mse) latents of ImageNet at 512x512, in the
# VAE's raw units (the posterior, not multiplied by the 0.18215 scaling factor), as stated for
# sCM's ImageNet-512 runs (sCM v2; quoted in this project's issue). The same numbers appear as the
# `imagenet_512` preset of public IMM-derived code (raw_mean, raw_std, final_std 0.5). They are
# NOT EDM2's: EDM2's StabilityVAEEncoder assumes raw_mean [5.81, 3.25, 0.12, -2.15] and raw_std
# [4.17, 4.62, 3.71, 3.28], but feeds the VAE pixels in [0, 1]; here pixels go in as [-1, 1], the
# range the VAE was trained on, which is what we take sCM's numbers to be measured in (not checked
# against the paper's code: it is not public). `python -m scaled.encode` measures the actual
# per-channel moments of the encoded data and prints them beside these; LatentDataset(...,
# normalization="measured") uses the measured ones.
LATENT_MEAN = (1.56, -0.695, 0.483, 0.729)
LATENT_STD = (5.27, 5.91, 4.21, 4.31)

#----------------------------------------------------------------------------
# Normalization and decoding.

def _channel(values, like):
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)


def normalize(x_raw, mean=LATENT_MEAN, std=LATENT_STD):
    """Raw VAE latents [B, C, h, w] -> model units, per channel at standard deviation SIGMA_D."""
    return (x_raw - _channel(mean, x_raw)) / _channel(std, x_raw) * SIGMA_D


def denormalize(x, mean=LATENT_MEAN, std=LATENT_STD):
    """Model units -> raw VAE latents (the inverse of `normalize`)."""
    return x / SIGMA_D * _channel(std, x) + _channel(mean, x)


def to_pixels(images):
    """VAE output in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@torch.no_grad()
def decode_to_pixels(vae, x, mean=LATENT_MEAN, std=LATENT_STD):
    """Model-unit latents [B, C, h, w] -> uint8 images [B, H, W, 3] through the VAE decoder (in the
    VAE's own dtype)."""
    dtype = next(vae.parameters()).dtype
    return to_pixels(vae.decode(denormalize(x.float(), mean, std).to(dtype)).sample)


def load_vae(name_or_path=DEFAULT_VAE, device="cpu", dtype=torch.float32):
    """diffusers.AutoencoderKL from a local folder (config.json + weights, as `save_pretrained`
    writes) or a Hugging Face model id already in the local cache. Never downloads: missing
    weights raise InputError naming the model and how to fetch it."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise InputError("the SD-VAE needs diffusers: pip install -r requirements.txt") from None
    diffusers_logging.set_verbosity_error()   # "accelerate not found" and similar notices
    local = os.path.isdir(name_or_path)
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        if local:
            raise InputError(f"cannot load a diffusers AutoencoderKL from {name_or_path}: "
                             f"{str(error).splitlines()[0]}") from None
        raise InputError(
            f"the VAE weights of {name_or_path!r} are not in the Hugging Face cache and this tool does not "
            f"download; on a machine with internet run `hf download {name_or_path}` (huggingface_hub's CLI; "
            f"HF_HOME sets the cache) or pass --vae FOLDER holding its config.json and "
            f"diffusion_pytorch_model.safetensors") from None
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
# The shard folder.

def shard_paths(folder, index):
    """(.npy, .json) paths of shard `index`."""
    stem = os.path.join(folder, f"shard-{index:05d}")
    return stem + ".npy", stem + ".json"


def read_manifest(folder):
    if not folder:
        raise InputError("no latent folder given (latents:PATH): the folder python -m scaled.encode wrote")
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise InputError(f"{folder} holds no manifest.json: encode images first (python -m scaled.encode)") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not readable JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def _open_shard(path, count, manifest):
    """The shard's array, memory-mapped, checked against the manifest; InputError if it is not."""
    expected = (count, 2 * manifest["latent_channels"], manifest["latent_size"], manifest["latent_size"])
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise InputError(f"shard {path} is missing") from None
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"shard {path} is corrupt ({str(error).splitlines()[0]})") from None
    if array.shape != expected or array.dtype != np.dtype(manifest["dtype"]):
        raise InputError(f"shard {path} holds {array.dtype} {array.shape}, the manifest says "
                         f"{manifest['dtype']} {expected}")
    return array


def shard_is_done(folder, index, manifest):
    """The shard's record (a dict) if the shard is complete and readable, else None."""
    npy, record_path = shard_paths(folder, index)
    try:
        with open(record_path) as f:
            record = json.load(f)
        _open_shard(npy, record["count"], manifest)
    except (OSError, ValueError, KeyError, InputError):
        return None
    return record


def measured_normalization(records):
    """Per-channel (mean, std) of latents drawn from the posteriors, from the shard records' sums."""
    n = sum(r["count"] for r in records) * records[0]["pixels_per_channel"]
    first = np.sum([r["sum_mean"] for r in records], axis=0) / n
    second = np.sum([r["sum_second_moment"] for r in records], axis=0) / n
    return tuple(first.tolist()), tuple(np.sqrt(np.maximum(second - first ** 2, 0)).tolist())

#----------------------------------------------------------------------------
# The dataset the trainer reads.

class LatentDataset:
    """Encoded ImageNet latents for the trainer: `shape` (C, h, w), `num_classes`, `len()`, and
    `batch(indices, generator)` -> (x float32 [B, C, h, w] in model units, labels int64 [B]).

    Each call draws x_raw = mean + std * n from the stored posterior (n from `generator`) and
    normalizes it (module docstring). Shards are memory-mapped; any index can be served, so the
    trainer owns the order and the split across ranks. normalization: "paper" (LATENT_MEAN,
    LATENT_STD) or "measured" (the encoded data's own moments)."""

    def __init__(self, folder, normalization="paper"):
        self.folder, self.manifest = folder, read_manifest(folder)
        m = self.manifest
        records = []
        for index in range(m["num_shards"]):
            npy, record_path = shard_paths(folder, index)
            if not os.path.exists(record_path):
                done = sum(os.path.exists(shard_paths(folder, i)[1]) for i in range(m["num_shards"]))
                raise InputError(f"{folder} is not fully encoded ({done} of {m['num_shards']} shards): run the same "
                                 f"python -m scaled.encode command again to finish it")
            try:
                with open(record_path) as f:
                    records.append(json.load(f))
            except (OSError, ValueError) as error:
                raise InputError(f"shard record {record_path} is corrupt ({error}): delete it and {npy}, then run "
                                 f"python -m scaled.encode again to re-encode that shard") from None
        self.counts = [r["count"] for r in records]
        self.shards = self._open_shards()   # checked now; reopened lazily in another process
        self.labels = torch.tensor([label for r in records for label in r["labels"]], dtype=torch.int64)
        self.starts = np.cumsum([0] + [r["count"] for r in records])
        if self.starts[-1] != m["num_images"]:
            raise InputError(f"{folder}: the shards hold {self.starts[-1]} images, the manifest {m['num_images']}")
        if normalization == "paper":
            self.mean, self.std = LATENT_MEAN, LATENT_STD
        elif normalization == "measured":
            self.mean, self.std = measured_normalization(records)
        else:
            raise InputError(f"unknown normalization {normalization!r}; use paper or measured")
        self.shape = (m["latent_channels"], m["latent_size"], m["latent_size"])
        self.num_classes = len(m["classes"])

    def _open_shards(self):
        return [_open_shard(shard_paths(self.folder, i)[0], count, self.manifest) for i, count in enumerate(self.counts)]

    def __getstate__(self):
        # Pickling a memory map copies the whole array: hand over the paths, not the maps.
        return {**self.__dict__, "shards": None}

    def __len__(self):
        return int(self.starts[-1])

    def raw(self, indices):
        """The stored posteriors [B, 2 C, h, w] (float32) of the given image indices."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices outside [0, {len(self)})")
        if self.shards is None:
            self.shards = self._open_shards()
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), 2 * self.shape[0], *self.shape[1:]), dtype=np.float32)
        for shard in np.unique(shard_of):
            rows = np.nonzero(shard_of == shard)[0]
            out[rows] = self.shards[shard][indices[rows] - self.starts[shard]]
        return torch.from_numpy(out)

    def batch(self, indices, generator=None):
        indices = torch.as_tensor(indices, dtype=torch.int64)
        mean, std = self.raw(indices.numpy()).chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        x = normalize(mean + std * noise, self.mean, self.std)
        if not torch.isfinite(x).all():
            bad = indices[~torch.isfinite(x.flatten(1)).all(dim=1)].tolist()
            raise InputError(f"{self.folder}: images {bad[:5]} hold non-finite latents (a corrupt shard?)")
        return x, self.labels[indices]
