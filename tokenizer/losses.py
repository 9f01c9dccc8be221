"""Tokenizer training losses (VideoAR Eq. 4), applied per frame:

    L = λ_rec L_rec + λ_perc L_perc + λ_GAN L_GAN + λ_commit L_commit + λ_entropy L_entropy

plus, for the discriminator, the hinge loss with LeCAM regularisation (MAGVIT-v2's recipe).

Design decisions:
- Weights never come from the network: the perceptual loss loads VGG16 weights (torchvision layout)
  and, when ``loss.perceptual_lin_path`` names them, LPIPS's learned linear heads from local paths
  named in the recipe; a missing file is an error naming the recipe key. With both files it is LPIPS
  (Zhang et al. 2018, the lpips package's ``LPIPS(net='vgg')``); with the VGG file only, LPIPS's own
  baseline variant (``lpips=False``: equal weights over channels and layers). It is off by default
  (``loss.perceptual_weight: 0``). What runs in each case: docs/tokenizer.md#perceptual-loss.
- The GAN terms start at ``loss.disc_start_step``; before that the discriminator is not even run.
- The generator's GAN term goes through the discriminator with its parameters frozen, so the
  autoencoder's backward never touches the discriminator engine's gradients (with ZeRO-2 a stray
  gradient would be reduced into the wrong engine's buckets).
- LeCAM keeps EMAs of the mean real/fake logits. The means are all-reduced before the update so that
  every rank holds the same EMA (it is checkpointed, and resume must be exact).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from videoar_common.run_logging import get_logger


# Indices into torchvision's vgg16().features after which LPIPS taps the activations
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_TAPS = (3, 8, 15, 22, 29)
VGG16_CHANNELS = (64, 128, 256, 512, 512)
VGG16_FILE_HINT = "torchvision's vgg16 ImageNet state dict, e.g. vgg16-397923af.pth"
LPIPS_FILE_HINT = "the lpips package's weights/v0.1/vgg.pth (keys lin0.model.1.weight ... lin4)"
# On [0, 1] pixels; on [-1, 1] this is LPIPS's ScalingLayer (shift 2·mean - 1, scale 2·std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(kw_only=True)
class TokenizerLossConfig:
    """Weights and schedule of the tokenizer losses (Eq. 4); the paper gives no λ values, the
    defaults follow MAGVIT-v2 / Open-MAGVIT2."""

    rec: Literal["l1", "l2"] = "l1"
    """Pixel reconstruction loss: mean absolute (l1) or squared (l2) error."""
    rec_weight: float = 1.0
    """λ_rec."""
    perceptual_weight: float = 0.0
    """λ_perc; 0 turns the perceptual loss off (default). > 0 needs loss.perceptual_vgg_path."""
    perceptual_vgg_path: str = ""
    """Local VGG16 weights (torchvision ``vgg16`` state dict, .pth or .safetensors). Never downloaded."""
    perceptual_lin_path: str = ""
    """LPIPS linear-head weights, a local file (the lpips package's ``weights/v0.1/vgg.pth``, or
    taming-transformers' ``vgg.pth``): with it the perceptual loss is LPIPS; empty = LPIPS's baseline
    variant (channel-normalised VGG features, equal weights). Never downloaded."""
    commit_weight: float = 0.25
    """λ_commit on the mean over scales of mse(z, code): pulls the encoder output towards its binary
    codes (Infinity's commitment_loss_weight 0.25)."""
    entropy_weight: float = 0.1
    """λ_entropy on the mean over scales of (per-token bit entropy - codebook bit entropy) / tau, tau =
    model.entropy_inv_temperature: Infinity's BSQ convention and default weight 0.1, i.e. 0.001 on the
    raw entropy difference at tau = 100 (formula and source: docs/tokenizer.md#quantizer-losses)."""
    gan_weight: float = 0.1
    """λ_GAN of the generator's hinge loss (0 disables the GAN and the discriminator)."""
    disc_start_step: int = 2000
    """Optimizer step at which the discriminator starts training and the GAN term switches on."""
    lecam_weight: float = 0.001
    """LeCAM regularisation weight for the discriminator (0 = off)."""
    lecam_decay: float = 0.999
    """EMA decay of the real/fake logit means used by LeCAM."""

    def __post_init__(self) -> None:
        for name in ("rec_weight", "perceptual_weight", "commit_weight", "entropy_weight", "gan_weight",
                     "lecam_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.perceptual_weight > 0 and not self.perceptual_vgg_path:
            raise ValueError(f"loss.perceptual_weight={self.perceptual_weight} needs loss.perceptual_vgg_path: "
                             f"a local file with {VGG16_FILE_HINT} (weights are never downloaded)")
        if self.disc_start_step < 0:
            raise ValueError(f"loss.disc_start_step must be >= 0, got {self.disc_start_step}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"loss.lecam_decay must be in [0, 1), got {self.lecam_decay}")


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights only; common wrappers unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


class VGGPerceptualLoss(nn.Module):
    """LPIPS on frozen VGG16 features, per frame (mean over frames and clips); weights from local files.

    Per frame: taps after relu1_2 ... relu5_3, each unit-normalised over channels, squared difference,
    weighted over channels by the layer's linear head (all ones without a head file), averaged over
    space, summed over the five layers.
    """

    def __init__(self, vgg_path: str, lin_path: str = "", *, key: str = "loss.perceptual_vgg_path"):
        super().__init__()
        from torchvision.models import vgg16
        path = Path(vgg_path)
        if not path.is_file():
            raise FileNotFoundError(f"{key}: {path} not found; expected {VGG16_FILE_HINT}. "
                                    "Weights are never downloaded: copy the file there, or set "
                                    "loss.perceptual_weight: 0 to turn the perceptual loss off")
        features = vgg16(weights=None).features[:VGG16_TAPS[-1] + 1]
        state = {k.removeprefix("features."): v for k, v in load_state_file(path).items()
                 if k.startswith("features.")}
        missing, unexpected = features.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{key}: {path} is not a torchvision vgg16 state dict "
                             f"(missing {['features.' + k for k in missing[:4]]})")
        self.features = features.eval().requires_grad_(False)
        self.lins = self._load_lins(lin_path)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def variant(self) -> str:
        return "lpips" if self.lins is not None else "lpips-baseline (no linear heads)"

    @staticmethod
    def _load_lins(lin_path: str) -> list[torch.Tensor] | None:
        if not lin_path:
            return None
        path = Path(lin_path)
        if not path.is_file():
            raise FileNotFoundError(f"loss.perceptual_lin_path: {path} not found; expected {LPIPS_FILE_HINT}. "
                                    "Weights are never downloaded: copy the file there, or set "
                                    "loss.perceptual_lin_path to '' for LPIPS's baseline without heads")
        state = load_state_file(path)
        lins = []
        for i, ch in enumerate(VGG16_CHANNELS):
            # lin{i}.model = [Dropout, Conv2d(ch, 1, 1)] in the released files; [Conv2d] without dropout
            w = state.get(f"lin{i}.model.1.weight", state.get(f"lin{i}.model.0.weight"))
            if w is None or w.numel() != ch:
                raise ValueError(f"loss.perceptual_lin_path: {path} lacks lin{i}.model.1.weight of {ch} "
                                 f"channels; expected {LPIPS_FILE_HINT}")
            lins.append(w.reshape(ch).float())
        return lins

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)

    def _taps(self, x_NCHW: torch.Tensor) -> list[torch.Tensor]:
        x = ((x_NCHW + 1) / 2 - self.mean.to(x_NCHW.dtype)) / self.std.to(x_NCHW.dtype)
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                out.append(x)
        return out

    def forward(self, recon_BCTHW: torch.Tensor, video_BCTHW: torch.Tensor) -> torch.Tensor:
        fold = lambda v: v.transpose(1, 2).flatten(0, 1)  # (B,C,T,H,W) → (B·T,C,H,W)
        feats_r, feats_v = self._taps(fold(recon_BCTHW)), self._taps(fold(video_BCTHW))
        total = recon_BCTHW.new_zeros((), dtype=torch.float32)
        for i, (fr, fv) in enumerate(zip(feats_r, feats_v)):
            diff = (F.normalize(fr.float(), dim=1, eps=1e-10) - F.normalize(fv.float(), dim=1, eps=1e-10)) ** 2
            if self.lins is None:
                per_layer = diff.sum(dim=1).mean()
            else:
                per_layer = (diff * self.lins[i].to(diff.device).view(1, -1, 1, 1)).sum(dim=1).mean()
            total = total + per_layer
        return total


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


class LeCAM:
    """EMA of the mean real/fake logits and the LeCAM penalty (Tseng et al. 2021)."""

    def __init__(self, decay: float):
        self.decay = decay
        self.ema_real = 0.0
        self.ema_fake = 0.0

    def penalty(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())

    def update(self, mean_real: float, mean_fake: float) -> None:
        """Update with logit means that are already averaged over ranks (identical on all ranks)."""
        self.ema_real = self.decay * self.ema_real + (1 - self.decay) * mean_real
        self.ema_fake = self.decay * self.ema_fake + (1 - self.decay) * mean_fake

    def state_dict(self) -> dict:
        return {"ema_real": self.ema_real, "ema_fake": self.ema_fake, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.ema_real, self.ema_fake = float(state["ema_real"]), float(state["ema_fake"])


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` do not require grad inside the block (restored afterwards)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class TokenizerLoss(nn.Module):
    """Generator (autoencoder) and discriminator objectives. Terms are returned detached for logging."""

    def __init__(self, cfg: TokenizerLossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = (VGGPerceptualLoss(cfg.perceptual_vgg_path, cfg.perceptual_lin_path)
                           if cfg.perceptual_weight > 0 else None)
        if self.perceptual is not None:
            heads = f", heads {cfg.perceptual_lin_path}" if cfg.perceptual_lin_path else ""
            get_logger().info("perceptual loss: %s (VGG16 %s%s)", self.perceptual.variant,
                              cfg.perceptual_vgg_path, heads)
        self.lecam = LeCAM(cfg.lecam_decay)

    def gan_active(self, step: int) -> bool:
        return self.cfg.gan_weight > 0 and step >= self.cfg.disc_start_step

    def reconstruction(self, recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        diff = recon.float() - video.float()
        return diff.abs().mean() if self.cfg.rec == "l1" else diff.pow(2).mean()

    def generator_loss(self, video_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor, commitment: torch.Tensor,
                       entropy: torch.Tensor, disc: nn.Module | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 4 for the autoencoder (commitment and entropy terms from the quantizer output);
        ``disc=None`` before the GAN starts."""
        c = self.cfg
        rec = self.reconstruction(recon_BCTHW, video_BCTHW)
        nll = c.rec_weight * rec
        terms = {"rec": rec}
        if self.perceptual is not None:
            perc = self.perceptual(recon_BCTHW, video_BCTHW)
            nll = nll + c.perceptual_weight * perc
            terms["perceptual"] = perc
        total = nll + c.commit_weight * commitment + c.entropy_weight * entropy
        terms.update(commit=commitment, entropy=entropy)
        if disc is not None:
            with frozen(disc):
                g = hinge_g_loss(disc(recon_BCTHW).float())
            total = total + c.gan_weight * g
            terms["gan_g"] = g
        terms["g_total"] = total
        return total, {k: v.detach().float() for k, v in terms.items()}

    def discriminator_loss(self, disc: nn.Module, video_BCTHW: torch.Tensor, recon_BCTHW: torch.Tensor
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss on real vs (detached) reconstructions, plus LeCAM; one forward for both."""
        logits = disc(torch.cat([video_BCTHW, recon_BCTHW.detach()], dim=0)).float()
        real, fake = logits.chunk(2, dim=0)
        hinge = hinge_d_loss(real, fake)
        total = hinge
        terms = {"d_hinge": hinge, "logits_real": real.mean(), "logits_fake": fake.mean()}
        if self.cfg.lecam_weight > 0:
            lecam = self.lecam.penalty(real, fake)
            total = total + self.cfg.lecam_weight * lecam
            terms["lecam"] = lecam
        terms["d_total"] = total
        return total, {k: v.detach().float() for k, v in terms.items()}
