"""Parameter counts of a ``ModelConfig``, next to the paper's (Tab. 3: L 926M, XL 2.0B).

The count is analytic (so XL/4B need not be built to be reported); a test checks it against a built
model. Differences from the paper come from what the paper does not specify: our FFN width
(4·hidden SwiGLU), the conditioning (a class-token table, not a text encoder) and the head.
"""
from __future__ import annotations

from dataclasses import replace

from videoar_megatron.model.config import PAPER_PARAMS, SIZES, ModelConfig


def layer_parameters(cfg: ModelConfig) -> int:
    h, f, hd = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    kv_heads = cfg.num_query_groups or cfg.num_attention_heads
    qkv = h * (h + 2 * kv_heads * hd)
    return 2 * h + qkv + h * h + 2 * h * f + f * h  # 2 norms, qkv, out proj, SwiGLU fc1 (gate+up), fc2


def condition_parameters(cfg: ModelConfig) -> int:
    c, h = cfg.condition, cfg.hidden_size
    if c.kind == "class":
        return (c.num_classes + 1) * c.tokens_per_class * h
    if c.kind == "text_tokens":
        return c.vocab_size * h + c.text_len * h
    if c.kind == "text_features":
        return c.feature_dim + c.feature_dim * h + c.text_len * h
    return 0


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by part (whole model, TP = PP = 1)."""
    h, d = cfg.hidden_size, cfg.latent_dim
    parts = {
        "transformer": cfg.num_layers * layer_parameters(cfg) + h,  # + final norm
        "input": d * h + h + cfg.max_scales * h,  # input projection, <SOS>, scale embedding
        "condition": condition_parameters(cfg),
        "head": h * d,
    }
    parts["total"] = sum(parts.values())
    return parts


def parameter_report(condition_kind: str = "class") -> str:
    """One line per named size: our count next to the paper's."""
    lines = [f"{'size':<5} {'layers x hidden x heads':<24} {'ours':>10} {'paper':>8}  ratio"]
    for size in ("L", "XL", "4B"):
        cfg = ModelConfig(size=size)
        cfg = replace(cfg, condition=replace(cfg.condition, kind=condition_kind))
        ours = count_parameters(cfg)["total"]
        paper = PAPER_PARAMS[size]
        dims = "{num_layers} x {hidden_size} x {num_attention_heads}".format(**SIZES[size])
        ratio = f"{ours / paper:.3f}" if paper else "  -"
        paper_s = f"{paper / 1e9:.3f}B" if paper else "n/a"
        lines.append(f"{size:<5} {dims:<24} {ours / 1e9:>9.3f}B {paper_s:>8}  {ratio}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m videoar_megatron.model.params
    print(parameter_report())
