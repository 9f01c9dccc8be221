"""The decode stage: several decoders (lanes) pulling the clips of the encoder's batches from one queue.

Design decisions:
- **One queue, many decoders.** Each batch of clips is cut into per-video requests (a video's nearby
  clips decode together, :func:`data_prep.video.group_by_video`) and queued; every lane is a thread
  with its own decoder that takes the oldest requests it can decode (a DALI pipeline up to its DALI
  batch, a PyAV decoder one video) and hands back the clips. A batch is complete when all its
  requests are; batches come out in submission order. No per-batch barrier: a lane that finishes
  early starts on the next batch, so the encoder is fed at the lanes' combined rate.
- **Which lane took a clip changes no byte.** Lanes of one run give identical pixels: DALI pipelines
  of one device are one decoder, and PyAV decoders convert and resize as DALI's CPU decoder does
  (:class:`data_prep.video.PyAVClipDecoder`). NVDEC's pixels differ from the CPU decoders' (colour
  conversion), so a run decodes either on NVDEC or on the CPU, never both
  (``config.NVDEC_WITH_CPU_DECODERS``).
- **Codecs route themselves.** A request goes only to lanes that decode its codec (DALI's CPU
  decoder lacks H.264, HEVC, MPEG-4, AV1; PyAV decodes them); the probe accepts only codecs some
  lane decodes.
- **GPU lanes synchronise their own stream.** An NVDEC lane decodes and copies on a CUDA stream of its
  thread (at ``decode_stream_priority``) and synchronises it before handing frames over, so the
  encoder's stream never waits on decode work.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from data_prep.video import (DALI_CPU_CODECS, DALI_GPU_CODECS, ClipPlan, DaliClipDecoder, PyAVClipDecoder,
                             VideoRequest, VideoUnusable, group_by_video)


@dataclass
class Lane:
    """One decoder and what it takes from the queue."""

    name: str
    """e.g. ``nvdec-3``, ``dali-cpu-0``, ``pyav-1`` (logs and stats)."""
    make_decoder: Callable[[], DaliClipDecoder | PyAVClipDecoder]
    """Builds the decoder on the lane's thread (a DALI pipeline is built on first use there)."""
    codecs: frozenset[str] | None
    """Codecs it decodes; None: any libavcodec codec (PyAV)."""
    take: int
    """Most requests (videos) per decode call."""
    cuda_device: int | None = None
    """NVDEC lanes: the GPU whose stream the lane decodes on."""
    stream_priority: int = 0

    def accepts(self, codec: str) -> bool:
        return self.codecs is None or codec in self.codecs


@dataclass
class _Request:
    request: VideoRequest
    codec: str
    ticket: "Ticket"
    slots: tuple[int, ...]
    """Positions of the request's clips in the ticket's batch."""


@dataclass
class Ticket:
    """One submitted batch: its clips' results fill in as lanes finish their requests."""

    results: list
    missing: int
    busy_s: float = 0.0
    """Lane-seconds spent on this batch's clips (a lane run serving several batches is shared out by clips)."""
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class DecoderLanes:
    """Decodes submitted batches of ``(plan, codec)`` with ``lanes`` pulling from one queue."""

    def __init__(self, lanes: Sequence[Lane]):
        if not lanes:
            raise ValueError("no decoder lanes (decode_pipelines / pyav_decoders)")
        self.lanes = list(lanes)
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._failure: BaseException | None = None
        self.clips_by_lane = {lane.name: 0 for lane in self.lanes}
        """Clips each lane has decoded so far (logs; tests of the mix)."""
        self._threads = [threading.Thread(target=self._serve, args=(lane,), daemon=True, name=f"decode-{lane.name}")
                         for lane in self.lanes]
        for t in self._threads:
            t.start()

    def accepts(self, codec: str) -> bool:
        return any(lane.accepts(codec) for lane in self.lanes)

    def submit(self, plans: Sequence[ClipPlan], codecs: Sequence[str]) -> Ticket:
        """Queue a batch; its :class:`Ticket` completes when every clip has a result."""
        ticket = Ticket(results=[None] * len(plans), missing=len(plans))
        items, start = [], 0
        for request in group_by_video(plans):
            slots = tuple(range(start, start + len(request.plans)))
            start += len(request.plans)
            codec = codecs[slots[0]]
            if not self.accepts(codec):  # the probe should have rejected it; never wait for nobody
                reason = VideoUnusable(f"no decoder for codec '{codec}'", "codec")
                self._deliver(ticket, slots, [reason] * len(slots), 0.0)
                continue
            items.append(_Request(request, codec, ticket, slots))
        with self._cv:
            if self._closed:
                raise RuntimeError(f"a decoder lane failed: {self._failure!r}" if self._failure
                                   else "decoder lanes are closed")
            self._queue.extend(items)
            self._cv.notify_all()
        if not plans:
            ticket.done.set()
        return ticket

    def result(self, ticket: Ticket) -> tuple[list[torch.Tensor | VideoUnusable], float]:
        """The batch's results in submission order, and the lane-seconds spent on them."""
        ticket.done.wait()
        if ticket.error is not None:
            raise RuntimeError(f"a decoder lane failed: {ticket.error!r}") from ticket.error
        return ticket.results, ticket.busy_s

    def close(self) -> None:
        """Stop the lanes (after their current request); unfinished tickets fail."""
        with self._cv:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for item in pending:
            self._fail(item.ticket, RuntimeError("decoder lanes closed"))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=60)

    # -- lane threads ---------------------------------------------------------------------------

    def _take(self, lane: Lane) -> list[_Request] | None:
        with self._cv:
            while True:
                picked = []
                for item in self._queue:
                    if lane.accepts(item.codec):
                        picked.append(item)
                        if len(picked) == lane.take:
                            break
                if picked:
                    for item in picked:
                        self._queue.remove(item)
                    return picked
                if self._closed:
                    return None
                self._cv.wait()

    def _serve(self, lane: Lane) -> None:
        stream = None
        try:
            if lane.cuda_device is not None:
                torch.cuda.set_device(lane.cuda_device)
                stream = torch.cuda.Stream(lane.cuda_device, priority=lane.stream_priority)
            decoder = lane.make_decoder()
        except BaseException as e:  # noqa: BLE001 - every waiting batch must hear of it
            self._crash(e)
            return
        while (items := self._take(lane)) is not None:
            try:
                results, busy = self._decode(decoder, items, stream)
            except BaseException as e:  # noqa: BLE001
                for item in items:
                    self._fail(item.ticket, e)
                self._crash(e)
                return
            done, total = 0, sum(len(item.slots) for item in items)
            with self._cv:
                self.clips_by_lane[lane.name] += total
            for item in items:
                n = len(item.slots)
                self._deliver(item.ticket, item.slots, results[done:done + n], busy * n / total)
                done += n

    @staticmethod
    def _decode(decoder, items: list[_Request], stream) -> tuple[list, float]:
        t0 = time.perf_counter()
        plans = [p for item in items for p in item.request.plans]
        if stream is None:
            results = decoder.decode(plans)
        else:
            with torch.cuda.stream(stream):
                results = decoder.decode(plans)
            stream.synchronize()  # frames complete before another thread's stream reads them
        return results, time.perf_counter() - t0

    def _deliver(self, ticket: Ticket, slots: tuple[int, ...], results: list, busy_s: float) -> None:
        with self._cv:
            for slot, r in zip(slots, results):
                ticket.results[slot] = r
            ticket.busy_s += busy_s
            ticket.missing -= len(slots)
            if ticket.missing == 0:
                ticket.done.set()

    def _fail(self, ticket: Ticket, error: BaseException) -> None:
        with self._cv:
            ticket.error = ticket.error or error
            ticket.done.set()

    def _crash(self, error: BaseException) -> None:
        """A lane died (a bug or a broken setup, not a bad video): fail everything waiting, stop."""
        with self._cv:
            self._failure = self._failure or error
            pending = list(self._queue)
            self._queue.clear()
            self._closed = True
            self._cv.notify_all()
        for item in pending:
            self._fail(item.ticket, error)


def dali_lanes(*, count: int, device: str, device_id: int, height: int, width: int, batch_size: int,
               threads: int, stream_priority: int = 0) -> list[Lane]:
    """``count`` DALI pipelines (NVDEC with ``device`` gpu), each taking up to a share of a batch."""
    take = -(-batch_size // count)  # ceil: the DALI batch of one pipeline, as a batch split over all

    def make():
        return DaliClipDecoder(height=height, width=width, device=device, device_id=device_id, batch_size=take,
                               num_threads=threads, pipelines=1, stream_priority=stream_priority)
    gpu = device == "gpu"
    return [Lane(f"{'nvdec' if gpu else 'dali-cpu'}-{i}", make, DALI_GPU_CODECS if gpu else DALI_CPU_CODECS, take,
                 cuda_device=device_id if gpu else None, stream_priority=stream_priority) for i in range(count)]


def pyav_lanes(*, count: int, height: int, width: int) -> list[Lane]:
    """``count`` PyAV decoders, one video at a time each (about one host core)."""
    def make():
        return PyAVClipDecoder(height=height, width=width, num_threads=1)
    return [Lane(f"pyav-{i}", make, None, 1) for i in range(count)]
