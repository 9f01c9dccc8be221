"""The evaluation recipe: one typed config for ``videoar eval fvd | rfvd | real-stats``.

Sections: ``protocol`` (how gFVD is sampled and folded), ``extractor`` (the I3D and its
preprocessing), ``data`` (manifests and decoding), ``recon`` (held-out reconstruction). Every field
of ``protocol`` and ``extractor`` that changes the real statistics is part of their cache key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from videoar_megatron.evaluation.clips import EvalDataConfig
from videoar_megatron.evaluation.i3d import FeatureExtractorConfig
from videoar_megatron.evaluation.protocols import FVDProtocolConfig
from videoar_megatron.evaluation.recon import ReconConfig


@dataclass(kw_only=True)
class EvalConfig:
    """An evaluation run (gFVD, rFVD/PSNR/SSIM)."""

    protocol: FVDProtocolConfig = field(default_factory=FVDProtocolConfig)
    """gFVD protocol: frames, resolution, samples x folds, label source, real set."""
    extractor: FeatureExtractorConfig = field(default_factory=FeatureExtractorConfig)
    """I3D weights and preprocessing."""
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    """Training / held-out manifests and decoding."""
    recon: ReconConfig = field(default_factory=ReconConfig)
    """Tokenizer reconstruction evaluation."""
    cache_dir: str = "eval_cache"
    """Directory of cached real-set statistics (shared by runs; keyed by protocol, data and extractor)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the I3D (and the model under test) run: auto = the local GPU when CUDA is present."""
    progress: bool = True
    """tqdm progress bars on rank 0."""
