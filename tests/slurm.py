"""A real single-node Slurm for the suite: Debian's munged, slurmctld and slurmd run as ordinary
processes with a key, ports, state and spool folders of the test's own (SLURM_CONF points the
client commands at them), all stopped after it (tests/services/ensure_packages.sh installs
munge, slurmctld, slurmd and the client)."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from .sshd import free_port

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")



def need_slurm():
    if all(os.path.exists(d) for d in DAEMONS) and shutil.which("sbatch") and os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("munge/slurmctld/slurmd missing or not root "
                    "(tests/services/ensure_packages.sh installs them)")
    pytest.skip("Slurm's daemons are not installed or this is not root")


def config(d, host):
    m = f"{d}/munge"
    return "\n".join([
        "ClusterName=ablation", f"SlurmctldHost={host}", "SlurmUser=root",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "AuthType=auth/munge",
        "CredType=cred/munge", f"AuthInfo=socket={m}/munge.socket",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "ReturnToService=2",
        "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log", f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


@contextlib.contextmanager
def slurm(workdir):
    """Yield the environment (SLURM_CONF) of a running one-node Slurm cluster."""
    need_slurm()
    d = os.path.join(workdir, "slurm")
    for sub in ("munge", "state", "spool"):
        os.makedirs(os.path.join(d, sub))
    key = os.path.join(d, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(1024))
    os.chmod(key, 0o600)
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(config(d, host))
    env = dict(os.environ, SLURM_CONF=conf)
    procs = []
    try:
        m = os.path.join(d, "munge")
        subprocess.run([DAEMONS[0], "--force", f"--key-file={key}", f"--socket={m}/munge.socket",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munged.seed"], check=True, env=env)
        for cmd in ([DAEMONS[1], "-D", "-i"], [DAEMONS[2], "-D"]):
            log = open(os.path.join(d, os.path.basename(cmd[0]) + ".out"), "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.time() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=env,
                                           capture_output=True, text=True).stdout:
            assert time.time() < deadline, open(os.path.join(d, "slurmctld.log")).read()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(d, "munge", "munged.pid")) as f:
                os.kill(int(f.read().strip()), signal.SIGTERM)
