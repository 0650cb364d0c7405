"""A bounded pool of threads for work that splits by tensor: positioned reads and writes, torch ops and
numpy release the GIL, so one thread's I/O overlaps another's arithmetic."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def default_workers() -> int:
    """Threads a job uses by default: one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_ordered(tasks: Iterable[Callable[[], T]], workers: int | None) -> Iterator[T]:
    """Each task's result, in the tasks' order, with up to ``workers`` running at once and at most
    ``2 * workers`` started ahead of the oldest unfinished one (memory stays a few tasks' worth).

    Of several failures the first in task order is raised; the tasks not started are cancelled and the
    running ones finish first. torch's own thread count is left alone: it decides how reductions split,
    so changing it would change rounding.
    """
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        for task in tasks:
            yield task()
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="wsurgery") as pool:
        ahead: collections.deque[Future[T]] = collections.deque()
        try:
            for task in tasks:
                ahead.append(pool.submit(task))
                while len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        except BaseException:
            for future in ahead:
                future.cancel()
            raise
