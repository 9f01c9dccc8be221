"""Threading for the clip stream: a thread pool whose results come back in input order, and a
generator run ahead in a background thread. Both keep the output independent of timing (the shards
must not depend on which thread finished first)."""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence


def ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """``map`` in a thread pool with a bounded window of pending work, results in input order."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def background(gen: Iterator, depth: int, setup: Callable[[], None] | None = None) -> Iterator:
    """Run a generator in a daemon thread, ``depth`` items ahead; exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            if setup is not None:
                setup()
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    thread = threading.Thread(target=produce, daemon=True, name="pretok-decode")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
