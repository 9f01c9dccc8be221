"""Per-bit sampling with counter-based random numbers.

The model gives one logit z per bit (binary cross-entropy head; the 2-class view is logits (0, z)).
With temperature τ and top-p p, a bit is drawn as follows (Infinity samples each bit from the
2-class softmax with top-k/top-p; for two classes top-k is a no-op for k >= 2):

- τ = 0: greedy, bit = [z > 0] (a tie z = 0 gives 0).
- otherwise q = sigmoid(z / τ) is the probability of a 1. Top-p over two classes keeps the likelier
  value alone when its probability max(q, 1 − q) is >= p (Infinity's rule: sort ascending, drop the
  smaller class when its cumulative probability is <= 1 − p), so then bit = [z > 0]; otherwise
  bit = [u < q] with u uniform in [0, 1). p = 1 never truncates; p <= 0.5 always does (greedy).

Design decision, where u comes from: a counter-based hash, not a ``torch.Generator``. Every uniform
is a pure function of (sample key, stream, position, bit), where the sample key comes from (run seed,
sample id, extension window) and the stream is the (frame, scale) step. So:

- a sample's video does not depend on the batch it is decoded in, the batch size or the number of
  ranks (per-sample streams, at no cost: one vectorised hash per step, no per-sample generator loop);
- the numbers are identical on CPU and CUDA (64-bit integer arithmetic only), so a GPU run can be
  checked against a CPU run on the same logits;
- there is no generator state to advance, so a decode step is a pure function of its input buffers
  and the whole decode can be captured in a CUDA graph and replayed.

The hash is Wellons' ``lowbias32`` (a 32-bit bijection with low bias), applied twice with the key
mixed in between; 24 bits of it make the uniform. Multiplications are done modulo 2^32 in int64 by
splitting the operand into 16-bit halves, so nothing overflows.
"""
from __future__ import annotations

import hashlib

import torch

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for int64 ``x`` in [0, 2^32): split x into 16-bit halves to stay below 2^63."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """:func:`mix32` on a Python int (for keys and stream constants)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def sample_key(seed: int, sample_id: int, window: int = 0) -> int:
    """32-bit key of one sample's random stream: a hash of (run seed, sample id, extension window)."""
    digest = hashlib.blake2b(f"videoar-sample:{seed}:{sample_id}:{window}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def uniform(keys_B: torch.Tensor, stream: int, tokens: int, dim: int) -> torch.Tensor:
    """Uniforms in [0, 1) ``(B, tokens, dim)`` float32 for stream ``stream`` of each sample key."""
    counter = torch.arange(tokens * dim, device=keys_B.device, dtype=torch.int64)
    key = mix32(keys_B.to(torch.int64) ^ mix32_int(stream * 0x9E3779B1 + 0x632BE5AB))[:, None]   # (B, 1)
    h = mix32(counter[None] ^ key)
    h = mix32(h ^ ((key << 5 | key >> 27) & _M32))
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(-1, tokens, dim)


def sample_bits(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Bits (bool, shape of ``logits``) from per-bit logits and uniforms ``u`` (see the module doc)."""
    z = logits.float()
    greedy = z > 0
    if temperature == 0:
        return greedy
    q = torch.sigmoid(z / temperature)
    drawn = u < q
    if top_p >= 1.0:
        return drawn
    confident = torch.maximum(q, 1.0 - q) >= top_p
    return torch.where(confident, greedy, drawn)
