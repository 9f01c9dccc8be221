"""Shared by the training benchmarks: synthetic token shards in the real format, running
``videoar train`` at a layout under torchrun, the dry run's memory estimate of the same run, and
summarising its metrics.

Synthetic shards: random latents quantized by the real ``MultiScaleBSQ`` (so stored bits and latents
agree exactly, as the shard contract requires), class labels, optional random text features. The
trainer cannot tell them from ``videoar pretokenize`` output; benchmarks thus time the whole training
step (reading, batch building with error correction, forward/backward, optimizer) without a corpus.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIT_MARGIN = 0.85
"""A benchmark runs a layout only when the dry run's estimate is below this share of the GPU memory (the
estimate is not a profile: docs/BENCHMARKS.md has it 0-2% under measured peaks)."""


def write_synthetic_shards(out: Path, *, num: int, frames: int, schedule: list[list[int]], latent_dim: int = 48,
                           classes: int = 101, text: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """A committed, merged shard set of ``num`` samples with ``frames`` latent frames (idempotent)."""
    from streaming import MDSWriter

    from data_prep import shards
    from tokenizer.quantizer import MultiScaleBSQ
    from videoar_common.atomic import mark_committed
    if (out / "COMMITTED").is_file():
        return out
    q = MultiScaleBSQ(dim=latent_dim, scales=schedule)
    H, W = schedule[-1]
    tokens = sum(h * w for h, w in schedule)
    manifest = {"format_version": 1, "tokenizer_hash": "synthetic", "scale_schedule": schedule,
                "latent_dim": latent_dim, "tokens_per_frame": tokens, "resolution": [16 * H, 16 * W],
                "num_frames": 1 + 4 * (frames - 1), "latent_frames": frames, "latent_hw": [H, W],
                "latent_dtype": "bfloat16", "num_partitions": 1, "input_manifest_sha256": "synthetic",
                "shapes": shards.manifest_shapes(latent_frames=frames, latent_dim=latent_dim, latent_hw=(H, W),
                                                 tokens_per_frame=tokens, text_shape=text),
                "dtypes": shards.manifest_dtypes("bfloat16", text is not None),
                "text_encoder": ({"hash": "synthetic", "max_length": text[0], "feature_dim": text[1]}
                                 if text else None)}
    out.mkdir(parents=True, exist_ok=True)
    shards.write_json(out / shards.MANIFEST_FILE, manifest)
    part = out / shards.partition_name(0, 1)
    gen = torch.Generator().manual_seed(seed)
    with MDSWriter(out=str(part), columns=shards.mds_columns(text is not None), size_limit=1 << 26) as w:
        for i in range(num):
            latent = shards.round_latent(torch.randn(frames, latent_dim, H, W, generator=gen), "bfloat16")
            bits = q.flatten_bits(q.latent_to_bits(latent)).numpy()
            sample = {"latent": shards.latent_to_storage(latent, "bfloat16"), "bits": shards.pack_bits(bits),
                      "label": i % classes, "caption": f"synthetic {i}", "sample_id": f"syn{i:08d}",
                      "source": f"synthetic/{i}", "clip_start": 0, "clip_stride": 1}
            if text:
                sample["text_features"] = np.random.default_rng(i).standard_normal(text).astype(np.float16)
                sample["text_mask"] = np.ones(text[0], dtype=np.uint8)
            w.write(sample)
    shards.write_jsonl(part / shards.REJECTS_FILE, [])
    mark_committed(part)
    shards.merge_partitions(out, 1)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(recipe: Path, run_dir: Path, nproc: int, sets: list[str], timeout: float = 900) -> tuple[int, str]:
    """``videoar train`` under torchrun with ``nproc`` processes; returns (exit code, stderr tail)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_port={free_port()}", "-m", "videoar_megatron.cli", "train", "--recipe", str(recipe),
           "--run-dir", str(run_dir)]
    for item in ["logging.progress_bar=false", "logging.log_every=1", "metrics.audit_sample_ids=false",
                 "checkpoint.save_every=0",
                 "checkpoint.save_at_end=false", "checkpoint.resume=false", *sets]:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stderr[-3000:]


def estimate_gib(recipe: Path, sets: list[str]) -> tuple[float, float]:
    """(dry-run estimate per GPU, the same without its fixed runtime allowance) in GiB for ``recipe`` with
    the ``--set`` items of a run: ``videoar train --dry-run``'s estimator, in process, at the run's
    ``target`` (set it to the run's GPUs). The second is comparable to the allocator's peak."""
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    from videoar_megatron.training.dry_run import RUNTIME_OVERHEAD_GIB, estimate_gib as dry_run_estimate
    total = dry_run_estimate(load_config(TrainConfig, recipe, sets))
    return total, total - RUNTIME_OVERHEAD_GIB


def summarise(run_dir: Path, skip: int) -> dict:
    """Median throughput after ``skip`` warm-up steps, peak memory (rank 0) over the run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if r["step"] > skip] or records
    med = lambda key: statistics.median(r[key] for r in timed if key in r) if any(key in r for r in timed) \
        else float("nan")  # noqa: E731
    return {"steps": len(records), "step_time_s": med("step_time_s"), "data_time_s": med("data_time_s"),
            "tokens_per_s": med("tokens_per_s"),
            "tokens_per_s_per_gpu": med("tokens_per_s_per_gpu"), "mfu": med("mfu"),
            "tflops_per_gpu": med("tflops_per_gpu"), "loss": records[-1]["loss"],
            "mem_peak_gib": max((r.get("mem_peak_gib", float("nan")) for r in records), default=float("nan")),
            "mem_reserved_gib": max((r.get("mem_reserved_gib", float("nan")) for r in records), default=float("nan"))}
