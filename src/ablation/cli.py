"""Turn user errors into one clear line and exit status 2; everything else is a real crash.

Set ABLATION_DEBUG=1 (or pass --debug) to see the traceback of a user error too.
"""
import argparse
import json
import os
import sys


class UserError(Exception):
    """Bad input from the user: a file, a key, a value. Printed as one line, exit status 2."""


def run(main, argv=None):
    """Call `main(argv)` for a module's `__main__`; map UserError to exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("ABLATION_DEBUG") == "1" or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        # one line: newlines inside the message would break "one clear line"; bounded, as
        # messages quote what the user gave
        print(f"error: {bounded(' '.join(str(e).split()), 440)}", file=sys.stderr)
        sys.exit(2)


MAX_YAML_BYTES = 1 << 20  # params and grid files are a few KB; more is a mistake or an attack
MAX_YAML_ALIASES = 20  # a params file needs none; many are an expansion bomb


def read_yaml(path):
    """Parse a small YAML file safely; every way it can be wrong is one UserError naming it:
    missing, a directory, unreadable, too large, not UTF-8, a syntax error, a duplicate key,
    an alias bomb. Returns the parsed document (None for an empty file)."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                Loader.aliases += 1
                if Loader.aliases > MAX_YAML_ALIASES:
                    raise UserError(f"{bounded(path)}: more than {MAX_YAML_ALIASES} YAML aliases "
                                    f"(*name); write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise UserError(f"{bounded(path)}: duplicate key {bounded(repr(key), 60)} at "
                                    f"line {key_node.start_mark.line + 1}")
                seen.add(key) if isinstance(key, (str, int, float, bool)) else None
            return super().construct_mapping(node, deep)

    try:
        if os.path.getsize(path) > MAX_YAML_BYTES:
            raise UserError(f"{bounded(path)}: {os.path.getsize(path)} bytes, more than the "
                            f"{MAX_YAML_BYTES} a params or grid file may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{bounded(path)}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{bounded(path)}: is a directory, expected a YAML file") from None
    except OSError as e:
        raise UserError(f"{bounded(path)}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{bounded(path)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line "
                        f"{line})") from None
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{bounded(path)}: YAML syntax error{where}: "
                        f"{bounded(getattr(e, 'problem', None) or e, 100)}") from None
    except RecursionError:
        raise UserError(f"{bounded(path)}: nested too deeply") from None


def bounded(text, limit=200):
    """`text` cut to `limit` characters, saying how much was cut: error messages quote input."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more chars)"


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


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors: one line naming the command, exit 2."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


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
