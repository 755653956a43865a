"""How busy the rest of the machine was while a benchmark measured something.

These machines are shared: another job on the same cores can halve what a timing sees. Wrap each
measurement in `OtherLoad()` and report `other_cpu_seconds` (CPU time every other process used
meanwhile, from /proc/stat minus this process and its children) beside the figure; `noisy` flags
samples during which the others used more than a tenth of one core on average.

    with OtherLoad() as load:
        run()
    print(f"{seconds:.2f} s (others used {load.other_cpu_seconds:.2f} CPU s, {load.other_cores:.2f} cores)")
"""

import datetime
import os
import platform
import time

import psutil
import torch
import transformers

# Others busy on average more than this many cores flag a sample as taken on a loaded machine.
NOISY_OTHER_CORES = 0.1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def setup() -> dict:
    """What a figure was measured on: the CPU, the versions that matter and the day."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}


def describe_setup(measured_on: dict) -> str:
    return (f"{measured_on['cpu']} ({measured_on['cpu_count']} cores), torch {measured_on['torch']}, "
            f"transformers {measured_on['transformers']}, {measured_on['date']}")


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system + times.children_user + times.children_system


class OtherLoad:
    """Context manager: CPU time that processes other than this one (and its children) used while it was open."""

    def __enter__(self):
        self._start = (time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc):
        wall_start, busy_start, own_start = self._start
        busy_end = _machine_busy_seconds()
        self.wall_seconds = time.perf_counter() - wall_start
        if busy_start is None or busy_end is None:
            self.other_cpu_seconds = float("nan")
        else:
            # Tick granularity (10 ms) can make a short, quiet interval read slightly negative.
            self.other_cpu_seconds = max(0.0, (busy_end - busy_start) - (_own_cpu_seconds() - own_start))
        self.other_cores = self.other_cpu_seconds / max(self.wall_seconds, 1e-9)
        return False

    @property
    def noisy(self) -> bool:
        return not self.other_cores <= NOISY_OTHER_CORES

    def describe(self) -> str:
        flag = " NOISY" if self.noisy else ""
        return f"others {self.other_cpu_seconds:.2f} CPU s ({self.other_cores:.2f} cores){flag}"
