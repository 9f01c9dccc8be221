"""Shared pieces of the AR benchmarks: the sequence layouts of the shipped recipes, CUDA timing, attention
FLOPs.

Layouts are read from the recipes with the project's config loader and the dry run's layout code
(``videoar_megatron.training.dry_run.longest``: the longest data source of the recipe, built from its
``num_frames`` / ``scale_schedule`` by ``TokenLayout.padded``), at TP = 1 (no sequence-parallel pad), so
a benchmark times what a recipe trains, never a hand-copied schedule:

- ``ucf``: recipes/ar/ucf101_L.yaml (17 frames at 128²: 1 class token + 5 × 130 = 651 tokens);
- ``stage1``: recipes/ar/stage1.yaml (its video source, 17 × 256²: 64 + 5 × 521 = 2,669);
- ``stage2``: recipes/ar/stage2.yaml (its video source, 17 × 384×672: 64 + 5 × 2,555 = 12,839);
- ``stage3``: recipes/ar/stage3.yaml (33 frames: 64 + 9 × 2,555 = 23,059);
- ``stage3_65f``: recipes/ar/stage3_65f.yaml when it exists, else stage3.yaml with data.num_frames=65
  (17 latent frames: 64 + 17 × 2,555 = 43,499).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from videoar_common.config import load_config
from videoar_common.distributed import DistContext, init_distributed, shutdown_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.training.config import TrainConfig
from videoar_megatron.training.dry_run import longest

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "ar"
SINGLE_GPU = ("parallel.tensor_parallel=1", "parallel.sequence_parallel=false", "parallel.context_parallel=1")
"""Overrides that drop the recipes' sequence- and context-parallel pads (stage3_65f.yaml runs CP=2): the
benchmarks run on one GPU."""


def layout_recipes() -> dict[str, tuple[Path, tuple[str, ...]]]:
    """Benchmark layout name -> (recipe, overrides)."""
    own_65f = RECIPES / "stage3_65f.yaml"
    return {"ucf": (RECIPES / "ucf101_L.yaml", ()), "stage1": (RECIPES / "stage1.yaml", ()),
            "stage2": (RECIPES / "stage2.yaml", ()), "stage3": (RECIPES / "stage3.yaml", ()),
            "stage3_65f": (own_65f, ()) if own_65f.is_file() else (RECIPES / "stage3.yaml", ("data.num_frames=65",))}


def recipe_config(recipe: Path, overrides: tuple[str, ...] = ()) -> TrainConfig:
    """A recipe as one GPU trains it (TP = CP = 1)."""
    return load_config(TrainConfig, recipe, [*overrides, *SINGLE_GPU])


def recipe_layout(recipe: Path, overrides: tuple[str, ...] = ()) -> TokenLayout:
    """The longest sequence a recipe trains, at TP = 1."""
    return longest(recipe_config(recipe, overrides))


def layout_origin(name: str) -> str:
    """``recipes/ar/x.yaml [+ overrides]``: where benchmark layout ``name`` comes from."""
    recipe, overrides = layout_recipes()[name]
    return " ".join([f"recipes/ar/{recipe.name}", *(f"+ {o}" for o in overrides)])


_RECIPE_CONFIGS = {name: recipe_config(*spec) for name, spec in layout_recipes().items()}
LAYOUTS: dict[str, TokenLayout] = {name: longest(cfg) for name, cfg in _RECIPE_CONFIGS.items()}
MASKS: dict[str, dict] = {name: dataclasses.asdict(cfg.model.mask) for name, cfg in _RECIPE_CONFIGS.items()}
"""The Random Frame Mask each layout's recipe trains with (``model.mask``: window, drop, anchor). It is
part of what a recipe trains: it sets the attended pairs, and ``flex_kernel: auto`` keeps Triton when the
mask reads the frame table (a window or a drop: every paper recipe, stages I–III and 65 frames)."""


@contextlib.contextmanager
def one_process_groups(device: str) -> Iterator[tuple[DistContext, object]]:
    """``(ctx, groups)`` of a one-process benchmark (every parallel size 1) on ``device``; Megatron's
    groups and the process group are torn down on the way out, also after an error."""
    ctx = init_distributed(device=device)
    try:
        groups = init_model_parallel(ctx, ParallelConfig())
        try:
            yield ctx, groups
        finally:
            destroy_model_parallel(ctx)
    finally:
        shutdown_distributed()


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of ``fn`` in milliseconds, timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms(fn: Callable[[], object], device: torch.device, iters: int = 10, warmup: int = 3) -> float:
    """Median time of ``fn`` in milliseconds: CUDA events on a GPU after ``warmup`` calls
    (:func:`cuda_time_ms`), wall clock on the CPU (one warm-up call)."""
    if device.type == "cuda":
        return cuda_time_ms(fn, warmup=warmup, iters=iters)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attended_pairs(mask_B1SS: torch.Tensor) -> float:
    """Mean number of (query, key) pairs per sample that the mask lets through."""
    return mask_B1SS.float().sum().item() / mask_B1SS.shape[0]


def attention_flops(pairs: float, heads: int, head_dim: int, backward: bool = True) -> float:
    """Useful attention FLOPs per sample and layer: QKᵀ and PV are 2·d each per attended pair;
    backward counted as twice the forward (the usual MFU convention; no recompute credit)."""
    forward = 4.0 * pairs * heads * head_dim
    return forward * (3.0 if backward else 1.0)


def row(label: str, value: float, baseline: float, unit: str = "ms", lower_is_better: bool = True) -> str:
    ratio = value / baseline if baseline else float("nan")
    better = "faster" if lower_is_better else "higher"
    return f"  {label:<34} {value:>10.3f} {unit:<8} vs baseline {baseline:>10.3f} {unit:<8} ratio {ratio:6.3f} " \
           f"({'<1' if lower_is_better else '>1'} = {better})"
