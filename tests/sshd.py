"""A real OpenSSH server for the suite: Debian's sshd run as an ordinary process on a free
loopback port, with a host key and a user key generated for the test, and stopped after it. No
system service is touched (tests/services/ensure_packages.sh installs the package)."""
import contextlib
import os
import shutil
import socket
import subprocess
import time

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need_sshd():
    if os.path.exists(SSHD) and shutil.which("ssh-keygen"):
        return
    if os.environ.get("CI") == "true":
        pytest.fail("openssh-server is missing (tests/services/ensure_packages.sh installs it)")
    pytest.skip("openssh-server is not installed (sh tests/services/ensure_packages.sh)")


@contextlib.contextmanager
def sshd(workdir):
    """Yield {host, port, user, key}: a key-only sshd for the current user on 127.0.0.1."""
    need_sshd()
    d = os.path.join(workdir, "sshd")
    os.makedirs(d)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        os.path.join(d, name)], check=True)
    shutil.copy(os.path.join(d, "user_key.pub"), os.path.join(d, "authorized_keys"))
    port = free_port()
    config = os.path.join(d, "sshd_config")
    with open(config, "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                "StrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp "
                "internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
    log = open(os.path.join(d, "sshd.log"), "w")
    p = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if p.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"sshd did not start: {open(log.name).read()[-1000:]}")
            time.sleep(0.1)
        yield {"host": "127.0.0.1", "port": port, "user": os.environ.get("USER") or
               subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip(),
               "key": os.path.join(d, "user_key")}
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
