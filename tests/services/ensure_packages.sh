#!/bin/sh
# Install the Debian packages the service tests start themselves (openssh-server: a real sshd
# for the team-remote test) unless they are already there. Idempotent; needs root (or sudo)
# and an apt source the first time only; without them the tests skip, and fail under CI=true.
set -eu
[ -x /usr/sbin/sshd ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo -n"  # never prompt: make test must not hang
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -qq --no-install-recommends openssh-server >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends openssh-server
}
# the package's own service is not ours to run: the tests start sshd on a port of their own
command -v systemctl >/dev/null 2>&1 && $SUDO systemctl disable --now ssh >/dev/null 2>&1 || true
test -x /usr/sbin/sshd
