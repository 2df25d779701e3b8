"""Encode an ImageNet-style image folder into SD-VAE latent shards for scaled.latents.LatentDataset.

    python -m scaled.encode --source ILSVRC2012/train --out latents/img512
    torchrun --nproc-per-node 8 -m scaled.encode --source ILSVRC2012/train --out latents/img512

The source holds one subfolder per class (the ILSVRC2012 train layout, `n01440764/*.JPEG`); class
index k is the k-th synset folder in sorted order (the order of torchvision's ImageFolder, of
EDM2's dataset_tool and of the usual ILSVRC2012 class index), written to OUT/classes.txt. Each
image is converted to RGB, center-cropped and resized to the resolution as EDM2 prepares
ImageNet-512 (`--transform=center-crop-dhariwal`: ADM's crop, halving by box filter while the
short side is at least twice the target, then bicubic), and encoded by the diffusers
AutoencoderKL into its posterior mean and standard deviation. Pixels enter the VAE in [-1, 1].

Resumable: a shard counts only once its record file exists (written last, atomically, after the
shard's array), so a crash loses at most the shards in progress; the same command continues.
Under torchrun each process takes the shards whose index is its rank modulo the world size; no
process group is needed. A bad image stops the run with one line naming the file; finished
shards stay.
"""

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time

import numpy as np
import PIL.Image
import torch

from scaled.latents import DEFAULT_VAE, FORMAT, load_vae, measured_normalization, read_manifest, shard_is_done, \
    shard_paths, LATENT_MEAN, LATENT_STD
from scm_min import InputError, Progress, _atomic_write, option
from scm_min import parse_args as parse_config

IMAGE_EXTENSIONS = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}

#----------------------------------------------------------------------------
# Images.

def center_crop_dhariwal(image, resolution):
    """ADM's center crop (Dhariwal & Nichol 2021), which EDM2 uses for ImageNet: box-filter halving
    while the short side is >= 2x the target, bicubic resize of the short side to the target, then a
    centered square crop. Returns uint8 [resolution, resolution, 3]."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=PIL.Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=PIL.Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top:top + resolution, left:left + resolution]


def scan_folder(source):
    """(classes, files, labels): sorted class subfolders, and the images under each, sorted."""
    if not os.path.isdir(source):
        raise InputError(f"image folder {source} does not exist")
    classes = sorted(entry.name for entry in os.scandir(source) if entry.is_dir())
    if not classes:
        raise InputError(f"{source} holds no class subfolders (expected the ImageNet train layout: "
                         f"SOURCE/n01440764/*.JPEG, one folder per class)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(source, name))):
            for file in sorted(names):
                if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.relpath(os.path.join(root, file), source))
                    labels.append(label)
    if not files:
        raise InputError(f"{source} holds class folders but no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, files, labels


class ImageFiles(torch.utils.data.Dataset):
    """Images of the plan, prepared for the VAE; a file that cannot be read gives its error as text
    (an exception in a loader worker would come back as a multi-line traceback)."""

    def __init__(self, source, files, resolution):
        self.source, self.files, self.resolution = source, files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.source, self.files[index])
        try:
            with PIL.Image.open(path) as image:
                return center_crop_dhariwal(image.convert("RGB"), self.resolution), None
        except Exception as error:  # PIL raises many kinds for broken files
            return None, f"cannot read image {path}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _collate(items):
    return items

#----------------------------------------------------------------------------
# The job.

@dataclasses.dataclass
class EncodeConfig:
    source: str = option("", "image folder with one subfolder per class (required)")
    out: str = option("", "output folder of latent shards (required; created, or resumed if it exists)")
    vae: str = option(DEFAULT_VAE, "Hugging Face model id in the local cache, or a folder from "
                      "AutoencoderKL.save_pretrained")
    resolution: int = option(512, "image side in pixels after the center crop")
    shard_size: int = option(4096, "images per shard")
    batch_size: int = option(32, "images per VAE call")
    dtype: str = option("float32", "storage of the posterior mean and std: float32 or float16 (half the disk space)")
    workers: int = option(8, "image decoding processes per GPU (0: in-process)")
    device: str = option("", "torch device (default: cuda:LOCAL_RANK if CUDA is present, else cpu)")


def parse_args(argv=None):
    return parse_config(argv, EncodeConfig, prog="python -m scaled.encode", description=__doc__.split("\n\n")[0])


def check_config(cfg, required, positive, choices):
    """InputError for a missing required option, a non-positive count or a value off its list."""
    for name in required:
        if not getattr(cfg, name):
            raise InputError(f"--{name.replace('_', '-')} is required")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")


def plan_manifest(cfg, classes, files, labels, vae_config):
    digest = hashlib.sha256("\n".join(f"{f}\t{l}" for f, l in zip(files, labels)).encode()).hexdigest()
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    if cfg.resolution % factor:
        raise InputError(f"--resolution {cfg.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return dict(format=FORMAT, num_images=len(files), num_shards=-(-len(files) // cfg.shard_size),
                shard_size=cfg.shard_size, resolution=cfg.resolution, latent_size=cfg.resolution // factor,
                latent_channels=vae_config["latent_channels"], dtype=cfg.dtype, vae=cfg.vae,
                pixel_range=[-1, 1], crop="center-crop-dhariwal", source_digest=digest, classes=classes)


def write_or_check_manifest(out, manifest):
    """Write the plan, or check that an existing one is the same (resuming another folder's or
    another setting's encoding would mix them)."""
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        existing = read_manifest(out)
        differs = sorted(k for k in set(manifest) | set(existing) if manifest.get(k) != existing.get(k))
        if differs:
            raise InputError(f"{out} already holds an encoding with other {', '.join(differs)}; "
                             f"use another --out (or delete it to start over)")
        return

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)

    _atomic_write(path, write_json)
    _atomic_write(os.path.join(out, "classes.txt"),
                  lambda tmp: open(tmp, "w").write("".join(name + "\n" for name in manifest["classes"])))


def distributed_rank():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def remove_stale_temporaries(out, rank, world):
    """Temporary files of this rank's shards left by a killed run (a finished shard never has one)."""
    for path in glob.glob(os.path.join(out, "shard-*.tmp")):
        index = int(os.path.basename(path)[6:11])
        if index % world == rank:
            os.remove(path)


def write_shard(out, index, posterior, labels, files, dtype):
    """The shard's array, then its record: the record marks the shard done (atomic renames)."""
    npy, record_path = shard_paths(out, index)
    array = posterior.numpy().astype(dtype)
    channels = array.shape[1] // 2
    # Moments of a draw mean + std * n, summed in float64 one channel at a time (a whole shard in
    # float64 would be 1 GB): E[x] = mean, E[x^2] = mean^2 + std^2.
    sum_mean, sum_second_moment = [], []
    for c in range(channels):
        mean, std = array[:, c].astype(np.float64), array[:, channels + c].astype(np.float64)
        sum_mean.append(float(mean.sum()))
        sum_second_moment.append(float((mean ** 2).sum() + (std ** 2).sum()))
    record = dict(index=index, count=len(labels), labels=labels, files=files,
                  pixels_per_channel=int(array.shape[2] * array.shape[3]),
                  sum_mean=sum_mean, sum_second_moment=sum_second_moment)

    def save_array(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())

    _write_then_rename(npy, save_array)
    _write_then_rename(record_path, lambda tmp: open(tmp, "w").write(json.dumps(record)))


def _write_then_rename(path, write):
    """write(path + ".tmp"), then rename it to path: a reader sees the whole file or none; a killed
    run leaves only the .tmp file, which the next run of the same rank removes."""
    write(path + ".tmp")
    os.replace(path + ".tmp", path)


@torch.no_grad()
def encode_batch(vae, images, device):
    """uint8 [B, H, W, 3] -> posterior mean and std [B, 2 C, h, w] (float32, on the CPU)."""
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    posterior = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist
    return torch.cat([posterior.mean, posterior.std], dim=1).float().cpu()


def run(cfg):
    rank, world, local_rank = distributed_rank()
    device = torch.device(cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    check_config(cfg, ["source", "out"], ["shard_size", "batch_size", "resolution"],
                 dict(dtype=["float32", "float16"]))
    classes, files, labels = scan_folder(cfg.source)
    vae = load_vae(cfg.vae, device)
    manifest = plan_manifest(cfg, classes, files, labels, vae.config)
    os.makedirs(cfg.out, exist_ok=True)
    write_or_check_manifest(cfg.out, manifest)
    remove_stale_temporaries(cfg.out, rank, world)
    log_path = os.path.join(cfg.out, "encode.log")

    mine = range(rank, manifest["num_shards"], world)
    pending = [i for i in mine if shard_is_done(cfg.out, i, manifest) is None]
    for index in pending:
        if os.path.exists(shard_paths(cfg.out, index)[1]):
            print(f"shard {index} is incomplete or corrupt: encoding it again", file=sys.stderr)
    batches = [list(range(start, min(start + cfg.batch_size, end)))
               for index in pending
               for end in [min((index + 1) * cfg.shard_size, len(files))]
               for start in range(index * cfg.shard_size, end, cfg.batch_size)]
    skipped = len(mine) - len(pending)
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{prefix}{len(files)} images in {len(classes)} classes, {manifest['num_shards']} shards of "
          f"{cfg.shard_size}; this process: {len(pending)} to encode, {skipped} already done; device {device}",
          file=sys.stderr, flush=True)
    loader = torch.utils.data.DataLoader(ImageFiles(cfg.source, files, cfg.resolution), batch_sampler=batches,
                                         num_workers=cfg.workers, collate_fn=_collate)
    progress = Progress(len(batches), f"{prefix}encode", log_path)
    start, encoded, parts = time.perf_counter(), 0, []
    for step, (batch_indices, items) in enumerate(zip(batches, loader)):
        errors = [error for _, error in items if error is not None]
        if errors:
            raise InputError(errors[0] + " (finished shards are kept; fix or remove the file and run again)")
        parts.append(encode_batch(vae, [image for image, _ in items], device))
        encoded += len(items)
        shard, last = divmod(batch_indices[-1], cfg.shard_size)
        if last == cfg.shard_size - 1 or batch_indices[-1] == len(files) - 1:
            first = shard * cfg.shard_size
            write_shard(cfg.out, shard, torch.cat(parts), labels[first:batch_indices[-1] + 1],
                        files[first:batch_indices[-1] + 1], cfg.dtype)
            parts = []
        progress.update(step, images_per_s=encoded / max(time.perf_counter() - start, 1e-9))
    progress.close()
    seconds = time.perf_counter() - start
    summary = f"{prefix}encoded {encoded} images in {seconds:.1f} s ({encoded / max(seconds, 1e-9):.1f} images/s)"
    records = [shard_is_done(cfg.out, i, manifest) for i in range(manifest["num_shards"])]
    if all(records):
        mean, std = measured_normalization(records)
        summary += ("; all shards done. Measured latent mean " + ", ".join(f"{v:.3f}" for v in mean) +
                    " std " + ", ".join(f"{v:.3f}" for v in std) + " (the paper's: mean " +
                    ", ".join(map(str, LATENT_MEAN)) + " std " + ", ".join(map(str, LATENT_STD)) + ")")
    print(summary, file=sys.stderr, flush=True)
    with open(log_path, "a") as log:
        log.write(summary + "\n")
    return records


def command(run, parse_args, argv=None):
    """Run a command line job; bad input prints one `error:` line and returns exit code 2."""
    try:
        run(parse_args(argv))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    return command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
