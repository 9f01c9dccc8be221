"""A video's real-world frame timing, from its packets' presentation timestamps (no pixel decoding).

Design decisions:
- **Frame k is the k-th frame in presentation order**: the k-th smallest packet timestamp. DALI's
  video decoder indexes frames the same way (its frame index is the packets sorted by PTS), and a
  sequential decode (PyAV) yields frames in that order, so indices planned from these times select
  the same frames on every decoder.
- **A stream is constant-rate when every gap is the declared frame period** (within one tick of
  the time base plus 1%: container time bases round the period, e.g. 33 or 34 ms at 30 fps).
  Those streams keep index arithmetic (stride = round(fps / target_fps)), so their clips, and the
  shards made from them, are what they always were. Anything else (irregular gaps, or regular
  gaps that contradict the declared rate, like a phone recording that declares 1000 fps) keeps its
  timestamps, and clips are cut by time (:func:`nearest_frames`).
- **Where a stream carries no timestamps, the rate is measured** from the frame count over the
  stream's duration; the declared rate is used only when nothing can be measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RATE_TOLERANCE = 0.01
"""Relative difference up to which a measured rate (or a frame gap) agrees with the declared one."""


@dataclass(frozen=True)
class StreamTiming:
    """What a probe learned about a stream's timing."""

    declared_fps: float
    """The container's rate (PyAV ``average_rate``, else ``guessed_rate``); 0 if absent."""
    measured_fps: float
    """Frames per second over the stream: from the timestamps, else frame count over duration;
    0 if neither is known."""
    frame_times: tuple[float, ...] | None
    """Presentation time of every frame in seconds from the first frame, in presentation order;
    None for a constant-rate stream (its times are k / fps) or one without timestamps."""

    @property
    def fps(self) -> float:
        """The rate index arithmetic uses: the declared rate unless the stream contradicts it."""
        if self.frame_times is not None or not _agree(self.measured_fps, self.declared_fps):
            return self.measured_fps or self.declared_fps
        return self.declared_fps

    def describe(self) -> str:
        measured = f"{self.measured_fps:.3g} fps" if self.measured_fps else "unknown"
        return f"declared {self.declared_fps:.4g} fps, measured {measured}"


def _agree(measured: float, declared: float) -> bool:
    return not measured or not declared or abs(measured - declared) <= RATE_TOLERANCE * declared


def stream_timing(timestamps: Sequence[int] | None, time_base: float, declared_fps: float,
                  duration_s: float | None, num_frames: int) -> StreamTiming:
    """Timing of a stream from its packets' timestamps (``time_base`` units, any order) or, with
    ``timestamps`` None (some packet had none), from ``duration_s``."""
    if timestamps is None or len(timestamps) < 2:
        measured = num_frames / duration_s if duration_s and num_frames > 1 else 0.0
        return StreamTiming(declared_fps, measured, None)
    ticks = np.sort(np.asarray(timestamps, dtype=np.int64))
    seconds = (ticks - ticks[0]) * time_base
    span = float(seconds[-1])
    measured = (len(seconds) - 1) / span if span > 0 else 0.0
    if declared_fps > 0 and _regular(np.diff(seconds), 1.0 / declared_fps, time_base):
        return StreamTiming(declared_fps, measured, None)
    return StreamTiming(declared_fps, measured, tuple(float(s) for s in seconds))


def _regular(gaps_s: np.ndarray, period_s: float, tick_s: float) -> bool:
    return bool(np.all(np.abs(gaps_s - period_s) <= tick_s + RATE_TOLERANCE * period_s))


def nearest_frames(times_s: np.ndarray, targets_s: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Index of the frame in ``times_s[lo:hi]`` nearest each target time (ties: the earlier frame).

    A target in a gap longer than a target period repeats the frame shown then, as a player would."""
    window = times_s[lo:hi]
    right = np.clip(np.searchsorted(window, targets_s, side="left"), 1, len(window) - 1) if len(window) > 1 \
        else np.zeros(len(targets_s), dtype=np.int64)
    if len(window) == 1:
        return right + lo
    left = right - 1
    take_left = (targets_s - window[left]) <= (window[right] - targets_s)
    return np.where(take_left, left, right) + lo
