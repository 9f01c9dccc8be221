"""Decoding in a process of its own (``decode_process: true``): the decoder lanes of :mod:`.decoders`
run in a spawned child process, one per worker, and hand their frames back to the encoder's process.

Design decisions:
- **Why a process.** On one GPU, NVDEC decode's small DALI kernels wait behind the encoder's long ones
  when both live in one CUDA context (session 7, H100: decode 96 clips/s alone, 6 beside a busy
  encoder). A second process has its own context; the GPU then time-slices between the two contexts.
  Whether that wins is measured (``bench_pretokenize.py --beside-decode process``, ``--decode-process``).
- **Same lanes, same bytes.** The child builds exactly the lanes the parent would
  (:func:`~data_prep.pretokenize.clip_stream.decoder_lanes` of the same config), so the frames, and
  the shards, are the bytes of in-process decoding (tested on DALI CPU; GPU test on NVDEC). Probing,
  planning and batching stay in the parent: only ``(plans, codecs)`` of a batch cross over.
- **Reused buffers, shared once.** The child stacks a batch's decoded clips into one of
  :data:`SLOTS` batch buffers (CUDA memory or shared host memory) and sends only the slot's number; a
  buffer itself crosses over (CUDA IPC / a shared-memory file, torch.multiprocessing) the first time it
  is used. The parent copies the batch out into memory of its own and releases the slot. Session 10
  measured the alternative, a fresh shared tensor per batch: on the CPU its creation was 58% of the
  child's time. On NVDEC the stack runs on a non-blocking stream of the child's, which no other stream's
  work in flight delays (the legacy default stream waits for every blocking stream). Failed clips travel
  as ``(reason, kind)``.
- **Same interface as the lanes.** :class:`DecodeProcess` has ``submit``/``result``/``close``/
  ``accepts``/``clips_by_lane`` of :class:`~data_prep.pretokenize.decoders.DecoderLanes`, so the clip
  stream takes either. Results come back in submission order.
- **Failures are loud.** An exception in the child (a lane that crashed, a setup error) comes back
  with the child's traceback and fails the waiting batch; a child that dies (killed, out of memory)
  is noticed within a second and named with its exit code. Either way the partition raises and
  nothing is committed (the writer commits only after its last batch).
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback
from typing import Sequence

import torch
import torch.multiprocessing as mp

from data_prep.pretokenize.config import PretokenizeConfig
from data_prep.pretokenize.decoders import Lane
from data_prep.video import ClipPlan, VideoUnusable

POLL_S = 1.0
"""How often a wait for the child checks that it is still alive."""
START_TIMEOUT_S = 600.0
"""Longest wait for the child to import torch and DALI and report ready (a slow shared filesystem)."""
SLOTS = 3
"""Batch buffers the child stacks into, round-robin: one being filled while the parent copies another
out, and one spare so that the child does not wait on the parent's next receive."""


class DecodeProcessFailed(RuntimeError):
    """The decode process raised or died; the message carries its traceback or exit code."""


class DecodeProcess:
    """The decoder lanes of ``cfg`` on ``decode_device`` in a spawned child process.

    ``lane_specs``: the lanes the child will build (the parent uses them only to know which codecs are
    decodable). Starts the child and waits until it is ready (its imports done, its lanes built).
    """

    def __init__(self, cfg: PretokenizeConfig, decode_device: str, device_id: int, lane_specs: Sequence[Lane]):
        self.lane_specs = list(lane_specs)
        self.clips_by_lane = {lane.name: 0 for lane in self.lane_specs}
        """Clips each lane (in the child) has decoded so far, as of the last batch received."""
        self.handoff_s = {"stack": 0.0, "receive": 0.0}
        """Seconds the hand-off of the batches received so far took: ``stack``, the child waiting for a free
        slot and stacking a batch's frames into it; ``receive``, the parent taking a message off the pipe
        and copying the batch out of the slot (a slot's first use: also opening the shared memory).
        Decoding itself is not in it: what the process route costs beyond the lanes' own work."""
        self._slots: dict[int, torch.Tensor] = {}
        """The child's batch buffers, by slot number, as this process sees them (shared memory)."""
        self.buffers_received = 0
        """Batch buffers that crossed from the child so far (at most SLOTS while the frame shape holds)."""
        ctx = mp.get_context("spawn")  # never fork: the parent holds a CUDA context and threads
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child_conn, cfg, decode_device, device_id),
                                   name="pretok-decode", daemon=True)
        self.process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._received: dict[int, tuple] = {}
        self._next = 0
        self._closed = False
        self._ready = False
        self.stream: torch.cuda.Stream | None = None
        """The stream CUDA frames are received and copied out on: an idle one, never the legacy default
        stream the encoder's launches are queued on (a slot's first receive enqueues a wait for the
        child's copy on the current stream, torch's CUDA IPC); a thread that receives frames should make
        it current (the clip stream's does)."""
        try:
            self._wait_for("ready", timeout=START_TIMEOUT_S)
        except DecodeProcessFailed:
            self.close()
            raise
        if decode_device == "gpu":  # once the child has opened the device: a bad device_id is its error
            self.stream = torch.cuda.Stream(device_id)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def accepts(self, codec: str) -> bool:
        return any(lane.accepts(codec) for lane in self.lane_specs)

    def submit(self, plans: Sequence[ClipPlan], codecs: Sequence[str]) -> int:
        """Queue a batch in the child; returns its ticket for :meth:`result`."""
        ticket, self._next = self._next, self._next + 1
        self._send(("decode", ticket, list(plans), list(codecs)))
        return ticket

    def result(self, ticket: int) -> tuple[list[torch.Tensor | VideoUnusable], float]:
        """The batch's results in submission order (frames, or the reason a clip failed), and the
        lane-seconds the child spent on them."""
        _, _, stacked, slots, busy_s, by_lane, stack_s = self._wait_for(ticket)
        self.clips_by_lane.update(by_lane)
        self.handoff_s["stack"] += stack_s
        return [stacked[s] if isinstance(s, int) else VideoUnusable(*s) for s in slots], busy_s

    def close(self) -> None:
        """Stop the child (its lanes finish their current request) and wait for it to exit."""
        if self._closed:
            return
        try:
            self._send(("close",))
        except (DecodeProcessFailed, OSError):
            pass  # already dead or closed: joined below
        self._closed = True
        self.process.join(timeout=60)
        if self.process.is_alive():  # stuck in a decoder: it holds nothing that must be kept
            self.process.kill()
            self.process.join(timeout=10)
        self._conn.close()

    # -- parent side ----------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            if self._closed:
                raise DecodeProcessFailed("the decode process (decode_process: true) is closed")
            try:
                self._conn.send(message)
            except OSError as e:  # a broken pipe: the child is gone
                raise self._death(f"{type(e).__name__}: {e}") from None

    def _wait_for(self, key, timeout: float | None = None):
        """The child's message for ``key`` (a ticket, or "ready"), keeping others that arrive first."""
        waited = 0.0
        while key not in self._received:
            if self._closed:
                raise DecodeProcessFailed("the decode process (decode_process: true) was closed")
            try:
                ready = self._conn.poll(POLL_S)
                t0 = time.perf_counter()
                with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
                    message = self._conn.recv() if ready else None
                self.handoff_s["receive"] += time.perf_counter() - t0 if ready else 0.0
            except (EOFError, OSError) as e:  # the child's end closed: it exited
                raise self._death(f"{type(e).__name__}: {e}") from None
            if message is None:
                waited += POLL_S
                if not self.process.is_alive():
                    raise self._death("no message")
                if timeout is not None and waited >= timeout:
                    raise DecodeProcessFailed(f"the decode process (pid {self.pid}) did not start in {timeout:.0f} s")
                continue
            if message[0] == "error":
                raise DecodeProcessFailed(f"the decode process (decode_process: true, pid {self.pid}) failed: "
                                          f"{message[2]}")
            if message[0] == "done":
                t0 = time.perf_counter()
                message = self._copy_out(message)
                self.handoff_s["receive"] += time.perf_counter() - t0
            self._received[message[1]] = message
            self._ready = self._ready or message[0] == "ready"
        return self._received.pop(key)

    def _copy_out(self, message: tuple) -> tuple:
        """``message`` with its batch copied out of the child's slot into memory of this process, and the
        slot released to the child (CUDA: once the copy is done)."""
        kind, ticket, slot, *rest = message
        if slot is None:  # every clip of the batch failed
            return message
        number, rows, buffer = slot
        if buffer is not None:  # the slot's first use, or its shape changed: the buffer itself came
            self._slots[number] = buffer
            self.buffers_received += 1
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            frames = self._slots[number][:rows].clone()
            if self.stream is not None:
                self.stream.synchronize()  # copied before the child may overwrite the slot
        self._send(("release", number))
        return (kind, ticket, frames, *rest)

    def _death(self, how: str) -> DecodeProcessFailed:
        self.process.join(timeout=5)
        code = self.process.exitcode
        hint = ("a negative code is the signal that ended it (-9: killed, e.g. by the out-of-memory killer); "
                "nothing of the partition was committed, rerun to redo it")
        if not self._ready:  # it never came up: most often an unguarded main script
            hint = ("it never reported ready. The 'spawn' start method imports the main script again in the "
                    "child: a script that runs pre-tokenization must keep its work under "
                    "`if __name__ == '__main__':` (its output above says more)")
        return DecodeProcessFailed(f"the decode process (decode_process: true, pid {self.pid}) died with exit "
                                   f"code {code} ({how}); {hint}")


# -- child side --------------------------------------------------------------------------------------

def serve(conn, cfg: PretokenizeConfig, decode_device: str, device_id: int) -> None:
    """The child's main: build the lanes, decode what the parent submits, answer in submission order."""
    from data_prep.pretokenize.clip_stream import decoder_lanes  # here: clip_stream imports this module
    from data_prep.pretokenize.decoders import DecoderLanes
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            conn.send(message)

    try:
        if decode_device == "gpu":
            torch.cuda.set_device(device_id)
        lanes = DecoderLanes(decoder_lanes(cfg, decode_device, device_id))
    except BaseException:  # noqa: BLE001 - the parent must hear why, not wait for nothing
        send(("error", "ready", _describe()))
        return
    send(("ready", "ready"))
    pending: queue.Queue = queue.Queue()
    closing = threading.Event()
    ring = SlotRing(cfg.batch_size, decode_device == "gpu")
    answer = threading.Thread(target=_answer, args=(send, lanes, pending, closing, ring),
                              name="pretok-decode-answer", daemon=True)
    answer.start()
    try:
        while (message := conn.recv())[0] != "close":
            if message[0] == "release":
                ring.release(message[1])
                continue
            _, ticket, plans, codecs = message
            try:
                pending.put((ticket, lanes.submit(plans, codecs)))
            except BaseException:  # noqa: BLE001 - a lane crashed earlier: fail this batch with why
                pending.put((ticket, _describe()))
    except EOFError:
        pass  # the parent is gone: nobody to answer
    finally:
        closing.set()
        pending.put(None)
        ring.close()
        lanes.close()
        answer.join(timeout=60)
        if decode_device == "gpu":
            torch.cuda.ipc_collect()  # frames the parent has released


class SlotRing:
    """The child's :data:`SLOTS` batch buffers (CUDA: device memory; CPU: shared memory), each filled again
    once the parent has released it."""

    def __init__(self, rows: int, gpu: bool):
        self.rows = rows
        self.gpu = gpu
        self.buffers: dict[int, torch.Tensor] = {}
        self._free: queue.Queue = queue.Queue()
        for number in range(SLOTS):
            self._free.put(number)
        self._stream = torch.cuda.Stream() if gpu else None  # torch's pool streams are non-blocking

    def release(self, number: int) -> None:
        self._free.put(number)

    def close(self) -> None:
        self._free.put(None)  # wakes a stack waiting for a slot

    def stack(self, frames: list[torch.Tensor]) -> tuple[int, int, torch.Tensor | None]:
        """``frames`` stacked into a free slot (waiting for one): ``(slot, rows, buffer)``, where ``buffer``
        is the slot's tensor when the parent has not seen it yet (else None)."""
        number = self._free.get()
        if number is None:
            raise RuntimeError("the decode process is closing")
        shape, dtype = (len(frames), *frames[0].shape), frames[0].dtype
        buffer = self.buffers.get(number)
        fresh = buffer is None or buffer.shape[1:] != shape[1:] or buffer.dtype != dtype or len(buffer) < len(frames)
        if fresh:
            size = (max(self.rows, len(frames)), *shape[1:])
            buffer = (torch.empty(size, dtype=dtype, device=frames[0].device) if self.gpu
                      else torch.empty(size, dtype=dtype).share_memory_())
            self.buffers[number] = buffer
        if self.gpu:
            # The lanes synchronised their own streams before handing the frames over.
            with torch.cuda.stream(self._stream):
                torch.stack(frames, out=buffer[:len(frames)])
            self._stream.synchronize()
        else:
            torch.stack(frames, out=buffer[:len(frames)])
        return number, len(frames), buffer if fresh else None


def _answer(send, lanes, pending: queue.Queue, closing: threading.Event, ring: SlotRing) -> None:
    """Send each batch's results in submission order (its slot, per clip its row or why it failed,
    lane-seconds)."""
    while (item := pending.get()) is not None:
        message = _message(lanes, *item, ring)
        if closing.is_set():
            return
        try:
            send(message)
        except OSError:
            return  # the parent is gone
        del message  # a new buffer's view; CUDA IPC keeps it until the parent drops its own


def _message(lanes, ticket: int, submitted, ring: SlotRing) -> tuple:
    try:
        if isinstance(submitted, str):  # the submit failed: its description
            raise RuntimeError(submitted)
        results, busy_s = lanes.result(submitted)
        t0 = time.perf_counter()
        frames = [r for r in results if isinstance(r, torch.Tensor)]
        slot = ring.stack(frames) if frames else None
        slots, row = [], 0
        for r in results:
            slots.append(row if isinstance(r, torch.Tensor) else (r.reason, r.kind))
            row += isinstance(r, torch.Tensor)
        return ("done", ticket, slot, slots, busy_s, dict(lanes.clips_by_lane), time.perf_counter() - t0)
    except BaseException:  # noqa: BLE001 - handed to the parent, which fails the partition
        return ("error", ticket, _describe())


def _describe() -> str:
    """The exception being handled, with the child's traceback (its last lines)."""
    lines = traceback.format_exc().strip().splitlines()
    return lines[-1] + "\n  child traceback (last lines):\n  " + "\n  ".join(lines[-12:-1])
