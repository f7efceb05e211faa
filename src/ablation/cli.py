"""Turn user errors into one clear line and exit status 2; everything else is a real crash.

Set ABLATION_DEBUG=1 (or pass --debug) to see the traceback of a user error too.
"""
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
        # one line: newlines inside the message would break "one clear line"
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


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
