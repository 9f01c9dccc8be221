"""Typed configuration of the VideoAR transformer, with the paper's named sizes.

Design decision: one ``ModelConfig`` holds every knob that changes the model's numerics (sizes,
RoPE, mask, cross-frame error correction, conditioning, loss); ``ParallelConfig`` holds the knobs
that must *not* change them (TP, PP, CP, sequence parallel, recompute). A named ``size`` fills the
transformer dimensions; explicit ``num_layers``/``hidden_size``/... override the preset, so a resolved
config written to a run directory loads back equal.

Sizes (paper supp. A): L = 24 x 1536 x 12 heads (926M), XL = 32 x 2048 x 16 (2.0B), 4B = 36 x 2560 x 32.
The FFN width defaults to 4 x hidden with SwiGLU, i.e. 16·h² weights per layer: that is the only
LLaMA-style choice that lands on the paper's parameter counts (L: 24·16·1536² = 906M + embeddings/head
≈ 926M). LLaMA's 8/3 x hidden would give 12·h² per layer (L ≈ 0.68B), far below 926M. See
:func:`parameter_report` for the counts next to the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Named sizes from the paper (supp. A); "tiny" is ours, for CPU tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
    "L": {"num_layers": 24, "hidden_size": 1536, "num_attention_heads": 12},
    "XL": {"num_layers": 32, "hidden_size": 2048, "num_attention_heads": 16},
    "4B": {"num_layers": 36, "hidden_size": 2560, "num_attention_heads": 32},
}
PAPER_PARAMS: dict[str, float | None] = {"tiny": None, "L": 926e6, "XL": 2.0e9, "4B": None}
"""Parameter counts the paper reports (Tab. 3); the 4B model's exact count is not given."""


@dataclass(kw_only=True)
class RopeConfig:
    base: float = 10000.0
    """RoPE base θ: pair j of a head rotates by position · base^(-2j/head_dim)."""
    axis_split: tuple[int, int, int] | None = None
    """Rotary pairs given to the (t, h, w) axes; must sum to head_dim/2. None: equal thirds, the
    remainder to t."""
    axis_layout: Literal["interleaved", "sectioned"] = "interleaved"
    """How pairs are assigned to axes over the one frequency ladder base^(-2j/head_dim).
    'interleaved' (t,h,w,t,h,w,...): every axis spans high and low frequencies. 'sectioned'
    (M-RoPE): t takes the highest frequencies, w the lowest, which leaves w almost unencoded for
    small grids. Both keep text tokens (i,i,i) exactly equal to 1-D RoPE."""
    grid: Literal["own", "final"] = "own"
    """Spatial indices of a coarse scale: 'own' = 0..h_k-1 on the scale's own grid (paper Fig. 2);
    'final' = round(i·H_K/h_k), rescaled to the final grid (Infinity/InfinityStar)."""

    def __post_init__(self):
        if self.base <= 1:
            raise ValueError(f"rope.base must be > 1, got {self.base}")
        if self.axis_split is not None and min(self.axis_split) < 0:
            raise ValueError(f"rope.axis_split must be non-negative, got {self.axis_split}")


@dataclass(kw_only=True)
class MaskConfig:
    rfm_window: int = 0
    """Random Frame Mask window w (Eq. 9): a query in frame t sees earlier frames t' with
    t - w <= t' < t. 0: unlimited. Applies in training and at inference."""
    rfm_p_mask: float = 0.0
    """Probability of dropping each earlier frame inside the window (training only), drawn per sample
    and per query frame. 0 disables the random drop."""
    rfm_anchor_first: bool = False
    """Keep latent frame 0 in every later frame's context: outside the window and never dropped (an
    anchor, like the first-frame condition of InfinityStar's interactive mode). False (default) is
    Eq. 9 as written: frame 0 is windowed and dropped like any earlier frame."""

    @property
    def reads_frame_table(self) -> bool:
        """Whether the mask looks up the per-sample frame table (``frame_visible_BTT``) for earlier frames:
        under a window or a random drop; without either every earlier frame is visible (a range test)."""
        return self.rfm_window > 0 or self.rfm_p_mask > 0

    def __post_init__(self):
        if self.rfm_window < 0:
            raise ValueError(f"mask.rfm_window must be >= 0 (0 = unlimited), got {self.rfm_window}")
        if not 0.0 <= self.rfm_p_mask < 1.0:
            raise ValueError(f"mask.rfm_p_mask must be in [0, 1), got {self.rfm_p_mask}")


@dataclass(kw_only=True)
class CorrectionConfig:
    p_min: float = 0.0
    """Cross-frame error correction (Eq. 8): lower end of the flip-ratio range of frame 0."""
    p_max: float = 0.25
    """Upper end of the flip-ratio range of frame 0. p_min = p_max = 0 disables the correction."""
    delta: float = 0.01
    """Per-latent-frame increase of both ends of the range: frame t draws from
    U(p_min + delta·t, p_max + delta·t)."""
    inherit: bool = True
    """Error inheritance: the first scale of frame t > 0 draws from U(p_final(t-1), p_max + delta·t),
    p_final(t-1) being the ratio drawn for the last scale of frame t-1."""

    def __post_init__(self):
        if not 0.0 <= self.p_min <= self.p_max <= 1.0:
            raise ValueError(f"correction.p_min/p_max must satisfy 0 <= p_min <= p_max <= 1, "
                             f"got {self.p_min}, {self.p_max}")
        if self.delta < 0:
            raise ValueError(f"correction.delta must be >= 0, got {self.delta}")

    @property
    def enabled(self) -> bool:
        """p_max = 0 switches the correction off (whatever delta is)."""
        return self.p_max > 0


@dataclass(kw_only=True)
class ConditionConfig:
    kind: Literal["class", "text_tokens", "text_features", "none"] = "class"
    """'class': a label → learned prefix tokens; 'text_tokens': token ids → a learned embedding;
    'text_features': precomputed frozen-encoder features (B, L, feature_dim) → a linear projection;
    'none': unconditional (no prefix, no CFG)."""
    num_classes: int = 101
    """Number of class labels (kind=class; UCF-101: 101)."""
    tokens_per_class: int = 1
    """Prefix length |Ψ| for kind=class: each label is embedded as this many learned tokens."""
    vocab_size: int = 32000
    """Vocabulary of kind=text_tokens."""
    text_len: int = 64
    """Prefix length |Ψ| for text kinds: captions are padded/truncated to this many tokens; padded
    keys are masked per sample. The video's RoPE offset is this padded length."""
    feature_dim: int = 2048
    """Width of the precomputed text-encoder features (kind=text_features)."""
    dropout: float = 0.1
    """Condition dropout for classifier-free guidance: a sample's condition is replaced by the learned
    null condition with this probability during training."""

    def __post_init__(self):
        for name in ("num_classes", "tokens_per_class", "vocab_size", "text_len", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"condition.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"condition.dropout must be in [0, 1), got {self.dropout}")

    @property
    def prefix_len(self) -> int:
        """|Ψ|: the number of prefix tokens before the video."""
        return {"class": self.tokens_per_class, "text_tokens": self.text_len,
                "text_features": self.text_len, "none": 0}[self.kind]


@dataclass(kw_only=True)
class LossConfig:
    scale_weighting: Literal["none", "infinity", "infinitystar"] = "none"
    """Weight of a token of scale k in the bitwise cross-entropy (the paper is silent), with
    n_k = h_k·w_k tokens per frame and K the last scale: 'none' = 1 (the finest scale dominates);
    'infinity' = sqrt(n_K / n_k), Infinity's --reweight_loss_by_scale 1 (its trainer.py), so scale k
    carries sqrt(n_k) / sum_j sqrt(n_j) of the loss; 'infinitystar' = min(max_reweight,
    (n_K / n_k)^(1/(1+scale_reweight))), InfinityStar's rule. Weights sum to one per sample
    (docs/ar_model.md#bit-loss-and-per-scale-weights)."""
    scale_reweight: int | None = None
    """r of scale_weighting=infinitystar (InfinityStar's --reweight_loss_by_scale); None = 4, the value
    of its 480p/720p training scripts. Refused with the other weightings."""
    max_reweight: float | None = None
    """Cap of the per-token weight for scale_weighting=infinitystar; None = 40 (InfinityStar's
    max_reweight_value). Refused with the other weightings."""
    scale_weights: list[float] | None = None
    """Optional explicit per-scale multipliers (one per scale of the schedule), applied on top."""

    def __post_init__(self):
        if self.scale_weighting != "infinitystar":
            for name in ("scale_reweight", "max_reweight"):
                if getattr(self, name) is not None:
                    raise ValueError(f"loss.{name} applies to loss.scale_weighting=infinitystar only, "
                                     f"not {self.scale_weighting!r}")
        if self.scale_reweight is not None and self.scale_reweight < 1:
            raise ValueError(f"loss.scale_reweight must be >= 1, got {self.scale_reweight}")
        if self.max_reweight is not None and self.max_reweight <= 0:
            raise ValueError(f"loss.max_reweight must be > 0, got {self.max_reweight}")
        if self.scale_weights is not None and min(self.scale_weights) < 0:
            raise ValueError(f"loss.scale_weights must be non-negative, got {self.scale_weights}")

    @property
    def infinitystar_r_cap(self) -> tuple[int, float]:
        """(r, cap) of the infinitystar weighting, defaults filled in."""
        return (4 if self.scale_reweight is None else self.scale_reweight,
                40.0 if self.max_reweight is None else self.max_reweight)


@dataclass(kw_only=True)
class ModelConfig:
    size: Literal["tiny", "L", "XL", "4B", "custom"] = "tiny"
    """Named size; fills num_layers, hidden_size and num_attention_heads unless they are given.
    'custom' requires all three."""
    num_layers: int | None = None
    """Transformer layers (None: from size)."""
    hidden_size: int | None = None
    """Hidden width (None: from size)."""
    num_attention_heads: int | None = None
    """Attention heads (None: from size)."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention (None: one per attention head)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width (None: 4 x hidden_size, which matches the paper's parameter counts)."""
    latent_dim: int = 48
    """d: bits per token = channels of the tokenizer latent (paper 48). Must match the tokenizer."""
    max_scales: int = 16
    """Rows of the learnable scale embedding s_k: the longest scale schedule this model will see."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation (output projections are scaled by 1/sqrt(2·layers))."""
    attention_backend: Literal["auto", "flex", "sdpa"] = "auto"
    """'flex': FlexAttention block-sparse masks (CUDA); 'sdpa': a dense boolean mask with
    scaled_dot_product_attention; 'auto': flex on CUDA, sdpa on CPU. Both use one mask definition."""
    flex_kernel: Literal["auto", "triton", "flash"] = "auto"
    """Kernel behind the flex path (CUDA). 'triton': Inductor's Triton FlexAttention kernels (no extra
    dependency). 'flash': FlexAttention's FlashAttention-4 backend (``BACKEND: FLASH``, CuTe DSL): needs
    the ``flash`` extra (flash-attn-4) and a Hopper or newer GPU (on Hopper head_dim <= 128; heads below
    97, such as 4B's 80, run zero-padded to 128 with their own softmax scale: exact); refused before
    building where it cannot run, and with a Random Frame Mask window or drop (mask.rfm_window /
    rfm_p_mask), with which it crashed through the model. 'auto': the fastest valid one per sequence
    layout: flash where it can run and the sequence has at least 4,096 tokens (it is 1.8x faster at
    stage-III length, slower at UCF-101 length) and the mask reads no frame table, else triton; the
    choice and its reason are logged at start. Same mask, same BlockMask, results equal within bf16
    rounding (GPU tests). A kernel choice: a run may resume with another value. Figures:
    docs/BENCHMARKS.md."""
    attention_split_tokens: int = 0
    """Split attention: (frame, scale) blocks of at least this many tokens run as unmasked SDPA calls
    over the keys before their end (FlashAttention kernels on GPU) and only the other queries go through
    the mask. Exact (same rule, tested on CPU and GPU); used only when no Random Frame Mask drop or
    window hides a frame. 0 (default) disables it: the one threshold measured made the stage-III
    VideoAR-L step slower (docs/BENCHMARKS.md)."""
    pad_to_multiple: int = 1
    """Pad the sequence at its end to a multiple of this (padded tokens are masked and carry no loss);
    sequence parallelism needs a multiple of the TP size, which the builder adds on its own."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """Multi-scale temporal 3-D RoPE (Eq. 7)."""
    mask: MaskConfig = field(default_factory=MaskConfig)
    """Attention mask: Random Frame Mask (Eq. 9)."""
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    """Cross-frame error correction (Eq. 8), applied when building training batches."""
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    """Conditioning prefix and condition dropout."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Bitwise cross-entropy weighting."""

    def __post_init__(self):
        self._fill_from_size()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} must be divisible by "
                             f"num_query_groups {groups}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (hidden_size / num_attention_heads) must be even "
                             "for RoPE")
        split = self.rope.axis_split
        if split is not None and sum(split) != self.head_dim // 2:
            raise ValueError(f"rope.axis_split {split} must sum to head_dim/2 = {self.head_dim // 2}")
        for name in ("latent_dim", "max_scales", "pad_to_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_split_tokens < 0:
            raise ValueError(f"attention_split_tokens must be >= 0 (0 = off), got {self.attention_split_tokens}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("norm_eps and init_std must be > 0")
        if self.loss.scale_weights is not None and len(self.loss.scale_weights) > self.max_scales:
            raise ValueError(f"loss.scale_weights has {len(self.loss.scale_weights)} entries but "
                             f"max_scales is {self.max_scales}")

    def _fill_from_size(self) -> None:
        preset = SIZES.get(self.size, {})
        for name in ("num_layers", "hidden_size", "num_attention_heads"):
            if getattr(self, name) is None:
                if not preset:
                    raise ValueError(f"size=custom needs {name}")
                setattr(self, name, preset[name])
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def prefix_len(self) -> int:
        return self.condition.prefix_len


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (Megatron column/row parallel linears; heads and FFN split)."""
    pipeline_parallel: int = 1
    """Pipeline stages; layers are split evenly, the prefix/embeddings live on the first stage and the
    bit head on the last."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_parallel > 1): norms and residuals hold S/TP tokens."""
    recompute: Literal["none", "full", "core_attn"] = "none"
    """Activation recompute: 'full' recomputes every layer in backward, 'core_attn' only attention."""
    virtual_pipeline_stages: int = 1
    """Model chunks per pipeline rank (Megatron's interleaved 1F1B; 1 = plain 1F1B). With v chunks the
    layers are dealt round-robin in num_layers / (PP x v) blocks (rank r holds virtual stages r, r + PP,
    ...), which cuts the pipeline bubble from (PP-1)/m to (PP-1)/(v m) for m micro-batches per step, at
    v times the point-to-point messages. Needs pipeline_parallel > 1, num_layers divisible by PP x v and
    micro-batches per step divisible by PP (the dry run prints the bubble). Combines with context_parallel."""
    context_parallel: int = 1
    """Context-parallel size (long videos): every rank of a CP group holds 1/CP of the sequence's tokens
    in embeddings, layers, head and loss; attention runs its queries against the keys/values gathered
    over the group under the same mask rule; gradients are reduced over data x context parallel ranks
    (Megatron-core's CP groups). Tokens are dealt to ranks in chunks balanced by attention work
    (docs/training.md). Sampling always runs unsplit."""
    context_parallel_chunk: int = 128
    """Tokens per chunk dealt to context-parallel ranks (the sequence is padded to a multiple of CP x
    chunk). 128 = FlexAttention's block: a chunk never splits a BlockMask block, so the mask keeps its
    block sparsity; smaller chunks balance finer at short lengths (tests)."""

    def __post_init__(self):
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.context_parallel < 1 or self.context_parallel_chunk < 1:
            raise ValueError(f"parallel.context_parallel ({self.context_parallel}) and "
                             f"parallel.context_parallel_chunk ({self.context_parallel_chunk}) must be >= 1")
        if self.virtual_pipeline_stages < 1:
            raise ValueError(f"parallel.virtual_pipeline_stages must be >= 1, got {self.virtual_pipeline_stages}")
        if self.virtual_pipeline_stages > 1 and self.pipeline_parallel == 1:
            raise ValueError(f"parallel.virtual_pipeline_stages={self.virtual_pipeline_stages} needs "
                             f"parallel.pipeline_parallel > 1 (virtual stages interleave a pipeline)")

    @property
    def megatron_virtual_stages(self) -> int | None:
        """Megatron's ``virtual_pipeline_model_parallel_size``: None, not 1, selects plain 1F1B."""
        return self.virtual_pipeline_stages if self.virtual_pipeline_stages > 1 else None

    @property
    def replica_size(self) -> int:
        """Ranks of one model replica: TP x CP x PP (they read the same samples)."""
        return self.tensor_parallel * self.context_parallel * self.pipeline_parallel
