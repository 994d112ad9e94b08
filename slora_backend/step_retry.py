"""A failed step is retried smaller: the batch is split in halves until the parts run.

A step can fail for no request's reason (out of memory, a transient kernel error) or for one
request's (an input that breaks a kernel). Splitting serves both: smaller parts need less
memory, and the halving isolates the request at fault, which alone ends with the error; its
batch-mates finish. The work is bounded: at most ``max_failures(n)`` failed attempts per step
(about two per halving level), after which every part not run yet fails with the last error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def max_failures(n: int) -> int:
    """Failed attempts allowed for a batch of ``n``: enough to halve down to a single request
    whose every level fails once, and to retry a single request once."""
    return 2 * math.ceil(math.log2(max(n, 1))) + 2


class SplitResult(Generic[T, R]):
    def __init__(self) -> None:
        self.done: list[tuple[list[T], R]] = []  # parts that ran, in order, and their results
        self.failed: list[tuple[T, BaseException]] = []  # items that ended with an error
        self.failures = 0  # failed attempts


def run_split_on_failure(items: Sequence[T], run: Callable[[list[T]], R],
                         recover: Callable[[BaseException], None]) -> SplitResult[T, R]:
    """Run ``items`` as one part; a part that raises is split in halves and each half run on.
    A single item is retried once before it fails. ``recover(error)`` runs after every failed
    attempt, before the next (e.g. wait for the device, release cached memory)."""
    result: SplitResult[T, R] = SplitResult()
    budget = max_failures(len(items))
    work: list[tuple[list[T], bool]] = [(list(items), False)]  # (part, retried already)
    last: BaseException | None = None
    while work:
        part, retried = work.pop(0)
        if result.failures >= budget:  # out of attempts: what has not run fails as the last did
            result.failed += [(item, last) for item in part]
            continue
        try:
            result.done.append((part, run(part)))
        except Exception as error:  # noqa: BLE001 - any failure of a step is handled alike
            last = error
            result.failures += 1
            recover(error)
            if len(part) == 1 and retried:
                result.failed += [(item, error) for item in part]
            elif len(part) == 1:
                work.insert(0, (part, True))
            else:
                mid = len(part) // 2
                work[:0] = [(part[:mid], False), (part[mid:], False)]
    return result
