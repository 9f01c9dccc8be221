"""gFVD protocols: which labels are generated, which real clips they are compared with, and folds.

Protocols differ across papers and change FVD materially, so every choice is a knob of
:class:`FVDProtocolConfig` and goes into the report:

- **MAGVIT-v2 / NBP** (``label_source: train_distribution``): 17 frames at 128², class labels drawn
  i.i.d. from the class frequencies of the training videos, 10,000 generated clips per fold × 4 folds,
  real clips drawn without replacement from the training clips; one FVD per fold, reported as
  mean ± std (population std, ``np.std``). With ``real_set: per_fold`` every fold has its own
  10,000 real clips (40,000 in all, as NBP App. A.4 describes); ``shared`` uses one real set.
- **Single run, LARP style** (``label_source: real_clips``, one fold): labels are those of randomly
  chosen real training clips, and the real statistics come from exactly those clips.

Design decisions: everything random is drawn from the seed on the *global* sample index, so labels,
real clips and folds do not depend on the number of ranks. Each rank generates a contiguous slice of
every fold (:func:`shard_bounds`: no overlap, no gap), the extractor turns its clips into features,
and one all-reduce of the float64 sums gives every rank the fold's statistics. The generator gets the
global sample ids with the labels, so it can seed per sample and give the same videos at any world
size. A short count (a generator that returned fewer clips) is an error, never a smaller FVD set.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Literal, Protocol

import numpy as np
import torch

from videoar_common.distributed import DistContext
from videoar_megatron.evaluation.fvd import FeatureStats, RealStatsCache, fvd_from_stats
from videoar_megatron.evaluation.i3d import FeatureExtractor

GenerateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(labels_B int64, sample_ids_B int64) → videos ``(B, 3, T, H, W)``, uint8 or float in [-1, 1]."""


@dataclass(kw_only=True)
class FVDProtocolConfig:
    """How gFVD is measured; defaults are the MAGVIT-v2 / NBP UCF-101 protocol."""

    name: str = "magvit2_nbp"
    """Protocol label written into reports."""
    num_frames: int = 17
    """Frames per clip, generated and real (MAGVIT-v2/NBP: 17; LARP: 16)."""
    resolution: int = 128
    """Clip height and width in pixels before the I3D's resize to 224."""
    fps: float = 8.0
    """Frame rate of the real clips (source frames are strided to it); 0 keeps the native rate."""
    num_samples: int = 10000
    """Generated clips per fold."""
    num_folds: int = 4
    """Folds; the report gives each fold's FVD and their mean ± std."""
    label_source: Literal["train_distribution", "real_clips"] = "train_distribution"
    """train_distribution: labels drawn i.i.d. from the training class frequencies (MAGVIT-v2/NBP);
    real_clips: labels of randomly chosen real clips, which are also the real set (LARP)."""
    real_set: Literal["per_fold", "shared"] = "per_fold"
    """per_fold: each fold compares with its own real clips (num_samples each, drawn without
    replacement); shared: one real set of real_num_samples clips for all folds."""
    real_num_samples: int = 0
    """Real clips of a shared real set; 0 means num_samples."""
    seed: int = 0
    """Seed of the label draw and of the real-clip selection."""
    batch_size: int = 16
    """Clips per generator call on each rank."""
    fd_method: Literal["sqrtm", "eigh"] = "sqrtm"
    """Matrix square root of the Fréchet distance: sqrtm (as the references) or eigh."""

    def __post_init__(self) -> None:
        checks = [(self.num_frames >= 9, f"num_frames must be >= 9 (the I3D's minimum), got {self.num_frames}"),
                  (self.resolution >= 1, f"resolution must be >= 1, got {self.resolution}"),
                  (self.fps >= 0, f"fps must be >= 0, got {self.fps}"),
                  (self.num_samples >= 2, f"num_samples must be >= 2, got {self.num_samples}"),
                  (self.num_folds >= 1, f"num_folds must be >= 1, got {self.num_folds}"),
                  (self.real_num_samples >= 0, f"real_num_samples must be >= 0, got {self.real_num_samples}"),
                  (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.label_source == "real_clips" and self.real_set != "per_fold":
            raise ValueError("label_source=real_clips compares each fold with the clips its labels came "
                             "from: set real_set=per_fold")

    @property
    def real_count(self) -> int:
        """Real clips per real set."""
        if self.real_set == "shared":
            return self.real_num_samples or self.num_samples
        return self.num_samples


class RealClipSource(Protocol):
    """Real clips of the training split, addressed by index (data_prep or in-memory tensors)."""

    def identity(self) -> dict:
        """JSON-able description of the data and clip sampling (part of the cache key)."""

    def class_labels(self) -> np.ndarray:
        """Class id of every training video: the class distribution labels are drawn from."""

    def num_clips(self) -> int:
        """Number of candidate clips."""

    def clip_labels(self, indices: np.ndarray) -> np.ndarray:
        """Class ids of the clips at ``indices``."""

    def load(self, indices: np.ndarray) -> torch.Tensor:
        """Clips ``(B, 3, T, H, W)`` at ``indices``, uint8 or float in [-1, 1]."""


class TensorClipSource:
    """A :class:`RealClipSource` over clips already in memory (one clip per video)."""

    def __init__(self, videos_NCTHW: torch.Tensor, labels_N: np.ndarray | torch.Tensor, name: str = "tensor"):
        self.videos, self.labels = videos_NCTHW, np.asarray(labels_N, dtype=np.int64)
        if len(self.labels) != len(self.videos):
            raise ValueError(f"{len(self.videos)} clips but {len(self.labels)} labels")
        self.name = name
        self._sha = hashlib.sha256(self.videos.cpu().contiguous().numpy().tobytes()).hexdigest()

    def identity(self) -> dict:
        return {"source": self.name, "content_sha256": self._sha, "shape": list(self.videos.shape)}

    def class_labels(self) -> np.ndarray:
        return self.labels

    def num_clips(self) -> int:
        return len(self.videos)

    def clip_labels(self, indices: np.ndarray) -> np.ndarray:
        return self.labels[indices]

    def load(self, indices: np.ndarray) -> torch.Tensor:
        return self.videos[torch.as_tensor(indices, dtype=torch.long)]


# ----------------------------------------------------------------------------------------------
# Deterministic draws, sharding, folds.
# ----------------------------------------------------------------------------------------------

def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of ``n`` items for ``rank``; slices tile 0..n exactly."""
    return n * rank // world_size, n * (rank + 1) // world_size


def fold_bounds(num_samples: int, fold: int) -> tuple[int, int]:
    """Global sample ids [start, stop) of ``fold``: folds are consecutive, disjoint blocks."""
    return fold * num_samples, (fold + 1) * num_samples


def class_distribution(labels: np.ndarray) -> np.ndarray:
    """Class frequencies ``p[c]`` of integer labels (classes 0..max)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0 or labels.min() < 0:
        raise ValueError("class-conditional FVD needs a class label (>= 0) for every training video")
    counts = np.bincount(labels)
    return counts / counts.sum()


def draw_labels(p: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` labels drawn i.i.d. from ``p``; the same for a seed whatever the world size."""
    return np.random.default_rng([seed, 0]).choice(len(p), size=count, p=p)


def draw_clips(num_clips: int, count: int, seed: int, stream: int) -> np.ndarray:
    """``count`` distinct clip indices out of ``num_clips`` (without replacement)."""
    if count > num_clips:
        raise ValueError(f"the protocol needs {count} distinct real clips but the training set has "
                         f"{num_clips}: lower protocol.num_samples / real_num_samples / num_folds, or "
                         "raise data.clips_per_video")
    return np.random.default_rng([seed, stream]).permutation(num_clips)[:count]


@dataclass
class FVDPlan:
    """Labels of every generated sample and the real clips of every real set (global, all ranks)."""

    cfg: FVDProtocolConfig
    source: RealClipSource
    gen_labels: np.ndarray = field(init=False)
    _real: list[np.ndarray] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        total = self.cfg.num_samples * self.cfg.num_folds
        if self.cfg.label_source == "train_distribution":
            self.gen_labels = draw_labels(class_distribution(self.source.class_labels()), total, self.cfg.seed)
        else:
            chosen = draw_clips(self.source.num_clips(), total, self.cfg.seed, stream=2)
            self.gen_labels = np.asarray(self.source.clip_labels(chosen), dtype=np.int64)
            self._real = np.split(chosen, self.cfg.num_folds)

    @property
    def num_real_sets(self) -> int:
        return 1 if self.cfg.real_set == "shared" else self.cfg.num_folds

    def real_set_of_fold(self, fold: int) -> int:
        return 0 if self.cfg.real_set == "shared" else fold

    def real_indices(self, real_set: int) -> np.ndarray:
        """Clip indices of a real set; drawn lazily (a cache hit needs no clip list)."""
        if self._real is None:
            n = self.cfg.real_count
            chosen = draw_clips(self.source.num_clips(), n * self.num_real_sets, self.cfg.seed, stream=1)
            self._real = np.split(chosen, self.num_real_sets)
        return self._real[real_set]


# ----------------------------------------------------------------------------------------------
# Running the protocol.
# ----------------------------------------------------------------------------------------------

@dataclass
class FVDResult:
    protocol: dict
    extractor: dict
    source: dict
    fvd_per_fold: list[float]
    mean: float
    std: float
    num_samples: int
    num_folds: int
    num_real_per_fold: int
    real_stats_files: list[str]
    real_cache_hits: list[bool]
    seconds: float
    world_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _chunks(ids: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def _check_clips(videos: torch.Tensor, count: int, cfg: FVDProtocolConfig, what: str) -> None:
    expected = (count, 3, cfg.num_frames, cfg.resolution, cfg.resolution)
    if tuple(videos.shape) != expected:
        raise ValueError(f"{what} returned clips of shape {tuple(videos.shape)}, the protocol needs {expected} "
                         "(protocol.num_frames, protocol.resolution)")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="clip", disable=not enabled, dynamic_ncols=True)


def _accumulate(ids: np.ndarray, fetch: Callable[[np.ndarray], torch.Tensor], extractor: FeatureExtractor,
                cfg: FVDProtocolConfig, what: str, bar) -> FeatureStats:
    stats = FeatureStats(extractor.dim)
    for chunk in _chunks(ids, cfg.batch_size):
        videos = fetch(chunk)
        _check_clips(videos, len(chunk), cfg, what)
        stats.update(extractor(videos))
        bar.update(len(chunk))
    return stats


def _check_count(stats: FeatureStats, expected: int, what: str) -> None:
    if stats.n != expected:
        raise RuntimeError(f"{what}: gathered {stats.n} clips over all ranks, expected {expected}")


def real_cache_fields(cfg: FVDProtocolConfig, source: RealClipSource, extractor: FeatureExtractor,
                      real_set: int) -> dict:
    """Everything that determines a real set's statistics."""
    return {"kind": "fvd_real", "version": 1, "source": source.identity(), "extractor": extractor.identity(),
            "num_frames": cfg.num_frames, "resolution": cfg.resolution, "fps": float(cfg.fps),
            "label_source": cfg.label_source, "real_set": cfg.real_set, "seed": cfg.seed,
            "count": cfg.real_count, "num_sets": 1 if cfg.real_set == "shared" else cfg.num_folds,
            "set_index": real_set,
            # real_clips draws its clips from (num_samples, num_folds); per_fold draws count * num_sets.
            "total_generated": cfg.num_samples * cfg.num_folds if cfg.label_source == "real_clips" else None}


def real_stats(plan: FVDPlan, real_set: int, extractor: FeatureExtractor, ctx: DistContext,
               cache: RealStatsCache | None, progress: bool = False) -> tuple[FeatureStats, bool, str]:
    """Statistics of one real set: from the cache when every rank sees it, else computed over ranks
    and cached by rank 0. Returns (stats, cache hit, cache file or "")."""
    cfg, source = plan.cfg, plan.source
    fields = real_cache_fields(cfg, source, extractor, real_set)
    cached = cache.load(fields) if cache is not None else None
    path = str(cache.paths(fields)[0]) if cache is not None else ""
    if cache is not None and not ctx.any(cached is None):
        return cached, True, path
    ids = plan.real_indices(real_set)
    lo, hi = shard_bounds(len(ids), ctx.rank, ctx.world_size)
    with _progress(hi - lo, f"real set {real_set}", progress and ctx.is_main) as bar:
        stats = _accumulate(ids[lo:hi], source.load, extractor, cfg, "the real clip source", bar)
    _check_count(stats.all_reduce(ctx), len(ids), f"real set {real_set}")
    if cache is not None and ctx.is_main:
        cache.save(fields, stats)
    ctx.barrier()
    return stats, False, path


def generated_stats(plan: FVDPlan, fold: int, generate: GenerateFn, extractor: FeatureExtractor,
                    ctx: DistContext, progress: bool = False) -> FeatureStats:
    """Statistics of one fold's generated clips; this rank generates its slice of the fold."""
    cfg = plan.cfg
    start, stop = fold_bounds(cfg.num_samples, fold)
    lo, hi = shard_bounds(stop - start, ctx.rank, ctx.world_size)
    ids = np.arange(start + lo, start + hi, dtype=np.int64)

    def fetch(chunk: np.ndarray) -> torch.Tensor:
        return generate(torch.from_numpy(plan.gen_labels[chunk]), torch.from_numpy(chunk))

    with _progress(hi - lo, f"fold {fold + 1}/{cfg.num_folds}", progress and ctx.is_main) as bar:
        stats = _accumulate(ids, fetch, extractor, cfg, "the generator", bar)
    _check_count(stats.all_reduce(ctx), cfg.num_samples, f"fold {fold}")
    return stats


def run_fvd_protocol(cfg: FVDProtocolConfig, *, generate: GenerateFn, source: RealClipSource,
                     extractor: FeatureExtractor, ctx: DistContext, cache: RealStatsCache | None = None,
                     progress: bool = False) -> FVDResult:
    """gFVD of ``generate`` under ``cfg``: one FVD per fold, mean ± std. Every rank returns it."""
    t0 = time.time()
    plan = FVDPlan(cfg, source)
    reals = [real_stats(plan, k, extractor, ctx, cache, progress) for k in range(plan.num_real_sets)]
    per_fold = []
    for fold in range(cfg.num_folds):
        gen = generated_stats(plan, fold, generate, extractor, ctx, progress)
        per_fold.append(fvd_from_stats(gen, reals[plan.real_set_of_fold(fold)][0], cfg.fd_method))
    return FVDResult(protocol=asdict(cfg), extractor=extractor.identity(), source=source.identity(),
                     fvd_per_fold=per_fold, mean=float(np.mean(per_fold)), std=float(np.std(per_fold)),
                     num_samples=cfg.num_samples, num_folds=cfg.num_folds, num_real_per_fold=cfg.real_count,
                     real_stats_files=[r[2] for r in reals], real_cache_hits=[r[1] for r in reals],
                     seconds=time.time() - t0, world_size=ctx.world_size)


def compute_real_stats(cfg: FVDProtocolConfig, *, source: RealClipSource, extractor: FeatureExtractor,
                       ctx: DistContext, cache: RealStatsCache, progress: bool = False) -> list[tuple[bool, str]]:
    """Fill the cache with every real set of the protocol (no generator needed)."""
    plan = FVDPlan(cfg, source)
    return [real_stats(plan, k, extractor, ctx, cache, progress)[1:] for k in range(plan.num_real_sets)]
