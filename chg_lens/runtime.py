"""How chg_lens shares the CPU: the number of torch threads follows the load.

torch's OpenMP threads spin-wait for work. When another process holds one of the cores, a spinning
thread steals it and every parallel region waits for the descheduled one: on a 2-core machine, one
CHG update at torch's default two threads took 1.7-2.0x as long as at one thread with one other busy
process, and 2.0-3.6x with two (benchmarks/threads_under_load.py, table in benchmarks/README.md).

:class:`LoadAwareThreads` (used by every fit once per update, and by the scoring engine once per
pass: measurements, patching, attribution, sweeps) looks at how much CPU other processes took on
this process's cores since the last look (``/proc/stat`` minus this process's own time; processes
at a lower priority (``nice``) do not count unless this one is niced too) and runs torch on the
cores left free, never more than the threads torch had at entry; the caller's thread count is
restored afterwards. ``CHG_LENS_THREADS=fixed`` turns it off (the thread count is then whatever
torch has). On a machine without ``/proc`` (not Linux) it does nothing.

chg_lens does not set ``OMP_WAIT_POLICY``: ``PASSIVE`` (threads sleep at every barrier) made a
quiet fit 1.2-1.5x slower on the same machine; it is the best choice only with two busy processes on
two cores. Set it yourself before torch loads if you want it.

Example::

    from chg_lens import runtime
    with runtime.LoadAwareThreads() as threads:
        for step in range(updates):
            threads.adapt()          # at most one look per `every` seconds; cheap
            ...                      # one update
"""

from __future__ import annotations

import os
import time

THREADS_ENV = "CHG_LENS_THREADS"
"""``auto`` (default: threads follow the load in fits and scoring passes) or ``fixed`` (leave torch's
thread count alone)."""


def cores() -> list[int]:
    """The CPUs this process may run on (its affinity); ``[0 .. cpu_count)`` where that is unknown."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def busy_seconds(cpus: list[int], path: str = "/proc/stat", *, nice: bool = True) -> float | None:
    """Seconds the CPUs ``cpus`` spent busy (not idle, not waiting for I/O) since boot, from
    ``/proc/stat``; None where it cannot be read. ``nice=False`` leaves out the time of processes
    at a lower priority (``nice`` > 0): the scheduler gives a normal-priority thread the core first."""
    want = {f"cpu{i}" for i in cpus}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    found = 0
    try:
        with open(path) as f:
            for line in f:
                name, _, rest = line.partition(" ")
                if name in want:
                    v = [int(x) for x in rest.split()]
                    total += sum(v[:8]) - v[3] - v[4] - (0 if nice else v[1])  # user..steal minus idle, iowait
                    found += 1
    except (OSError, ValueError):
        return None
    return total / tick if found else None


def niced() -> bool:
    """Whether this process runs at a lower priority than normal (its time then counts as nice)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0) > 0
    except (AttributeError, OSError):
        return False


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


def threads_for(n_cores: int, others: float, most: int) -> int:
    """Threads to run when other processes keep ``others`` cores busy on ``n_cores`` cores: the
    cores left free (a core counts as taken from 0.5 of it on), at least 1, at most ``most``::

        threads_for(2, 0.0, 2), threads_for(2, 1.0, 2), threads_for(2, 2.0, 2)   # 2, 1, 1
    """
    free = n_cores - int(others + 0.5)
    return max(1, min(most, free))


class LoadAwareThreads:
    """Within the block, torch runs on as many threads as there are cores other processes leave
    free (:func:`threads_for`), re-judged at most every ``every`` seconds when :meth:`adapt` is
    called; torch's thread count at entry is the most it uses and is restored at exit.
    ``enabled=None`` follows ``CHG_LENS_THREADS`` (anything but ``fixed`` enables it)."""

    def __init__(self, every: float = 2.0, enabled: bool | None = None):
        self.every = float(every)
        if enabled is None:
            enabled = os.environ.get(THREADS_ENV, "auto").strip().lower() != "fixed"
        self.enabled = enabled
        self.history: list[tuple[float, int]] = []  # (others, threads) at each change, for tests and logs

    def __enter__(self) -> "LoadAwareThreads":
        import torch

        self._torch = torch
        self.start_threads = torch.get_num_threads()
        self._cpus = cores()
        self._nice = niced()  # a niced process competes with niced ones; a normal one only with normal ones
        self._last = self._sample()
        if self._last is None:
            self.enabled = False
        return self

    def _sample(self) -> tuple[float, float, float] | None:
        busy = busy_seconds(self._cpus, nice=self._nice)
        return None if busy is None else (time.monotonic(), busy, own_seconds())

    def others(self) -> float | None:
        """Cores other processes kept busy since the last look (None: not measured yet or not readable)."""
        now = self._sample()
        if now is None or self._last is None:
            return None
        wall = now[0] - self._last[0]
        if wall <= 0:
            return None
        used = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2]))
        self._last = now
        return min(float(len(self._cpus)), used / wall)

    def adapt(self) -> int:
        """Re-judge the load (at most every ``every`` seconds) and set torch's thread count; returns it."""
        torch = self._torch
        if not self.enabled or time.monotonic() - self._last[0] < self.every:
            return torch.get_num_threads()
        others = self.others()
        if others is None:
            return torch.get_num_threads()
        want = threads_for(len(self._cpus), others, self.start_threads)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.history.append((others, want))
        return want

    def __exit__(self, *exc) -> None:
        if self._torch.get_num_threads() != self.start_threads:
            self._torch.set_num_threads(self.start_threads)
