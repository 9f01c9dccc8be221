"""Dry run: validate a recipe at its target world size and estimate memory per GPU, building nothing.

``videoar train --recipe R --dry-run`` runs on a login node (no GPU, no process group): it checks the
layout arithmetic at ``target.nodes x target.gpus_per_node`` (TP x PP divides the world, heads and
query groups by TP, layers by PP, global batch by micro-batch x DP, enough micro-batches for the
pipeline, sequence length padded for sequence parallelism), derives each data source's sequence from
its shard manifest when it is readable (else from its ``num_frames`` / ``scale_schedule``), and prints
the pipeline bubble of its micro-batches per step ((PP-1)/(v m), a warning above 10%), the parameters
per pipeline stage and an analytic memory estimate per GPU of the first and last stage (at the longest
sequence of the recipe's data sources).

Memory model (bytes per GPU; N = parameters of the stage on one TP rank; Megatron's accounting):

- weights: 2N (bf16) or 4N (fp32); gradients: 4N (fp32 main-grad buffers);
- optimizer: fp32 main weights (bf16 only) + AdamW exp_avg + exp_avg_sq = 12N (bf16) or 8N (fp32),
  divided by DP with the distributed optimizer;
- activations of one micro-batch per layer (flash/flex attention: no S x S scores), in bf16 elements:
  replicated over TP (4·s·b·h: two norm inputs, QKV and FC1 inputs; divided by TP under sequence
  parallelism) plus TP-split (s·b·(2h + 2·kv·hd + 3f)/TP: q/k/v, attention output, SwiGLU gate+up and
  product). Full recompute keeps only each layer's input (s·b·h) plus one layer's working set.
  Under 1F1B the first stage holds PP micro-batches of its layers in flight, the last one; interleaved
  (v virtual stages), stage s holds 2(PP-s-1) + (v-1)PP + 1 chunk forwards of num_layers/(PP v) layers
  (Megatron's warm-up count + 1; :func:`in_flight_layers`);
- the optimizer step's working list: torch's foreach AdamW holds one fp32 temporary per main weight
  (sqrt(exp_avg_sq) + eps), 4N (/DP when distributed). Activations are freed by then, so the peak is
  the larger of the two, not their sum. Without this term the estimate ran 5%, 9% and 12% under the
  measured peaks of L, XL and 4B at stage III (docs/BENCHMARKS.md), the gap growing with N;
- a fixed allowance for the CUDA context, NCCL buffers and allocator slack (``RUNTIME_OVERHEAD_GIB``).

Context parallelism (``parallel.context_parallel`` = CP): a rank holds S/CP tokens of every activation
except attention's keys and values, which it gathers whole (2·S·kv·hd per layer, stored for backward);
the distributed optimizer shards over data x context parallel ranks (Megatron's ``dp_cp`` group), so
its state and working list divide by DP x CP. The report prints the attended (query, key) pairs of each
CP rank (:func:`videoar_megatron.model.context_parallel.attended_pairs_per_rank`) and, for every CP that
divides the world, the estimate: the smallest CP that fits is the proposal.

It is an estimate meant to catch a recipe that cannot fit before it waits in a queue, not a profile;
``benchmarks/bench_ar_memory.py`` prints measured peaks next to it on a GPU host.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from videoar_megatron.model.context_parallel import attended_pairs_per_rank, sequence_multiple
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.params import condition_parameters, layer_parameters
from videoar_megatron.training.config import SourceConfig, TrainConfig

PAPER_TEMPORAL_FACTOR = 4
"""Tokenizer time compression τ (paper): 1 + 4k frames → 1 + k latent frames."""
PAPER_SPATIAL_FACTOR = 16
"""Tokenizer spatial compression (paper)."""
RUNTIME_OVERHEAD_GIB = 3.0
"""CUDA context, NCCL buffers, allocator fragmentation."""
BUBBLE_WARN = 0.10
"""The dry run warns when the pipeline bubble is above this share of the compute time."""
GIB = 2**30


class DryRunError(ValueError):
    """The recipe cannot run at its target size; the message names the knob."""


def source_layout(cfg: TrainConfig, source: SourceConfig) -> tuple[TokenLayout, str]:
    """(padded token layout, where it came from) of one data source: its shard manifest if readable,
    else the recipe's ``num_frames`` / ``scale_schedule`` (/ ``resolution``)."""
    manifest_path = Path(source.path) / "manifest.json"
    where = f"data source {source.name}"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        schedule = source.scale_schedule or m["scale_schedule"]
        frames, origin = int(m["latent_frames"]), f"shard manifest {manifest_path}"
    else:
        if source.scale_schedule is None or not source.num_frames:
            raise DryRunError(f"{where}: cannot derive the sequence: the shards are not readable here and the "
                              f"recipe lacks its scale_schedule and num_frames")
        if (source.num_frames - 1) % PAPER_TEMPORAL_FACTOR:
            raise DryRunError(f"{where}: num_frames={source.num_frames} is not 1 + {PAPER_TEMPORAL_FACTOR}k")
        schedule, origin = source.scale_schedule, "recipe"
        frames = 1 + (source.num_frames - 1) // PAPER_TEMPORAL_FACTOR
        if source.resolution is not None:
            grid = [r // PAPER_SPATIAL_FACTOR for r in source.resolution]
            if list(schedule[-1]) != grid or any(r % PAPER_SPATIAL_FACTOR for r in source.resolution):
                raise DryRunError(f"{where}: scale_schedule ends at {list(schedule[-1])} but resolution "
                                  f"{source.resolution} / {PAPER_SPATIAL_FACTOR} is {grid}")
    if len(schedule) > cfg.model.max_scales:
        raise DryRunError(f"{where}: the schedule has {len(schedule)} scales > model.max_scales={cfg.model.max_scales}")
    multiple = cfg.model.pad_to_multiple * sequence_multiple(cfg.parallel)
    return TokenLayout.padded(cfg.model.prefix_len, schedule, frames, multiple), origin


def sequence_layouts(cfg: TrainConfig) -> dict[str, tuple[TokenLayout, str]]:
    """Every source's (layout, origin); memory is estimated at the longest."""
    return {s.name: source_layout(cfg, s) for s in cfg.data.sources}


def longest(cfg: TrainConfig) -> TokenLayout:
    return max((lay for lay, _ in sequence_layouts(cfg).values()), key=lambda lay: lay.seq_len)


@dataclass
class StageMemory:
    stage: int
    params: int
    weights: float
    grads: float
    optimizer: float
    optimizer_distributed: float
    activations: float
    activations_recompute: float
    optimizer_step: float
    """The optimizer step's fp32 working list (one temporary per main weight)."""
    optimizer_step_distributed: float

    def total(self, distributed: bool, recompute: bool) -> float:
        step = self.optimizer_step_distributed if distributed else self.optimizer_step
        return (self.weights + self.grads + (self.optimizer_distributed if distributed else self.optimizer)
                + max(self.activations_recompute if recompute else self.activations, step)
                + RUNTIME_OVERHEAD_GIB * GIB)


def stage_parameters(cfg: TrainConfig, stage: int) -> int:
    """Parameters of one pipeline stage held by one TP rank."""
    m, tp, pp = cfg.model, cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    h = m.hidden_size
    per_layer = layer_parameters(m)
    split = per_layer - 2 * h  # everything but the two norms is column/row parallel
    n = (m.num_layers // pp) * (split // tp + 2 * h)
    if stage == 0:
        n += m.latent_dim * h + h + m.max_scales * h + condition_parameters(m)
    if stage == pp - 1:
        n += h + h * m.latent_dim
    return n


def layer_activation_bytes(cfg: TrainConfig, layout: TokenLayout) -> tuple[float, float]:
    """(stored activations of one layer for one micro-batch, layer input only) in bytes. Under context
    parallelism a rank holds S/CP tokens, and the keys/values of all S (gathered for attention)."""
    m, p = cfg.model, cfg.parallel
    S, b, h, f, tp = layout.seq_len, cfg.train.micro_batch_size, m.hidden_size, m.ffn_hidden_size, p.tensor_parallel
    s = S / p.context_parallel
    kv = (m.num_query_groups or m.num_attention_heads) * m.head_dim
    elem = 2 if cfg.train.precision == "bf16" else 4
    replicated = 4 * s * b * h / (tp if p.sequence_parallel else 1)
    split = b * (s * (2 * h + 3 * f) + S * 2 * kv) / tp
    layer_input = s * b * h / (tp if p.sequence_parallel else 1)
    return elem * (replicated + split), elem * layer_input


def in_flight_layers(cfg: TrainConfig, stage: int, accumulation: int) -> float:
    """Layers' worth of one micro-batch's activations that pipeline ``stage`` holds at its peak: the
    chunk forwards Megatron's schedule runs before the stage's first backward (its warm-up count + 1),
    each over num_layers / (PP x v) layers. Plain 1F1B: PP - stage micro-batches of the stage's layers;
    interleaved: 2 (PP - stage - 1) + (v - 1) PP + 1 chunk forwards, capped by the step's m x v."""
    pp, v, layers = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline_stages, cfg.model.num_layers
    if pp == 1:
        return layers
    warmup = pp - stage - 1 if v == 1 else 2 * (pp - stage - 1) + (v - 1) * pp
    return min(warmup + 1, accumulation * v) * layers / (pp * v)


def pipeline_bubble(cfg: TrainConfig, accumulation: int) -> float:
    """Idle share of a 1F1B step relative to its compute, (PP - 1) / (v x m) for m micro-batches per step
    and v virtual stages (Narayanan et al. 2021, eq. 1 and section 2.2.2); 0 without a pipeline."""
    pp, v = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline_stages
    return (pp - 1) / (v * accumulation)


def bubble_report(cfg: TrainConfig, accumulation: int) -> list[str]:
    """The dry run's pipeline-bubble line, and a warning line above :data:`BUBBLE_WARN`."""
    pp, v = cfg.parallel.pipeline_parallel, cfg.parallel.virtual_pipeline_stages
    if pp == 1:
        return ["pipeline bubble: none (parallel.pipeline_parallel=1)"]
    bubble = pipeline_bubble(cfg, accumulation)
    kind = "interleaved" if v > 1 else "plain"
    lines = [f"pipeline bubble: (PP-1)/(v x m) = {pp - 1}/({v} x {accumulation}) = {bubble:.1%} of the compute "
             f"time ({kind} 1F1B, {v} virtual stage(s), {accumulation} micro-batches per step)"]
    if bubble > BUBBLE_WARN:
        lines.append(f"WARNING: the pipeline bubble {bubble:.1%} is above {BUBBLE_WARN:.0%}: raise the micro-batches "
                     f"per step (train.global_batch_size / train.micro_batch_size) or "
                     f"parallel.virtual_pipeline_stages, or lower parallel.pipeline_parallel")
    return lines


def stage_memory(cfg: TrainConfig, layout: TokenLayout, stage: int, dp: int, accumulation: int) -> StageMemory:
    """``dp``: the ranks the distributed optimizer shards over (data x context parallel)."""
    n = stage_parameters(cfg, stage)
    bf16 = cfg.train.precision == "bf16"
    weights = (2 if bf16 else 4) * n
    optimizer = (12 if bf16 else 8) * n
    in_flight = in_flight_layers(cfg, stage, accumulation)
    full, layer_input = layer_activation_bytes(cfg, layout)
    return StageMemory(stage=stage, params=n, weights=weights, grads=4 * n, optimizer=optimizer,
                       optimizer_distributed=optimizer / dp, activations=in_flight * full,
                       activations_recompute=in_flight * layer_input + full,
                       optimizer_step=4 * n, optimizer_step_distributed=4 * n / dp)


def dry_run(cfg: TrainConfig) -> tuple[bool, str]:
    """(fits, report). Raises :class:`DryRunError` / ``ValueError`` for a recipe that cannot run."""
    t = cfg.target
    layout = cfg.check_layout(t.world_size, f"the target {t.nodes} node(s) x {t.gpus_per_node} GPUs")
    if not cfg.data.path:
        return True, _base_recipe_report(cfg, layout)
    layouts = sequence_layouts(cfg)
    seq = longest(cfg)
    stages = stages_memory(cfg, seq, layout)
    distributed, recompute = cfg.optim.distributed_optimizer, cfg.parallel.recompute == "full"
    shards = layout.dp * layout.cp
    cp = f" CP={layout.cp}" if layout.cp > 1 else ""
    lines = [f"recipe layout at {t.nodes} x {t.gpus_per_node} GPUs ({t.gpu_memory_gib:g} GiB each): "
             f"TP={layout.tp}{cp} PP={layout.pp} DP={layout.dp}, micro-batch {layout.micro_batch_size} x "
             f"{layout.accumulation} accumulation x {layout.dp} = global batch {layout.global_batch_size}",
             *bubble_report(cfg, layout.accumulation),
             *[f"sequence of {name} ({origin}): {lay.prefix_len} prefix + {lay.frames} frames x "
               f"{lay.tokens_per_frame} tokens ({len(lay.scales)} scales, last {lay.scales[-1]}) + {lay.pad} pad = "
               f"{lay.seq_len} tokens" for name, (lay, origin) in layouts.items()],
             f"model: {cfg.model.size} {cfg.model.num_layers} x {cfg.model.hidden_size} x "
             f"{cfg.model.num_attention_heads} heads, precision {cfg.train.precision}, recompute "
             f"{cfg.parallel.recompute}, distributed optimizer {distributed}",
             "", f"{'per GPU (GiB)':<34}" + "".join(f"{'stage ' + str(s.stage):>12}" for s in stages)]
    rows = [("parameters (millions)", lambda s: s.params / 1e6), ("weights", lambda s: s.weights / GIB),
            ("gradients (fp32)", lambda s: s.grads / GIB),
            ("optimizer, not distributed", lambda s: s.optimizer / GIB),
            (f"optimizer, distributed (/{shards})", lambda s: s.optimizer_distributed / GIB),
            ("activations, no recompute", lambda s: s.activations / GIB),
            ("activations, full recompute", lambda s: s.activations_recompute / GIB),
            ("optimizer step working list", lambda s: s.optimizer_step / GIB),
            (f"  distributed (/{shards})", lambda s: s.optimizer_step_distributed / GIB),
            ("runtime overhead", lambda s: RUNTIME_OVERHEAD_GIB)]
    for label, fn in rows:
        lines.append(f"  {label:<32}" + "".join(f"{fn(s):>12.2f}" for s in stages))
    lines.append("  (peak = weights + gradients + optimizer + the larger of activations and the step's list)")
    for d in (False, True):
        for r in (False, True):
            mark = "  <- this recipe" if (d, r) == (distributed, recompute) else ""
            worst = max(s.total(d, r) for s in stages) / GIB
            label = f"total, {'dist.' if d else 'repl.'} optim, {'recompute' if r else 'no recompute'}"
            lines.append(f"  {label:<32}{worst:>12.2f}{mark}")
    worst = max(s.total(distributed, recompute) for s in stages) / GIB
    fits = worst <= t.gpu_memory_gib
    lines += context_parallel_lines(cfg, seq)
    lines.append(f"\nestimate {worst:.1f} GiB of {t.gpu_memory_gib:g} GiB per GPU: "
                 + ("fits" if fits else "DOES NOT FIT (raise TP/CP/PP, enable recompute / the distributed "
                                        "optimizer, or lower train.micro_batch_size)"))
    return fits, "\n".join(lines)


def stages_memory(cfg: TrainConfig, seq: TokenLayout, layout) -> list[StageMemory]:
    """Memory of the first and last pipeline stage at sequence ``seq`` (``layout``: the batch layout)."""
    pp = cfg.parallel.pipeline_parallel
    return [stage_memory(cfg, seq, s, layout.dp * layout.cp, layout.accumulation) for s in sorted({0, pp - 1})]


def context_parallel_lines(cfg: TrainConfig, seq: TokenLayout) -> list[str]:
    """This recipe's attended pairs per CP rank, and the estimate at every CP the target's world allows
    with the smallest that fits (the proposal)."""
    p, t = cfg.parallel, cfg.target
    lines = [""]
    if p.context_parallel > 1:
        pairs = attended_pairs_per_rank(seq, p.context_parallel, p.context_parallel_chunk, cfg.model.mask.rfm_window)
        lines.append(f"context parallel: CP={p.context_parallel}, chunks of {p.context_parallel_chunk} tokens; "
                     f"attended pairs per rank (millions): {', '.join(f'{x / 1e6:.1f}' for x in pairs)} "
                     f"(max/min {max(pairs) / min(pairs):.3f})")
    rows, proposal = [], None
    for cp, gib in context_parallel_options(cfg):
        rows.append(f"CP={cp}: {gib:.1f}")
        if proposal is None and gib <= t.gpu_memory_gib:
            proposal = cp
    lines.append(f"estimate per GPU (GiB) by parallel.context_parallel at {t.world_size} GPUs: {'; '.join(rows)}")
    lines.append(f"smallest context_parallel that fits: {proposal}" if proposal is not None else
                 "no context_parallel fits at this size: raise TP/PP or target.nodes")
    return lines


def context_parallel_options(cfg: TrainConfig) -> list[tuple[int, float]]:
    """(CP, estimate in GiB) for every CP whose layout is valid at the target world size."""
    from dataclasses import replace
    out, ranks = [], cfg.target.world_size // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    for cp in (d for d in range(1, ranks + 1) if ranks % d == 0):
        try:
            option = replace(cfg, parallel=replace(cfg.parallel, context_parallel=cp))
            option.check_layout(cfg.target.world_size)
        except ValueError:
            continue
        out.append((cp, estimate_gib(option)))
    return out


def _base_recipe_report(cfg: TrainConfig, layout) -> str:
    """A recipe without data (a base of other recipes): model and layout only."""
    pp = cfg.parallel.pipeline_parallel
    per_stage = ", ".join(f"stage {s}: {stage_parameters(cfg, s) / 1e6:.1f}M" for s in sorted({0, pp - 1}))
    return (f"base recipe (no data.path): model and layout checks only\n"
            f"layout at {cfg.target.nodes} x {cfg.target.gpus_per_node} GPUs: TP={layout.tp} PP={layout.pp} "
            f"DP={layout.dp}, micro-batch {layout.micro_batch_size} x {layout.accumulation} accumulation\n"
            + "".join(f"{line}\n" for line in bubble_report(cfg, layout.accumulation)) +
            f"model: {cfg.model.size} {cfg.model.num_layers} x {cfg.model.hidden_size} x "
            f"{cfg.model.num_attention_heads} heads; parameters per GPU ({per_stage})")


def estimate_gib(cfg: TrainConfig) -> float:
    """Worst-stage memory estimate of the recipe as configured (for tests and benchmarks)."""
    layout = cfg.check_layout(cfg.target.world_size)
    stages = stages_memory(cfg, longest(cfg), layout)
    return max(s.total(cfg.optim.distributed_optimizer, cfg.parallel.recompute == "full") for s in stages) / GIB
