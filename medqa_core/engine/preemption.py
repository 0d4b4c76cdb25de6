"""Preemption: SIGTERM and SIGINT stop a job at the next step boundary instead of killing it mid-step.

The handlers only set a flag; the training loop reads it after each step (checkpoints, then raises
:class:`Interrupted`) and scoring reads it after each batch. A second signal does not wait: it raises
:class:`Interrupted` at once. Handlers are installed by :class:`StopOnSignals` around one job (the CLI
does it) and the previous ones are put back afterwards; importing this module changes nothing.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signal_name: str) -> int:
    """The shell's exit status for a job stopped by ``signal_name``: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + int(signal.Signals[signal_name])


class Interrupted(Exception):
    """A job stopped on a signal. ``exit_code`` is the shell's 128 + signal number (143, 130)."""

    def __init__(self, signal_name: str, step: int | None = None, steps: int | None = None,
                 checkpoint: str | None = None) -> None:
        self.signal_name = signal_name
        self.step = step  # optimizer steps finished, when training was stopped
        self.steps = steps  # steps the run asked for
        self.checkpoint = checkpoint  # the checkpoint written on the way out, if any
        where = f" after step {step} of {steps}" if step is not None else ""
        super().__init__(f"stopped by {signal_name}{where}")

    @property
    def exit_code(self) -> int:
        return exit_code(self.signal_name)

    def as_failure(self, phase: str) -> dict[str, Any]:
        """The record's ``failure`` field for this stop."""
        return {"kind": "interrupted", "signal": self.signal_name, "phase": phase, "message": str(self),
                "step": self.step, "steps": self.steps, "checkpoint": self.checkpoint}


class StopOnSignals:
    """Context manager: while inside, SIGTERM and SIGINT ask the job to stop instead of killing it.

    Signals that were ignored (``SIG_IGN``) when it was entered stay ignored, as Python leaves an ignored
    SIGINT ignored. Outside the main thread, where Python cannot install handlers, it does nothing.

    Example::

        with StopOnSignals() as stop:
            ...
            if stop.requested():  # at a step boundary
                raise Interrupted(stop.requested())
    """

    def __init__(self) -> None:
        self._received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("not the main thread: SIGTERM/SIGINT keep their handlers")
            return self
        for sig in SIGNALS:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._received is not None:  # asked twice: stop now, mid-step
            raise Interrupted(name)
        self._received = name  # no logging here: it could land inside a log line being written

    def requested(self) -> str | None:
        """The name of the first signal received ("SIGTERM"), or None."""
        return self._received

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal was received.

        Raises:
            Interrupted: a signal asked the job to stop.
        """
        if self._received is not None:
            raise Interrupted(self._received)
