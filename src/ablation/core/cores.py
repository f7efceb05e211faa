"""A machine's cores shared by the runs on it: a run holds one core per thread it computes
with, from one pool of lock files, and waits while too few are free. Never more busy threads
than cores, whatever started the runs (`dvc repro`, DVC queue workers, Ray tasks, a shell).

The pool is one directory of slot files, one per core a process may run on (its CPU
affinity: Slurm and cgroups narrow it), shared by every user of the machine. A slot is held by
an flock, which the kernel drops when its holder dies, even by SIGKILL: a killed run never
leaves cores taken.
"""
import fcntl
import hashlib
import os
import random
import tempfile
import time

POLL_S = (0.2, 0.6)  # seconds between tries while waiting: random, so waiters interleave


def machine_cores():
    """The cores this process may run on (its affinity), else the machine's count."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pool_dir(cores):
    """$ABLATION_CORES_DIR, else a directory in the system temp folder named after the cores:
    processes pinned to other cores (two Slurm jobs on one node) use other pools."""
    env = os.environ.get("ABLATION_CORES_DIR")
    if env:
        return env
    key = hashlib.sha256(",".join(map(str, cores)).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"ablation-cores-{key}")


class CoreHold:
    """`with CoreHold(n, say) as hold:` holds n cores of the pool (waiting while fewer are
    free; `say(text)` once when it has to wait); `hold.waited_s` is how long it waited."""

    def __init__(self, n, say=print, cores=None):
        self.cores = cores if cores is not None else machine_cores()
        if not 1 <= n <= len(self.cores):
            raise ValueError(f"{n} cores asked of {len(self.cores)}")
        self.n, self.say, self.fds, self.waited_s = n, say, [], 0.0

    def _slots(self):
        d = pool_dir(self.cores)
        os.makedirs(d, exist_ok=True)
        try:
            os.chmod(d, 0o1777)  # every user's runs share the machine's cores
        except OSError:
            pass
        return [os.open(os.path.join(d, f"core-{i}"), os.O_RDONLY | os.O_CREAT, 0o644)
                for i in range(len(self.cores))]

    def __enter__(self):
        slots, t0, said = self._slots(), time.monotonic(), False
        try:
            while True:
                held = [fd for fd in random.sample(slots, len(slots)) if _try_lock(fd)]
                if len(held) >= self.n:
                    self.fds = held[:self.n]
                    break
                for fd in held:  # all or nothing: two waiters never hold half each
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if not said:
                    self.say(f"waiting for {self.n} free core(s) of {len(slots)}: "
                             f"{len(slots) - len(held)} busy with other runs")
                    said = True
                time.sleep(random.uniform(*POLL_S))
        finally:
            for fd in slots:
                if fd not in self.fds:
                    os.close(fd)
        self.waited_s = time.monotonic() - t0
        return self

    def __exit__(self, *exc):
        for fd in self.fds:
            os.close(fd)  # closing drops the lock
        self.fds = []
        return False


def _try_lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
