"""Steps that must not stop half-way: an interrupt arriving inside waits until the step ends.

Kept apart from core/cli.py, which every stage imports (dvc.yaml lists a stage's import
closure as its deps): only commands that drive DVC use this.
"""
import contextlib
import os
import signal
import threading

from ablation.core.cli import _raise_interrupted


@contextlib.contextmanager
def deferred_interrupts():
    """`with deferred_interrupts():` a step that must not stop half-way (a child that changes
    the repository): SIGINT and SIGTERM arriving inside are noted, not raised, and the first is
    raised as Interrupted once the block has ended, leaving the handlers as core.cli's leaves
    them after a first signal (a second Ctrl-C ends the process; the cleanup on the way out is
    not disturbed by another SIGTERM). A second Ctrl-C inside the block ends the process at
    once. Main thread only (signals are delivered there); elsewhere it defers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []

    def note(signum, frame):
        if noted and signum == signal.SIGINT:  # asked twice: go now
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        noted.append(signum)
    old = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if noted:  # now as if it had arrived here: cli's handler records it, sets the handlers
        _raise_interrupted(noted[0], None)  # for the way out and raises Interrupted
