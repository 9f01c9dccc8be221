"""Shared by decoder tests: two decodes show the same frames, with a control that a decode off by one
frame fails.

A mean absolute pixel difference over whole frames cannot tell neighbouring frames of the synthetic
videos apart: a small shape moves over a still background, so neighbours differ in few pixels and
their whole-frame mean difference (2 to 7 levels at 32x32) is below the tolerances that colour
conversion and re-encoding need (4 to 6). The control therefore compares on the pixels that move
between neighbouring frames of the reference: there the same frame differs only by colour conversion
or coding noise, and a neighbour by the motion itself.
"""
from __future__ import annotations

import torch

MOVING = 60
"""A pixel moves between two reference frames where its R+G+B changes by more than this (of 765)."""


def moving_pixel_distances(got_FHWC: torch.Tensor, want_FHWC: torch.Tensor) -> tuple[float, float]:
    """Mean |got - want| on the moving pixels of each neighbouring pair of ``want`` frames: against the
    same frames, and against the neighbour (``got`` one frame early or late)."""
    a, b = got_FHWC.float().cpu(), want_FHWC.float().cpu()
    moving = ((b[1:] - b[:-1]).abs().sum(-1, keepdim=True) > MOVING).expand(-1, -1, -1, 3)
    if moving.sum() < 3 * 16:
        raise AssertionError(f"the reference frames hardly move ({int(moving.sum()) // 3} moving pixels): "
                             "no frame-order control is possible")

    def on_moving(x: torch.Tensor) -> float:
        return x.abs()[moving].mean().item()
    same = (on_moving(a[:-1] - b[:-1]) + on_moving(a[1:] - b[1:])) / 2
    shifted = (on_moving(a[1:] - b[:-1]) + on_moving(a[:-1] - b[1:])) / 2
    return same, shifted


def assert_same_frames(got_FHWC: torch.Tensor, want_FHWC: torch.Tensor, tol: float) -> None:
    """``got`` shows ``want``'s frames: whole-frame mean |difference| below ``tol``, and on the moving
    pixels closer to the same frames than to the neighbours by a factor of 2 or more."""
    assert got_FHWC.shape == want_FHWC.shape, (got_FHWC.shape, want_FHWC.shape)
    whole = (got_FHWC.float().cpu() - want_FHWC.float().cpu()).abs().mean().item()
    same, shifted = moving_pixel_distances(got_FHWC, want_FHWC)
    assert whole < tol and same < 0.5 * shifted, \
        (f"mean |difference| {whole:.2f} (tolerance {tol}); on moving pixels {same:.2f} vs {shifted:.2f} "
         "off by one frame")
