"""Small corpora, a tiny random tokenizer and config builders shared by the pre-tokenization tests."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import torch

from data_prep.pretokenize.config import PretokenizeConfig
from data_prep.pretokenize.pipeline import Pretokenizer
from data_prep.pretokenize.worker import Worker
from data_prep.synth import make_corpus
from data_prep.video import ClipSamplingConfig
from tokenizer import load_tokenizer

FRAMES = 9          # 1 + 4k: 3 latent frames
SIZE = (48, 64)     # source videos; clips are cropped to 32x32 (latent grid 2x2)
GPU_SIZE = (144, 192)  # NVDEC has minimum sizes (VP9: 128x128): GPU tests use larger sources
CLIP = dict(num_frames=FRAMES, frame_stride=1, clips_per_video=2, height=32, width=32)
SCHEDULE = [[1, 1], [2, 2]]


def make_tiny_tokenizer(directory: Path, seed: int = 0, schedule=None) -> Path:
    from tokenizer import save_tokenizer
    from tokenizer.config import TokenizerModelConfig
    from tokenizer.model import VideoTokenizer
    torch.manual_seed(seed)
    cfg = TokenizerModelConfig(base_channels=8, channel_mult=[1, 1, 2, 2, 2], norm_groups=4, latent_dim=8,
                               scale_schedule=schedule or SCHEDULE)
    save_tokenizer(VideoTokenizer(cfg), directory)
    return directory


def make_clean_corpus(root: Path, num: int = 5, size: tuple[int, int] = SIZE) -> Path:
    """``num`` VP9 videos of 12 frames (two 9-frame clips each)."""
    return make_corpus(root, num=num, classes=3, codec="vp9", frames=12, size=size, fps=8, seed=1)


def make_mixed_corpus(root: Path, size: tuple[int, int] = SIZE) -> tuple[Path, dict[str, str]]:
    """4 good VP9 videos plus one of each reject kind; returns (manifest, source → expected kind)."""
    good = make_corpus(root / "good", num=4, classes=2, codec="vp9", frames=12, size=size, seed=2)
    h264 = make_corpus(root / "h264", num=1, classes=1, codec="h264", frames=12, size=size, seed=3)
    short = make_corpus(root / "short", num=1, classes=1, codec="vp9", frames=5, size=size, seed=4)
    rows = []
    for m in (good, h264, short):
        with open(m) as f:
            for row in csv.DictReader(f):
                row["path"] = str(Path(m).parent.relative_to(root) / row["path"])
                rows.append(row)
    # a VP9 file cut to a third: the container still opens, most frames are gone
    src = root / rows[0]["path"]
    trunc = root / "good" / "videos" / "truncated.webm"
    data = src.read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    rows.insert(2, {**rows[0], "path": str(trunc.relative_to(root))})
    rows.insert(4, {**rows[1], "path": "good/videos/does_not_exist.webm"})
    manifest = root / "metadata.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "label"], lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in ("path", "caption", "label")})
    expected = {next(r["path"] for r in rows if r["path"].startswith("h264/")): "codec",
                str(trunc.relative_to(root)): "truncated", "good/videos/does_not_exist.webm": "missing",
                next(r["path"] for r in rows if r["path"].startswith("short/")): "too_short"}
    return manifest, expected


def pretok_config(tokenizer: Path, manifest: Path, out: Path, **overrides) -> PretokenizeConfig:
    clips = ClipSamplingConfig(**{**CLIP, **overrides.pop("clips", {})})
    base = dict(tokenizer=str(tokenizer), input_manifest=str(manifest), output_dir=str(out), clips=clips,
                scale_schedule=SCHEDULE, latent_dtype="float32", batch_size=3, device="cpu",
                decode_device="cpu", decode_threads=1, probe_workers=2, num_partitions=2, progress_bar=False)
    return PretokenizeConfig(**{**base, **overrides})


def pretokenizer(cfg: PretokenizeConfig, worker: Worker = Worker(0, 1)) -> Pretokenizer:
    """The production pre-tokenizer for ``cfg``, loading the tokenizer as the CLI does."""
    return Pretokenizer(cfg, worker, load_tokenizer)


COMPILED_FACTOR = 1.25
"""How much farther from a higher-precision encode of the same clips the compiled encoder
(``encoder_compile``) may be than the eager one. Distance to the eager encoder is no yardstick: the two
round at different points (Inductor keeps fused intermediates in fp32 where eager bf16 rounds each op),
so they differ by about as much as either differs from fp32 (on an H100 compiled vs eager bf16 was 0.031;
on CPU under bf16 autocast, eager and compiled were 0.0207 and 0.0206 from fp64 and 0.023 from each
other). Both round the same weights and conv inputs to bf16 (autocast casts before Inductor sees the
graph), so an equally good compile lands at about the eager encoder's distance (the ratio was 0.99 in
bf16 and 1.04 in fp32 on CPU); 1.25 leaves room for the spread of that estimate over a test's few hundred
latent values, and still fails a compile that rounds more than eager does."""


def relative_distance(got: torch.Tensor, reference: torch.Tensor) -> float:
    """||got - reference|| / ||reference|| over all elements, in float64."""
    got, reference = got.double(), reference.double()
    return float((got - reference).norm() / reference.norm())


def tree_bytes(root: Path, exclude=("logs",)) -> dict[str, bytes]:
    """Every file under ``root`` (relative path → bytes), except run logs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in exclude}


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
