"""Self-describing tokenizer checkpoints: one call to load, no training recipe needed.

Layout of a tokenizer directory::

    config.yaml        TokenizerModelConfig (resolved)
    model.safetensors  weights (no pickle)
    meta.json          {"content_hash": sha256 of config + weights, "format": 1, ...}
    COMMITTED          commit marker, written last

The content hash identifies the tokenizer in shard manifests: pre-tokenized shards record it and the
AR trainer refuses shards made by another tokenizer. It is computed over the canonical config text and
the tensors in sorted key order, so it does not depend on file timestamps or serialisation details.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tokenizer.config import TokenizerModelConfig
from tokenizer.model import VideoTokenizer
from videoar_common.atomic import atomic_write_json, is_committed, mark_committed
from videoar_common.config import ConfigError, dump_config, load_config
from videoar_common.exit_codes import InputError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
FORMAT_VERSION = 1
TOKENIZER_EXPORT_DIR = "tokenizer"
"""Where ``videoar tokenizer train`` exports the tokenizer inside its run directory."""


class TokenizerCheckpointError(InputError, RuntimeError):
    """A tokenizer directory is missing, incomplete or inconsistent; the message names the file."""


def content_hash(cfg: TokenizerModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(dump_config(cfg).encode())
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tokenizer(model: VideoTokenizer, directory: str | Path, extra_meta: dict | None = None) -> str:
    """Write ``model`` as a tokenizer directory (atomically committed); returns its content hash."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "COMMITTED").unlink(missing_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digest = content_hash(model.cfg, state)
    (directory / CONFIG_FILE).write_text(dump_config(model.cfg))
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(directory / WEIGHTS_FILE)
    atomic_write_json(directory / META_FILE, {"content_hash": digest, "format": FORMAT_VERSION,
                                              **(extra_meta or {})})
    mark_committed(directory, {"content_hash": digest})
    return digest


def read_tokenizer_hash(directory: str | Path) -> str:
    meta = Path(directory) / META_FILE
    if not meta.is_file():
        raise TokenizerCheckpointError(f"{meta} not found: not a tokenizer directory")
    return json.loads(meta.read_text())["content_hash"]


def load_tokenizer(directory: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, verify: bool = True) -> VideoTokenizer:
    """Load a tokenizer directory written by :func:`save_tokenizer` (eval mode)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerCheckpointError(f"tokenizer directory not found: {directory}")
    if not is_committed(directory):
        if is_committed(directory / TOKENIZER_EXPORT_DIR):
            raise TokenizerCheckpointError(f"{directory} is a tokenizer training run directory: its tokenizer is "
                                           f"{directory / TOKENIZER_EXPORT_DIR}")
        raise TokenizerCheckpointError(f"{directory} has no COMMITTED marker: the save did not finish")
    for name in (CONFIG_FILE, WEIGHTS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise TokenizerCheckpointError(f"{directory / name} is missing")
    version = json.loads((directory / META_FILE).read_text()).get("format", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise TokenizerCheckpointError(f"{directory} has tokenizer format {version}; this videoar-megatron reads "
                                       f"format {FORMAT_VERSION} and older: upgrade it")
    try:
        cfg = load_config(TokenizerModelConfig, directory / CONFIG_FILE)
    except ConfigError as e:
        raise TokenizerCheckpointError(f"{directory / CONFIG_FILE}: {e}") from e
    state = load_file(str(directory / WEIGHTS_FILE))
    expected = read_tokenizer_hash(directory)
    if verify and content_hash(cfg, state) != expected:
        raise TokenizerCheckpointError(f"{directory}: weights do not match the content hash in {META_FILE}")
    model = VideoTokenizer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TokenizerCheckpointError(f"{directory / WEIGHTS_FILE}: missing keys {missing[:5]}, "
                                       f"unexpected keys {unexpected[:5]}")
    model.content_hash = expected
    return model.to(device=device, dtype=dtype).eval()
