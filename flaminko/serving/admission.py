"""Admission control: how many requests the server holds at once.

The running batch is bounded by its preallocated cache (`--max-batch-size` rows of `--max-total-tokens`
columns, `--max-images` images a row), so it cannot grow with the load. What could grow is what waits
for it: a request's decoded images and prompt tensors exist from its preparation on. So a request is
admitted at the door, before its images are fetched or decoded, only while fewer than
max_batch_size + max_queue requests are in the server (being prepared, queued or running); beyond that
it is refused at once with 429 and a Retry-After, and holds nothing. Whatever the burst, the server
holds at most that many requests' tensors beside the fixed cache."""

import threading
import time

from .metrics import Metrics

# What a refused client is told to wait (seconds): a decoding step frees slots, so soon is right.
RETRY_AFTER_S = 1


class Overloaded(Exception):
    """The running batch and the queue are full (answered 429 with Retry-After)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.retry_after = RETRY_AFTER_S


class Ticket:
    """One admitted request, from its arrival to the end of its answer: it times the request for the
    metrics, and gives its place back when closed (once, whoever closes it)."""

    def __init__(self, admission: "Admission", seed: int | None):
        self.seed = seed
        self.arrived = time.monotonic()
        self.taken = False  # a generation manager owns the request now, and closes the ticket at its end
        self._admission = admission
        self._first_token = True
        self._closed = threading.Lock()

    def token(self) -> None:
        metrics = self._admission.metrics
        if self._first_token:
            self._first_token = False
            metrics.first_token(time.monotonic() - self.arrived)
        metrics.tokens()

    def close(self) -> None:
        """The request has been answered (or has failed in generation): timed, and its place given back."""
        if not self._closed.acquire(blocking=False):
            return
        seconds = time.monotonic() - self.arrived
        if self._first_token:  # an empty answer: its end is its first token
            self._admission.metrics.first_token(seconds)
        self._admission.metrics.finished(seconds)
        self._admission.release()

    def drop(self) -> None:
        """The request was refused before generation: its place given back, nothing timed."""
        if self._closed.acquire(blocking=False):
            self._admission.release()


class Admission:
    """Counts the requests in the server against max_batch_size + max_queue; `running()` says how many
    are in the running batch (the rest are waiting)."""

    def __init__(self, *, max_batch_size: int, max_queue: int, running):
        self.capacity = max_batch_size + max_queue
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._running = running
        self._held = 0
        self._lock = threading.Lock()
        self.metrics = Metrics(running=running, waiting=self.waiting)

    def admit(self, seed: int | None = None) -> Ticket:
        with self._lock:
            if self._held >= self.capacity:
                self.metrics.rejected()
                raise Overloaded(
                    f"the server is full: {self.max_batch_size} requests running and {self.max_queue} waiting; "
                    f"retry after {RETRY_AFTER_S} s"
                )
            self._held += 1
        return Ticket(self, seed)

    @property
    def held(self) -> int:
        """Requests in the server: being prepared, queued or running."""
        return self._held

    def waiting(self) -> int:
        with self._lock:
            return max(self._held - self._running(), 0)

    def release(self) -> None:
        with self._lock:
            self._held -= 1
