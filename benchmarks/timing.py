"""Wall-clock timing of a step: warm-up calls (compilation) excluded, then ``reps`` timed calls."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: ``median`` is what the table reports, ``times`` every timed call."""

    median: float
    best: float
    times: tuple[float, ...]
    warmup_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(median_s=self.median, best_s=self.best, times_s=list(self.times), warmup_s=self.warmup_s)


def time_calls(
    fn: Callable[[], Any],
    *,
    reps: int,
    warmup: int = 1,
    sync: Callable[[Any], Any] = lambda x: x,
) -> Timing:
    """Calls ``fn`` ``warmup`` times untimed (compile, allocator warm-up), then ``reps`` times timed.

    ``sync(result)`` must block until the result is computed (``jax.block_until_ready`` for JAX's
    asynchronous dispatch); the time of a call includes it.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    t0 = time.perf_counter()
    for _ in range(warmup):
        sync(fn())
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return Timing(statistics.median(times), min(times), tuple(times), warmup_s)
