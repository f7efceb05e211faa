#!/bin/sh
# Install the Debian packages the service tests start themselves, unless they are there:
# openssh-server (a real sshd for the team-remote test) and munge, slurmctld, slurmd and the
# Slurm client (a one-node Slurm for `grid sbatch`). Idempotent; needs root (or sudo) and an apt
# source the first time only; without them those tests skip, and fail under CI=true.
set -eu
PKGS="openssh-server munge slurmctld slurmd slurm-client"
[ -x /usr/sbin/sshd ] && [ -x /usr/sbin/munged ] && [ -x /usr/sbin/slurmctld ] \
    && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"  # never prompt: make test must not hang
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $PKGS >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $PKGS
}
# the packages' own services are not ours to run: the tests start each on ports of their own
if command -v systemctl >/dev/null 2>&1; then
    for s in ssh munge slurmctld slurmd; do $SUDO systemctl disable --now "$s" >/dev/null 2>&1 || true; done
fi
test -x /usr/sbin/sshd && test -x /usr/sbin/slurmd
