"""Local workers whose processes end with dwiflow, and the interruption state of a run.

Pydra's ``cf`` worker runs tasks in a ``ProcessPoolExecutor``; when the dwiflow process is killed
(SIGKILL leaves no chance to clean up) its worker processes are re-parented and go on computing.
:class:`LocalProcessWorker` starts every worker process with the kernel's parent-death signal set
(``PR_SET_PDEATHSIG``, Linux) and a watchdog thread (elsewhere, and as a second guard), so a worker
ends when its parent does; the worker processes ignore SIGINT/SIGTERM, on which dwiflow kills the pool instead of
draining it.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import inspect
import logging
import os
import signal
import sys
import threading
import time
from typing import ClassVar

import attrs
import pydra.engine  # noqa: F401  (pydra.workers needs the engine imported first)
from pydra.engine.submitter import Submitter
from pydra.workers.cf import ConcurrentFuturesWorker

PR_SET_PDEATHSIG = 1


class Interruption:
    """The signal that interrupted this process, if any (set by :func:`install_signal_handlers`)."""

    signal: int | None = None


def _interrupt(signum, frame) -> None:
    Interruption.signal = signum
    # The interruption may land inside one of Pydra's asyncio tasks: the task then holds the KeyboardInterrupt
    # too, and asyncio would print its whole traceback ("Task exception was never retrieved") when the task is
    # freed, after the one-line message. The run is being abandoned; what its tasks raise is not news.
    logging.getLogger("asyncio").disabled = True
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _quiet_abandoned_coroutines(unraisable) -> None:
    """After an interruption, Pydra's suspended jobs are closed when they are freed, after their event loop was
    closed, and their clean-up fails ("Exception ignored in: <coroutine Job.run_async>: Event loop is closed").
    Those are the abandoned run's, not news; anything else goes to Python's hook as before."""
    if Interruption.signal is not None and inspect.iscoroutine(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`KeyboardInterrupt` (recording the signal), so a run unwinds: no result
    of an interrupted task counts, partial outputs are removed and the worker processes are killed. The
    interrupted process prints one line, not the tracebacks of the jobs it abandons."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.unraisablehook = _quiet_abandoned_coroutines


def interrupted() -> bool:
    return Interruption.signal is not None


def die_with_parent() -> None:
    """In a worker process: end when the parent process ends (also when it is SIGKILLed)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="dwiflow-parent-watch", daemon=True).start()


def start_pool_process() -> None:
    """Set up a worker process of the pool: it ignores SIGINT and SIGTERM, which dwiflow handles (a Ctrl-C reaches
    the whole process group; the handlers a forked process inherits would raise KeyboardInterrupt in it, and an idle
    worker would print that traceback before dwiflow kills it), and it ends with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()


@attrs.define
class LocalProcessWorker(ConcurrentFuturesWorker):
    """Pydra's ``cf`` worker whose processes end with their parent and are killed, not drained, on interruption."""

    _plugin_name: ClassVar[str] = "cf"
    pool: cf.ProcessPoolExecutor = attrs.field(eq=False, init=False, hash=False, repr=False)

    @pool.default
    def _pool_default(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(self.n_procs, initializer=start_pool_process)

    def start_handing_over_the_dwi(self) -> "LocalProcessWorker":
        """Fork the pool's processes now (a fork-started pool starts all of them with its first job), so that they
        inherit the DWI this process read last (the pre-flight checks'), then free this process's copy: the
        workers' stages read it from their own, and it is held once, not also by the process that waits."""
        from dwiflow.tasks.io import forget_dwi

        self.pool.submit(os.getpid).result()
        forget_dwi()
        return self

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.pool = self._pool_default()

    def close(self) -> None:
        if interrupted():
            self.kill()
        else:
            self.pool.shutdown()

    def kill(self) -> None:
        """Kill the worker processes now (their running tasks leave no result that counts)."""
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        manager = getattr(self.pool, "_executor_manager_thread", None)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(timeout=5)
        # let the pool's manager thread finish closing its wake-up pipe: at exit, concurrent.futures wakes every
        # manager thread through that pipe, and one closing it meanwhile makes the interpreter print "Exception
        # ignored … Bad file descriptor" (seen under load in CI; Python 3.12 guards the pipe with a lock)
        if manager is not None and manager.is_alive():
            manager.join(timeout=5)



def _nodes_done(graph) -> int:
    return sum(1 for node in graph.nodes if node.done)


class PromptSubmitter(Submitter):
    """Pydra's Submitter, which finishes a workflow as soon as a failure leaves nothing it can run.

    Pydra 1.0a12 marks the nodes downstream of a failed task unrunnable one level per call of
    ``get_runnable_tasks`` (its walk stops at the first node not yet started), and when a call finds nothing to run
    its asynchronous loop waits a second before the next: a run that failed in its response stage ended about five
    seconds later, one per stage after it (and the BIDS App submits a failed run twice). Here the walk is repeated
    until it finds a task to run or no more nodes end, so the failure propagates at once. What runs, and in which
    order, is unchanged.
    """

    def get_runnable_tasks(self, graph):
        tasks = super().get_runnable_tasks(graph)
        done = _nodes_done(graph)
        while not tasks:
            tasks = super().get_runnable_tasks(graph)
            now = _nodes_done(graph)
            if now == done:
                break
            done = now
        return tasks
