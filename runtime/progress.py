"""The one progress protocol of the library: progress(done, total), called as work
advances (sampler steps, recorded steps, benchmark configurations, eval samples).
The library never draws anything; the CLIs turn these calls into a progress bar."""
from __future__ import annotations

from typing import Callable

#: progress(done, total): `done` of `total` units finished; total may grow between calls
Progress = Callable[[int, int], None]


def scaled(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """Returns a progress callback for one part of a larger job: a call (done, part_total)
    is reported as (offset + done, total). None stays None."""
    if progress is None:
        return None
    return lambda done, _part_total: progress(offset + done, total)
