"""The command line: user errors as one clear line and exit status 2 (everything else is a
real crash), interrupts as one line and 128 + the signal's number, argument parsing, progress
bars, and reading the YAML files users write.

Set ABLATION_DEBUG=1 (or pass --debug) to see the traceback of a user error or interrupt too.
"""
import argparse
import os
import signal
import sys
import threading


class UserError(Exception):
    """Bad input from the user: a file, a key, a value. Printed as one line, exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler preempting the job) arrived. Raised in the main
    thread, so `finally` blocks and context managers clean up on the way out; `note` says what
    was left and how to go on (the code that knows sets it on the way up)."""

    def __init__(self, signum, note=""):
        super().__init__(signum, note)
        self.signum, self.note = signum, note


_received = []  # the signals received, in order: a library may turn ours into a bare
# KeyboardInterrupt (Ray's ray.wait does), which then still exits 128 + the right number


def _raise_interrupted(signum, frame):
    _received.append(signum)
    # the cleanup on the way out runs undisturbed by a repeated SIGTERM (a process group's
    # signal arrives twice); a second Ctrl-C forces the exit
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def catch_interrupts():
    """SIGINT and SIGTERM raise Interrupted. Again after a library installs handlers of its own
    (ray.init's: SIGTERM would print a stack and exit 1). Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)


def run(main, argv=None):
    """Call `main(argv)` for a module's `__main__`: a UserError is one line and exit status 2,
    SIGINT or SIGTERM one line and 130 or 143 (after the cleanup on the way out), a closed
    pipe (`... | head`) a quiet exit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("ABLATION_DEBUG") == "1" or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    catch_interrupts()
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        # one line: newlines inside the message would break "one clear line"; bounded, as
        # messages quote what the user gave
        print(f"error: {bounded(' '.join(str(e).split()), 440)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = getattr(e, "signum", _received[0] if _received else signal.SIGINT)
        note = getattr(e, "note", "")
        print(f"interrupted by {signal.Signals(signum).name}" + (f": {note}" if note else ""),
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except BrokenPipeError:  # the reader went away: say nothing more, to nobody
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


MAX_YAML_BYTES = 1 << 20  # params and grid files are a few KB; more is a mistake or an attack
MAX_YAML_ALIASES = 20  # a params file needs none; many are an expansion bomb


def read_config(path):
    """Parse a small config file users write: JSON if its name ends in .json (the GPU check's:
    no YAML library there), else YAML, read safely. Every way it can be wrong is one UserError
    naming it: missing, a directory, unreadable, too large, not UTF-8, a syntax error, a
    duplicate key, an alias bomb. Returns the parsed document (None for an empty YAML file)."""
    try:
        if os.path.getsize(path) > MAX_YAML_BYTES:
            raise UserError(f"{bounded(path)}: {os.path.getsize(path)} bytes, more than the "
                            f"{MAX_YAML_BYTES} a params or grid file may have")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{bounded(path)}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{bounded(path)}: is a directory, expected a config file") from None
    except OSError as e:
        raise UserError(f"{bounded(path)}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{bounded(path)}: not UTF-8 text (byte 0x{raw[e.start]:02x} at line "
                        f"{line})") from None
    if str(path).endswith(".json"):
        import json
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{bounded(path)}: JSON syntax error at line {e.lineno}: "
                            f"{bounded(e.msg, 100)}") from None
        except RecursionError:
            raise UserError(f"{bounded(path)}: nested too deeply") from None
    return _parse_yaml(text, path)



def _parse_yaml(text, path):
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


def lookup(registry, name, what):
    """registry[name]; an unknown name is one UserError listing the valid ones (for callers of
    the builders that did not come through the params schema or a command line)."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown {what} {bounded(repr(name), 60)} (valid: "
                        f"{', '.join(registry)})") from None


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors: one line naming the command, exit 2."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(total, desc, enabled=True, unit="img"):
    """A tqdm bar on stderr when stderr is a terminal; nothing when disabled, when stderr is a
    file or pipe (a queue worker's log, a test, a hostile-input check expecting one line) or
    where tqdm is not installed."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:  # e.g. the bare GPU machine: dvc brings tqdm, torch does not
            return _NoBar()
        return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)
    return _NoBar()
