"""sCM training at scale: `python -m scaled.train` (one process) or
`torchrun --nproc-per-node N -m scaled.train` (N processes; several nodes through torchrun's
rendezvous flags).

Modes: `teacher` (the TrigFlow diffusion loss, scm_min.TeacherLoss), `scd` (distillation from
`--teacher FILE`, the EMA export of a teacher run) and `sct` (consistency training, optionally
started from `--teacher`). The losses, the EMA (scm_min.PowerEMA) and the progress lines
(scm_min.Progress) are scm_min's; the step is scaled.step's; this module adds the parallel
machinery:

- FSDP2: `parallelize` shards each block of the net (`net.regions()`) and the root with
  `fully_shard`, bf16 parameters for the trunk through `MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`; the embedding path (layers marked `fp32`) and the log-variance head are
  units of their own in fp32 (sCM v2, Sec. 4.1). Nets are built with their parameters on the meta
  device, materialized sharded, and filled from rank 0 (a fresh initialization or a file). The
  frozen teacher is sharded the same way, without gradients or optimizer state. One process is
  FSDP of world size 1: there is one code path.
- The JVP pass under FSDP2: scaled.step.forward_ad_jvp propagates dual tensors (x, t_x) through
  the net; FSDP's per-module hooks gather each block's parameters as in a forward pass and the
  block computes its tangent (the flash attention JVP kernel on CUDA). torch.func.jvp around a
  fully_shard model is what fails (pytorch#182641).
- Exact resume: the randomness of a step (time, noise, dropout, flips, label dropout) is drawn
  from generators seeded by (seed, step, rank); the data order is DataOrder's; a checkpoint
  (torch.distributed.checkpoint) holds the model, the optimizer, the EMA, the step, the data
  position and the skip counters, so a resumed run computes the same steps.
"""

import argparse
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from scaled.data import DataError, DataOrder, derived_seed, make_dataset
from scaled.networks import PRESETS as NET_PRESETS
from scaled.networks import make_net, project_weights_
from scaled.step import (classifier_free_guidance, drop_labels, flops_per_sample, forward_ad_jvp, prepare, scm_loss,
                         teacher_loss)
from scm_min import InputError, PowerEMA, Progress, option, parse_args, raise_first_failed

MODES = ("teacher", "scd", "sct")
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# Dense bf16 matrix rate of the card from its data sheet, for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

#----------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass
class TrainConfig:
    preset: str = option("", "named preset (see PRESETS in scaled/train.py) whose values replace these defaults; "
                         "the flags below override it")
    mode: str = option("teacher", "teacher (TrigFlow diffusion), scd (distillation from --teacher) or sct")
    teacher: str = option("", "EMA export (.safetensors) of a teacher run: sCD's teacher and the student's start "
                          "(sct: optional start); 'init' = the student's own initialization (throughput runs only)")
    net: str = option("unet-s", f"network preset of scaled.networks: {', '.join(NET_PRESETS)}")
    net_args: str = option("{}", "JSON object of make_net overrides, e.g. '{\"channels\": 64, \"dropout\": 0.1}'; "
                           "the data's shape and classes set img_channels, img_resolution and label_dim")
    data: str = option("synthetic", "NAME[:PATH]: synthetic[:C,H,W[,CLASSES]] (random latents) or cifar10:PATH")
    out: str = option("out/scaled", "output folder: train.log, metrics.jsonl, checkpoints/, ema.safetensors")
    seed: int = option(0, "seed of initialization, data order and every step's randomness")
    steps: int = option(1000, "training iterations")
    batch_size: int = option(256, "global batch (all processes together); divisible by the number of processes")
    lr: float = option(1e-4, "learning rate before decay")
    lr_ref_steps: int = option(0, "inverse square-root decay lr / sqrt(max(step / REF, 1)) (EDM2); 0: constant")
    lr_warmup: int = option(0, "linear learning-rate warm-up iterations")
    adam_eps: float = option(1e-8, "Adam epsilon (sCM v2's ImageNet runs: 1e-11); betas are (0.9, 0.99)")
    grad_clip: float = option(0.0, "clip the gradient's global norm to this (0: no clipping)")
    ema_sigma_rel: float = option(0.05, "power-function EMA length relative to training (EDM2's sigma_rel)")
    label_dropout: float = option(0.1, "teacher: probability that a label is replaced by 'no class' "
                                  "(for classifier-free guidance)")
    guidance: float = option(1.0, "sCD: classifier-free guidance scale of the teacher (1: none)")
    guidance_range: str = option("", "sCD: LOW,HIGH trains a guidance-input student (sCM v2's ImageNet students: "
                                 "1,2): each sample's scale w ~ U[LOW, HIGH] guides the teacher and is the "
                                 "student's input; the student gains a guidance embedding (starting at zero)")
    teacher_P_mean: float = option(-0.4, "teacher time proposal: mean of log sigma (sCM v2, ImageNet 512)")
    teacher_P_std: float = option(1.0, "teacher time proposal: std of log sigma")
    P_mean: float = option(-0.8, "student time proposal: mean of log sigma (sCM v2, ImageNet 512)")
    P_std: float = option(1.6, "student time proposal: std of log sigma")
    warmup_steps: int = option(10000, "tangent warm-up iterations H")
    tangent_c: float = option(0.1, "tangent normalization constant c")
    precision: str = option("bf16", "bf16 (bf16 trunk through FSDP's mixed precision, fp32 master weights, "
                            "embeddings and loss), fp32, or fp64 (tests)")
    activation_checkpointing: bool = option(False, "recompute each block's activations in the backward pass")
    keep_gathered: bool = option(True, "keep gathered parameters from a forward (the JVP pass, the teacher's) to the "
                                 "next, resharding only after the backward (FSDP2 reshard_after_forward=False): "
                                 "fewer all-gathers a step, for each net's bf16 weights held whole on every GPU")
    log_every: int = option(10, "a progress line and a metrics.jsonl record every this many iterations")
    checkpoint_every: int = option(1000, "checkpoint every this many iterations and at the end (0: never, for "
                                   "throughput runs)")
    keep_checkpoints: int = option(3, "keep the newest this many checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in OUT (required if OUT has one)")
    export_only: bool = option(False, "with --resume: write OUT/ema.safetensors from the newest checkpoint and stop")
    export: bool = option(True, "write OUT/ema.safetensors at the end (--no-export: not, for throughput runs)")
    max_skips: int = option(10, "stop after this many consecutive iterations with a non-finite loss or gradient")
    peak_tflops: float = option(0.0, "the card's dense bf16 TFLOP/s for MFU (0: known cards' data sheet value)")
    threads: int = option(0, "CPU threads per process (0: torch's default)")
    dry_run: bool = option(False, "print the resolved configuration, parameter count and memory estimate, and stop")


PRESETS = {
    # A CPU smoke test: unet-tiny on small random latents.
    "tiny": dict(net="unet-tiny", data="synthetic:4,8,8,10", steps=20, batch_size=8, log_every=5,
                 checkpoint_every=10, warmup_steps=10, precision="fp32"),
    # CIFAR-10 pixels (unconditional) with a 30M EDM2-style U-Net at 32x32; P as scm_min's CIFAR-10 job.
    # The teacher's rate sits between scm_min's CIFAR U-Net (5e-4) and EDM2's for its weight-normalized
    # nets (1e-2); neither rate was tuned here.
    "cifar10-teacher": dict(mode="teacher", net="unet-s", net_args='{"channels": 64, "attn_resolutions": [16, 8]}',
                            data="cifar10:data/cifar-10-batches-py", steps=1400, batch_size=256, lr=2e-3,
                            lr_warmup=100, teacher_P_mean=-1.2, teacher_P_std=1.2, checkpoint_every=500),
    "cifar10-scd": dict(mode="scd", net="unet-s", net_args='{"channels": 64, "attn_resolutions": [16, 8]}',
                        data="cifar10:data/cifar-10-batches-py", steps=250, batch_size=256, lr=2e-4, lr_warmup=100,
                        P_mean=-1.0, P_std=1.4, warmup_steps=100, adam_eps=1e-11, checkpoint_every=500),
    # sCM v2's ImageNet-512 sCD recipe on the XL and XXL U-Nets (pass --data latents:PATH): Adam
    # (0.9, 0.99), eps 1e-11, inverse-sqrt decay, P (-0.8, 1.6), H = 10k, w ~ U[1, 2] as the student's input.
    "imagenet512-xl-scd": dict(mode="scd", guidance_range="1,2",
                               net="unet-xl", data="synthetic", batch_size=2048, lr=1e-4,
                               lr_ref_steps=2000, adam_eps=1e-11, warmup_steps=10000, steps=200_000,
                               activation_checkpointing=True),
    "imagenet512-xxl-scd": dict(mode="scd", guidance_range="1,2",
                                net="unet-xxl", data="synthetic", batch_size=2048, lr=1e-4,
                                lr_ref_steps=2000, adam_eps=1e-11, warmup_steps=10000, steps=200_000,
                                activation_checkpointing=True),
}

# Fields that may change between a checkpoint and its resumption.
RESUMABLE_FIELDS = {"preset", "out", "steps", "log_every", "checkpoint_every", "keep_checkpoints", "resume",
                    "export_only", "export", "max_skips", "peak_tflops", "threads", "dry_run", "activation_checkpointing",
                    "keep_gathered"}


def validate(cfg):
    try:
        net_args = json.loads(cfg.net_args)
    except json.JSONDecodeError as error:
        raise InputError(f"--net-args is not JSON ({error})") from None
    raise_first_failed([
        (cfg.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
        (cfg.net in NET_PRESETS, f"--net must be one of {', '.join(NET_PRESETS)}"),
        (isinstance(net_args, dict), "--net-args must be a JSON object"),
        (cfg.mode != "scd" or cfg.teacher, "--mode scd needs --teacher FILE (the ema.safetensors of a teacher run)"),
        (cfg.steps >= 1 and cfg.batch_size >= 1, "--steps and --batch-size must be at least 1"),
        (cfg.lr > 0 and cfg.adam_eps > 0 and cfg.grad_clip >= 0, "--lr and --adam-eps must be > 0, --grad-clip >= 0"),
        (cfg.lr_ref_steps >= 0 and cfg.lr_warmup >= 0, "--lr-ref-steps and --lr-warmup must be >= 0"),
        (0 < cfg.ema_sigma_rel < 0.28, "--ema-sigma-rel must be in (0, 0.28)"),
        (0 <= cfg.label_dropout < 1 and cfg.guidance >= 1, "--label-dropout must be in [0, 1), --guidance >= 1"),
        (not cfg.guidance_range or (cfg.mode == "scd" and cfg.guidance == 1),
         "--guidance-range needs --mode scd and no fixed --guidance"),
        (cfg.teacher_P_std > 0 and cfg.P_std > 0, "time proposal standard deviations must be positive"),
        (cfg.warmup_steps >= 0 and cfg.tangent_c > 0, "--warmup-steps must be >= 0 and --tangent-c > 0"),
        (cfg.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
        (cfg.log_every >= 1 and cfg.keep_checkpoints >= 1 and cfg.checkpoint_every >= 0,
         "--log-every and --keep-checkpoints must be at least 1, --checkpoint-every at least 0"),
        (cfg.max_skips >= 1 and cfg.threads >= 0, "--max-skips must be at least 1, --threads >= 0"),
        (not cfg.export_only or cfg.resume, "--export-only needs --resume")])
    return net_args


def guidance_range(cfg):
    """(low, high) of --guidance-range, or None."""
    if not cfg.guidance_range:
        return None
    try:
        low, high = (float(v) for v in cfg.guidance_range.split(","))
    except ValueError:
        low = high = float("nan")
    if not 1 <= low <= high:
        raise InputError(f"--guidance-range {cfg.guidance_range!r}: expected LOW,HIGH with 1 <= LOW <= HIGH")
    return low, high


def parse_config(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="")
    preset = pre.parse_known_args(argv)[0].preset
    if preset and preset not in PRESETS:
        raise InputError(f"unknown --preset {preset!r}; presets: {', '.join(PRESETS)}")
    return parse_args(argv, TrainConfig, defaults=PRESETS.get(preset, {}))

#----------------------------------------------------------------------------
# Processes and sharding.

def init_distributed():
    """(rank, world size, device) under torchrun (or any launcher that sets RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), else a process group of one."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def net_kwargs(cfg, net_args, dataset):
    """make_net arguments (student, teacher): the teacher's without the guidance embedding that
    --guidance-range gives the student."""
    C, H, W = dataset.shape
    if H != W:
        raise InputError(f"the networks take square inputs; the data is {C}x{H}x{W}")
    guided_student = guidance_range(cfg) is not None
    if guided_student and not dataset.num_classes:
        raise InputError("--guidance-range needs class labels (classifier-free guidance); this data has none")
    teacher = {"img_channels": C, "img_resolution": H, "label_dim": dataset.num_classes, **net_args,
               "dtype": PRECISIONS[cfg.precision]}
    return {**teacher, "guidance_embedding": True} if guided_student else teacher, teacher


def parallelize(net, mesh, param_dtype, keep_gathered=False):
    """fully_shard each block (bf16 parameters with `param_dtype`, gradients reduced in fp32), the
    embedding-path layers inside blocks and the log-variance head as fp32 units, then the root
    (embeddings, stem, output layers; fp32). Inputs are never cast: the nets cast their trunk.
    keep_gathered: units stay gathered after a forward until a backward reshards them."""
    trunk = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                 cast_forward_inputs=False)
    full = MixedPrecisionPolicy(cast_forward_inputs=False)
    shard = functools.partial(fully_shard, mesh=mesh, reshard_after_forward=not keep_gathered)
    for block in net.regions():
        for module in block.modules():
            if getattr(module, "fp32", False) and module is not block:
                shard(module, mp_policy=full)
        shard(block, mp_policy=trunk)
    shard(net.logvar, mp_policy=full)
    shard(net, mp_policy=full)
    return net


def build_sharded(cfg, kwargs, mesh, device, buffers, trainable=True):
    """The net built on the meta device, sharded over `mesh`, materialized on `device` with
    uninitialized parameters (fill them with load_full_state) and the given buffers {name: tensor}
    (the meta device computes no values, and some buffers are not in a state dict)."""
    with torch.device("meta"):
        net = make_net(cfg.net, **kwargs)
    if cfg.precision == "fp64":
        net = net.double()
    parallelize(net, mesh, torch.bfloat16 if cfg.precision == "bf16" else None, cfg.keep_gathered)
    net.to_empty(device=device)
    with torch.no_grad():
        for name, b in net.named_buffers():
            b.copy_(buffers[name])
    return net.train(trainable).requires_grad_(trainable)


def load_full_state(net, full_state):
    """Fill a sharded net from a full state dict that rank 0 holds (others pass None)."""
    set_model_state_dict(net, dict(full_state) if dist.get_rank() == 0 else {},   # it replaces the dict's values
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def local(x):
    return x.to_local() if isinstance(x, DTensor) else x

#----------------------------------------------------------------------------
# Files: the teacher's EMA export and checkpoints.

def export_metadata(cfg, kwargs, step):
    return {"net": cfg.net, "net_kwargs": json.dumps({k: v for k, v in kwargs.items() if k != "dtype"}),
            "step": str(step), "mode": cfg.mode}


def read_teacher(path, cfg, kwargs):
    """The full state dict of a teacher export (rank 0 reads it; None on other ranks), after
    checking that it is a net of this run's architecture."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise InputError(f"teacher file not found: {path}")
    try:
        with safe_open(path, "pt") as file:
            meta = file.metadata() or {}
    except Exception as error:
        raise InputError(f"cannot read teacher {path} as safetensors ({type(error).__name__}: {error})") from None
    ours = export_metadata(cfg, kwargs, 0)
    if meta.get("net") != ours["net"] or meta.get("net_kwargs") != ours["net_kwargs"]:
        raise InputError(f"teacher {path} is a {meta.get('net')} with {meta.get('net_kwargs')}; this run builds "
                         f"{ours['net']} with {ours['net_kwargs']}")
    return load_file(path) if dist.get_rank() == 0 else None


def write_export(path, full_state, metadata):
    """Write a full state dict (rank 0) to one safetensors file, atomically."""
    from safetensors.torch import save_file
    tmp = path + ".partial"
    save_file({k: v.contiguous() for k, v in full_state.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def checkpoint_dirs(out):
    """Complete checkpoints in out/checkpoints, oldest first."""
    dirs = [d for d in glob.glob(os.path.join(out, "checkpoints", "step-*")) if not d.endswith(".partial")]
    return sorted(dirs, key=lambda d: int(d.rsplit("-", 1)[1]))


def resumable_config(cfg):
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_FIELDS}

#----------------------------------------------------------------------------
# The trainer.

class Trainer:
    """Everything one run holds; `state_dict` / `load_state_dict` are what a checkpoint saves."""

    def __init__(self, cfg, dataset=None):
        net_args = validate(cfg)
        self.cfg = cfg
        self.rank, self.world_size, self.device = init_distributed()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dataset = make_dataset(cfg.data) if dataset is None else dataset
        if cfg.batch_size % self.world_size:
            raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {self.world_size} processes")
        self.guidance_range = guidance_range(cfg)
        self.kwargs, self.teacher_kwargs = net_kwargs(cfg, net_args, self.dataset)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAdaptiveWeight\) returned a view")
        self.checkpoints = checkpoint_dirs(cfg.out)
        if self.checkpoints and not cfg.resume:
            raise InputError(f"{cfg.out} holds checkpoints ({os.path.basename(self.checkpoints[-1])}); pass --resume "
                             f"to continue, or another --out")
        if cfg.resume and not self.checkpoints:
            raise InputError(f"--resume: no checkpoint in {os.path.join(cfg.out, 'checkpoints')}")

        # One full net on the CPU of each process: the buffers, and on rank 0 the initialization.
        torch.manual_seed(cfg.seed)
        reference = make_net(cfg.net, **self.kwargs)
        reference = reference.double() if cfg.precision == "fp64" else reference
        buffers = dict(reference.named_buffers())
        fresh = reference.state_dict() if self.rank == 0 else None
        teacher_state = fresh
        if cfg.teacher and cfg.teacher != "init":
            teacher_state = read_teacher(cfg.teacher, cfg, self.teacher_kwargs)
        elif self.guidance_range and self.rank == 0:   # 'init': the student's start less its guidance embedding
            with torch.device("meta"):
                teacher_keys = set(make_net(cfg.net, **self.teacher_kwargs).state_dict())
            teacher_state = {k: v for k, v in fresh.items() if k in teacher_keys}
        del reference
        # The student starts as the teacher (a new guidance embedding as initialized: gain 0).
        start = None if self.rank else {**fresh, **teacher_state}
        self.net = build_sharded(cfg, self.kwargs, self.mesh, self.device, buffers)
        load_full_state(self.net, start)
        self.teacher = None
        # sCD of the teacher's classifier-free guidance: at one scale, or at each sample's w.
        self.guided_teacher = cfg.mode == "scd" and (cfg.guidance != 1 or self.guidance_range is not None)
        if cfg.mode == "scd":
            self.teacher = build_sharded(cfg, self.teacher_kwargs, self.mesh, self.device, buffers, trainable=False)
            load_full_state(self.teacher, teacher_state)
        del start, fresh, teacher_state
        self.ema = PowerEMA(self.net, cfg.ema_sigma_rel,
                            average=build_sharded(cfg, self.kwargs, self.mesh, self.device, buffers, trainable=False))
        with torch.no_grad():   # the first update copies; this keeps uninitialized memory out of it
            torch._foreach_copy_([local(p) for p in self.ema.net.parameters()], [local(p) for p in self.net.parameters()])
        if cfg.activation_checkpointing:
            prepare(self.net, checkpoint=True)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=cfg.adam_eps)
        if cfg.mode == "teacher":
            self.loss_fn = teacher_loss(self.net, cfg.teacher_P_mean, cfg.teacher_P_std)
        else:
            teacher = self.teacher
            if self.guided_teacher:
                teacher = classifier_free_guidance(teacher, cfg.guidance)   # the scale: a batch's w if given
            self.loss_fn = scm_loss(self.net, teacher, cfg.P_mean, cfg.P_std, cfg.warmup_steps, cfg.tangent_c,
                                    jvp=forward_ad_jvp, guidance_range=self.guidance_range)
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self.order = DataOrder(len(self.dataset), cfg.seed, cfg.batch_size, self.rank, self.world_size)

    # What a checkpoint holds.
    def state_dict(self):
        return {"model": get_model_state_dict(self.net), "optimizer": get_optimizer_state_dict(self.net, self.optimizer),
                "ema": get_model_state_dict(self.ema.net),
                "trainer": {"step": self.step, "data_position": self.order.position,
                            "ema_updates": self.ema.num_updates, "skipped": self.skipped,
                            "consecutive_skips": self.consecutive_skips, "teacher": self.cfg.teacher,
                            "config": json.dumps(resumable_config(self.cfg), sort_keys=True)}}

    def load_state_dict(self, state):
        set_model_state_dict(self.net, state["model"])
        set_optimizer_state_dict(self.net, self.optimizer, state["optimizer"])
        set_model_state_dict(self.ema.net, state["ema"])
        trainer = state["trainer"]
        self.step, self.order.position = trainer["step"], trainer["data_position"]
        self.ema.num_updates, self.skipped = trainer["ema_updates"], trainer["skipped"]
        self.consecutive_skips = trainer["consecutive_skips"]

    def save_checkpoint(self):
        """DCP into checkpoints/step-N.partial, renamed to step-N once every rank has written (a
        killed save leaves only a .partial folder, never a checkpoint that looks complete); then
        the oldest beyond keep_checkpoints are removed."""
        final = os.path.join(self.cfg.out, "checkpoints", f"step-{self.step:08d}")
        partial = final + ".partial"
        if self.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        dist.barrier()
        dcp.save(self.state_dict(), checkpoint_id=partial)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in checkpoint_dirs(self.cfg.out)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        dist.barrier()

    def load_checkpoint(self, path):
        state = self.state_dict()
        try:
            dcp.load(state, checkpoint_id=path)
        except (Exception, CheckpointException) as error:   # CheckpointException is a BaseException
            raise InputError(f"cannot read checkpoint {path} ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]})") from None
        saved = json.loads(state["trainer"]["config"])
        ours = resumable_config(self.cfg)
        changed = sorted(k for k in {**saved, **ours} if saved.get(k) != ours.get(k))
        if changed:
            raise InputError(f"checkpoint {path} was written with other settings ({', '.join(changed)}); "
                             f"use those or another --out")
        self.load_state_dict(state)

    def export_ema(self, path):
        """The EMA weights as one safetensors file (fp32, full tensors) for sampling or as a teacher."""
        full = get_model_state_dict(self.ema.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            metadata = export_metadata(self.cfg, self.kwargs, self.step)
            if getattr(self.dataset, "pixel_normalization", None):
                metadata["pixel_normalization"] = json.dumps(list(self.dataset.pixel_normalization))
            write_export(path, full, metadata)
        dist.barrier()

    # One iteration.
    def learning_rate(self, step):
        cfg = self.cfg
        warmup = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else 1.0
        decay = 1 / math.sqrt(max(step / cfg.lr_ref_steps, 1.0)) if cfg.lr_ref_steps else 1.0  # EDM2's schedule
        return cfg.lr * warmup * decay

    def next_batch(self, generator):
        x0, labels = self.dataset.batch(self.order.next_indices(), generator)
        x0 = x0.to(self.device, PRECISIONS[self.cfg.precision] if self.cfg.precision == "fp64" else torch.float32)
        if labels is None or not self.kwargs["label_dim"]:
            return x0, {}
        if self.cfg.mode == "teacher" and self.cfg.label_dropout:
            labels = drop_labels(labels, self.cfg.label_dropout, generator)
        return x0, {"class_labels": labels.to(self.device)}

    def train_step(self):
        """One iteration; returns its logs (floats). A non-finite loss or gradient on any rank
        skips the update on all ranks (weights, optimizer and EMA unchanged)."""
        cfg, step = self.cfg, self.step
        torch.manual_seed(derived_seed(cfg.seed, 2, step, self.rank))   # time, noise, dropout (CPU and CUDA)
        generator = torch.Generator().manual_seed(derived_seed(cfg.seed, 3, step, self.rank))  # flips, labels
        x0, cond = self.next_batch(generator)
        loss, logs = self.loss_fn(self.net, x0, step, **cond)
        self.optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        grads = [local(p.grad) for p in self.net.parameters() if p.grad is not None]
        stats = torch.stack([torch.stack(torch._foreach_norm(grads)).double().pow(2).sum(),  # squared gradient norm
                             loss.detach().double().sum(), torch.tensor(float(len(loss)), device=self.device),
                             logs.get("g_norm", torch.zeros([], device=self.device)).double() * len(loss),
                             logs["error"].double() * len(loss)]).to(self.device)
        dist.all_reduce(stats)
        sq_norm, loss_sum, count, g_norm_sum, error_sum = stats.tolist()
        grad_norm = math.sqrt(sq_norm) if math.isfinite(sq_norm) else math.inf
        self.step += 1
        if not (math.isfinite(loss_sum) and math.isfinite(sq_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_skips += 1
            return {"loss": loss_sum / count, "grad_norm": grad_norm, "skipped": True}
        self.consecutive_skips = 0
        if cfg.grad_clip and grad_norm > cfg.grad_clip:
            torch._foreach_mul_(grads, cfg.grad_clip / grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(step)
        self.optimizer.step()
        project_weights_(self.net)
        self.ema.update(self.net)
        return {"loss": loss_sum / count, "grad_norm": grad_norm, "error": error_sum / count, "skipped": False,
                "g_norm": g_norm_sum / count if "g_norm" in logs else None}

#----------------------------------------------------------------------------
# The run.

class Log:
    """Rank 0's log: lines to stderr and OUT/train.log, records to OUT/metrics.jsonl."""

    def __init__(self, out, rank):
        self.rank, self.path, self.jsonl = rank, os.path.join(out, "train.log"), os.path.join(out, "metrics.jsonl")

    def line(self, message):
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)
            with open(self.path, "a") as file:
                file.write(message + "\n")

    def record(self, values):
        if self.rank == 0:
            with open(self.jsonl, "a") as file:
                file.write(json.dumps(values) + "\n")

    def truncate_records(self, step):
        """Drop records after `step` (those of a run that was killed after its last checkpoint)."""
        if self.rank == 0 and os.path.exists(self.jsonl):
            with open(self.jsonl) as file:   # a line cut by the kill is dropped too
                kept = [line for line in file if line.endswith("\n") and json.loads(line)["step"] <= step]
            with open(self.jsonl + ".partial", "w") as file:
                file.writelines(kept)
            os.replace(self.jsonl + ".partial", self.jsonl)


def parameter_count(cfg, kwargs):
    with torch.device("meta"):
        return sum(p.numel() for p in make_net(cfg.net, **kwargs).parameters())


def memory_estimate(cfg, kwargs, world_size):
    """GiB per GPU of the training state, sharded over world_size: fp32 master weights, gradients,
    Adam's two moments and the EMA (4 + 4 + 8 + 4 bytes a parameter), the teacher (4), plus the
    gathered weights: with keep_gathered the whole student and teacher, else the largest block
    twice (FSDP prefetches the next). Activations are not counted."""
    with torch.device("meta"):
        net = make_net(cfg.net, **kwargs)
    params = sum(p.numel() for p in net.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in net.regions())
    per_param = 4 + 4 + 8 + 4 + (4 if cfg.mode == "scd" else 0)
    gathered = (params * (2 if cfg.mode == "scd" else 1) if cfg.keep_gathered else 2 * block) \
        * (2 if cfg.precision == "bf16" else 4)
    return {"state_gib": params * per_param / world_size / 2 ** 30, "gathered_gib": gathered / 2 ** 30}


def step_flops(cfg, kwargs, shape, guided=False):
    """Matrix FLOPs per sample of one iteration (scaled.step.flops_per_sample's rule); a guided
    teacher evaluates its conditional and unconditional F: one forward more."""
    counts = flops_per_sample(cfg.net, shape, **{k: v for k, v in kwargs.items() if k != "dtype"})
    return {"teacher": counts["teacher_step"], "scd": counts["scd_step"] + (counts["forward"] if guided else 0),
            "sct": counts["scd_step"] - counts["forward"]}[cfg.mode]


def peak_flops(cfg, device):
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for card, tflops in PEAK_TFLOPS.items():
            if card in name:
                return tflops * 1e12
    return None


def run(cfg, dataset=None):
    """Train (or export) as cfg says; returns the logs of the iterations this process ran."""
    trainer = Trainer(cfg, dataset)
    rank, world_size = trainer.rank, trainer.world_size
    os.makedirs(cfg.out, exist_ok=True)
    log = Log(cfg.out, rank)
    if cfg.resume:
        start = time.perf_counter()
        trainer.load_checkpoint(trainer.checkpoints[-1])
        log.truncate_records(trainer.step)
        log.line(f"resumed from {trainer.checkpoints[-1]} at iteration {trainer.step} (loaded in "
                 f"{time.perf_counter() - start:.2f} s)")
    if cfg.export_only:
        trainer.export_ema(os.path.join(cfg.out, "ema.safetensors"))
        return []
    device = trainer.device
    log.line(f"{cfg.mode} {cfg.net} ({parameter_count(cfg, trainer.kwargs) / 1e6:.1f}M parameters) on {world_size} x "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, data {cfg.data}, "
             f"global batch {cfg.batch_size}, torch {torch.__version__}")
    if rank == 0:
        with open(os.path.join(cfg.out, "config.json"), "w") as file:
            json.dump(dataclasses.asdict(cfg), file, indent=2)
    flops = step_flops(cfg, trainer.kwargs, trainer.dataset.shape, trainer.guided_teacher)
    peak = peak_flops(cfg, device)
    progress = Progress(cfg.steps, cfg.mode, log.path if rank == 0 else None, first_step=trainer.step,
                        every=cfg.log_every) if rank == 0 else None
    history, window_start, window_steps = [], time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while trainer.step < cfg.steps:
        logs = trainer.train_step()
        history.append(logs)
        window_steps += 1
        if logs["skipped"]:
            log.line(f"iteration {trainer.step}: non-finite loss or gradient on some rank (loss {logs['loss']:.4g}, "
                     f"grad norm {logs['grad_norm']:.4g}); skipped ({trainer.skipped} in all, "
                     f"{trainer.consecutive_skips} in a row)")
            if trainer.consecutive_skips >= cfg.max_skips:
                raise TrainingError(f"{trainer.consecutive_skips} consecutive iterations with a non-finite loss or "
                                    f"gradient (up to iteration {trainer.step}); the last checkpoint is intact")
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            seconds = time.perf_counter() - window_start
            images_per_s = window_steps * cfg.batch_size / seconds
            record = {"step": trainer.step, "images_seen": trainer.order.position, "loss": logs["loss"],
                      "grad_norm": logs["grad_norm"], "g_norm": logs.get("g_norm"), "error": logs.get("error"),
                      "lr": trainer.learning_rate(trainer.step - 1), "images_per_s": images_per_s,
                      "mfu": flops * images_per_s / world_size / peak if peak else None,
                      "memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                      "skipped": trainer.skipped}
            log.record(record)
            shown = {k: record[k] for k in ("loss", "grad_norm", "g_norm", "images_per_s", "mfu", "memory_gib",
                                            "skipped") if record[k] is not None}
            if progress is not None:
                progress.update(trainer.step - 1, **shown)
            window_start, window_steps = time.perf_counter(), 0
        if cfg.checkpoint_every and (trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps):
            start = time.perf_counter()
            trainer.save_checkpoint()
            log.line(f"checkpoint step-{trainer.step:08d} written in {time.perf_counter() - start:.2f} s")
            window_start, window_steps = time.perf_counter(), 0   # images/s leaves the checkpoint out
    if progress is not None:
        progress.close()
    if cfg.export:
        trainer.export_ema(os.path.join(cfg.out, "ema.safetensors"))
    log.line(f"done: {trainer.step} iterations, {trainer.skipped} skipped"
             + (f"; EMA -> {os.path.join(cfg.out, 'ema.safetensors')}" if cfg.export else ""))
    return history


class TrainingError(RuntimeError):
    """A run that cannot go on (too many non-finite iterations): one line, exit 1."""


def dry_run(cfg):
    net_args = validate(cfg)
    dataset = make_dataset(cfg.data)
    kwargs, _ = net_kwargs(cfg, net_args, dataset)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    memory = memory_estimate(cfg, kwargs, world_size)
    print(json.dumps({"config": dataclasses.asdict(cfg), "data": {"shape": dataset.shape, "classes": dataset.num_classes,
                                                                   "length": len(dataset)},
                      "parameters": parameter_count(cfg, kwargs), "processes": world_size,
                      "memory_per_gpu_gib": {**{k: round(v, 3) for k, v in memory.items()},
                                             "activations": "not estimated: the log's memory_gib is the measured peak"}},
                     indent=2))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_config(argv)
        if cfg.dry_run:
            dry_run(cfg)
            return 0
        run(cfg)
    except (InputError, DataError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)   # one line, always
        return 2
    except TrainingError as error:
        print("error: " + str(error), file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
