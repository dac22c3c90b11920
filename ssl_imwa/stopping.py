"""Ctrl-C and a scheduler's SIGTERM stop a run at the next step boundary, with a checkpoint there; so does
the SIGUSR2 with which Slurm warns a submitit job of its time limit, before submitit requeues it."""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Self

log = logging.getLogger("ssl_imwa")

GRACEFUL_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """The run stopped on a signal. Its exit status is 128 + the signal's number, as a shell reports
    a command a signal ended (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP): neither success nor
    a failure (1). Its message says how to continue; the orchestrator logs it (console and main.log)."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(128 + signal.Signals[signal_name].value)
        self.message = message
        self.signal_name = signal_name

    def __str__(self) -> str:
        return self.message


class StopRequests:
    """While active, SIGINT, SIGTERM and SIGHUP ask the run to stop instead of killing it mid-step.

    The first signal is remembered (`signal_name`); the training loop sees it after the current
    step, writes a checkpoint at that step and raises `Terminated`, so a stop loses at most the step
    in progress. A second signal stops at once (the last checkpoint stays the resume point), for
    a run stuck where no step ends. Only the main thread can take signals; elsewhere this is inert.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            numbers = list(GRACEFUL_SIGNALS)
            # In a submitit job SIGUSR2 has a handler (submitit's: requeue the job, then exit at once, mid-step);
            # it is taken here too, and handed on once the run has stopped with its checkpoint.
            if callable(signal.getsignal(signal.SIGUSR2)):
                numbers.append(signal.SIGUSR2)
            self._previous = {number: signal.signal(number, self._handle) for number in numbers}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        previous, self._previous = self._previous, {}
        for number, handler in previous.items():
            signal.signal(number, handler)
        handed_on = previous.get(signal.SIGUSR2)
        if isinstance(error, Terminated) and error.signal_name == "SIGUSR2" and callable(handed_on):
            log.info("checkpoint written; handing SIGUSR2 on to the job manager (submitit requeues the job)")
            handed_on(signal.SIGUSR2, None)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.signal_name is not None:
            message = f"stopped at once by a second {name}; resume=true continues from the last checkpoint"
            log.warning("%s", message)
            raise Terminated(message, name)
        self.signal_name = name
        log.warning("%s: stopping after the current step, with a checkpoint there (send it again to stop at once)",
                    name)
