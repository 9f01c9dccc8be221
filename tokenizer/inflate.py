"""Inflation: initialise the causal 3-D tokenizer from a 2-D image tokenizer (MAGVIT-v2, VideoAR supp. A).

Rule: each 2-D kernel ``(o, i, kh, kw)`` goes into the temporally-last slice ``[:, :, -1]`` of its
causal 3-D kernel ``(o, i, kt, kh, kw)``; the earlier slices are zero. Norms and biases are copied.
Layers with no 2-D counterpart (temporal down/upsampling) keep their init, which is the identity on
the newest frame. With causal padding that replicates the first frame, a single frame then passes
through the inflated model exactly as through the 2-D model. The discriminator is never inflated.

A 2-D key that has no 3-D counterpart, or whose shape does not fit, is an error (the image checkpoint
does not match the recipe's architecture): silently dropping weights would look like a working init.

:func:`reinflate` applies the same rule to a 3-D tokenizer trained on images (single frames): each
kernel's temporal taps are folded into the last slice. Measured on the synthetic corpus (32x32, 9
frames, tau = 4): training on videos from scratch stayed at ~18-19 dB for 1,000+ steps (causal
replicate padding in every layer makes frame 0 dominate every latent at init), while 400 image steps,
reinflation and 300 video steps reached ~25 dB.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenizer.losses import load_state_file
from videoar_common.exit_codes import InputError


class InflationError(InputError, ValueError):
    """The 2-D state dict does not fit the 3-D model; the message lists the offending keys."""


@dataclass
class InflationReport:
    inflated: list[str] = field(default_factory=list)
    """Conv kernels placed into the temporally-last slice."""
    copied: list[str] = field(default_factory=list)
    """Tensors copied as they are (norms, biases)."""
    left_at_init: list[str] = field(default_factory=list)
    """3-D keys with no 2-D counterpart (temporal-only layers)."""

    @property
    def mapped(self) -> list[str]:
        return self.inflated + self.copied

    def summary(self) -> str:
        return (f"inflated {len(self.inflated)} conv kernels, copied {len(self.copied)} tensors, "
                f"left {len(self.left_at_init)} at init: {self.left_at_init}")

    def to_dict(self) -> dict:
        return {**asdict(self), "num_mapped": len(self.mapped), "num_left_at_init": len(self.left_at_init)}


def inflate_kernel(w2d: torch.Tensor, like3d: torch.Tensor) -> torch.Tensor:
    """``(o, i, kh, kw)`` → ``(o, i, kt, kh, kw)`` with the kernel in the last temporal slice."""
    out = torch.zeros_like(like3d)
    out[:, :, -1] = w2d.to(like3d.dtype)
    return out


def inflate_from_2d(model3d: nn.Module, state2d: dict[str, torch.Tensor]) -> InflationReport:
    """Load ``state2d`` into ``model3d`` by inflation (in place); returns which keys went where."""
    target = model3d.state_dict()
    merged = dict(target)
    report = InflationReport()
    unexpected, mismatched = [], []
    for key, w in state2d.items():
        if key not in target:
            unexpected.append(key)
            continue
        t = target[key]
        if w.dim() == 4 and t.dim() == 5 and tuple(w.shape) == (t.shape[0], t.shape[1], *t.shape[3:]):
            merged[key] = inflate_kernel(w, t)
            report.inflated.append(key)
        elif tuple(w.shape) == tuple(t.shape):
            merged[key] = w.to(t.dtype).clone()
            report.copied.append(key)
        else:
            mismatched.append(f"{key}: 2-D {tuple(w.shape)} vs 3-D {tuple(t.shape)}")
    if unexpected or mismatched:
        raise InflationError(f"the image tokenizer does not match the video tokenizer's architecture "
                             f"(model section of the recipe): {len(unexpected)} unknown keys {unexpected[:5]}, "
                             f"{len(mismatched)} shape mismatches {mismatched[:5]}")
    report.left_at_init = [k for k in target if k not in state2d]
    model3d.load_state_dict(merged)
    return report


def inflate_from_file(model3d: nn.Module, path: str | Path) -> InflationReport:
    """Inflate from a 2-D state dict file (.safetensors, .pt/.pth; ``state_dict``/``model`` wrappers ok)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image tokenizer checkpoint not found: {path}")
    state = load_state_file(path)
    # Quantizer is parameter-free; tolerate a common 'module.' prefix from DDP-wrapped saves.
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return inflate_from_2d(model3d, state)


def _causal_convs(model3d: nn.Module):
    from tokenizer.model import CausalConv3d
    for name, module in model3d.named_modules():
        if isinstance(module, CausalConv3d) and module.kt > 1:
            yield name, module


def deflate_to_2d(model3d: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the 2-D twin (``tokenizer.image2d``) that computes what ``model3d`` computes on a
    single frame: causal padding replicates the frame into every temporal tap, so the 2-D kernel is the
    sum of the taps. Temporal-only layers are dropped (they have no 2-D counterpart)."""
    state = {}
    for key, value in model3d.state_dict().items():
        if ".temporal." in key:
            continue
        state[key] = value.sum(dim=2) if value.dim() == 5 else value.clone()
    return state


@torch.no_grad()
def reinflate(model3d: nn.Module) -> InflationReport:
    """Fold every causal kernel's temporal taps into its last slice (in place).

    For a tokenizer trained on images only this is the paper's inflation applied to itself: outputs on
    a single frame are unchanged (the taps of a single frame are summed either way), and at the start
    of video training every frame is processed on its own (temporal layers pick the newest frame), so
    the spatial features are not smeared over time by taps that images never constrained.
    """
    report = InflationReport()
    for name, module in _causal_convs(model3d):
        w = module.conv.weight
        w[:, :, -1] = w.sum(dim=2)
        w[:, :, :-1] = 0
        report.inflated.append(f"{name}.conv.weight")
    return report
