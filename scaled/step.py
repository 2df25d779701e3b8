"""The sCM training step and few-step sampling for scaled.networks' nets, on one GPU.

Every equation comes from scm_min: the loss is `scm_min.SCMLoss` (sCD with a teacher, sCT
without), given the net's own log-variance head and a JVP function; the diffusion loss of a
teacher is `scm_min.TeacherLoss`; the samplers are scm_min's. What this module adds:

- `forward_ad_jvp`: torch.func.jvp's signature through torch.autograd.forward_ad dual tensors,
  which lets a block run its JVP as one compiled region (`prepare`).
- `prepare(net, compile=..., checkpoint=...)`: per-block activation checkpointing (gradient pass
  only) and per-block torch.compile regions, for the forward, the backward and the JVP. The
  block is the unit that sharding will wrap later, and the JVP is computed block by block.
- `TrainStep`: loss, backward, Adam on the fp32 master weights, forced weight normalization.
- Label dropout for a guided teacher (`teacher_loss(..., label_dropout)`) and a per-sample
  guidance scale for a guided student (`scm_loss(..., guidance_range)`): `ConditionedLoss`.
- `classifier_free_guidance`, `sample_few_step`, `sample_teacher_guided`.

Precision: the nets compute their trunk in `net.dtype` (bf16) with fp32 master weights, and the
embedding path, F, the target g and the loss in fp32 (see scaled/networks.py).
"""

import dataclasses
import functools

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

from scaled.networks import is_functorch_wrapped, make_net, project_weights_
from scm_min import (SIGMA_D, SCMLoss, TeacherLoss, consistency_times, sample_consistency, sample_teacher,
                     scm_g, teacher_times)

__all__ = ["forward_ad_jvp", "flops_per_sample", "RecordingJVP", "prepare", "scm_loss", "teacher_loss", "TrainStep",
           "drop_labels", "sample_guidance", "ConditionedLoss",
           "classifier_free_guidance", "sample_few_step", "sample_teacher_guided"]

# Time proposals of sCM v2's ImageNet 512 runs: consistency model and teacher.
IMAGENET512_P = dict(P_mean=-0.8, P_std=1.6)
IMAGENET512_TEACHER_P = dict(P_mean=-0.4, P_std=1.0)

#----------------------------------------------------------------------------
# JVP and per-block regions.

def forward_ad_jvp(fn, primals, tangents):
    """(fn(*primals), its derivative along tangents), like torch.func.jvp, through forward-mode
    dual tensors: each op propagates its tangent, and the regions of a block prepared with
    compile=True compute theirs in compiled graphs. Call under torch.no_grad() for the sCM JVP pass."""
    with fwAD.dual_level():
        output = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(output)
    return primal, torch.zeros_like(primal) if tangent is None else tangent


class RecordingJVP:
    """A jvp function (torch.func.jvp's signature) that records each call, for checking the
    tangent and the target g that a step used (tests, benchmarks)."""

    def __init__(self, jvp=forward_ad_jvp):
        self.jvp, self.calls = jvp, []

    def __call__(self, fn, primals, tangents):
        output = self.jvp(fn, primals, tangents)
        self.calls.append((fn, primals, tangents, output))
        return output

    def trajectory(self, call=-1):
        """(x_t, t, dx_t/dt) of a recorded scm_min.scm_jvp call, its tangent scaling undone."""
        _, (x, t), (t_x, _), _ = self.calls[call]
        cos_sin = (torch.cos(t) * torch.sin(t)).reshape(-1, *([1] * (x.ndim - 1)))
        return x * SIGMA_D, t, t_x * SIGMA_D / cos_sin

    def target(self, r=1.0, call=-1):
        """(F^-, g) of a recorded scm_jvp call, g by scm_min.scm_g with warm-up factor r."""
        F, cos_sin_dF_dt = self.calls[call][3]
        x_t, t, dxt_dt = self.trajectory(call)
        return F, scm_g(F, cos_sin_dF_dt, x_t, t, dxt_dt, r)


def _block_forward(block, *args):
    return block(*args)


def _region_jvp(block, name, primals, tangents):
    """Primal and tangent outputs of getattr(block, name) inside forward_ad_jvp's dual level, as
    tuples (torch.func.jvp here would open a second, nested level, which forward AD refuses)."""
    outputs = getattr(block, name)(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
    outputs = [fwAD.unpack_dual(y) for y in (outputs if isinstance(outputs, tuple) else (outputs,))]
    return tuple(y.primal for y in outputs), tuple(y.tangent for y in outputs)


_COMPILED = {}


def _compiled(fn):
    """One compiled function per kind of call, shared by all blocks: blocks of the same structure
    and shapes reuse one graph (torch.compile treats their parameters as inputs)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _has_tangent(args):
    return any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


@dataclasses.dataclass
class BlockRunner:
    """How scaled.networks.run_block and run_region call a block (attached by `prepare`).

    compile: the forward (and its backward) of a whole block is one compiled graph; in the JVP
    pass under forward_ad_jvp, each region of a block (the pieces between attention calls) is one
    compiled graph of primal and tangent, and attention runs its own kernel in between.
    checkpoint: the block's activations are recomputed in the backward pass."""
    compile: bool = False
    checkpoint: bool = False

    def block(self, block, *args):
        if (self.compile and _has_tangent(args)) or any(is_functorch_wrapped(a) for a in args):
            return block(*args)   # JVP pass: regions compile; torch.func transforms: all eager
        forward = _compiled(_block_forward) if self.compile else _block_forward
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, block, *args, use_reentrant=False)
        return forward(block, *args)

    def region(self, block, name, *args):
        if not self.compile or torch.compiler.is_compiling() or not _has_tangent(args) \
                or any(is_functorch_wrapped(a) for a in args):
            return getattr(block, name)(*args)
        duals = [fwAD.unpack_dual(a) for a in args]
        primals = tuple(d.primal for d in duals)
        tangents = tuple(torch.zeros_like(d.primal) if d.tangent is None else d.tangent for d in duals)
        outputs, output_tangents = _compiled(_region_jvp)(block, name, primals, tangents)
        outputs = tuple(y if t is None else fwAD.make_dual(y, t) for y, t in zip(outputs, output_tangents))
        return outputs if len(outputs) > 1 else outputs[0]


def prepare(net, compile=False, checkpoint=False):
    """Attach per-block activation checkpointing and compiled regions to `net`'s blocks (in place;
    returns net). Checkpointing applies to passes with gradients; compiled regions to the forward,
    the backward and the JVP under forward_ad_jvp. The glue between blocks stays eager."""
    if compile:
        # One compiled entry per distinct block shape and mode (forward, JVP, with and without grad).
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, 4096)
    for block in net.regions():
        block.runner = BlockRunner(compile, checkpoint) if (compile or checkpoint) else None
    return net

#----------------------------------------------------------------------------
# Losses and the training step.

def flops_per_sample(preset, shape, **overrides):
    """Matrix FLOPs per sample [C, H, W] of the forward, the JVP pass and the gradient pass of a
    preset, counted by torch.utils.flop_counter on the meta device (convolutions, linear layers,
    attention products; nothing elementwise), and of the sCD step (the teacher's forward, the JVP
    pass, the gradient pass) and the teacher's diffusion step (the gradient pass)."""
    with torch.device("meta"):
        net = make_net(preset, **overrides)
        x, t = torch.randn(1, *shape), torch.rand(1)
        labels = torch.zeros(1, dtype=torch.long) if net.label_dim else None
    bound = functools.partial(net, class_labels=labels)
    counts = {}
    for name, run in (("forward", lambda: bound(x, t)),
                      ("jvp", lambda: forward_ad_jvp(bound, (x, t), (x, t))),
                      ("forward_backward", None)):
        with FlopCounterMode(display=False) as counter:
            if run is None:
                bound(x, t).sum().backward()
            else:
                with torch.no_grad():
                    run()
        counts[name] = counter.get_total_flops()
    counts["scd_step"] = counts["forward"] + counts["jvp"] + counts["forward_backward"]
    counts["teacher_step"] = counts["forward_backward"]
    return counts


def scm_loss(net, teacher=None, P_mean=IMAGENET512_P["P_mean"], P_std=IMAGENET512_P["P_std"],
             warmup_steps=10000, tangent_c=0.1, jvp=forward_ad_jvp, guidance_range=None):
    """scm_min.SCMLoss with `net`'s log-variance head: sCD with a (frozen) teacher, sCT without.
    Defaults: ImageNet 512's time proposal and the paper's warm-up H = 10k (sCM v2, Sec. 4.2).
    guidance_range (low, high): sCD of a guided teacher (`classifier_free_guidance(teacher_net)`)
    with the scale w ~ U[low, high] drawn per sample and given to student and teacher alike; sCM's
    ImageNet-512 students use (1, 2)."""
    loss = SCMLoss(teacher, P_mean, P_std, warmup_steps, tangent_c, logvar=net.logvar, jvp=jvp)
    return loss if guidance_range is None else ConditionedLoss(loss, guidance_range=guidance_range)


def teacher_loss(net, P_mean=IMAGENET512_TEACHER_P["P_mean"], P_std=IMAGENET512_TEACHER_P["P_std"],
                 label_dropout=0.0):
    """scm_min.TeacherLoss (the TrigFlow diffusion loss) with `net`'s log-variance head.
    label_dropout: the fraction of class labels replaced by "no class" (-1), which teaches the
    unconditional F that classifier-free guidance needs (0.1 for sCM's ImageNet teachers)."""
    loss = TeacherLoss(P_mean, P_std, logvar=net.logvar)
    return loss if not label_dropout else ConditionedLoss(loss, label_dropout=label_dropout)


def drop_labels(class_labels, p, generator=None):
    """class_labels [B] with each replaced by -1 ("no class") with probability p (classifier-free
    guidance's label dropout, Ho & Salimans 2022)."""
    drop = torch.rand(class_labels.shape, generator=generator, device=class_labels.device) < p
    return torch.where(drop, torch.full_like(class_labels, -1), class_labels)


def sample_guidance(n, low=1.0, high=2.0, generator=None, device=None):
    """Guidance scales w ~ U[low, high], one per sample: the guided student's training input."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


class ConditionedLoss:
    """A loss `loss(net, x0, step, **cond)` whose conditioning is changed per sample before the call:
    class labels dropped with probability label_dropout; a guidance scale drawn from
    U[guidance_range] (replacing any given one). Draws from the global RNG, as the losses do.
    Other attributes are the wrapped loss's."""

    def __init__(self, loss, label_dropout=0.0, guidance_range=None):
        self.loss, self.label_dropout, self.guidance_range = loss, label_dropout, guidance_range

    def __getattr__(self, name):
        if name == "loss":   # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.loss, name)

    def __call__(self, net, x0, step, class_labels=None, **cond):
        if self.label_dropout and class_labels is not None:
            class_labels = drop_labels(class_labels, self.label_dropout)
        if self.guidance_range is not None:
            cond["guidance"] = sample_guidance(len(x0), *self.guidance_range, device=x0.device).to(x0.dtype)
        return self.loss(net, x0, step, class_labels=class_labels, **cond)


class TrainStep:
    """One optimizer step: `loss_fn(net, x0, step, **cond)` (per-sample, fp32), mean, backward,
    Adam on the fp32 master weights (betas and eps of sCM's ImageNet runs), then forced weight
    normalization outside any forward or JVP pass."""

    def __init__(self, net, loss_fn, lr=1e-4, betas=(0.9, 0.99), eps=1e-11):
        self.net, self.loss_fn = net, loss_fn
        fused = all(p.is_cuda for p in net.parameters())
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=eps, fused=fused or None)

    def __call__(self, x0, step, **cond):
        """Returns (mean loss, logs of the loss) as tensors; nothing synchronizes with the GPU."""
        loss, logs = self.loss_fn(self.net, x0, step, **cond)
        self.optimizer.zero_grad(set_to_none=True)
        loss = loss.mean()
        loss.backward()
        self.optimizer.step()
        project_weights_(self.net)
        return loss.detach(), logs

#----------------------------------------------------------------------------
# Guidance and sampling (scm_min's samplers with the conditioning bound to the net).

def classifier_free_guidance(net, scale=None):
    """A network F = F_uncond + w (F_cond - F_uncond) (Ho & Salimans 2022) from one batched call of
    `net`; w is the `guidance` argument [B] if given, else `scale`. As an sCD teacher, it receives
    the student's guidance, so a guidance-conditioned student learns each w's guided map."""

    def guided(x, t, class_labels=None, guidance=None):
        w = guidance if guidance is not None else torch.full_like(t, scale)
        uncond = torch.full_like(class_labels, -1) if class_labels is not None else None
        labels = None if class_labels is None else torch.cat([class_labels, uncond])
        F_cond, F_uncond = net(torch.cat([x, x]), torch.cat([t, t]), labels).chunk(2)
        return F_uncond + w.reshape(-1, *([1] * (x.ndim - 1))).to(F_cond.dtype) * (F_cond - F_uncond)

    return guided


def sample_few_step(net, z, n_steps=2, t_mid=1.1, class_labels=None, guidance=None, generator=None):
    """1- or 2-step consistency sampling (sCM v2, Sec. 5.2) from z ~ N(0, SIGMA_D^2 I)."""
    bound = functools.partial(net, class_labels=class_labels, guidance=guidance)
    return sample_consistency(bound, z, consistency_times(n_steps, t_mid), generator)


def sample_teacher_guided(net, z, n_steps, class_labels=None, scale=1.0, solver="heun"):
    """The teacher's PF-ODE (EDM's schedule in TrigFlow time) with classifier-free guidance w = scale."""
    guided = functools.partial(classifier_free_guidance(net, scale), class_labels=class_labels)
    return sample_teacher(guided, z, teacher_times(n_steps), solver)
