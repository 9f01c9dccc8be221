"""Frozen text encoder for precomputed caption features (loaded from a local path only).

Design decision: the AR trainer never runs the text encoder; pre-tokenization stores its last hidden
states per sample, padded to a fixed ``max_length`` (so every sample has the same shape and batches
stack) with a mask of real tokens. The encoder is identified in the shard manifest by a content hash
of its directory, so shards made with another encoder are refused like another tokenizer's.

Any Hugging Face model saved with ``save_pretrained`` works: an encoder-only model (T5EncoderModel,
CLIPTextModel, BERT, ...) or an encoder-decoder (its encoder is used). Nothing is downloaded:
``local_files_only=True``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


@dataclass(kw_only=True)
class TextEncoderConfig:
    """Optional frozen text encoder whose caption features are stored in every sample."""

    path: str = ""
    """Local directory of a Hugging Face text encoder and its tokenizer (save_pretrained layout);
    empty = no text features."""
    max_length: int = 64
    """Captions are truncated / padded to this many tokens (the stored feature length L_txt)."""

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"text_encoder.max_length must be >= 1, got {self.max_length}")


def directory_hash(directory: str | Path) -> str:
    """sha256 over the names and bytes of every (non-hidden) file under ``directory``, sorted."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


class FrozenTextEncoder:
    """Captions → (features float16 ``(B, L_txt, D_txt)``, mask uint8 ``(B, L_txt)``)."""

    def __init__(self, cfg: TextEncoderConfig, device: torch.device):
        from transformers import AutoModel, AutoTokenizer
        path = Path(cfg.path)
        if not path.is_dir():
            raise FileNotFoundError(f"text_encoder.path: directory not found: {path}")
        self.cfg, self.device = cfg, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.content_hash = directory_hash(path)
        self.feature_dim = int(getattr(model.config, "d_model", 0) or model.config.hidden_size)

    @property
    def feature_shape(self) -> tuple[int, int]:
        return (self.cfg.max_length, self.feature_dim)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)
        mask = tok["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # padding positions are exact zeros
        return (hidden.to("cpu", torch.float16).numpy(), mask.to("cpu", torch.uint8).numpy())
