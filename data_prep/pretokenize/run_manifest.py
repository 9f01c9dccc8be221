"""``manifest.json`` of a shard set: everything that fixes the bytes of the shards, and nothing
run-specific. The first worker creates it; every other worker and every rerun compares the fields of
``data_prep.shards.RERUN_FIELDS`` against it (``shards.ensure_run_manifest``) and refuses another
tokenizer, schedule, resolution, input manifest, ... naming the field.

The inputs are identified by content: the tokenizer's content hash and the input manifest's SHA-256.
The code version (the installed package's version, or "source" for a checkout) is recorded only.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from data_prep import shards
from data_prep.pretokenize.config import PretokenizeConfig
from data_prep.pretokenize.encoder import ClipEncoder


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("videoar-megatron")
    except PackageNotFoundError:
        return "source"


def build_run_manifest(cfg: PretokenizeConfig, enc: ClipEncoder, *, num_partitions: int,
                       decode_device: str) -> dict:
    """``manifest.json``: everything that fixes the bytes of the shards, and nothing run-specific."""
    text = None
    if enc.text is not None:
        text = {"hash": enc.text.content_hash, "max_length": cfg.text_encoder.max_length,
                "feature_dim": enc.text.feature_dim}
    c = cfg.clips
    return {
        "format_version": shards.FORMAT_VERSION, "code_version": code_version(),
        "tokenizer_hash": enc.tokenizer.content_hash, "scale_schedule": enc.schedule,
        "latent_dim": enc.latent_dim, "tokens_per_frame": enc.quantizer.tokens_per_frame,
        "resolution": [c.height, c.width], "num_frames": c.num_frames, "frame_stride": c.frame_stride,
        "target_fps": c.target_fps, "fps": c.target_fps or None, "clips_per_video": c.clips_per_video,
        "latent_frames": enc.latent_frames, "latent_hw": list(enc.latent_hw),
        "latent_dtype": cfg.latent_dtype, "shapes": enc.shapes(),
        "dtypes": shards.manifest_dtypes(cfg.latent_dtype, enc.text is not None),
        "columns": shards.mds_columns(enc.text is not None), "compression": cfg.compression or None,
        "shard_size_limit": cfg.shard_size_limit, "text_encoder": text,
        "input_manifest_sha256": file_sha256(cfg.input_manifest), "num_partitions": num_partitions,
        "decode_device": decode_device, "decoder": cfg.decoder, "encode_dtype": enc.encode_dtype,
    }
