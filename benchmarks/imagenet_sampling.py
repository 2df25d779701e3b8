"""Time to one 512x512 image on one GPU: unet-xxl 2-step sampling plus the SD-VAE decoder, batch 1.

Goal (issue 12): <= 40 ms at batch 1 on an H100. Measured here, in one run:
- the SD-VAE decoder on one latent, in fp32 (TF32 off: the reference, and with TF32), bf16 and
  fp16, channels-last or not, eager, replayed from a CUDA graph, and torch.compile'd inside a
  CUDA graph (--compile); each variant's uint8 image against the fp32 reference's: PSNR in dB
  and the largest pixel difference;
- the whole pipeline (2 network evaluations with fresh noise between them, then the decode):
  eager with the fp32 decode (the eager reference), and replayed from one CUDA graph with the
  fastest decode whose PSNR is >= --min-psnr;
- the VAE encoder's throughput at batch --encode-batch (fp32 and bf16), for the encoding time of
  ImageNet.

The networks carry random weights (the SD-VAE built from its published configuration, the U-Net
from make_net): no weights can be downloaded on the GPU machine. Timings do not depend on the
weights' values; PSNRs of random weights are only indicative of the trained decoder's.

    python benchmarks/imagenet_sampling.py --out benchmarks/results/imagenet_sampling_h100.json [--compile]
    python benchmarks/imagenet_sampling.py --device cpu --tiny     # dry run of the script

Prints a table; writes the JSON after each part.
"""

import argparse
import math
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from scaled_step import cuda_graph, environment, time_calls, timestamped_log, write_json  # noqa: E402
from scaled.latents import LATENT_MEAN, LATENT_STD, decode_to_pixels  # noqa: E402
from scaled.networks import freeze, make_net  # noqa: E402
from scaled.step import sample_few_step  # noqa: E402
from scm_min import SIGMA_D  # noqa: E402

# stabilityai/sd-vae-ft-mse's config.json (the diffusers AutoencoderKL arguments that differ from the defaults).
SD_VAE_CONFIG = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                     norm_num_groups=32, sample_size=512,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def random_vae(config, device, dtype, channels_last):
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()   # its notice about casting with .to()
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval().requires_grad_(False).to(device, dtype)
    return vae.to(memory_format=torch.channels_last) if channels_last else vae


def decoder(vae, device):
    """latents -> uint8 image through `vae`, the normalization constants already on the device (a
    copy from the host is not allowed inside a CUDA graph capture)."""
    mean, std = (torch.tensor(values, device=device) for values in (LATENT_MEAN, LATENT_STD))
    return lambda x: decode_to_pixels(vae, x, mean, std)


def psnr(image, reference):
    """PSNR in dB of uint8 images against the reference, and the largest pixel difference."""
    error = (image.double() - reference.double())
    mse = error.pow(2).mean().item()
    return (math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)), int(error.abs().max().item())


def decode_variants(args, device, config, latents, log, variants, reference=None):
    """Each decoder variant (dtype, channels_last, mode, tf32): time at batch 1 and PSNR against
    `reference`, the uint8 image of the first variant (fp32, TF32 off) if not given."""
    rows = []
    for dtype_name, channels_last, mode, tf32 in variants:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        vae = random_vae(config, device, getattr(torch, dtype_name), channels_last)
        x = latents.contiguous(memory_format=torch.channels_last) if channels_last else latents
        decode_x = decoder(vae, device)
        decode = lambda: decode_x(x)
        if mode == "compile+cuda_graph":
            vae.decoder = torch.compile(vae.decoder)
        if mode in ("cuda_graph", "compile+cuda_graph"):
            graph, output = cuda_graph(decode, device)
            seconds, _ = time_calls(graph.replay, device, warmup=3, repeat=args.repeat)
            graph.replay()
            image = output.clone()
            del graph, output
        else:
            seconds, _ = time_calls(decode, device, warmup=2, repeat=args.repeat)
            image = decode()
        if reference is None:
            reference = image
        quality, max_diff = psnr(image, reference)
        rows.append(dict(dtype=dtype_name, channels_last=channels_last, mode=mode, tf32=tf32,
                         seconds=round(seconds, 6), psnr_db=round(quality, 2), max_pixel_diff=max_diff,
                         image_std=round(image.float().std().item(), 2)))
        log(f"decode {rows[-1]}")
        del vae
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return rows, reference


def pipeline(args, device, config, best, log, eager_reference=True):
    """2-step sampling + decode of one image: eager with the fp32 decode, and one CUDA graph."""
    torch.manual_seed(0)
    with torch.device(device):
        net = freeze(make_net(args.preset), torch.bfloat16 if device.type == "cuda" else torch.float32)
    resolution = {"unet-tiny": 8, "dit-tiny": 8}.get(args.preset, 64)
    z = torch.randn(1, 4, resolution, resolution, device=device) * SIGMA_D
    labels = torch.tensor([207], device=device) % max(net.label_dim, 1)
    rows = []
    if eager_reference:
        vae32 = random_vae(config, device, torch.float32, False)
        decode32 = decoder(vae32, device)
        eager = lambda: decode32(sample_few_step(net, z, 2, class_labels=labels))
        sampling_s = time_calls(lambda: sample_few_step(net, z, 2, class_labels=labels), device, 2, args.repeat)[0]
        rows.append(dict(what="eager reference: 2 steps eager + fp32 decode eager",
                         seconds=round(time_calls(eager, device, 2, args.repeat)[0], 6),
                         sampling_only_s=round(sampling_s, 6)))
        log(f"pipeline {rows[-1]}")
        del vae32
    if device.type == "cuda" and best is not None:
        vae = random_vae(config, device, getattr(torch, best["dtype"]), best["channels_last"])
        if best["mode"] == "compile+cuda_graph":
            vae.decoder = torch.compile(vae.decoder)
        decode = decoder(vae, device)
        fast = lambda: decode(sample_few_step(net, z, 2, class_labels=labels))
        graph, _ = cuda_graph(fast, device)
        sampling_graph, _ = cuda_graph(lambda: sample_few_step(net, z, 2, class_labels=labels), device)
        rows.append(dict(what=f"one CUDA graph: 2 steps + {best['dtype']} decode ({best['mode']}, "
                              f"channels_last={best['channels_last']})",
                         seconds=round(time_calls(graph.replay, device, 3, args.repeat)[0], 6),
                         sampling_only_s=round(time_calls(sampling_graph.replay, device, 3, args.repeat)[0], 6),
                         decode_psnr_db=best["psnr_db"]))
        log(f"pipeline {rows[-1]}")
        del graph, sampling_graph, vae
    del net
    return rows


def encoder_throughput(args, device, config, log):
    rows = []
    x = torch.rand(args.encode_batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    for dtype_name in ("float32", "bfloat16"):
        vae = random_vae(config, device, getattr(torch, dtype_name), False)
        xd = x.to(vae.dtype)
        encode = lambda: vae.encode(xd).latent_dist.mean
        seconds, _ = time_calls(encode, device, warmup=2, repeat=max(3, args.repeat // 4))
        rows.append(dict(dtype=dtype_name, batch=args.encode_batch, images_per_s=round(args.encode_batch / seconds, 1)))
        log(f"encode {rows[-1]}")
        del vae
    return rows


def print_table(results):
    print("\nSD-VAE decode of one latent (batch 1):")
    print(f"{'dtype':9s} {'ch-last':7s} {'mode':19s} {'tf32':5s} {'ms':>8s} {'PSNR dB':>8s} {'max diff':>8s}")
    for r in results["decode"]:
        print(f"{r['dtype']:9s} {str(r['channels_last']):7s} {r['mode']:19s} {str(r['tf32']):5s} "
              f"{r['seconds'] * 1e3:8.2f} {r['psnr_db']:8.2f} {r['max_pixel_diff']:8d}")
    print(f"\n{results['preset']} 2-step sampling + decode, batch 1:")
    for r in results["pipeline"]:
        print(f"  {r['what']}: {r['seconds'] * 1e3:.1f} ms (sampling alone {r['sampling_only_s'] * 1e3:.1f} ms)")
    print("\nVAE encoder throughput:")
    for r in results["encode"]:
        print(f"  {r['dtype']} batch {r['batch']}: {r['images_per_s']} images/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny VAE and unet-tiny (a dry run of the script)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the decoder inside a CUDA graph")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median)")
    parser.add_argument("--min-psnr", type=float, default=40.0,
                        help="the pipeline's decode is the fastest variant with at least this PSNR against fp32")
    parser.add_argument("--encode-batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/imagenet_sampling.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    config = TINY_VAE_CONFIG if args.tiny else SD_VAE_CONFIG
    args.preset, args.resolution = ("unet-tiny", 64) if args.tiny else ("unet-xxl", 512)
    latent_side = args.resolution // 8
    start = time.perf_counter()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    log = timestamped_log(start)

    def save():
        write_json(out, results)

    import diffusers
    results = dict(environment=dict(environment(device), diffusers=diffusers.__version__), preset=args.preset,
                   vae_config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                   weights="random (timing only; PSNR indicative)", decode=[], pipeline=[], encode=[])
    log(results["environment"])
    torch.manual_seed(1)
    latents = torch.randn(1, 4, latent_side, latent_side, device=device) * SIGMA_D   # model units, as sampled
    variants = [("float32", False, "eager", False), ("float32", False, "eager", True),
                ("bfloat16", False, "eager", False), ("float16", False, "eager", False),
                ("bfloat16", True, "eager", False), ("float16", True, "eager", False)]
    if device.type == "cuda":
        variants += [("bfloat16", True, "cuda_graph", False), ("float16", True, "cuda_graph", False)]
    results["decode"], reference = decode_variants(args, device, config, latents, log, variants)
    save()

    def fastest_good():
        eligible = [r for r in results["decode"] if r["psnr_db"] >= args.min_psnr and r["dtype"] != "float32"]
        return min(eligible, key=lambda r: r["seconds"]) if eligible else None

    best = fastest_good()
    results["pipeline"] = pipeline(args, device, config, best, log)
    save()
    results["encode"] = encoder_throughput(args, device, config, log)
    save()
    if args.compile and device.type == "cuda":   # last: compiling may take a while
        rows, _ = decode_variants(args, device, config, latents, log, [("bfloat16", True, "compile+cuda_graph", False)],
                                  reference)
        results["decode"] += rows
        save()
        if fastest_good() is not best:
            results["pipeline"] += pipeline(args, device, config, fastest_good(), log, eager_reference=False)
            save()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
