"""3D causal multi-scale BSQ video tokenizer (VideoAR §4.1)."""
from tokenizer.checkpoint import load_tokenizer, save_tokenizer

__all__ = ["load_tokenizer", "save_tokenizer"]
