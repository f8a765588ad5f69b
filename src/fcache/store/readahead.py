"""Read-ahead over a known sequence of sample-view requests: ``window`` range requests kept in flight, each chunk decoded
as it lands, the results handed over in request order (``FeatureStore.read_stream``).

``ShardFetcher.read`` sends a batch's k requests and waits for the last before it hands anything over, so on object
storage every batch costs at least one round trip beside its decoding: with 20 ms per request and k = 16 that bounds
demo-size chunks near 0.44 of the local rate. Here a feeder thread sends the next request as soon as one of the
``window`` in flight returns (``Backend.range_future``), and the fetcher's decoding threads decode each chunk while
the others travel. Chunks that lie back to back in one object (the samples of a shard read in order, as evaluation,
predict and export read them, or a sample's views) are read by one range request of up to ``RUN_BYTES``: a reader in
index order sends a request per run of chunks, not per chunk, so a window of 16 requests carries up to 16 runs.
At most ``window`` requests are in flight, and at most ``2 * window`` runs of chunks and ``HELD_BYTES`` of
decoded chunks are held ahead of the consumer (large chunks, which need few requests in flight to read at the local
rate, get a smaller window). The values equal ``ShardFetcher.read``'s bit for bit (the same decode, the same
``convert``); the errors are the ones it raises, at the request that meets them; closing the iterator early stops the
feeder and waits for what is in flight, so no thread outlives it. On local disk (no cache) each decoding thread reads
its own chunk, as ``read`` does.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from itertools import islice
from typing import Any

import numpy as np

from fcache.store.backends import Range
from fcache.store.fetch import Chunk, Convert, ShardFetcher, decoder

Request = tuple[str, int, int | None]
Prepare = Callable[[Sequence[Request]], None]
READ_AHEAD = 16  # range requests kept in flight by default: demo-size chunks at 20 ms per request reach the local rate near it
HELD_BYTES = 256 * 2**20  # chunks a read-ahead holds at most, counted in stored bytes (fewer in flight where chunks are large)
RUN_BYTES = 2 * 2**20  # the most bytes one range request reads for chunks that lie back to back in one object
END = object()
WAIT = 0.05  # seconds between looks at the stop flag while the window is full


class ReadAhead:
    """The stored values (or ``convert``'s) of ``requests`` in order, ``window`` range requests kept in flight.

    ``prepare(block)`` runs in the feeder before a block of up to ``window`` requests is sent (the store's checks and the
    side data their decoding needs); its error is raised where that block's first request would be handed over.
    """

    def __init__(self, fetcher: ShardFetcher, requests: Iterable[Request], window: int, convert: Convert | None, prepare: Prepare) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.fetcher, self.window, self.prepare = fetcher, window, prepare
        self.done: Convert = convert or (lambda _, v: v)
        self.requests = iter(requests)
        biggest = max((math.prod(c.chunk_shape[2:]) * c.dtype.itemsize for c in fetcher.layouts.values() if c), default=1)
        held = max(1, min(2 * window * max(1, RUN_BYTES // biggest), HELD_BYTES // biggest))
        held = max(held, fetcher.manifest.num_views)  # every view of one sample at least: a request's chunks always fit
        self.in_flight = threading.BoundedSemaphore(min(window, held))  # range requests sent and not yet answered
        self.held = threading.BoundedSemaphore(held)  # chunks sent and not yet handed over
        self.capacity = held
        self.runs: dict[str, Run] = {}  # per object, the chunks back to back not sent yet (``_start``, ``_send_runs``)
        self.ready: queue.Queue[Any] = queue.Queue()  # (request, its chunks' futures) in request order; END; an error
        self.stop = threading.Event()
        self.pending: list[Future[Any]] = []  # each chunk's future, done once its request returned and it is decoded
        self.feeder: threading.Thread | None = None
        self.pid = os.getpid()

    def __iter__(self) -> Iterator[np.ndarray]:
        return (values for _, values in self.pairs())

    def start(self) -> None:
        """Send the first requests now (else at the first value asked for)."""
        if self.feeder is None:
            self.feeder = threading.Thread(target=self._feed, name="fcache-readahead", daemon=True)
            self.feeder.start()

    def close(self) -> None:
        """Stop sending, and wait for what is in flight and decoding: no thread outlives it, nothing writes after it."""
        if os.getpid() != self.pid:  # a forked copy: its threads and requests stayed in the parent
            return
        self.stop.set()
        if self.feeder is not None:
            self.feeder.join()
        self._fail_runs(RuntimeError("read-ahead stopped"))  # chunks of runs never sent: nobody waits for them now
        for f in list(self.pending):
            f.exception()

    def pairs(self) -> Iterator[tuple[Request, np.ndarray]]:
        """Each request with its values, in order."""
        self.start()
        try:
            while (item := self.ready.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                request, chunks = item
                values = [c.result() for c in chunks]
                for _ in chunks:
                    self.held.release()
                yield request, values[0] if request[2] is not None else np.stack(values)
        finally:
            self.close()

    # -- the feeder thread ---------------------------------------------------------------------------------
    def _feed(self) -> None:
        try:
            for block in blocks(self.requests, self.window):
                if self.stop.is_set():
                    return
                self.prepare(block)
                self.fetcher.load_indexes(block)
                for part in self._parts(block):
                    # the slots of a part's chunks are taken while no run waits to be sent (the consumer may wait for
                    # one), so that its runs are cut only by RUN_BYTES and where chunks are not back to back
                    if not self._take(self.held, sum(len(chunks) for _, chunks in part)):
                        return
                    for request, chunks in part:
                        started = [self._start(w) for w in chunks]
                        self.pending = [p for p in self.pending if not p.done()] + started
                        self.ready.put((request, started))
                    if not self._send_runs():
                        return
            self.ready.put(END)
        except BaseException as e:  # noqa: BLE001 - raised in the consumer, in order
            # the chunks of the requests before it are read still, so the consumer gets their values first (where their
            # requests cannot be sent, they fail where they are handed over)
            with contextlib.suppress(BaseException):
                self._send_runs()
            self._fail_runs(e)
            self.ready.put(e)

    def _parts(self, block: list[Request]) -> Iterator[list[tuple[Request, list[Chunk]]]]:
        """``block``'s requests with their chunks, in parts of at most ``held`` chunks (one request at least)."""
        part: list[tuple[Request, list[Chunk]]] = []
        count = 0
        for request in block:
            chunks = self.fetcher.chunks_of(request)
            if part and count + len(chunks) > self.capacity:
                yield part
                part, count = [], 0
            part.append((request, chunks))
            count += len(chunks)
        if part:
            yield part

    def _take(self, sem: threading.BoundedSemaphore, n: int = 1) -> bool:
        """Take ``n`` slots of ``sem``; False once the consumer has stopped."""
        for _ in range(n):
            while not sem.acquire(timeout=WAIT):
                if self.stop.is_set():
                    return False
        return True

    def _start(self, w: Chunk) -> Future[np.ndarray]:
        """Chunk ``w`` read and decoded: at once from the cache or local disk, else once the range request of its run
        (``Run``: the chunks back to back with it in its object) returns."""
        f, done = self.fetcher, self.done
        if not f.backend.remote and f.cache is None:
            return decoder().submit(lambda: done(w, f.decode(w, f.backend.get_ranges([f.range_of(w)])[0])))
        hit = f.cache_get(w)
        if hit is not None:
            return decoder().submit(self._from_cache, w, hit, done)
        out: Future[np.ndarray] = Future()
        r = f.range_of(w)
        run = self.runs.get(r.key)
        if run is not None and run.extends(r):
            run.add(w, r, out)
            return out
        if run is not None and not self._send(run):
            out.set_exception(RuntimeError("read-ahead stopped"))
            return out
        self.runs[r.key] = Run(r, w, out)
        return out

    def _send_runs(self) -> bool:
        """Send every run not sent yet; False once the consumer has stopped."""
        while self.runs:
            if not self._send(self.runs.pop(next(iter(self.runs)))):
                return False
        return True

    def _send(self, run: Run) -> bool:
        """One range request for ``run``'s chunks, each decoded as the request lands; False once the consumer has stopped."""
        if not self._take(self.in_flight):
            run.fail(RuntimeError("read-ahead stopped"))
            return False
        sent = self.fetcher.backend.range_future(Range(run.key, run.start, run.stop))

        def landed(got: Future[bytes]) -> None:
            self.in_flight.release()
            error = got.exception()
            if error is not None:
                run.fail(error)
                return
            data = memoryview(got.result())
            for w, a, z, out in run.chunks:
                decoder().submit(self._decoded, w, bytes(data[a - run.start : z - run.start]), self.done, out)

        sent.add_done_callback(landed)
        return True

    def _fail_runs(self, e: BaseException) -> None:
        for run in self.runs.values():
            run.fail(e)
        self.runs.clear()

    def _decoded(self, w: Chunk, raw: bytes, done: Convert, out: Future[np.ndarray]) -> None:
        try:
            self.fetcher.cache_put(w, raw)
            out.set_result(done(w, self.fetcher.decode(w, raw)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            out.set_exception(e)

    def _from_cache(self, w: Chunk, raw: bytes, done: Convert) -> np.ndarray:
        return done(w, self.fetcher.decode_cached(w, raw))


class Run:
    """Chunks back to back in one object, read by one range request: each with its byte range and its future."""

    def __init__(self, r: Range, w: Chunk, out: Future[np.ndarray]) -> None:
        assert r.stop is not None
        self.key, self.start, self.stop = r.key, r.start, r.stop
        self.chunks: list[tuple[Chunk, int, int, Future[np.ndarray]]] = [(w, r.start, r.stop, out)]

    def extends(self, r: Range) -> bool:
        """Whether ``r`` starts where the run ends, in its object, and the run with it stays within ``RUN_BYTES``."""
        return r.key == self.key and r.start == self.stop and r.stop is not None and r.stop - self.start <= RUN_BYTES

    def add(self, w: Chunk, r: Range, out: Future[np.ndarray]) -> None:
        assert self.extends(r) and r.stop is not None
        self.chunks.append((w, r.start, r.stop, out))
        self.stop = r.stop

    def fail(self, e: BaseException) -> None:
        for *_, out in self.chunks:
            if not out.done():
                out.set_exception(e)


class Expected:
    """The requests a process will ask for next, told in advance and read ahead (``FeatureStore.expect``): ``take`` hands
    over the values of the requests asked for while they are the ones expected. The first that is not, or an error of
    the read-ahead, ends it: those requests are then read as usual, so a wrong guess costs requests, never values, and an
    error is raised by the read that asked for the request (as ``read_many`` raises it), not by a guess."""

    def __init__(self, stream: ReadAhead) -> None:
        self.stream = stream
        self.pairs: Iterator[tuple[Request, np.ndarray]] | None = stream.pairs()
        self.pid = os.getpid()
        stream.start()

    @property
    def open(self) -> bool:
        if self.pid != os.getpid():  # forked: the read-ahead's threads stayed in the parent
            self.pairs = None
        return self.pairs is not None

    def take(self, requests: Sequence[Request]) -> list[np.ndarray]:
        """The values of the leading requests that are the next ones expected."""
        got: list[np.ndarray] = []
        for request in requests:
            if not self.open or self.pairs is None:
                break
            try:
                expected, values = next(self.pairs)
            except Exception:  # noqa: BLE001 - the read of a guess failed: the read that asks for it tells
                self.close()
                break
            if expected != request:
                self.close()
                break
            got.append(values)
        return got

    def close(self) -> None:
        if self.open and self.pairs is not None:
            self.pairs = None
            self.stream.close()


def blocks(items: Iterable[Request], n: int) -> Iterator[list[Request]]:
    """``items`` in lists of ``n`` (the last may be shorter)."""
    if n < 1:
        raise ValueError(f"window must be at least 1, not {n}")
    it = iter(items)
    while block := list(islice(it, n)):
        yield block
