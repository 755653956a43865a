"""What `/metrics` serves: Prometheus' text exposition format (version 0.0.4), written here rather than
through prometheus_client, which Flaminko does not depend on for five series."""

import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; from a first token on a GPU (tens of milliseconds) to a long answer on a CPU (minutes).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus reads a histogram."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        buckets = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.bounds, self.counts)]
        return [*buckets, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """The server's series. Counters and histograms are updated by the threads that generate; the gauges
    are read when scraped (`running` and `waiting` give them)."""

    def __init__(self, *, running: Callable[[], int], waiting: Callable[[], int]):
        self._running, self._waiting = running, waiting
        self._lock = threading.Lock()
        self.generated_tokens = 0
        self.rejected_requests = 0
        self.time_to_first_token = Histogram()
        self.request_latency = Histogram()

    def tokens(self, count: int = 1) -> None:
        with self._lock:
            self.generated_tokens += count

    def rejected(self) -> None:
        with self._lock:
            self.rejected_requests += 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.time_to_first_token.observe(seconds)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.request_latency.observe(seconds)

    def render(self) -> str:
        series = [
            ("flaminko_running_requests", "gauge", "Requests in the running batch.", [f"flaminko_running_requests {self._running()}"]),
            (
                "flaminko_waiting_requests",
                "gauge",
                "Admitted requests not yet in the running batch (their images being prepared, or queued).",
                [f"flaminko_waiting_requests {self._waiting()}"],
            ),
        ]
        with self._lock:
            series += [
                ("flaminko_generated_tokens_total", "counter", "Tokens generated and sent to clients.", [f"flaminko_generated_tokens_total {self.generated_tokens}"]),
                (
                    "flaminko_rejected_requests_total",
                    "counter",
                    "Requests answered 429 because the running batch and the queue were full.",
                    [f"flaminko_rejected_requests_total {self.rejected_requests}"],
                ),
                (
                    "flaminko_time_to_first_token_seconds",
                    "histogram",
                    "From a request's arrival to its first generated token.",
                    self.time_to_first_token.lines("flaminko_time_to_first_token_seconds"),
                ),
                (
                    "flaminko_request_latency_seconds",
                    "histogram",
                    "From a request's arrival to the end of its answer.",
                    self.request_latency.lines("flaminko_request_latency_seconds"),
                ),
            ]
        lines = []
        for name, kind, help_text, samples in series:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"
