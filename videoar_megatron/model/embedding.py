"""First-stage embeddings: the condition prefix and the video token inputs (Eq. 7).

- Video token: ``x = W_in · F̃ + s_k`` (a linear map of the d-dim input features plus the learnable
  scale embedding s_k); frame 0's first scale is the learned ``<SOS>`` vector (plus s_0) at every
  position of that scale. No frame embedding: time is carried by the 3-D RoPE (paper: none).
- Prefix (|Ψ| tokens): ``class`` → each label is ``tokens_per_class`` learned vectors; ``text_tokens``
  → a learned token embedding; ``text_features`` → RMSNorm + linear projection of precomputed
  frozen-encoder features. Condition dropout and the unconditional CFG branch replace the prefix of a
  sample by a learned null condition (an extra class row, or a learned |Ψ|-token null prefix for text).

These modules are small and replicated over tensor-parallel ranks; every rank computes the same
output from the same batch, so their gradients agree across TP without communication.
"""
from __future__ import annotations

import torch
from torch import nn

from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.layout import PAD, TEXT, LayoutTables, TokenLayout
from videoar_megatron.model.sequence import VideoARBatch


class ConditionEmbedding(nn.Module):
    """Condition → prefix ``(B, |Ψ|, C)``, with the learned null condition where ``cond_drop_B``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        c, C = cfg.condition, cfg.hidden_size
        self.kind, self.prefix_len, self.tokens_per_class = c.kind, cfg.prefix_len, c.tokens_per_class
        if c.kind == "class":
            self.class_emb = nn.Embedding(c.num_classes + 1, c.tokens_per_class * C, dtype=dtype)
            self.null_class = c.num_classes
        elif c.kind == "text_tokens":
            self.token_emb = nn.Embedding(c.vocab_size, C, dtype=dtype)
        elif c.kind == "text_features":
            self.feat_norm = nn.RMSNorm(c.feature_dim, eps=cfg.norm_eps, dtype=dtype)
            self.feat_proj = nn.Linear(c.feature_dim, C, bias=False, dtype=dtype)
        if c.kind in ("text_tokens", "text_features"):
            self.null_prefix = nn.Parameter(torch.zeros(cfg.prefix_len, C, dtype=dtype))
        for name, p in self.named_parameters():
            if "norm" not in name:
                nn.init.normal_(p, std=cfg.init_std)

    def forward(self, batch: VideoARBatch) -> torch.Tensor:
        drop_B = batch.cond_drop_B
        if self.kind == "class":
            label_B = batch.class_B.masked_fill(drop_B, self.null_class)
            prefix = self.class_emb(label_B)
            return prefix.view(label_B.shape[0], self.tokens_per_class, -1)
        if self.kind == "text_tokens":
            prefix = self.token_emb(batch.text_ids_BP)
        else:
            feats = batch.text_feat_BPD.to(self.feat_proj.weight.dtype)
            prefix = self.feat_proj(self.feat_norm(feats))
        return torch.where(drop_B[:, None, None], self.null_prefix.to(prefix.dtype)[None], prefix)


class VideoAREmbedding(nn.Module):
    """Input embedding of a sequence slice: ``(B, ·)`` batch → ``[s, B, C]`` (Megatron's layout)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        C = cfg.hidden_size
        self.input_proj = nn.Linear(cfg.latent_dim, C, bias=False, dtype=dtype)
        self.sos = nn.Parameter(torch.zeros(C, dtype=dtype))
        self.scale_emb = nn.Embedding(cfg.max_scales, C, dtype=dtype)
        for p in (self.input_proj.weight, self.sos, self.scale_emb.weight):
            nn.init.normal_(p, std=cfg.init_std)
        self.condition = ConditionEmbedding(cfg, dtype) if cfg.prefix_len else None

    def video(self, batch: VideoARBatch, tables: LayoutTables, start: int, end: int) -> torch.Tensor:
        """Embeddings ``(B, end-start, C)`` of video tokens ``start:end`` (indices into the N video tokens)."""
        P = batch.layout.prefix_len
        scale_n = tables.scale_S[P + start:P + end]
        frame_n = tables.frame_S[P + start:P + end]
        x = self.input_proj(batch.inputs_BNd[:, start:end].to(self.input_proj.weight.dtype))
        is_sos = ((frame_n == 0) & (scale_n == 0))[None, :, None]
        x = torch.where(is_sos, self.sos.to(x.dtype), x)
        return x + self.scale_emb(scale_n)[None]

    def at_positions(self, batch: VideoARBatch, tables: LayoutTables, positions_s: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[s, B, C]`` of the tokens at sequence positions ``positions_s`` (any order; a
        context-parallel rank's chunks): the same values as :meth:`forward` gives them."""
        P, N = batch.layout.prefix_len, batch.layout.video_len
        kind_s, scale_s = tables.kind_S[positions_s], tables.scale_S[positions_s]
        n_s = (positions_s - P).clamp(0, N - 1)  # rows that are not video take some video row, then drop it
        x = self.input_proj(batch.inputs_BNd[:, n_s].to(self.input_proj.weight.dtype))
        is_sos = ((tables.frame_S[positions_s] == 0) & (scale_s == 0))[None, :, None]
        x = torch.where(is_sos, self.sos.to(x.dtype), x) + self.scale_emb(scale_s.clamp(min=0))[None]
        if P:
            prefix = self.condition(batch)[:, positions_s.clamp(max=P - 1)]
            x = torch.where((kind_s == TEXT)[None, :, None], prefix.to(x.dtype), x)
        x = torch.where((kind_s == PAD)[None, :, None], torch.zeros((), dtype=x.dtype, device=x.device), x)
        return x.transpose(0, 1).contiguous()

    def forward(self, batch: VideoARBatch, tables: LayoutTables, positions: slice) -> torch.Tensor:
        layout: TokenLayout = batch.layout
        P, N = layout.prefix_len, layout.video_len
        start, stop = positions.start, positions.stop
        parts = []
        if start < P:
            parts.append(self.condition(batch)[:, start:min(stop, P)])
        if stop > P and start < P + N:
            parts.append(self.video(batch, tables, max(start, P) - P, min(stop, P + N) - P))
        if stop > P + N:  # pads: zero input, masked everywhere, no loss
            ref = parts[-1] if parts else self.sos
            n = stop - max(start, P + N)
            parts.append(ref.new_zeros(batch.batch_size, n, self.sos.shape[0]))
        return torch.cat(parts, dim=1).transpose(0, 1).contiguous()
