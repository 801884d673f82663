"""Crash points for fault-injection tests: stop the process dead at a named phase.

**Test-only.** The crash tests start a real ``secure-fed master`` or ``secure-fed slave`` with
the environment variable ``SECURE_FED_CRASH_AT`` set to the name of one crash point; when the
process reaches that point it ends at once with :func:`os._exit` and exit status 137, the
status a shell reports after ``kill -9``: no ``finally`` block runs, no buffer is flushed, no
file is closed, exactly as after a power cut of the process. ``name:N`` stops at the N-th time
the point is reached instead of the first.

Without the variable (every real deployment) :func:`crash_point` is one dictionary lookup and
returns. Named points (see ``docs/operations.md`` for what each one leaves behind):

======================================  =========================================================
``master.collecting``                   a chunk of an update was added to the running sum, the
                                        rest of that update and the others are still to come
``master.decrypted``                    the aggregate was decrypted; no checkpoint yet
``master.checkpoint_write``             the parameters file of the checkpoint is written, its
                                        JSON commit marker is not
``master.before_commit_record``         the checkpoint is committed, the audit record
                                        ``model_committed`` is not written yet
``master.summary_write``                the audit record ``model_committed`` is written,
                                        ``summary.json`` is not rewritten yet
``master.unmasking``                    a masked round's sum is decrypted (``he+mask``) or added
                                        (``mask``); the survivors' shares are not yet asked for
``slave.secagg_advertised``             the slave sent its signed key advertisement (secure
                                        aggregation phase 0); it has sent no share yet
``slave.secagg_shared``                 the slave sent its encrypted key shares (secure
                                        aggregation phase 1); it has not trained yet
``slave.training``                      local training ran; nothing is in the privacy ledger and
                                        nothing was sent
``slave.after_ledger``                  the ledger holds the round's entry; nothing was sent
``slave.mid_upload``                    the update header and a first chunk were sent
``slave.after_upload``                  every chunk of the update was sent
``slave.unmasking``                     the master asked for the slave's shares of a masked
                                        round (phase 3); none is sent yet
======================================  =========================================================
"""

from __future__ import annotations

import os

CRASH_ENV = "SECURE_FED_CRASH_AT"
"""Environment variable naming the crash point (``name`` or ``name:N``)."""
CRASH_EXIT_STATUS = 137
"""Exit status of a process stopped at a crash point (128 + SIGKILL, as after ``kill -9``)."""

_hits: dict[str, int] = {}


def _target(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition(":")
    return name, int(count) if count.isdigit() and int(count) > 0 else 1


def crash_point(name: str) -> None:
    """End the process with status 137 if ``SECURE_FED_CRASH_AT`` names this point (test-only).

    Args:
        name: the crash point, e.g. ``"master.decrypted"``.
    """
    spec = os.environ.get(CRASH_ENV)
    if spec is None:
        return
    target, count = _target(spec)
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < count:
        return
    os.write(2, f"\nsecure_fed.faults: crash point '{name}' reached (hit {count}); "
                f"exiting with status {CRASH_EXIT_STATUS}\n".encode())
    os._exit(CRASH_EXIT_STATUS)
