"""Child processes that never outlive their parent (Ray workers, GPU study jobs)."""
import ctypes
import signal


def die_with_parent():
    """In a child process: SIGKILL it when its parent dies (Linux), so a killed Ray worker
    does not leave its `dvc exp run` training on as an orphan."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
