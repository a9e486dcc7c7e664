"""The emulator's progress bar on stderr (tqdm): each request counts half when routed and half
when done."""

from __future__ import annotations

import sys

__all__ = ["PROGRESS_INTERVAL_S", "NoBar", "Progress", "progress_bar"]


class NoBar:
    """No progress bar."""

    def routed(self) -> None:
        return None

    def done(self) -> None:
        return None

    def close(self) -> None:
        return None


#: Seconds between progress-bar refreshes.
PROGRESS_INTERVAL_S = 1.0


class Progress:
    """A progress bar on stderr where each request counts half when routed and half when done.

    Counting completions alone gives no rate (and an ETA of hours) until the first request has
    generated its whole output, tens of virtual seconds into the run; arrivals advance the bar
    from the first request on. The rate is averaged over the whole run so far (tqdm's
    ``smoothing=0``): the simulator's speed varies with the load, and a short-term rate swings.
    """

    def __init__(self, total: int | None, desc: str) -> None:
        from tqdm import tqdm

        self.total = total
        self._routed = 0
        self._done = 0
        self.bar = tqdm(
            total=None if total is None else 2 * total,
            desc=desc,
            file=sys.stderr,
            mininterval=PROGRESS_INTERVAL_S,
            smoothing=0.0,
            leave=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        )

    def _postfix(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self._routed}{of} routed, {self._done} done"

    def routed(self) -> None:
        self._routed += 1
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def done(self) -> None:
        self._done += 1
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.set_postfix_str(self._postfix(), refresh=False)
        self.bar.close()


def progress_bar(enabled: bool, total: int | None, desc: str) -> Progress | NoBar:
    """A `Progress` bar when `enabled`, else a `NoBar`."""
    if not enabled:
        return NoBar()
    return Progress(total, desc)
