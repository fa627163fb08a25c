"""Child processes that never outlive their parent, however the parent dies.

``up`` (and the test helpers) start workers and a gateway as child processes. If the
parent is killed with SIGKILL, or its terminal closes, nothing runs its cleanup, and
orphaned nodes would keep their ports and data dirs. So the parent holds the write end
of a pipe and each child watches the read end (``DLLM_PARENT_FD``): the kernel closes the
write end when the parent dies, for any reason, the child's read returns end-of-file,
and the child stops itself with SIGTERM, the same clean shutdown as Ctrl-C (deregister,
then exit). A child that has not exited ``GRACE_SECONDS`` later exits hard.

A pipe rather than Linux's ``PR_SET_PDEATHSIG``: that signal fires when the parent
*thread* that started the child exits, which a thread pool does routinely, and it is
Linux-only.
"""

from __future__ import annotations

import os
import signal
import threading
import time

ENV = "DLLM_PARENT_FD"
GRACE_SECONDS = 20.0

_lock = threading.Lock()
_pipe: tuple[int, int] | None = None


def child_fd() -> int:
    """The read end to hand to children (``pass_fds`` and ``DLLM_PARENT_FD``).

    One pipe per parent process, created on first use; the parent never writes to it
    and keeps the write end open until it dies.
    """
    global _pipe
    with _lock:
        if _pipe is None:
            _pipe = os.pipe()  # both ends close-on-exec: only pass_fds hands one on
        return _pipe[0]


def watch_parent() -> None:
    """In a child: stop this process when the parent named by ``DLLM_PARENT_FD`` dies."""
    value = os.environ.pop(ENV, "")
    if not value.isdigit():
        return
    fd = int(value)
    try:
        os.set_inheritable(fd, False)  # our own children must not keep our parent's pipe
    except OSError:
        return  # not a descriptor we were given
    threading.Thread(target=_wait_for_parent, args=(fd,), name="parent-watch", daemon=True).start()


def _wait_for_parent(fd: int) -> None:
    try:
        while os.read(fd, 1):
            pass  # the parent never writes; ignore stray bytes
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    os._exit(1)
