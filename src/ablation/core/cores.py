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


def _machine_busy_s():
    """CPU seconds the whole machine has been busy (user, nice, system, irq, softirq of
    /proc/stat's first line; not idle, iowait or steal); None without /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return sum(int(x) for x in fields[1:4] + fields[6:8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_s():
    """CPU seconds of this process (all its threads) and of its live children (DataLoader
    workers), from os.times() and /proc/<child>/stat."""
    t = os.times()
    own = t.user + t.system
    try:
        kids = set()
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/children") as f:
                kids.update(f.read().split())
        for pid in kids:
            with open(f"/proc/{pid}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
            own += (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass  # a child gone between the two reads, or no /proc: its time counts as others'
    return own


class Load:
    """How busy other processes kept the machine while this one worked: `with Load() as l:`,
    then `l.cores` is their CPU seconds (the machine's busy time less this process's and its
    children's) over the wall seconds in between: 0 on an idle machine, about 1 where another
    process kept one core busy all along. None without /proc/stat."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.monotonic(), _machine_busy_s(), _own_s()
        self.cores = None
        return self

    def __exit__(self, *exc):
        busy, wall = _machine_busy_s(), time.monotonic() - self.t0
        if busy is not None and self.busy0 is not None and wall > 0:
            other = (busy - self.busy0) - (_own_s() - self.own0)
            self.cores = max(0.0, other / wall)
        return False
