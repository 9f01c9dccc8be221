"""Random draws of the training batch builder, from one generator or from one generator per sample.

The trainer seeds a generator per sample (from the run seed, the step and the sample id) so that a
sample's error-correction flips, Random Frame Mask and condition dropout do not depend on which rank,
micro-batch or position it lands in. Building the micro-batch one sample at a time gave that, at the
cost of running every requantization kernel once per sample (measured: most of the trainer's data
time). With :data:`Generators` as a sequence, each draw instead takes sample ``b``'s rows from
``generators[b]`` with the very call the one-sample build would make, and the arithmetic runs once on
the whole batch: the batch equals the concatenation of one-sample builds bit for bit
(tests/test_model_sequence.py).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]
"""One generator for the whole batch, one per sample (rows split evenly, in order), or None (global RNG)."""


def draw_device(generator: Generators, default: torch.device | str) -> torch.device:
    """Where ``generator``'s numbers are drawn (a generator draws on its own device)."""
    if generator is None:
        return torch.device(default)
    first = generator if isinstance(generator, torch.Generator) else generator[0]
    return first.device


def rand_rows(shape: Sequence[int], generator: Generators, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.rand(shape)``; with per-sample generators the leading dim is split evenly over them.

    ``device`` is used only without a generator; otherwise numbers come from the generator's device.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(tuple(shape), generator=generator, dtype=dtype,
                          device=draw_device(generator, device))
    rows, rest = shape[0], tuple(shape[1:])
    if rows % len(generator):
        raise ValueError(f"{rows} rows cannot be split over {len(generator)} per-sample generators")
    per = rows // len(generator)
    parts = [torch.rand((per, *rest), generator=g, dtype=dtype, device=g.device) for g in generator]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
