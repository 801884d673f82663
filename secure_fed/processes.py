"""Worker processes for TenSEAL work that end with the process that started them.

TenSEAL holds the GIL while it encrypts or decrypts, so the encoder and the key holder run it
in a :class:`~concurrent.futures.ProcessPoolExecutor`. A pool shut down normally ends its
workers; this module makes sure they also end when their parent is killed (``SIGKILL``,
the OOM killer, a crash), and that nothing else of :mod:`multiprocessing` outlives it.

What kept processes alive after a ``kill -9`` of a slave (CPython 3.11 sources):

* A pool worker blocks reading its call queue. ``multiprocessing.queues.Queue.__getstate__``
  hands the child *both* ends of the queue's pipe, so the child itself holds a write end and
  never reads EOF when the parent dies: it waits forever.
* With the ``forkserver`` start method the workers are children of the fork server, not of
  the pool's owner, and each is sent a copy of the server's "alive" pipe
  (``forkserver.ForkServer.connect_to_new_process`` passes ``self._forkserver_alive_fd``);
  ``forkserver.main`` exits only at EOF on that pipe, i.e. when the owner *and every worker*
  closed it. A stuck worker keeps the fork server alive.
* The resource tracker (``resource_tracker.main``) ignores SIGINT and SIGTERM and exits at EOF
  on its pipe, whose write end the owner and every worker hold
  (``popen_spawn_posix.Popen._launch`` passes ``resource_tracker.getfd()``).

So the workers are started with ``spawn``: they are direct children of the pool's owner and
no fork server exists; and each worker watches its parent from a thread and exits when it is
gone. Then the resource tracker reads EOF, unlinks the queues' semaphores the dead parent left
behind (with a warning on stderr) and exits too. The watch uses a pidfd (Linux 5.3+), which
becomes readable when the parent process exits; elsewhere it polls ``os.getppid()``, which
changes when an orphan is re-parented. ``prctl(PR_SET_PDEATHSIG)`` is not used: the kernel
sends that signal when the parent *thread* that created the child exits (prctl(2)), and pool
workers are created from whichever thread calls ``submit`` (an asyncio executor thread), not
from one that lives as long as the pool.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

__all__ = ["worker_pool", "PARENT_POLL_S", "ORPHAN_EXIT_STATUS"]

PARENT_POLL_S = 0.25
"""Seconds between two checks of the parent where no pidfd is available."""
ORPHAN_EXIT_STATUS = 75
"""Exit status of a worker that ended because its parent was gone (``EX_TEMPFAIL``)."""


def worker_pool(workers: int, initializer: Callable[..., None],
                initargs: tuple[Any, ...]) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes that end with the calling process.

    Started with ``spawn`` (never ``fork`` from a process that may run threads, and no fork
    server that could outlive the caller); each worker first starts its parent watch, then
    runs ``initializer(*initargs)``, which loads the context once per worker (contexts cannot
    be pickled, so their bytes are passed).

    Args:
        workers: number of worker processes.
        initializer: module-level function run once in each worker.
        initargs: its arguments (picklable).
    """
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(os.getpid(), initializer, initargs))


def _start_worker(parent_pid: int, initializer: Callable[..., None],
                  initargs: tuple[Any, ...]) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                     name="secure-fed-parent-watch").start()
    initializer(*initargs)


def _exit_with_parent(parent_pid: int) -> None:
    """End this process (without cleanup: its parent is gone) once ``parent_pid`` has exited."""
    pidfd: int | None = None
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or the parent is already gone
        pidfd = None
    # Checked after opening: had the parent died (and its pid been reused) before, this process
    # would have been re-parented already, and the pidfd would name a stranger.
    if os.getppid() == parent_pid:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while os.getppid() == parent_pid:
                time.sleep(PARENT_POLL_S)
    os._exit(ORPHAN_EXIT_STATUS)
