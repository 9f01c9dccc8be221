"""What a token shard directory holds, and a picture of a few samples decoded back to pixels.

The PNG shows, per sample, the source clip (decoded again from the source file with PyAV, when it is
reachable) over the tokenizer's reconstruction from the stored bits (what the AR model learns to
predict). It is the quickest check that crops, frame selection, the scale schedule and the bit layout
are right. The tokenizer is handed in by the caller (``videoar shards inspect`` loads it): ``data_prep``
does not import ``tokenizer``.

Design decision: the stored continuous latent is not decoded into a picture. The decoder is trained on
quantized latents only (sums of the scales' binary codes, unit norm each), and after all scales the
residual still holds most of the latent's norm, so decoding the raw latent feeds the decoder an input
it never saw (colours and shapes come out wrong where the bits are right). What the AR trainer does
with the latent is re-quantize it (self-correction); the title of each sample says whether that gives
the stored bits back.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep import shards
from data_prep.tokenizer_api import BitQuantizer, DecodingTokenizer, require
from videoar_common.atomic import is_committed


def summarize(directory: str | Path) -> dict[str, Any]:
    """Counts, shapes, dtypes, rejects by kind and labels of a shard directory (merged or not)."""
    directory = Path(directory)
    manifest = shards.read_shard_manifest(directory)
    n = int(manifest["num_partitions"])
    committed = shards.committed_partitions(directory, n)
    samples, nbytes, num_shards, rejects = 0, 0, 0, []
    for p in committed:
        part = directory / shards.partition_name(p, n)
        index = shards.read_index(part)
        samples += sum(s["samples"] for s in index)
        nbytes += sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index)
        num_shards += len(index)
        rejects += shards.read_rejects(part / shards.REJECTS_FILE)
    kinds = collections.Counter(r["kind"] for r in rejects)
    return {"directory": str(directory), "merged": is_committed(directory), "partitions": n,
            "partitions_committed": len(committed), "samples": samples, "shards": num_shards, "bytes": nbytes,
            "rejects": len(rejects), "rejects_by_kind": dict(sorted(kinds.items())),
            "reject_examples": {k: next(r for r in rejects if r["kind"] == k)["reason"] for k in sorted(kinds)},
            "shapes": manifest["shapes"], "dtypes": manifest["dtypes"],
            "manifest": {k: manifest[k] for k in ("tokenizer_hash", "scale_schedule", "resolution", "num_frames",
                                                  "frame_stride", "target_fps", "clips_per_video", "latent_dtype",
                                                  "decode_device", "encode_dtype", "text_encoder")}}


def format_summary(s: dict[str, Any]) -> str:
    m = s["manifest"]
    lines = [f"{s['directory']}: {'merged' if s['merged'] else 'NOT merged'}, "
             f"{s['partitions_committed']}/{s['partitions']} partitions committed",
             f"  samples {s['samples']} in {s['shards']} shards, {s['bytes'] / 2**20:.1f} MiB",
             f"  clips {m['num_frames']} frames at {m['resolution'][0]}x{m['resolution'][1]} "
             f"(stride {m['frame_stride']}, target fps {m['target_fps']}), {m['clips_per_video']} per video",
             f"  schedule {m['scale_schedule']}; tokenizer {m['tokenizer_hash'][:16]}…; decode {m['decode_device']}, "
             f"encode {m['encode_dtype']}",
             "  shapes: " + ", ".join(f"{k} {v}" for k, v in s["shapes"].items() if v),
             "  dtypes: " + ", ".join(f"{k} {v}" for k, v in s["dtypes"].items() if v),
             f"  rejects {s['rejects']}" + ("" if not s["rejects"] else ": " + ", ".join(
                 f"{k} {v}" for k, v in s["rejects_by_kind"].items()))]
    for kind, reason in s["reject_examples"].items():
        lines.append(f"    e.g. {kind}: {reason}")
    return "\n".join(lines)


def _source_root(directory: Path) -> Path | None:
    """The input manifest's directory, from a worker's resolved config in logs/ (if any)."""
    import yaml
    for cfg in sorted((directory / shards.LOG_DIR).glob("worker-*/config.yaml")):
        manifest = yaml.safe_load(cfg.read_text()).get("input_manifest")
        if manifest:
            return Path(manifest).parent.resolve()
    return None


def _to_uint8_frames(video_13FHW: torch.Tensor) -> np.ndarray:
    return ((video_13FHW[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def _strip(frames_FHWC: np.ndarray, max_frames: int = 9) -> np.ndarray:
    idx = np.linspace(0, len(frames_FHWC) - 1, min(max_frames, len(frames_FHWC))).round().astype(int)
    return np.concatenate([frames_FHWC[i] for i in idx], axis=1)


@torch.no_grad()
def render_samples(directory: str | Path, tok: DecodingTokenizer, *, png: str | Path | None = None,
                   num: int = 4, source_root: str | Path | None = None) -> Path:
    """Decode ``num`` samples (spread over the set) back to pixels through ``tok`` (the tokenizer that
    wrote them: its content hash must be the manifest's); write a PNG; return its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_prep.reader import decode_sample

    require(tok, DecodingTokenizer, "shards inspect")
    directory = shards.require_complete(directory)
    manifest = shards.read_shard_manifest(directory)
    shards.check_manifest_matches(manifest, {"tokenizer_hash": tok.content_hash}, source=str(directory))
    q = tok.quantizer_for(manifest["scale_schedule"])
    root = Path(source_root) if source_root else _source_root(directory)
    raw = _read_raw_samples(directory, num)
    h = manifest["resolution"][0]
    fig, axes = plt.subplots(len(raw), 1, figsize=(min(18, 1.2 * 9 * 3), 3.4 * len(raw)), squeeze=False)
    for ax, r in zip(axes[:, 0], raw):
        s = decode_sample(r, manifest)
        rows = sample_rows(s, r, manifest, tok, q, root)
        ax.imshow(np.concatenate([_strip(f) for _, f in rows], axis=0))
        ax.set_yticks([(i + 0.5) * h for i in range(len(rows))], [name for name, _ in rows], fontsize=8)
        ax.set_xticks([])
        label = f" label {int(s['label'])}" if int(s["label"]) >= 0 else ""
        differ, total = latent_bit_mismatches(s, q)
        check = (f"latent re-quantizes to {differ} of {total} bits differently" if differ
                 else "latent re-quantizes to these bits")
        ax.set_title(f"{s['source']} @ frame {int(s['clip_start'])}{label}: {s['caption'][:60]} ({check})",
                     fontsize=9)
    fig.tight_layout()
    png = Path(png) if png else directory / shards.LOG_DIR / "inspect.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _source_clip(src: Path, sample: dict, raw: dict, manifest: dict):
    """The source frames of a stored clip (a clip_stride of 0: picked by time, rebuilt from the video's
    timestamps under the manifest's target_fps)."""
    from data_prep.video import ClipPlan, ClipSamplingConfig, clip_at, probe_video
    start, stride, frames = int(sample["clip_start"]), int(raw["clip_stride"]), int(manifest["num_frames"])
    if stride > 0:
        return ClipPlan(path=str(src), start_frame=start, stride=stride, num_frames=frames)
    h, w = manifest["resolution"]
    sampling = ClipSamplingConfig(num_frames=frames, target_fps=float(manifest["target_fps"]), height=h, width=w)
    return clip_at(probe_video(src, any_codec=True), sampling, start, stride)


def sample_rows(s: dict, raw: dict, manifest: dict, tok: DecodingTokenizer, q: BitQuantizer, root: Path | None
                ) -> list[tuple[str, np.ndarray]]:
    """The PNG rows of one decoded sample ``s``: the source clip (when its file is reachable) and the
    decode of the stored bits, as uint8 frames ``(F, H, W, 3)``."""
    from data_prep.video import PyAVClipDecoder
    h, w = manifest["resolution"]
    rows = []
    src = root / s["source"] if root is not None else None
    if src is not None and src.is_file():
        clip = _source_clip(src, s, raw, manifest)
        frames = PyAVClipDecoder(height=h, width=w, num_threads=1).decode([clip])[0]
        if isinstance(frames, torch.Tensor):
            rows.append(("source", frames.numpy()))
    bits = q.unflatten_bits(s["bits"])
    rows.append(("from bits", _to_uint8_frames(tok.decode_bits(bits, batch=1, quantizer=q))))
    return rows


def latent_bit_mismatches(s: dict, q: BitQuantizer) -> tuple[int, int]:
    """(bits that re-quantizing the stored latent gives differently from the stored bits, all bits)."""
    again = q.flatten_bits(q.latent_to_bits(s["latent"].float()))
    return int((again != s["bits"]).sum()), s["bits"].numel()


def _read_raw_samples(directory: Path, num: int) -> list[dict]:
    """``num`` raw samples spread evenly over the merged index, read straight from the MDS shards."""
    from streaming.base.format import reader_from_json
    readers = [reader_from_json(str(directory), None, s) for s in shards.read_index(directory)]
    total = sum(r.samples for r in readers)
    if total == 0:
        raise ValueError(f"{directory} holds no samples")
    wanted = sorted(set(np.linspace(0, total - 1, min(num, total)).round().astype(int).tolist()))
    out, start = [], 0
    for reader in readers:
        for i in wanted:
            if start <= i < start + reader.samples:
                out.append(reader.get_item(i - start))
        start += reader.samples
    return out
