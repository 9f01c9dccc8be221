"""One optimizer step of tokenizer training: a window of ``grad_accum_steps`` micro-batches on two engines.

Design decisions:
- **Losses are checked before any backward**, and the verdict is all-reduced, so that all ranks act
  together and the discriminator never steps on a window whose generator loss was bad. A bad window is
  finished with NaN-poisoned backward passes: DeepSpeed's ZeRO optimizer then sees a non-finite gradient
  norm and drops the step on every rank (no update, no LR step, gradients cleared), which keeps its
  micro-step bookkeeping in phase.
- **The step's verdict is the shared numerics guard's** (:mod:`videoar_common.numerics`, as in the AR
  trainer): the trainer hands it this rank's window loss and DeepSpeed's gradient norm (:class:`Window`),
  and checks that the guard and DeepSpeed agree on whether the step was applied.
- The generator's GAN term runs the discriminator with frozen parameters, so the autoencoder's backward
  never produces discriminator gradients; the discriminator sees detached reconstructions.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_prep.clip_dataset import ClipStream
from tokenizer.evaluate import psnr_per_clip
from tokenizer.losses import TokenizerLoss
from tokenizer.train_config import TokenizerTrainConfig
from tokenizer.train_engines import Engines
from videoar_common.distributed import DistContext
from videoar_common.run_logging import get_logger


@dataclass
class Window:
    """What one optimizer step did on this rank."""

    applied: bool
    """DeepSpeed updated the autoencoder (its collective overflow check passed)."""
    loss: float
    """This rank's mean generator loss; NaN when one of its generator or discriminator losses was not finite."""
    grad_norm: float
    """The autoencoder's global gradient norm; inf when DeepSpeed dropped the step on a non-finite norm, 0
    for a window this trainer poisoned (its NaN is ours, the loss already says why)."""
    terms: dict[str, float]
    """Mean loss terms over the micro-batches, plus ``image_step`` and ``clips`` (this rank's clips)."""


class WindowRunner:
    """Forward, loss check, backward and engine steps of one window (see the module docstring)."""

    def __init__(self, cfg: TokenizerTrainConfig, ctx: DistContext, engines: Engines, loss: TokenizerLoss,
                 dtype: torch.dtype):
        self.accum, self.numerics = cfg.grad_accum_steps, cfg.numerics
        self.ctx, self.engines, self.loss, self.dtype = ctx, engines, loss, dtype
        self._injected = False

    def run(self, stream: ClipStream, *, image_step: bool, gan: bool, step: int) -> Window:
        """Collective: one optimizer step over ``grad_accum_steps`` batches of ``stream``."""
        sums: dict[str, float] = defaultdict(float)
        poisoned, locally_bad, clips = False, False, 0
        for _ in range(self.accum):
            batch = stream.next_batch()
            clips += batch.video_BCTHW.shape[0]
            if not poisoned:
                video = batch.video_BCTHW.to(self.ctx.device, self.dtype, non_blocking=True)
                g_loss, d_loss, terms = self._forward(video, gan)
                locally_bad = not self._finite(g_loss, d_loss, step)
                poisoned = self.ctx.any(locally_bad)
            if poisoned:
                self._poison(gan)
                continue
            self._backward_and_step(g_loss, d_loss)
            for k, v in terms.items():
                sums[k] += v.item()
        return self._window(sums, poisoned, locally_bad, image_step, gan, clips, step)

    def _forward(self, video_BCTHW: torch.Tensor, gan: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        recon_BCTHW, commit, entropy = self.engines.ae(video_BCTHW)
        disc = self.engines.disc
        g_loss, terms = self.loss.generator_loss(video_BCTHW, recon_BCTHW, commit, entropy,
                                                 disc.module if gan else None)
        d_loss = None
        if gan:
            d_loss, d_terms = self.loss.discriminator_loss(disc, video_BCTHW, recon_BCTHW)
            terms.update(d_terms)
        terms["psnr"] = psnr_per_clip(video_BCTHW, recon_BCTHW.detach()).mean()
        return g_loss, d_loss, terms

    def _finite(self, g_loss: torch.Tensor, d_loss: torch.Tensor | None, step: int) -> bool:
        """This rank's losses are finite (numerics.inject_nonfinite_* makes them not, once, for drills)."""
        n = self.numerics
        if step == n.inject_nonfinite_step and not self._injected and self.ctx.rank == n.inject_nonfinite_rank:
            self._injected = True
            g_loss.data.fill_(float("nan"))  # the drill: this rank's loss is NaN, the others are fine
        return bool(torch.isfinite(g_loss).item()) and (d_loss is None or bool(torch.isfinite(d_loss).item()))

    def _backward_and_step(self, g_loss: torch.Tensor, d_loss: torch.Tensor | None) -> None:
        ae, disc = self.engines.ae, self.engines.disc
        ae.backward(g_loss)
        ae.step()
        if d_loss is not None:
            disc.backward(d_loss)
            disc.step()

    def _poison(self, gan: bool) -> None:
        """A NaN-gradient backward + step on each training engine: DeepSpeed drops the step at the window's end."""
        for engine in (self.engines.ae, self.engines.disc) if gan else (self.engines.ae,):
            surrogate = sum(p.sum() for p in engine.module.parameters() if p.requires_grad) * float("nan")
            engine.backward(surrogate)
            engine.step()

    def _window(self, sums: dict[str, float], poisoned: bool, locally_bad: bool, image_step: bool, gan: bool,
                clips: int, step: int) -> Window:
        ae, disc = self.engines.ae, self.engines.disc
        applied = ae.was_step_applied()
        if gan and applied and not disc.was_step_applied():
            get_logger().warning("step %d: discriminator step dropped (non-finite gradient norm)", step)
        terms = {k: v / self.accum for k, v in sums.items()}
        terms.update(image_step=float(image_step), clips=float(clips))
        if poisoned:
            norm = 0.0
        elif not applied:
            norm = math.inf
        else:
            norm = float(ae.get_global_grad_norm() or 0.0)
        loss = math.nan if locally_bad else terms.get("g_total", 0.0)
        return Window(applied=applied, loss=loss, grad_norm=norm, terms=terms)


def reduce_terms(terms: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of every term over the ranks (identical on every rank afterwards)."""
    keys = sorted(terms)
    dev = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    vec = torch.tensor([terms[k] for k in keys], dtype=torch.float64, device=dev)
    if ctx.world_size > 1:
        dist.all_reduce(vec)
        vec /= ctx.world_size
    return dict(zip(keys, vec.tolist()))
