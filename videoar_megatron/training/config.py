"""The AR training recipe: one typed tree (``TrainConfig``) that a YAML recipe fills.

Design decision: every knob of a run lives here or in the owning library's config (``ModelConfig``,
``ParallelConfig``, ``PreemptionConfig``, ``NumericsConfig``, ``LoggingConfig``), nested under one
root, so ``videoar train --recipe R --set a.b=v`` reaches all of them and the resolved tree written to
``<run_dir>/config.yaml`` (and into every checkpoint's ``train_state.json``) describes the run
completely. Checks that involve several sections (batch divisibility, heads by TP, layers by PP) live
in :meth:`TrainConfig.check_layout`, called with the *target* world size by the dry run and with the
actual one at start-up, so a recipe fails on a login node rather than after the queue wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from videoar_common.compile_cache import CompileConfig
from videoar_common.numerics import NumericsConfig
from videoar_common.preemption import PreemptionConfig
from videoar_common.run_logging import LoggingConfig
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.context_parallel import check_context_parallel
from videoar_megatron.training.metrics import MetricsConfig


def _check_shape_knobs(prefix: str, num_frames: int, resolution, scale_schedule) -> None:
    if num_frames < 0:
        raise ValueError(f"{prefix}num_frames must be >= 0, got {num_frames}")
    if resolution is not None and len(resolution) != 2:
        raise ValueError(f"{prefix}resolution must be [height, width], got {resolution}")
    if scale_schedule is not None and (not scale_schedule or any(len(s) != 2 for s in scale_schedule)):
        raise ValueError(f"{prefix}scale_schedule must be a non-empty list of [h, w], got {scale_schedule}")


@dataclass(kw_only=True)
class SourceConfig:
    """One more token shard set mixed into training (e.g. images next to videos)."""

    name: str = ""
    """Short name (metrics are logged per source as loss_<name>)."""
    path: str = ""
    """Merged token shard directory."""
    weight: float = 1.0
    """Relative share of optimizer steps that read this source (every step reads one source)."""
    num_frames: int = 0
    """Expected frames per clip (0 = any; 1 for images)."""
    resolution: list[int] | None = None
    """Expected [height, width] in pixels (None = any)."""
    scale_schedule: list[list[int]] | None = None
    """Scale schedule to train on (None: the shards' own)."""

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"name must be a non-empty identifier, got {self.name!r}")
        if not self.path:
            raise ValueError(f"source {self.name!r}: path must be set")
        if self.weight <= 0:
            raise ValueError(f"source {self.name!r}: weight must be > 0, got {self.weight}")
        _check_shape_knobs(f"source {self.name!r}: ", self.num_frames, self.resolution, self.scale_schedule)


@dataclass(kw_only=True)
class DataConfig:
    """Token shards (``videoar pretokenize`` output) and how they are read.

    The fields without a section describe the main source; ``mix`` adds more shard sets (staged
    recipes train on images and videos together). Each optimizer step reads one source: shapes differ
    between sources, and one step's micro-batches must share a sequence layout."""

    path: str = ""
    """Merged token shard directory of the main source (required)."""
    name: str = "main"
    """Name of the main source (metrics are logged per source when there are several)."""
    weight: float = 1.0
    """Relative share of optimizer steps that read the main source (with data.mix)."""
    mix: list[SourceConfig] = field(default_factory=list)
    """More shard sets. Steps are dealt to sources by smooth weighted round-robin over the step
    index (deterministic, resumable, same at every layout)."""
    shuffle: bool = True
    """Shuffle samples (mosaicml-streaming py1e); false reads in shard order."""
    seed: int = 0
    """Shuffle seed of the sample order (independent of train.seed)."""
    num_canonical_nodes: int = 1
    """Streaming's canonical node count: the sample order is the same at every node count that
    divides it or is a multiple of it. Keep it fixed for the whole run (a resume refuses a change)."""
    num_workers: int = 2
    """DataLoader worker processes per rank and source (part of the order: keep it fixed across resumes)."""
    tokenizer_hash: str = ""
    """Expected tokenizer content hash of every source ("" = accept the shards' and record it)."""
    resolution: list[int] | None = None
    """Expected clip [height, width] in pixels of the main source (None = any)."""
    num_frames: int = 0
    """Expected frames per clip of the main source (0 = any)."""
    scale_schedule: list[list[int]] | None = None
    """Scale schedule to train the main source on. None: the shard manifest's. Another schedule (same
    final grid) is re-quantized from the stored latents, no re-tokenization needed."""

    def __post_init__(self) -> None:
        if self.num_canonical_nodes < 1:
            raise ValueError(f"num_canonical_nodes must be >= 1, got {self.num_canonical_nodes}")
        if self.num_workers < 0 or self.seed < 0:
            raise ValueError("num_workers and seed must be >= 0")
        if self.weight <= 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        _check_shape_knobs("", self.num_frames, self.resolution, self.scale_schedule)
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names} (data.name and data.mix[].name)")

    @property
    def sources(self) -> list[SourceConfig]:
        """The main source followed by ``mix``."""
        main = SourceConfig(name=self.name, path=self.path or "<unset>", weight=self.weight,
                            num_frames=self.num_frames, resolution=self.resolution,
                            scale_schedule=self.scale_schedule)
        return [main, *self.mix]


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with a warm-up + decay learning-rate schedule (paper: AdamW(0.9, 0.95), wd 0.05, lr 1e-4 cosine)."""

    lr: float = 1e-4
    """Peak learning rate (reached at the end of warm-up)."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up (Megatron OptimizerParamScheduler styles)."""
    decay_steps: int = 0
    """Steps from 0 to the end of the decay (0 = train.steps)."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to norms, biases or other 1-D parameters)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping; the norm is still computed and
    checked by the numerics guard)."""
    distributed_optimizer: bool = True
    """GPU: shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.weight_decay < 0 or self.clip_grad < 0 or self.eps <= 0:
            raise ValueError("weight_decay and clip_grad must be >= 0, eps > 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class TrainLoopConfig:
    """Steps, batch sizes, precision, seeds."""

    steps: int = 1000
    """Optimizer steps of the run (a resumed run continues to this total)."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks; = micro_batch_size x data-parallel
    size x gradient-accumulation steps (accumulation is derived, so this may stay fixed when the
    layout changes, and a resume at another layout reads the same samples per step)."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one rank."""
    seed: int = 1234
    """Seed of the weight initialisation and of every random draw of the batches (error-correction
    flips, Random Frame Mask, condition dropout), which are derived from (seed, step, sample id):
    independent of the layout, replayed exactly on resume."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Parameter/compute precision. bf16 (GPU): bf16 weights and activations, fp32 main weights, grads
    reduced in fp32 and optimizer state (Megatron mixed precision). fp32: everything fp32 (CPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """cuda when available (auto), else cpu."""
    engine: Literal["auto", "megatron", "local"] = "auto"
    """Forward/backward and optimizer engine. auto: megatron on CUDA, local on CPU. megatron: Megatron
    DDP, pipeline schedules (1F1B for PP > 1), finalize_model_grads and get_megatron_optimizer
    (distributed optimizer, bf16 main weights); needs CUDA (on CPU it runs only inside the CI emulation,
    videoar_megatron.training.cuda_compat.emulated_cuda). local: the CPU engine, PP = 1, no recompute: a
    loop over micro-batches, gloo all-reduces, Megatron's FP32Optimizer on host tensors."""

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")


ASYNC_WORKERS = ("fork", "persistent")
"""``checkpoint.async_worker`` values."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron dist_checkpointing checkpoints under ``<run_dir>/checkpoints``."""

    save_every: int = 1000
    """Save every this many steps (0 = only at the end and on preemption)."""
    keep_last: int = 3
    """Keep the newest this many committed checkpoints (0 = keep all)."""
    save_at_end: bool = True
    """Save after the last step."""
    async_save: bool = True
    """Write checkpoints in the background (Megatron dist_checkpointing's asynchronous save): the step
    loop stalls only to plan the save and copy the state to host memory; a forked process per rank writes
    the files while training goes on, and the commit marker is written once every rank's files are whole
    (checked once per step). A stop (signal, time limit) and the end of the run wait for the commit; a
    crash before it leaves the previous checkpoint the newest committed. Same files as a synchronous
    save (false: the loop waits for the whole write). Needs the fork start method (Linux) and a launching
    script guarded by if __name__ == "__main__" (videoar and python -m videoar_megatron.cli are)."""
    async_worker: str = "fork"
    """Who writes an asynchronous save (Megatron's ``AsyncCallsQueue``): ``fork``, a process forked per
    save after the state was copied to host memory by the training process (on CPU the fork's
    copy-on-write memory is the snapshot); ``persistent`` (CUDA only), one worker process per rank,
    started at the first save and kept: it receives the GPU tensors over CUDA IPC, copies them to its own
    host memory while the step loop waits (reusing its pinned buffers from the second save on), and
    writes. The step loop then stalls only for that device-to-host copy: no pinned-memory allocation and
    no fork in the training process. Costs a second CUDA context per GPU. Against fork:
    docs/BENCHMARKS.md (bench_checkpoint.py --set checkpoint.async_worker=persistent)."""
    resume: bool = True
    """At start, resume from the newest committed checkpoint of the run directory if there is one. false
    = start fresh, refused in a run directory that already holds committed checkpoints (use a new one)."""
    load: str = ""
    """Initial weights when there is nothing to resume: a committed step directory, or a run's
    checkpoint root (its newest committed step). Model weights only (next stage of a staged recipe);
    any TP/PP layout."""

    def __post_init__(self) -> None:
        if self.save_every < 0 or self.keep_last < 0:
            raise ValueError("save_every and keep_last must be >= 0")
        if self.async_worker not in ASYNC_WORKERS:
            raise ValueError(f"checkpoint.async_worker must be one of {', '.join(ASYNC_WORKERS)}, "
                             f"got {self.async_worker!r}")


@dataclass(kw_only=True)
class TargetConfig:
    """The machine this recipe is written for; the dry run validates the recipe at this size."""

    nodes: int = 1
    """Nodes of the target allocation."""
    gpus_per_node: int = 8
    """GPUs per node."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU, for the dry run's fits / does-not-fit verdict."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1 or self.gpu_memory_gib <= 0:
            raise ValueError("nodes, gpus_per_node and gpu_memory_gib must be positive")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(kw_only=True)
class CommConfig:
    """Collective timeouts and the NCCL flight recorder (hang diagnosis)."""

    init_timeout_s: float = 1800.0
    """Collective timeout until the first step finished (start-up, compilation, checkpoint loading)."""
    step_timeout_s: float = 900.0
    """Collective timeout after the first step (set behind a barrier so a slow rank is not killed)."""
    flight_recorder_entries: int = 20000
    """GPU: NCCL flight-recorder ring size (TORCH_FR_BUFFER_SIZE); 0 disables. On a timeout every rank
    dumps its recent collectives to ``<run_dir>/flight_recorder/rank<r>`` (TORCH_NCCL_DUMP_ON_TIMEOUT)."""

    def __post_init__(self) -> None:
        if self.init_timeout_s <= 0 or self.step_timeout_s <= 0 or self.flight_recorder_entries < 0:
            raise ValueError("timeouts must be > 0 and flight_recorder_entries >= 0")


@dataclass(kw_only=True)
class DebugConfig:
    """Fault injection for drills and tests (all off by default)."""

    nan_at_steps: list[int] = field(default_factory=list)
    """Make the loss non-finite at these steps (on nan_rank)."""
    nan_rank: int = -1
    """Rank that injects the NaN (-1 = every rank)."""
    signal_at_step: int = 0
    """Send SIGUSR1 to this process at the end of this step (on signal_rank; 0 = off)."""
    signal_rank: int = 0
    """Rank that receives the injected signal."""
    crash_in_save_at_step: int = 0
    """Kill the process (os._exit) after the checkpoint of this step is written but before it is
    committed (0 = off)."""
    crash_in_async_save_at_step: int = 0
    """With checkpoint.async_save: kill the job (the process and its background writer) at the end of
    the step after this one while this step's checkpoint is still being written (uncommitted); 0 = off."""
    slow_async_save_s: float = 0.0
    """With checkpoint.async_save: the background writer waits this long before writing each checkpoint
    (drills of a slow file system: training goes on meanwhile, a stop or the end of the run waits)."""

    def __post_init__(self) -> None:
        if self.slow_async_save_s < 0 or self.crash_in_async_save_at_step < 0:
            raise ValueError("slow_async_save_s and crash_in_async_save_at_step must be >= 0")


@dataclass(kw_only=True)
class TrainConfig:
    """A VideoAR training run: model, layout, data, optimizer, checkpoints and guards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The VideoAR transformer (sizes, RoPE, mask, error correction, condition, loss)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Tensor/pipeline parallel sizes, sequence parallel, activation recompute."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """Nodes x GPUs the recipe is written for (dry run, CI validation)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Token shards."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """Steps, batch sizes, precision, seed."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving, keep-last-k, auto-resume, initial weights."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Signals and wall-clock limit that make the job save and exit for a requeue."""
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    """Non-finite / spiking steps: skipped on every rank together, bounded."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """JSONL (always), wandb, TensorBoard, progress bar."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """MFU peak and the per-step sample-id audit."""
    comm: CommConfig = field(default_factory=CommConfig)
    """Timeouts and the NCCL flight recorder."""
    compile: CompileConfig = field(default_factory=CompileConfig)
    """Where compiled kernels are cached (kept across requeues, shareable between nodes)."""
    debug: DebugConfig = field(default_factory=DebugConfig)
    """Fault injection (drills and tests)."""

    def __post_init__(self) -> None:
        if self.model.condition.kind == "text_tokens":
            raise ValueError("model.condition.kind=text_tokens needs caption token ids, which token shards "
                             "do not store; use text_features (a frozen text encoder at pre-tokenization) "
                             "or class")
        p = self.parallel
        if self.model.num_layers % p.pipeline_parallel:
            raise ValueError(f"model.num_layers={self.model.num_layers} is not divisible by "
                             f"parallel.pipeline_parallel={p.pipeline_parallel}")
        if self.model.num_layers % (p.pipeline_parallel * p.virtual_pipeline_stages):
            raise ValueError(f"model.num_layers={self.model.num_layers} is not divisible by "
                             f"parallel.pipeline_parallel={p.pipeline_parallel} x parallel.virtual_pipeline_stages="
                             f"{p.virtual_pipeline_stages} (every virtual stage holds the same number of layers)")
        heads, groups = self.model.num_attention_heads, self.model.num_query_groups or self.model.num_attention_heads
        if heads % p.tensor_parallel or groups % p.tensor_parallel:
            raise ValueError(f"model.num_attention_heads={heads} and num_query_groups={groups} must be "
                             f"divisible by parallel.tensor_parallel={p.tensor_parallel}")
        check_context_parallel(self.model, p)
        if self.model.ffn_hidden_size % p.tensor_parallel:
            raise ValueError(f"model.ffn_hidden_size={self.model.ffn_hidden_size} is not divisible by "
                             f"parallel.tensor_parallel={p.tensor_parallel}")
        if self.optim.warmup_steps >= self.decay_steps:
            # refused rather than shortened: a warm-up silently cut would change a long run's schedule too
            length = (f"optim.decay_steps={self.optim.decay_steps}" if self.optim.decay_steps
                      else f"train.steps={self.train.steps} (optim.decay_steps is 0)")
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be below the LR schedule's "
                             f"length, {length}; for a short try add --set optim.warmup_steps=0 (or any "
                             f"value below {self.decay_steps})")

    @property
    def decay_steps(self) -> int:
        return self.optim.decay_steps or self.train.steps

    def check_layout(self, world_size: int, where: str = "") -> "BatchLayout":
        """Validate the recipe at ``world_size`` ranks; returns the derived batch layout.

        Raises ``ValueError`` naming the knobs when the world does not split into TP x CP x PP x DP or
        the global batch does not split into micro-batches x DP x accumulation.
        """
        at = f" at {where}" if where else ""
        p = self.parallel
        mp = p.replica_size
        if world_size % mp:
            cp = f" x parallel.context_parallel ({p.context_parallel})" if p.context_parallel > 1 else ""
            raise ValueError(f"world size {world_size}{at} is not divisible by parallel.tensor_parallel "
                             f"({p.tensor_parallel}){cp} x parallel.pipeline_parallel ({p.pipeline_parallel})")
        dp = world_size // mp
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            parts = "TP x CP x PP" if p.context_parallel > 1 else "TP x PP"
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is not divisible by "
                             f"train.micro_batch_size ({self.train.micro_batch_size}) x data-parallel size "
                             f"({dp} = world size {world_size}{at} / ({parts} = {mp}))")
        accum = self.train.global_batch_size // per_step
        if self.parallel.pipeline_parallel > 1 and accum < self.parallel.pipeline_parallel:
            # 1F1B needs at least PP microbatches in flight to keep every stage busy; fewer is legal
            # but mostly bubble, so it is refused rather than silently slow.
            raise ValueError(f"{accum} micro-batches per step{at} < parallel.pipeline_parallel="
                             f"{self.parallel.pipeline_parallel}: raise train.global_batch_size or lower "
                             f"train.micro_batch_size (the pipeline would be mostly idle)")
        if p.virtual_pipeline_stages > 1 and accum % p.pipeline_parallel:
            # Megatron's interleaved schedule runs micro-batches in groups of PP per virtual stage; a
            # smaller last group would stall the pipeline, and Megatron refuses it.
            raise ValueError(f"{accum} micro-batches per step{at} is not a multiple of parallel.pipeline_parallel="
                             f"{p.pipeline_parallel}, which parallel.virtual_pipeline_stages="
                             f"{p.virtual_pipeline_stages} needs: change train.global_batch_size or "
                             f"train.micro_batch_size")
        return BatchLayout(world_size=world_size, tp=p.tensor_parallel, pp=p.pipeline_parallel, dp=dp,
                           cp=p.context_parallel,
                           micro_batch_size=self.train.micro_batch_size, accumulation=accum,
                           global_batch_size=self.train.global_batch_size)


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step is split over ranks and micro-batches."""

    world_size: int
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    accumulation: int
    """Micro-batches per rank per step."""
    global_batch_size: int
    cp: int = 1
    """Context-parallel size: a replica's CP ranks share its samples (each holds part of every sequence)."""

    @property
    def replica_size(self) -> int:
        """Ranks of one model replica (TP x CP x PP): they read the same samples."""
        return self.tp * self.cp * self.pp

    @property
    def per_rank_batch(self) -> int:
        """Samples one data-parallel replica reads per step (= micro_batch_size x accumulation)."""
        return self.micro_batch_size * self.accumulation

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp, "cp": self.cp, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "accumulation": self.accumulation,
                "global_batch_size": self.global_batch_size}
