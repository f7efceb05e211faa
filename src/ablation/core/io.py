"""Files the stages write: output paths checked before work, one writer per output set, and
every write atomic (a temp sibling renamed into place), so a killed run never leaves a
half-written file.
"""
import json
import os

from ablation.core.cli import UserError, bounded
from ablation.core.outputs import record_path


def check_outputs(*paths):
    """Fail before any work unless every path can be written: not a directory, and its nearest
    existing ancestor a writable directory. Creates nothing."""
    for path in paths:
        if path is None:
            continue
        path = os.path.abspath(os.fspath(path))
        if os.path.isdir(path):
            raise UserError(f"{bounded(path)}: is a directory, expected a file path to write")
        d = os.path.dirname(path)
        while not os.path.exists(d):
            d = os.path.dirname(d)
        if not os.path.isdir(d):
            raise UserError(f"{bounded(path)}: cannot be created: {bounded(d)} is a file")
        if not os.access(d, os.W_OK | os.X_OK):
            raise UserError(f"{bounded(path)}: cannot be written: no write permission in "
                            f"{bounded(d)}")


class OutputLock:
    """An exclusive lock for one output set (flock on `<dir>/.<name>.lock`): a second writer of
    the same outputs fails at once, naming the holder. The kernel drops the lock when its
    holder dies, even by SIGKILL; the file is removed on a normal exit."""

    def __init__(self, path):
        d, base = os.path.split(os.path.abspath(os.fspath(path)))
        self.path = os.path.join(d, f".{base}.lock")
        self.fd = None

    def __enter__(self):
        import fcntl
        import socket
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(self.fd)
            raise UserError(f"{bounded(self.path)}: another run is writing these outputs "
                            f"({bounded(holder, 100)}); wait for it or stop it") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        return self

    def __exit__(self, *exc):
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)
        return False


def atomic_path(path):
    """A temporary sibling of `path` to write to before `os.replace(tmp, path)`."""
    path = os.fspath(path)
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp{os.getpid()}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path):
    """Delete temp siblings of `path` left by a killed writer (its pid no longer runs)."""
    d, base = os.path.split(os.fspath(path))
    prefix = f".{base}.tmp"
    for name in os.listdir(d or "."):
        pid = name[len(prefix):]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            os.remove(os.path.join(d, name))


def replace_atomic(write, path):
    """Call `write(tmp)` then rename tmp onto `path`; on any failure remove tmp and re-raise.

    A SIGKILL cannot be caught: it may leave the temp file, never a half-written `path`; the
    next write to `path` removes such leftovers.
    """
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    remove_stale_temps(path)
    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path):
    """`obj` as indented, key-sorted JSON at `path`, atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    replace_atomic(write, path)


def write_metrics(values, metrics_keys, metrics_path):
    """Split what a run recorded: `metrics_keys` to the metrics JSON, the rest to the record
    beside it (record_path). The record is written first: a metrics file never lacks it."""
    write_json({k: v for k, v in values.items() if k not in metrics_keys},
               record_path(metrics_path))
    write_json({k: values[k] for k in metrics_keys}, metrics_path)


def save_torch(obj, path):
    """torch.save of a plain dict, atomically."""
    import torch
    replace_atomic(lambda tmp: torch.save(obj, tmp), path)


def save_npz(arrays, path):
    """np.savez of named arrays (no pickles), atomically."""
    import numpy as np

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    replace_atomic(write, path)
