"""The attention JVP kernel's accuracy on q, k, v (and tangents) of a trained DiT-like net.

The kernel's bf16 error was measured on random inputs with synthetic offsets (attention_jvp.py
--accuracy); an open issue asks for t_o's error to be at most 1.5x SDPA-math's on inputs taken
from a trained DiT. This script makes such inputs on a CPU and measures them on a GPU:

  train     a small DiT (head dim 72, DiT-XL's; 256 tokens) trained briefly as a TrigFlow teacher
            on CIFAR-10 pixels by scaled.train (fp32 on the CPU) -> DIR/ema.safetensors
  capture   the sCM JVP pass of that net (scm_min.scm_jvp through scaled.step.forward_ad_jvp, the
            sCT tangent dx_t/dt of the data pair) on a few images at a spread of times t, recording
            q, k, v and their tangents at every attention call -> DIR/attention_inputs.pt, and the
            statistics that matter to the kernel (key and value offsets, logit scales)
  accuracy  per layer, in bf16, ||err|| / ||ref|| of o and t_o against float64 for the default
            dispatch (`ours`), the Triton kernel, SDPA's math backend and scaled.attention's math
            fallback; needs a CUDA GPU (--allow-cpu: a check of the pipeline, without `triton`)

  python benchmarks/attention_trained_block.py train                # 26 min on 2 (shared) CPU cores
  python benchmarks/attention_trained_block.py capture              # 20 s; a 14 MB file
  python benchmarks/attention_trained_block.py accuracy --out attention_trained_block_h100.json
  python benchmarks/attention_trained_block.py accuracy --allow-cpu    # CPU check of the pipeline

DIR is --dir (default out/trained_dit, git-ignored: carry DIR/attention_inputs.pt to the GPU
machine); `train` passes any flag it does not know to scaled.train (e.g. --resume after an
interruption). The net is dit-b with width 144 = 2 heads x 72, depth 4, patch 2 (1.6M
parameters, a 6 MB export): 4 heads (width 288) would train 3x slower on the CPU and double the
capture, which stores float32 tensors, 6 x depth x images x heads x 256 x 72 x 4 bytes (4 images
at depth 4, 2 heads: 14 MB).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.autograd.forward_ad as fwAD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import scm_min  # noqa: E402
from scaled import attention as A  # noqa: E402
from scaled import networks  # noqa: E402

DEFAULT_DIR = os.path.join(ROOT, "out", "trained_dit")
DEFAULT_DATA = os.path.join(ROOT, ".data", "cifar10-train.zip")
NAMES = ("q", "k", "v", "t_q", "t_k", "t_v")


class Error(Exception):
    """Bad input: one line, exit 2."""


def require(path, what, made_by):
    if not os.path.exists(path):
        raise Error(f"{what} not found: {path} ({made_by})")

#----------------------------------------------------------------------------
# train: scaled.train's teacher mode, so that the net is trained exactly as the repository trains.

def train(args, extra):
    from scaled import train as scaled_train
    require(args.data, "CIFAR-10 training images", "expected the JPEG zip there; pass --data PATH")
    net_args = dict(width=args.heads * args.head_dim, heads=args.heads, depth=args.depth, patch=2)
    argv = ["--mode", "teacher", "--net", "dit-b", "--net-args", json.dumps(net_args),
            "--data", f"cifar10:{args.data}", "--out", args.dir, "--precision", "fp32",
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--lr-warmup", str(args.lr_warmup),
            # scm_min's CIFAR-10 time proposal (the cifar10-teacher preset's)
            "--teacher-P-mean", "-1.2", "--teacher-P-std", "1.2",
            "--threads", str(args.threads), "--log-every", "25", "--checkpoint-every", "250",
            "--keep-checkpoints", "1", *extra]
    print("python -m scaled.train " + " ".join(f"'{a}'" if "{" in a else a for a in argv), flush=True)
    return scaled_train.main(argv)

#----------------------------------------------------------------------------
# capture: the JVP the sCM loss takes, with every attention call's inputs recorded.

def load_net(path):
    from scaled.sample import load_weights, net_from_weights
    require(path, "trained weights", "made by: attention_trained_block.py train")
    state, metadata = load_weights(path)
    net, config = net_from_weights("", state, metadata)
    net.dtype = torch.float32   # fp32 trunk: the inputs as the net computes them, rounded only by `accuracy`
    return net.eval().requires_grad_(False), config, metadata


class AttentionRecorder:
    """Replaces the `attention` that scaled.networks' blocks call by one that records, per block
    (named by a forward pre-hook on each of net.regions()), the primal and tangent of q, k, v and
    of the output (dual tensors of forward_ad_jvp: unpack_dual gives both)."""

    def __init__(self, net):
        self.net, self.records, self.layer = net, {}, None
        names = {module: name for name, module in net.named_modules()}
        self.hooks = [block.register_forward_pre_hook(lambda block, _: setattr(self, "layer", names[block]))
                      for block in net.regions()]

    def attention(self, q, k, v):
        o = self.original(q, k, v)
        if self.layer in self.records:
            raise RuntimeError(f"{self.layer} calls attention twice; the recorder keeps one call per block")
        duals = [fwAD.unpack_dual(x) for x in (q, k, v, o)]
        copy = lambda x: None if x is None else x.detach().to(torch.float32, memory_format=torch.contiguous_format,
                                                               copy=True)
        self.records[self.layer] = {**{n: copy(d.primal) for n, d in zip(NAMES[:3], duals)},
                                    **{n: copy(d.tangent) for n, d in zip(NAMES[3:], duals)},
                                    "t_o": copy(duals[3].tangent)}
        return o

    def __enter__(self):
        self.original, networks.attention = networks.attention, self.attention
        return self

    def __exit__(self, *exc):
        networks.attention = self.original
        for hook in self.hooks:
            hook.remove()


def offset_ratio(x):
    """Per (image, head): ||mean over keys of x|| / RMS distance of the keys from that mean. A
    large ratio is a shared offset, the case the kernel's centring (keys) or its sums of the
    rounded values (values) handle."""
    mean = x.mean(-2, keepdim=True)
    return mean.squeeze(-2).norm(dim=-1) / (x - mean).norm(dim=-1).pow(2).mean(-1).sqrt()


def layer_stats(q, k, v, t_q, t_k, t_v):
    q, k, v, t_q, t_k, t_v = (x.double() for x in (q, k, v, t_q, t_k, t_v))
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale                                            # logits
    t_s = (t_q @ k.transpose(-2, -1) + q @ t_k.transpose(-2, -1)) * scale          # their tangent
    p = torch.softmax(s, dim=-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / torch.log(torch.tensor(float(s.shape[-1])))
    return dict(   # offsets per [image][head]; the rest over all rows of the layer
        key_offset=offset_ratio(k).tolist(), t_key_offset=offset_ratio(t_k).tolist(),
        value_offset=offset_ratio(v).tolist(), t_value_offset=offset_ratio(t_v).tolist(),
        logit_max=s.abs().max().item(), t_logit_max=t_s.abs().max().item(),
        # the part of t_s shared by a row's keys, against its spread (what the centre c removes)
        t_logit_row_offset=(t_s.mean(-1).abs() / t_s.std(-1)).mean().item(),
        logit_row_std=s.std(-1).mean().item(),
        p_max=p.amax(-1).mean().item(),               # mean over rows of the largest weight
        entropy=entropy.mean().item())                # mean over rows, 1 = uniform over keys


def print_stats(stats):
    worst = lambda rows: max(map(max, rows))
    print("per layer: k offset/spread per head (max over images) | t_k, v, t_v offset/spread (max) | "
          "max |s| | row std of s | max |t_s| | t_s row offset/std | mean max p | entropy/log L")
    for name, st in stats.items():
        heads = " ".join(f"{max(h):.2f}" for h in zip(*st["key_offset"]))
        print(f"{name:9} k [{heads}] | t_k {worst(st['t_key_offset']):.2f} v {worst(st['value_offset']):.2f} "
              f"t_v {worst(st['t_value_offset']):.2f} | |s| {st['logit_max']:.1f} | std {st['logit_row_std']:.2f} | "
              f"|t_s| {st['t_logit_max']:.3g} | {st['t_logit_row_offset']:.2f} | p {st['p_max']:.3f} | "
              f"H {st['entropy']:.3f}")


def capture(args):
    from scaled.data import CIFAR10, DataError
    from scaled.sample import latent_shape
    from scaled.step import forward_ad_jvp
    torch.set_num_threads(args.threads)
    weights, path = os.path.join(args.dir, "ema.safetensors"), os.path.join(args.dir, "attention_inputs.pt")
    net, config, metadata = load_net(weights)
    require(args.data, "CIFAR-10 training images", "expected the JPEG zip there; pass --data PATH")
    try:
        dataset = CIFAR10(args.data)   # the trainer's normalization (data std SIGMA_D)
    except DataError as error:
        raise Error(str(error)) from None
    if latent_shape(config) != dataset.shape:
        raise Error(f"{weights} takes {latent_shape(config)} inputs, the data is {dataset.shape}")
    generator = torch.Generator().manual_seed(args.seed)
    indices = torch.randperm(len(dataset), generator=generator)[:len(args.t)]
    x0, _ = dataset.batch(indices, generator)
    z = torch.randn(x0.shape, generator=generator) * scm_min.SIGMA_D
    t = torch.tensor(args.t, dtype=torch.float32)
    # sCT's pair (x_t, dx_t/dt) and scm_jvp: what SCMLoss hands the JVP in scaled.train's sCT step.
    x_t, dxt_dt = scm_min.trigflow_interpolate(x0, z, t), scm_min.trigflow_velocity(x0, z, t)
    with torch.no_grad(), AttentionRecorder(net) as recorder:
        scm_min.scm_jvp(net, x_t, t, dxt_dt, jvp=forward_ad_jvp)
    layers = recorder.records
    if len(layers) != len(net.regions()):
        raise RuntimeError(f"recorded {len(layers)} attention calls, expected one per block ({len(net.regions())})")
    for name, rec in layers.items():
        # The tangents reached attention (non-zero) and are the ones it used: its t_o follows from them.
        for n in NAMES[3:]:
            if rec[n] is None or rec[n].abs().max() == 0:
                raise RuntimeError(f"{name}: the tangent {n} is zero; the JVP did not reach attention")
        t_o = A.attention_jvp_math(*(rec[n].double() for n in NAMES))[1]
        err = ((t_o - rec.pop("t_o").double()).norm() / t_o.norm()).item()
        if not err < 1e-4:
            raise RuntimeError(f"{name}: the recorded tangents do not reproduce the net's t_o (rel. diff {err:.1e})")
    stats = {name: layer_stats(*(rec[n] for n in NAMES)) for name, rec in layers.items()}
    meta = dict(weights=os.path.abspath(weights), net=metadata.get("net"), net_config=config,
                train_step=int(metadata.get("step", -1)), t=args.t, seed=args.seed, images=indices.tolist(),
                trunk_dtype="float32", tangent="sCT: dx_t/dt = cos(t) z - sin(t) x0; scm_min.scm_jvp via "
                "scaled.step.forward_ad_jvp (both tangents times cos(t) sin(t))")
    torch.save(dict(layers=layers, stats=stats, meta=meta), path)
    q = next(iter(layers.values()))["q"]
    print(f"{len(layers)} layers, q/k/v/t_q/t_k/t_v of shape {list(q.shape)} each (t = {args.t}) -> {path} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    print_stats(stats)
    return 0

#----------------------------------------------------------------------------
# accuracy: as attention_jvp.py --accuracy, on the captured tensors.

def accuracy(args):
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise Error("accuracy needs a CUDA GPU (--allow-cpu: a CPU check of the pipeline, without the Triton kernel)")
    path = os.path.join(args.dir, "attention_inputs.pt")
    require(path, "capture", "made by: attention_trained_block.py capture")
    try:
        capture = torch.load(path, weights_only=True)
        layers = capture["layers"]
    except Exception as error:   # a truncated or foreign file
        raise Error(f"cannot read capture {path} ({type(error).__name__}: {str(error)[:120]}); run capture again") from None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import attention_jvp as bench   # imports Triton; only this mode needs it
    from torch.nn.attention import SDPBackend
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_num_threads(args.threads)
    env = bench.environment() if cuda else dict(card="CPU (--allow-cpu)", torch=torch.__version__,
                                                 triton=bench.triton.__version__,
                                                 time=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    dtype, device = getattr(torch, args.dtype), "cuda" if cuda else "cpu"
    jvp = lambda fn, xs: torch.func.jvp(fn, tuple(xs[:3]), tuple(xs[3:]))
    ops = {"ours": lambda xs: jvp(A.attention, xs),   # whatever scaled.attention dispatches to (Gluon on Hopper)
           "triton": lambda xs: A.attention_jvp_triton(   # the Triton kernel
               *xs, config=bench.triton_config(xs[0].shape[-1], xs[0].dtype, xs[0].device)),
           "sdpa_math": lambda xs: jvp(bench.sdpa_with(SDPBackend.MATH), xs),
           "math_fallback": lambda xs: jvp(A.attention_math, xs)}
    if not cuda:
        del ops["triton"]   # Triton's interpreter would take minutes here; `ours` is the math path on a CPU
    shapes = {name: list(layer["q"].shape) for name, layer in layers.items()}
    print(f"{env['card']}: {args.dtype}, captured t = {capture['meta']['t']}, per layer [B, H, L, D] = "
          f"{next(iter(shapes.values()))}; ||err|| / ||ref|| against float64 (o | t_o)")
    rows = []
    for name, layer in layers.items():
        xs = [layer[n].to(device, dtype) for n in NAMES]
        ref_o, ref_t = A.attention_jvp_math(*(x.double() for x in xs))
        row = dict(layer=name)
        with torch.no_grad():
            for op_name, op in ops.items():
                o, t_o = op(xs)
                err_t = (t_o.double() - ref_t).flatten(1).norm(dim=1) / ref_t.flatten(1).norm(dim=1)
                row[op_name] = dict(o=((o.double() - ref_o).norm() / ref_o.norm()).item(),
                                    t_o=((t_o.double() - ref_t).norm() / ref_t.norm()).item(),
                                    t_o_per_image=err_t.tolist())   # one per captured t
        for op_name in ("ours", "triton"):
            if op_name in row:
                row[f"{op_name}_over_sdpa_math"] = row[op_name]["t_o"] / row["sdpa_math"]["t_o"]
        rows.append(row)
        print(f"{name:9} " + "  ".join(f"{n} {row[n]['o']:.1e} | {row[n]['t_o']:.1e}" for n in ops)
              + "  t_o " + " ".join(f"{n}/sdpa_math {row[f'{n}_over_sdpa_math']:.2f}"
                                    for n in ("ours", "triton") if n in row), flush=True)
    worst = {n: max(r[f"{n}_over_sdpa_math"] for r in rows) for n in ("ours", "triton") if n in ops}
    print("worst t_o ratio to sdpa_math over layers: "
          + ", ".join(f"{n} {w:.2f}x" for n, w in worst.items()) + " (the issue asks for <= 1.5x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(**env, dtype=args.dtype, capture=os.path.abspath(path), meta=capture["meta"],
                           shapes=shapes, stats=capture["stats"], worst_t_o_ratio=worst, rows=rows), f, indent=1)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    modes = {name: sub.add_parser(name, help=help) for name, help in (
        ("train", "train the DiT teacher on CIFAR-10 (CPU, fp32) by scaled.train"),
        ("capture", "record q, k, v and tangents of the sCM JVP pass"),
        ("accuracy", "errors of o and t_o per layer in bf16 (CUDA GPU)"))}
    for name, m in modes.items():
        m.add_argument("--dir", default=DEFAULT_DIR, help="folder of the weights and the capture")
        m.add_argument("--threads", type=int, default=2, help="CPU threads (the machine is shared)")
        if name != "accuracy":
            m.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 training images (zip, folder or archive)")
    t = modes["train"]
    t.add_argument("--heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=72, help="DiT-XL's head dim")
    t.add_argument("--depth", type=int, default=4)
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3, help="1e-3 and 2e-3 learnt alike over 200 steps; 5e-4 slower")
    t.add_argument("--lr-warmup", type=int, default=100)
    c = modes["capture"]
    c.add_argument("--t", type=float, nargs="+", default=[0.1, 0.5, 1.0, 1.5],
                   help="TrigFlow times, one image each (sigma = 0.5 tan t: 0.05, 0.27, 0.78, 7.1)")
    c.add_argument("--seed", type=int, default=0, help="images, flips and noise")
    a = modes["accuracy"]
    a.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    a.add_argument("--allow-cpu", action="store_true", help="run on the CPU (no Triton kernel) to check the pipeline")
    a.add_argument("--out", help="write the results as JSON here")
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "train":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return train(args, extra)
        return {"capture": capture, "accuracy": accuracy}[args.command](args)
    except (Error, scm_min.InputError) as error:   # InputError: scaled.sample's, for a bad weights file
        print("error: " + " ".join(str(error).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
