"""The life of a scheduler thread, shared by ``Engine`` and ``SpanEngine``.

Each engine owns one thread that runs every forward pass (see ``engine.py`` for why one):
``start`` launches it, ``close`` tells it to stop, fails what is outstanding (the
subclass's ``_run`` does that when it sees the state change) and joins it.
"""

from __future__ import annotations

import threading
from typing import Any

from .errors import EngineClosed


class SchedulerThread:
    """``start``/``close``/context manager around a subclass's ``_run`` loop; the subclass
    waits on ``_wakeup`` (under ``_lock``) and returns once ``_state`` is no longer "running"."""

    def _init_scheduler(self, thread_name: str) -> None:
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._state = "new"  # -> "running" -> "closed"
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name

    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        with self._lock:
            if self._state == "closed":
                raise EngineClosed("engine is closed")
            if self._state == "running":
                return
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name=self._thread_name)
            self._thread.start()

    def close(self) -> None:
        """Stop the scheduler, failing outstanding work with ``EngineClosed``, and join it."""
        with self._lock:
            self._state = "closed"
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        raise NotImplementedError
