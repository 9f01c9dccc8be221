"""Recipe schema of tokenizer training (``videoar tokenizer train``): one nested dataclass per section.

Every key is documented by the docstring under its field (``videoar tokenizer train --help`` lists
them all) and checked in ``__post_init__`` with a message naming the key. Checks that involve two
sections (latent grid vs scale schedule, clip length vs temporal compression) live in
:class:`TokenizerTrainConfig`.

Sections that mean the same as in the AR recipe are the same classes (``preemption``, ``logging``, from
``videoar_common``); sections whose keys differ are named for the tokenizer (``TokenizerOptimConfig``:
two engines, a floor relative to each peak; ``TokenizerNumericsConfig``: skip/rollback/stop policies
over the shared numerics guard; ...), so no two config classes of the project share a name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from data_prep.video import ClipSamplingConfig
from tokenizer.config import TokenizerModelConfig
from tokenizer.discriminator import DiscriminatorConfig
from tokenizer.losses import TokenizerLossConfig
from videoar_common.config import ConfigError
from videoar_common.numerics import NumericsConfig
from videoar_common.preemption import PreemptionConfig
from videoar_common.run_logging import LoggingConfig


@dataclass(kw_only=True)
class SynthCorpusConfig:
    """A synthetic corpus (``videoar synth``) written into the run directory, for CPU demos and CI."""

    enabled: bool = False
    """Write ``<run_dir>/synth/{train,eval}`` (once; reused on resume) and train/evaluate on them.
    data.manifest, data.image_manifest and eval.manifest must then be empty."""
    num_train: int = 48
    """Training videos."""
    num_eval: int = 8
    """Held-out videos (different seed)."""
    classes: int = 4
    """Classes (shape/colour/motion styles)."""
    frames: int = 17
    """Frames per synthetic video (>= data.clip.num_frames)."""
    codec: Literal["vp9", "mjpeg"] = "vp9"
    """Codec; both decode with DALI on CPU."""
    seed: int = 0
    """Seed of the training corpus (the held-out corpus uses seed + 1000)."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "classes", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.synth.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class TokenizerDataConfig:
    """Training data: videos (DALI) and/or images (PIL), streamed per rank (the AR trainer reads token
    shards instead)."""

    manifest: str = ""
    """Training videos: CSV/JSONL manifest (path + caption/label columns, see data_prep.manifest) or a
    .txt list of paths."""
    image_manifest: str = ""
    """Training images (.jpg/.png/...; each a 1-frame clip), or videos whose random single frames serve as
    images. Same list formats as data.manifest."""
    image_every: int = 0
    """Joint image-video training: every n-th optimizer step is an image step (needs data.manifest and
    data.image_manifest, or data.synth whose training videos then also give the image frames). 0 = images
    only when there is no video manifest."""
    clip: ClipSamplingConfig = field(default_factory=ClipSamplingConfig)
    """How clips are cut: frames (1 + 4k), stride or target fps, output height/width (resize to cover,
    centre crop). Training clips start at a seeded random frame; held-out clips are centred."""
    micro_batch_size: int = 1
    """Video clips per rank per micro-batch."""
    image_micro_batch_size: int = 8
    """Images per rank per micro-batch on image steps."""
    decode_device: Literal["auto", "cpu", "gpu"] = "auto"
    """DALI decode device: gpu = NVDEC (mixed), cpu = libavcodec; auto = gpu when training on CUDA."""
    decode_threads: int = 2
    """DALI CPU threads per rank."""
    seed: int = 0
    """Seed of the per-epoch shuffles and random clip starts."""
    synth: SynthCorpusConfig = field(default_factory=SynthCorpusConfig)
    """Synthetic corpus instead of manifests (tiny CPU recipe)."""

    def __post_init__(self) -> None:
        if self.synth.enabled and (self.manifest or self.image_manifest):
            raise ValueError("data.synth.enabled writes its own corpus: leave data.manifest and "
                             "data.image_manifest empty")
        if not self.synth.enabled and not (self.manifest or self.image_manifest):
            raise ValueError("set data.manifest (videos) and/or data.image_manifest (images), "
                             "or data.synth.enabled: true")
        if self.image_every < 0:
            raise ValueError(f"data.image_every must be >= 0, got {self.image_every}")
        if self.image_every and not (self.manifest and self.image_manifest) and not self.synth.enabled:
            raise ValueError("data.image_every mixes image steps into video training: it needs both "
                             "data.manifest and data.image_manifest (or data.synth.enabled)")
        if self.micro_batch_size < 1 or self.image_micro_batch_size < 1:
            raise ValueError("data.micro_batch_size and data.image_micro_batch_size must be >= 1")
        if self.decode_threads < 1:
            raise ValueError(f"data.decode_threads must be >= 1, got {self.decode_threads}")
        if self.synth.enabled and self.synth.frames < self.clip.num_frames * self.clip.frame_stride:
            raise ValueError(f"data.synth.frames={self.synth.frames} is shorter than one clip "
                             f"(data.clip.num_frames={self.clip.num_frames} at stride {self.clip.frame_stride})")


@dataclass(kw_only=True)
class TokenizerOptimConfig:
    """AdamW for both engines, each with Megatron's warm-up + decay schedule (``videoar_common.lr_schedule``,
    stepped only on applied steps)."""

    lr: float = 1e-4
    """Peak learning rate of the autoencoder."""
    disc_lr: float = 1e-4
    """Peak learning rate of the discriminator."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip per engine (0 = off)."""
    warmup_steps: int = 1000
    """Linear warm-up from 0 to the peak over this many applied steps (the first step runs at lr 0)."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up, down to lr * min_lr_ratio at the last step (constant: stay at the peak). The
    discriminator's schedule starts at loss.disc_start_step: it warms up over its own first warmup_steps
    and decays to disc_lr * min_lr_ratio at the same last step. A schedule whose warm-up does not end
    before the last step stays in its warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"optim.lr and optim.disc_lr must be > 0, got {self.lr}, {self.disc_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """The two DeepSpeed engines (autoencoder, discriminator)."""

    zero_stage: int = 1
    """ZeRO stage: 1 (optimizer states sharded) or 2 (+ gradients sharded)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 on GPU (fp32 master weights in the ZeRO optimizer), fp32 on CPU; bf16 needs CUDA."""
    reduce_bucket_size: int = 200_000_000
    """ZeRO reduce bucket size (elements)."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2):
            raise ValueError(f"deepspeed.zero_stage must be 1 or 2, got {self.zero_stage}")
        if self.reduce_bucket_size < 1:
            raise ValueError(f"deepspeed.reduce_bucket_size must be >= 1, got {self.reduce_bucket_size}")


@dataclass(kw_only=True)
class TokenizerCheckpointConfig:
    """Training checkpoints in ``<run_dir>/checkpoints/step_XXXXXXXX`` (COMMITTED marker written last)."""

    every: int = 1000
    """Save every this many optimizer steps (and at the end, and when stopped or preempted)."""
    keep_last: int = 3
    """Committed checkpoints to keep (older ones are deleted after a new one commits)."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass(kw_only=True)
class InitConfig:
    """Initial weights of the autoencoder when a run starts (ignored on resume)."""

    from_tokenizer: str = ""
    """A tokenizer directory (e.g. the export of an image pre-training run) with the same architecture
    (the parameter-free scale schedule may differ)."""
    from_recipe: str = ""
    """A tokenizer recipe trained first, in <run_dir>/init/<its name> (resumable; skipped once done), whose
    exported tokenizer then initialises this run like from_tokenizer. Relative paths resolve against the
    recipe file that sets this key."""
    inflate_from: str = ""
    """A 2-D image tokenizer state dict (.safetensors/.pt; keys of tokenizer/image2d.py) to inflate:
    kernels into the last temporal slice, the rest zero."""
    reinflate: bool = False
    """With from_tokenizer/from_recipe: fold every causal kernel's temporal taps into its last slice
    (inflation applied to an image-trained 3-D tokenizer; single-frame outputs are unchanged)."""

    def __post_init__(self) -> None:
        if sum(map(bool, (self.from_tokenizer, self.from_recipe, self.inflate_from))) > 1:
            raise ValueError("set at most one of init.from_tokenizer, init.from_recipe and init.inflate_from")
        if self.reinflate and not (self.from_tokenizer or self.from_recipe):
            raise ValueError("init.reinflate needs init.from_tokenizer or init.from_recipe")


@dataclass(kw_only=True)
class TokenizerNumericsConfig:
    """What happens when a loss or gradient is not finite on any rank (decided on all ranks together by the
    numerics guard shared with the AR trainer, ``videoar_common.numerics``)."""

    on_nonfinite: Literal["skip", "rollback", "stop"] = "skip"
    """skip: drop the optimizer step and its data window on every rank; rollback: also reload the last
    committed checkpoint (the data consumed since then is skipped); stop: exit with an error. A bad
    step is never checkpointed."""
    max_nonfinite: int = 10
    """Stop with an error (exit 3) at the next bad step once this many steps of one job were bad."""
    inject_nonfinite_step: int = -1
    """Fault-injection drill: make the loss NaN at this optimizer step (first attempt only); -1 = off."""
    inject_nonfinite_rank: int = 0
    """Rank on which the drill injects the NaN."""

    def __post_init__(self) -> None:
        if self.max_nonfinite < 1:
            raise ValueError(f"numerics.max_nonfinite must be >= 1, got {self.max_nonfinite}")

    def guard_config(self) -> NumericsConfig:
        """The shared guard's budget: more than max_nonfinite bad steps in this job (the guard's state is not
        checkpointed) stops the run; a bad-step streak is bounded by the same number."""
        return NumericsConfig(max_consecutive_skips=self.max_nonfinite, max_total_skips=self.max_nonfinite)


@dataclass(kw_only=True)
class TokenizerEvalConfig:
    """Held-out reconstruction evaluation (PSNR/SSIM, bits per scale, PNG grid) on rank 0."""

    manifest: str = ""
    """Held-out videos (CSV/JSONL/.txt); empty = no evaluation (unless data.synth.enabled)."""
    num_clips: int = 16
    """Clips evaluated (centre clip of each source, in file order)."""
    batch_size: int = 4
    """Clips per evaluation forward."""
    every: int = 0
    """Evaluate every this many steps (0 = only before training and at the end)."""
    grid_clips: int = 3
    """Clips shown in the reconstruction grid."""
    grid_frames: int = 5
    """Frames shown per clip in the grid (evenly spaced)."""

    def __post_init__(self) -> None:
        if min(self.num_clips, self.batch_size, self.grid_clips, self.grid_frames) < 1 or self.every < 0:
            raise ValueError("eval.num_clips, batch_size, grid_clips, grid_frames must be >= 1, eval.every >= 0")


@dataclass(kw_only=True)
class TokenizerTrainConfig:
    """``videoar tokenizer train``: the 3D causal multi-scale BSQ tokenizer with DeepSpeed."""

    model: TokenizerModelConfig = field(default_factory=TokenizerModelConfig)
    """Tokenizer architecture and scale schedule (written into the exported tokenizer directory)."""
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    """3D discriminator (always trained from scratch)."""
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    """Loss weights (Eq. 4) and GAN schedule."""
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    """Optimizers and learning-rate schedule."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO stage and precision."""
    data: TokenizerDataConfig
    """Training data (required: a recipe must say where its data comes from)."""
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)
    """Held-out evaluation."""
    checkpoint: TokenizerCheckpointConfig = field(default_factory=TokenizerCheckpointConfig)
    """Checkpointing and retention."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights (inflation or an earlier tokenizer)."""
    numerics: TokenizerNumericsConfig = field(default_factory=TokenizerNumericsConfig)
    """Non-finite loss handling."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    """Signals and wall-clock limit that make the job save, write REQUEUE_REQUESTED and exit with 75 (as
    ``videoar train``)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric sinks (metrics.jsonl always)."""
    steps: int = 100_000
    """Optimizer steps in total."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (per rank)."""
    global_batch_size: int = 0
    """Clips per optimizer step over all ranks. 0 = data.micro_batch_size x grad_accum_steps x world size;
    > 0 derives grad_accum_steps from the world size at launch (must divide evenly) and overrides it."""
    seed: int = 0
    """Seed of model initialisation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = the local GPU when CUDA is present, else CPU (gloo)."""
    stop_after: int = 0
    """Save and exit (code 0) after this many steps in this job (resume continues). 0 = off. For jobs that
    should be requeued use preemption.time_limit_minutes."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.grad_accum_steps < 1 or self.stop_after < 0 or self.global_batch_size < 0:
            raise ValueError("steps and grad_accum_steps must be >= 1, stop_after and global_batch_size >= 0")
        clip, m = self.data.clip, self.model
        if (clip.num_frames - 1) % m.temporal_factor:
            raise ValueError(f"data.clip.num_frames={clip.num_frames} must be 1 + {m.temporal_factor}k "
                             f"(the model's temporal compression, model.temporal_down_levels)")
        f = m.spatial_factor
        grid = [clip.height // f, clip.width // f]
        if clip.height % f or clip.width % f or [int(v) for v in m.scale_schedule[-1]] != grid:
            raise ValueError(f"the last entry of model.scale_schedule must be the latent grid of "
                             f"data.clip ({clip.height}x{clip.width} / {f} = {grid}), got {m.scale_schedule[-1]}")
        if clip.height % self.discriminator.spatial_factor or clip.width % self.discriminator.spatial_factor:
            raise ValueError(f"data.clip height/width must be multiples of {self.discriminator.spatial_factor} "
                             f"(discriminator.channel_mult has {len(self.discriminator.channel_mult)} down-blocks)")
        if self.eval.manifest and self.data.synth.enabled:
            raise ValueError("data.synth.enabled provides the held-out corpus: leave eval.manifest empty")


def resolve_batch(cfg: TokenizerTrainConfig, world_size: int) -> TokenizerTrainConfig:
    """The config with grad_accum_steps derived from global_batch_size for this world size."""
    if not cfg.global_batch_size:
        return cfg
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not a multiple of data.micro_batch_size "
                         f"({cfg.data.micro_batch_size}) x world size ({world_size})")
    return dataclasses.replace(cfg, grad_accum_steps=cfg.global_batch_size // per_step)
