"""Sequence builder: one sample's latent/bits + condition → teacher-forced VideoAR inputs and targets.

Layout (see :mod:`videoar_megatron.model.layout`)::

    [ prefix |Ψ| | frame 0: scale 0 … K-1 | frame 1: scale 0 … K-1 | … | pads ]

Inputs of the N = T·L video tokens (Eq. 6), with F^t_k the accumulated (upsampled, summed) codes of
scales 0..k of frame t, each frame's pyramid starting from zero (temporal-independent BSQ):

- frame 0, scale 0: the learned ``<SOS>`` embedding (flagged by ``LayoutTables``; features are 0 here);
- frame t > 0, scale 0: ``scale_input(F^{t-1}_{K-1}, 0)``, the previous frame's final accumulation
  downsampled to scale 0's grid;
- scale k > 0: ``scale_input(F^t_{k-1}, k)``.

Targets are the bits of (t, k). With cross-frame error correction (training) the accumulations come
from the flipped bits and the targets are re-quantized against them (:mod:`.correction`); otherwise
they are the clean bits (the stored ones when given, else quantized from the latent).

Design decision: everything random about a training sample (flip ratios and flips, the Random Frame
Mask table, condition dropout) is drawn here from an explicit ``torch.Generator``, never inside the
model forward: tensor- and pipeline-parallel ranks of a replica build the same batch from the same
seed, and a resumed run replays it. A list of generators, one per sample, gives each sample its own
stream while the batch is built in one pass (:mod:`.rng`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tokenizer.quantizer import MultiScaleBSQ
from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.correction import corrupt_and_requantize, draw_flip_ratios
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.mask import draw_frame_visibility
from videoar_megatron.model.rng import Generators, rand_rows


@dataclass
class VideoARBatch:
    """Everything one forward needs; every tensor has the batch first."""

    layout: TokenLayout
    """Shape of the sequence (shared by all samples)."""
    inputs_BNd: torch.Tensor
    """Input features (Eq. 6) of the N video tokens, float; zeros at ``<SOS>`` tokens."""
    targets_BNd: torch.Tensor | None
    """Target bits of the video tokens, bool (None at inference)."""
    frame_visible_BTT: torch.Tensor
    """Earlier frames in each query frame's context (Random Frame Mask draw), bool."""
    text_len_B: torch.Tensor
    """Valid prefix length per sample (padded caption keys are masked), long."""
    cond_drop_B: torch.Tensor
    """True: use the learned null condition (condition dropout / unconditional CFG branch)."""
    class_B: torch.Tensor | None = None
    """Class labels (condition kind 'class')."""
    text_ids_BP: torch.Tensor | None = None
    """Caption token ids padded to |Ψ| (kind 'text_tokens')."""
    text_feat_BPD: torch.Tensor | None = None
    """Precomputed text-encoder features padded to |Ψ| (kind 'text_features')."""
    flip_p_BTK: torch.Tensor | None = None
    """Flip ratios drawn by the error correction (for logging and tests)."""

    @property
    def batch_size(self) -> int:
        return self.inputs_BNd.shape[0]

    def unconditional(self) -> "VideoARBatch":
        """The same batch with every sample's condition replaced by the learned null condition:
        the unconditional branch of classifier-free guidance."""
        return replace(self, cond_drop_B=torch.ones_like(self.cond_drop_B))

    def to(self, device: torch.device | str) -> "VideoARBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()}
        return replace(self, **moved)


def concat_batches(parts: list[VideoARBatch]) -> VideoARBatch:
    """Concatenate batches of one layout along the batch dimension."""
    layouts = {p.layout for p in parts}
    if len(layouts) != 1:
        raise ValueError(f"cannot batch samples of different layouts: {sorted(map(str, layouts))}")
    merged = {}
    for f in fields(VideoARBatch):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "layout":
            merged[f.name] = values[0]
        elif values[0] is None:
            merged[f.name] = None
        else:
            merged[f.name] = torch.cat(values, dim=0)
    return VideoARBatch(**merged)


# --- condition --------------------------------------------------------------------------------

def _condition_fields(cfg: ModelConfig, B: int, cond, text_len_B, device) -> dict:
    kind, P = cfg.condition.kind, cfg.prefix_len
    out = {"text_len_B": torch.full((B,), P, dtype=torch.long, device=device)}
    if kind == "none":
        return out
    if cond is None:
        raise ValueError(f"condition.kind={kind} needs a condition for every sample")
    if kind == "class":
        out["class_B"] = torch.as_tensor(cond, dtype=torch.long, device=device).reshape(B)
        if out["class_B"].min() < 0 or out["class_B"].max() >= cfg.condition.num_classes:
            raise ValueError(f"class labels must be in [0, condition.num_classes={cfg.condition.num_classes})")
        return out
    if cond.shape[1] != P:
        raise ValueError(f"captions must be padded to condition.text_len={P}, got length {cond.shape[1]}")
    key = "text_ids_BP" if kind == "text_tokens" else "text_feat_BPD"
    out[key] = cond.to(device)
    if text_len_B is not None:
        lengths = torch.as_tensor(text_len_B, dtype=torch.long, device=device).reshape(B)
        if lengths.min() < 1 or lengths.max() > P:
            raise ValueError(f"caption lengths must be in [1, condition.text_len={P}], got {lengths.tolist()}")
        out["text_len_B"] = lengths
    return out


def _draw_cond_drop(B: int, p: float, generator: Generators, device) -> torch.Tensor:
    if p <= 0:
        return torch.zeros(B, dtype=torch.bool, device=device)
    return (rand_rows((B,), generator) < p).to(device)


# --- video ------------------------------------------------------------------------------------

def _fold_frames(latent_BdTHW: torch.Tensor) -> torch.Tensor:
    """``(B, d, T, H, W)`` → ``(B·T, d, H, W)``, frames of a sample adjacent."""
    B, d, T, H, W = latent_BdTHW.shape
    return latent_BdTHW.permute(0, 2, 1, 3, 4).reshape(B * T, d, H, W)


def scale_inputs(quantizer: MultiScaleBSQ, accum_NdHW: list[torch.Tensor], B: int, T: int) -> torch.Tensor:
    """Eq. 6 inputs of every video token ``(B, T·L, d)`` from per-scale accumulations of B·T frames."""
    K, d = len(quantizer.scales), quantizer.dim
    per_scale = []
    for k in range(K):
        if k > 0:
            x = quantizer.scale_input(accum_NdHW[k - 1], k)
        else:  # previous frame's final accumulation; frame 0 is <SOS> (zeros here)
            last = accum_NdHW[-1].reshape(B, T, *accum_NdHW[-1].shape[1:])
            prev = torch.cat([torch.zeros_like(last[:, :1]), last[:, :-1]], dim=1)
            x = quantizer.scale_input(prev.reshape(B * T, *prev.shape[2:]), 0)
        per_scale.append(x.flatten(2).transpose(1, 2))  # (B·T, h·w, d), row-major
    return torch.cat(per_scale, dim=1).reshape(B, T * quantizer.tokens_per_frame, d)


def _clean_bits(quantizer: MultiScaleBSQ, latent_NdHW, bits_BTLd, B: int, T: int) -> list[torch.Tensor]:
    if bits_BTLd is not None:
        if bits_BTLd.shape[:2] != (B, T) or bits_BTLd.shape[2] != quantizer.tokens_per_frame:
            raise ValueError(f"bits must be (B={B}, T={T}, L={quantizer.tokens_per_frame}, d), "
                             f"got {tuple(bits_BTLd.shape)}")
        return quantizer.unflatten_bits(bits_BTLd.reshape(B * T, *bits_BTLd.shape[2:]).bool())
    if latent_NdHW is None:
        raise ValueError("need the latent or the bits of every sample")
    return quantizer.latent_to_bits(latent_NdHW)


def video_tokens(quantizer: MultiScaleBSQ, cfg: ModelConfig, *, latent_BdTHW=None, bits_BTLd=None,
                 correct: bool, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs_BNd, targets_BNd, flip_p_BTK) of the video tokens; error correction when ``correct``."""
    ref = latent_BdTHW if latent_BdTHW is not None else bits_BTLd
    if ref is None:
        raise ValueError("need the latent or the bits of every sample")
    B, T = (ref.shape[0], ref.shape[2]) if latent_BdTHW is not None else ref.shape[:2]
    latent_NdHW = _fold_frames(latent_BdTHW) if latent_BdTHW is not None else None
    flip_p = None
    if correct:
        if latent_NdHW is None:
            raise ValueError("cross-frame error correction re-quantizes the latent: the batch needs "
                             "the continuous latent, not only bits (or set correction.p_max: 0)")
        flip_p = draw_flip_ratios(B, T, len(quantizer.scales), cfg.correction, generator)
        out = corrupt_and_requantize(quantizer, latent_NdHW, flip_p.reshape(B * T, -1), generator)
        targets, accum = out.target_bits, out.accum_NdHW
    else:
        targets = _clean_bits(quantizer, latent_NdHW, bits_BTLd, B, T)
        accum = quantizer.accumulate(targets)
    inputs = scale_inputs(quantizer, accum, B, T)
    targets_BNd = quantizer.flatten_bits(targets).reshape(B, -1, quantizer.dim)
    return inputs, targets_BNd, flip_p


def build_batch(quantizer: MultiScaleBSQ, cfg: ModelConfig, *, latent_BdTHW: torch.Tensor | None = None,
                bits_BTLd: torch.Tensor | None = None, cond=None, text_len_B=None, training: bool,
                generator: Generators = None, pad_to_multiple: int = 1) -> VideoARBatch:
    """Teacher-forced batch from latents ``(B, d, T, H, W)`` and/or packed bits ``(B, T, L, d)``.

    ``training`` switches on the random parts (error correction, frame-mask drops, condition
    dropout), all drawn from ``generator``: one for the batch, or a sequence of one per sample (each
    sample is then exactly what a one-sample build from its generator gives). ``pad_to_multiple`` is
    combined with ``cfg.pad_to_multiple`` (sequence parallelism needs a multiple of the TP size).
    """
    ref = latent_BdTHW if latent_BdTHW is not None else bits_BTLd
    if generator is not None and not isinstance(generator, torch.Generator) and ref is not None \
            and len(generator) != ref.shape[0]:
        raise ValueError(f"{len(generator)} per-sample generators for a batch of {ref.shape[0]} samples")
    if quantizer.dim != cfg.latent_dim:
        raise ValueError(f"latent_dim={cfg.latent_dim} but the tokenizer has {quantizer.dim} bits per token")
    if len(quantizer.scales) > cfg.max_scales:
        raise ValueError(f"the scale schedule has {len(quantizer.scales)} scales > max_scales={cfg.max_scales}")
    correct = training and cfg.correction.enabled
    inputs, targets, flip_p = video_tokens(quantizer, cfg, latent_BdTHW=latent_BdTHW, bits_BTLd=bits_BTLd,
                                           correct=correct, generator=generator)
    B, device = inputs.shape[0], inputs.device
    T = inputs.shape[1] // quantizer.tokens_per_frame
    multiple = cfg.pad_to_multiple * pad_to_multiple
    layout = TokenLayout.padded(cfg.prefix_len, quantizer.scales, T, multiple)
    p_mask = cfg.mask.rfm_p_mask if training else 0.0
    frame_visible = draw_frame_visibility(B, T, window=cfg.mask.rfm_window, p_mask=p_mask,
                                          anchor_first=cfg.mask.rfm_anchor_first, generator=generator,
                                          device=device)
    drop = _draw_cond_drop(B, cfg.condition.dropout if training and cfg.condition.kind != "none" else 0.0,
                           generator, device)
    return VideoARBatch(layout=layout, inputs_BNd=inputs, targets_BNd=targets, frame_visible_BTT=frame_visible,
                        cond_drop_B=drop, flip_p_BTK=flip_p,
                        **_condition_fields(cfg, B, cond, text_len_B, device))
