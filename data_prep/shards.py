"""Token shard format: columns, bit packing, the run manifest, partition layout and merging.

One module owns every byte layout decision so the writer (pre-tokenization) and the reader (AR
trainer) cannot drift apart; ``docs/shard_format.md`` is the prose version of this file.

Layout of an output directory::

    manifest.json                 run manifest, written before the first shard (see build_manifest)
    part-00000-of-00004/          one committed partition: MDS shards, index.json, rejects.jsonl, COMMITTED
    .tmp-part-00001-of-00004/     a partition being written (removed and redone by a rerun)
    index.json                    merged MDS index over all partitions (written by merge_partitions)
    rejects.jsonl                 merged rejects, partition order
    COMMITTED                     written last by the merge: the shard set is complete
    logs/                         per-partition timings (not part of the byte-identical output)

Design decision: the continuous latent is stored next to the bits (so the AR trainer can requantize
for self-correction and a new scale schedule needs no re-tokenization), and the bits are computed
from the latent *as stored* (after rounding to the storage dtype), so ``latent_to_bits(latent) ==
bits`` holds exactly for what the reader returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from videoar_common.atomic import (atomic_write_json, atomic_write_text, is_committed,
                                            mark_committed)
from videoar_common.exit_codes import InputError

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.json"
REJECTS_FILE = "rejects.jsonl"
LOG_DIR = "logs"
LATENT_DTYPES = ("float32", "float16", "bfloat16")
BITS_LAYOUT = "uint8, np.packbits along d (bitorder big), shape (T, L, ceil(d/8))"

# Manifest fields a rerun must agree with (the AR trainer checks its own subset of them).
# Checked in this order, so the root cause is named (a new resolution also changes the schedule).
RERUN_FIELDS = ("format_version", "tokenizer_hash", "latent_dim", "resolution", "num_frames",
                "frame_stride", "target_fps", "clips_per_video", "scale_schedule", "latent_dtype",
                "compression", "shard_size_limit", "text_encoder", "input_manifest_sha256",
                "num_partitions", "decode_device", "encode_dtype")

_PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})$")


class ShardManifestMismatch(InputError, ValueError):
    """Shards were made with other settings than expected; the message names the field."""


class ShardsIncomplete(InputError, RuntimeError):
    """The shard directory is not (yet) a complete, merged shard set."""


class ShardContentError(InputError, ValueError):
    """A sample cannot be used as the run is configured (e.g. no class label for a class-conditional
    model); the message names the sample and the knob."""


# ----------------------------------------------------------------------------------------------
# Per-sample encoding
# ----------------------------------------------------------------------------------------------

def mds_columns(with_text: bool) -> dict[str, str]:
    """MDS column encodings of a sample."""
    cols = {"latent": "ndarray", "bits": "ndarray", "label": "int64", "caption": "str",
            "sample_id": "str", "source": "str", "clip_start": "int64", "clip_stride": "int64"}
    if with_text:
        cols.update({"text_features": "ndarray", "text_mask": "ndarray"})
    return cols


def sample_id(source: str, clip_start: int) -> str:
    """Stable id of a clip: sha256 of the source path (as recorded) and the clip's first frame."""
    return hashlib.sha256(json.dumps([source, int(clip_start)]).encode()).hexdigest()


def round_latent(latent: torch.Tensor, dtype: str) -> torch.Tensor:
    """The latent as it will be stored, back in float32 (bits are computed from this)."""
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}, got {dtype!r}")
    return latent.to(getattr(torch, dtype)).float()


def latent_to_storage(latent: torch.Tensor, dtype: str) -> np.ndarray:
    """Latent (any float dtype, CPU) → the ndarray written to the shard; bfloat16 as raw uint16."""
    t = latent.detach().to("cpu", getattr(torch, dtype)).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def latent_from_storage(arr: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored ndarray → float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(arr, dtype=np.uint16).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(arr, dtype=np.float32))


def pack_bits(bits_TLd: np.ndarray) -> np.ndarray:
    """bool ``(T, L, d)`` → uint8 ``(T, L, ceil(d/8))``."""
    return np.packbits(np.asarray(bits_TLd, dtype=bool), axis=-1, bitorder="big")


def unpack_bits(packed: np.ndarray, d: int) -> np.ndarray:
    """uint8 ``(T, L, ceil(d/8))`` → bool ``(T, L, d)``."""
    return np.unpackbits(packed, axis=-1, count=d, bitorder="big").astype(bool)


# ----------------------------------------------------------------------------------------------
# Run manifest
# ----------------------------------------------------------------------------------------------

def manifest_shapes(*, latent_frames: int, latent_dim: int, latent_hw: tuple[int, int],
                    tokens_per_frame: int, text_shape: tuple[int, int] | None) -> dict:
    t, d, (h, w), n = latent_frames, latent_dim, latent_hw, tokens_per_frame
    return {"latent": [t, d, h, w], "bits": [t, n, d], "bits_packed": [t, n, (d + 7) // 8],
            "text_features": list(text_shape) if text_shape else None,
            "text_mask": [text_shape[0]] if text_shape else None}


def manifest_dtypes(latent_dtype: str, with_text: bool) -> dict:
    return {"latent": latent_dtype,
            "latent_storage": "uint16 (raw bfloat16 bits)" if latent_dtype == "bfloat16" else latent_dtype,
            "bits": BITS_LAYOUT, "label": "int64 (-1: none)", "caption": "str", "sample_id": "str",
            "text_features": "float16" if with_text else None,
            "text_mask": "uint8 (1: token)" if with_text else None}


def read_index(directory: str | Path) -> list[dict]:
    """The shard entries of the MDS ``index.json`` in ``directory`` (a partition's or the merged one)."""
    return json.loads((Path(directory) / INDEX_FILE).read_text())["shards"]


def read_shard_manifest(directory: str | Path) -> dict:
    """The ``manifest.json`` of a shard directory."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ShardsIncomplete(f"{path} not found: not a token shard directory")
    return json.loads(path.read_text())


def _canonical(value: Any) -> Any:
    """JSON-normal form so tuples vs lists and int vs float spellings compare equal."""
    return json.loads(json.dumps(value))


def check_manifest_matches(manifest: Mapping[str, Any], expected: Mapping[str, Any],
                           source: str = "shards") -> None:
    """Raise :class:`ShardManifestMismatch` naming the first field of ``expected`` that differs.

    ``expected`` holds only the fields the caller cares about, e.g. ``{"tokenizer_hash": ...,
    "scale_schedule": [[1, 1], [2, 2]], "resolution": [128, 128], "num_frames": 17}``.
    """
    for key, want in expected.items():
        if key not in manifest:
            raise ShardManifestMismatch(f"{source}: manifest has no field '{key}' (format "
                                        f"{manifest.get('format_version')})")
        have = _canonical(manifest[key])
        if have != _canonical(want):
            raise ShardManifestMismatch(f"{source}: '{key}' is {have!r} in the shard manifest but "
                                        f"{_canonical(want)!r} is expected")


def ensure_run_manifest(out: Path, manifest: dict) -> dict:
    """Write ``manifest.json`` if absent; else require the rerun fields to match (naming the field).

    Safe when several workers start at once: the file is created by an atomic hard link, so exactly
    one writer wins and the others compare against it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_FILE
    if not path.exists():
        tmp = out / f".{MANIFEST_FILE}.{_unique()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, path)  # fails if another worker created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    existing = json.loads(path.read_text())
    check_manifest_matches(existing, {k: manifest[k] for k in RERUN_FIELDS},
                           source=f"{path} (refusing to mix shards: rerun into a new output_dir)")
    return existing


def _unique() -> str:
    import socket
    return f"{socket.gethostname()}.{os.getpid()}"


# ----------------------------------------------------------------------------------------------
# Partitions and merge
# ----------------------------------------------------------------------------------------------

def partition_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def partition_range(index: int, count: int, total: int) -> range:
    """Contiguous slice of the input manifest owned by partition ``index`` of ``count``."""
    if not 0 <= index < count:
        raise ValueError(f"partition {index} out of range for {count} partitions")
    return range(index * total // count, (index + 1) * total // count)


def committed_partitions(out: Path, count: int) -> list[int]:
    return [i for i in range(count) if is_committed(out / partition_name(i, count))]


def merge_partitions(out: str | Path, count: int) -> dict:
    """Merge the committed partitions' indexes and rejects; commit the shard set. Idempotent.

    The merged ``index.json`` equals what ``streaming.base.util.merge_index`` writes for the same
    partitions (shard basenames prefixed by the partition directory), but is written atomically and
    only from the partitions this run owns (never from other ``*.json`` files in the directory).
    """
    out = Path(out)
    missing = [partition_name(i, count) for i in range(count) if not is_committed(out / partition_name(i, count))]
    if missing:
        raise ShardsIncomplete(f"{out}: {len(missing)} of {count} partitions are not committed yet "
                               f"(first: {missing[:3]}); rerun the pretokenize job to finish them")
    shards, rejects, samples = [], [], 0
    for i in range(count):
        part = out / partition_name(i, count)
        part_shards = read_index(part)
        for shard in part_shards:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{part.name}/{shard[key]['basename']}"
            samples += shard["samples"]
        shards += part_shards
        rejects.append((part / REJECTS_FILE).read_text())
    atomic_write_text(out / INDEX_FILE, json.dumps({"version": 2, "shards": shards}))
    atomic_write_text(out / REJECTS_FILE, "".join(rejects))
    summary = {"partitions": count, "samples": samples, "shards": len(shards),
               "rejects": sum(t.count("\n") for t in rejects)}
    mark_committed(out, summary)
    return summary


def require_complete(directory: str | Path) -> Path:
    """The directory of a complete, merged shard set, or a clear error saying what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardsIncomplete(f"shard directory not found: {directory}")
    read_shard_manifest(directory)
    if not is_committed(directory) or not (directory / INDEX_FILE).is_file():
        raise ShardsIncomplete(f"{directory} is not a complete shard set (no COMMITTED marker from the "
                               f"merge step): finish the pretokenize run or run `videoar shards merge`")
    return directory


def read_rejects(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_json(path, obj)
