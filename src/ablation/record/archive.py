"""The GPU study's archive: one .tar.gz that carries finished runs from a machine without DVC
(the lent GPU machine) into the record here (`python -m ablation.report --add ARCHIVE`).

Layout (every name below the archive root; nothing else is allowed in it):

    manifest.json                  {"format", "files": {name: {"sha256", "bytes"}}}
    study.json                     provenance, the plan, what ran and how (gpu/study.py)
    runs/<experiment>/params.json  the params the run read (data, train, svm sections)
    runs/<experiment>/<metrics path as in the repository>  metrics JSON, its .run.json
                                   record, its .unit.json (start, end, weights' SHA-256) and
                                   <stem>/plots/metrics/*.tsv (dvclive's per-epoch curves)

Reading checks everything before anything is used: a gzip tar of regular files only, safe
names, bounded sizes, every member listed in the manifest with its size and SHA-256 and every
listed file present. JSON only, read in memory, never extracted; nothing is unpickled. Any
fault is one UserError naming the archive.
"""
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import zlib

from ablation.core.cli import UserError, bounded
from ablation.core.io import replace_atomic

FORMAT = "ablation-gpu-study/1"
CODE = ("src/ablation", "grids", "params.yaml", "bench/gpu_study.sh")  # what the digest covers
MAX_ARCHIVE_BYTES = 16 << 20  # what the device tool brings back per file
MAX_MEMBER_BYTES = 4 << 20  # a metrics file is ~1 KB, a curve ~0.5 KB, study.json ~100 KB
MAX_TOTAL_BYTES = 64 << 20  # uncompressed: a gzip bomb stops here
MAX_MEMBERS = 4000  # ~10 files per run
NAME = re.compile(r"^(?!.*(^|/)\.\.?(/|$))[A-Za-z0-9_][A-Za-z0-9_.@/-]{0,250}$")


def digest(data):
    return hashlib.sha256(data).hexdigest()


def file_digest(path):
    """SHA-256 of a file's bytes, read in blocks (model files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(path, files):
    """Write `files` ({name: bytes}) and their manifest as a gzip tar at `path`, atomically;
    the same files give the same bytes (sorted, no times, no owners)."""
    for name in files:
        if not NAME.match(name) or name == "manifest.json":
            raise ValueError(f"not an archive member name: {name!r}")
    manifest = {"format": FORMAT, "files": {n: {"sha256": digest(b), "bytes": len(b)}
                                            for n, b in sorted(files.items())}}
    members = {"manifest.json": json.dumps(manifest, indent=1, sort_keys=True).encode(),
               **files}

    def put(tmp):
        import gzip
        # no name and no time in the gzip header: the same files give the same bytes
        with open(tmp, "wb") as raw, \
                gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in ["manifest.json", *sorted(files)]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
                tar.addfile(info, io.BytesIO(members[name]))
    replace_atomic(put, path)
    return manifest


def read(path):
    """{name: bytes} of a verified archive (manifest.json left out). UserError otherwise."""
    def bad(what):
        raise UserError(f"{bounded(path)}: not a GPU study archive: {what} (nothing was "
                        f"changed)")
    # the same three faults as cli.read_config's (cli.py is a dependency of every stage: a
    # shared helper there would re-run them all)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_ARCHIVE_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{bounded(path)}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{bounded(path)}: is a directory, expected a .tar.gz archive") from None
    except OSError as e:
        raise UserError(f"{bounded(path)}: cannot read ({e.strerror})") from None
    if len(raw) > MAX_ARCHIVE_BYTES:
        bad(f"larger than {MAX_ARCHIVE_BYTES} bytes")
    members = _members(raw, bad)
    try:
        manifest = json.loads(members.pop("manifest.json"))
    except KeyError:
        bad("no manifest.json")
    except (ValueError, RecursionError):
        bad("manifest.json is not JSON")
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or not isinstance(listed, dict):
        bad(f"manifest.json is not of format {FORMAT}")
    for name in sorted(set(listed) | set(members)):
        want = listed.get(name)
        if name not in members:
            bad(f"{bounded(repr(name), 80)} is listed in the manifest but missing (truncated?)")
        if not isinstance(want, dict):
            bad(f"{bounded(repr(name), 80)} is not in the manifest")
        if want.get("bytes") != len(members[name]) or want.get("sha256") != digest(members[name]):
            bad(f"{bounded(repr(name), 80)} does not match its SHA-256 in the manifest "
                f"(tampered or corrupt)")
    return members


def _gunzip(raw, bad):
    """The decompressed tar, at most MAX_TOTAL_BYTES (+ headers): tarfile reads PAX and long-name
    headers whole, before any member size is seen, so the bound comes first."""
    d = zlib.decompressobj(wbits=31)  # gzip only
    try:
        out = d.decompress(raw, MAX_TOTAL_BYTES + (1 << 20))
    except zlib.error as e:
        bad(f"unreadable gzip ({bounded(str(e), 60)})")
    if d.unconsumed_tail:
        bad(f"more than {MAX_TOTAL_BYTES} bytes uncompressed")
    if not d.eof:
        bad("truncated gzip stream")
    return out


def _members(raw, bad):
    """The archive's regular files as {name: bytes}, every name and size checked."""
    out, total = {}, 0
    data = _gunzip(raw, bad)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for i, m in enumerate(tar):
                if i >= MAX_MEMBERS:
                    bad(f"more than {MAX_MEMBERS} members")
                if not m.isfile():
                    bad(f"member {bounded(repr(m.name), 80)} is not a regular file")
                if not NAME.match(m.name) or m.name in out:
                    bad(f"member name {bounded(repr(m.name), 80)} is not allowed or repeated")
                total += m.size
                if m.size > MAX_MEMBER_BYTES or total > MAX_TOTAL_BYTES:
                    bad(f"member {bounded(repr(m.name), 80)} is too large")
                out[m.name] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
        bad(f"unreadable gzip tar ({type(e).__name__})")
    return out


def load_json(members, name, path, limit=MAX_MEMBER_BYTES):
    """One member parsed as JSON, or a UserError naming the archive and the member."""
    try:
        return json.loads(members[name][:limit])
    except KeyError:
        raise UserError(f"{bounded(path)}: not a GPU study archive: no {name}") from None
    except (ValueError, RecursionError):
        raise UserError(f"{bounded(path)}: not a GPU study archive: {name} is not JSON") \
            from None


def code_digest(root="."):
    """SHA-256 over the code and configs a run depends on (CODE), path by path."""
    h = hashlib.sha256()
    for top in CODE:
        full = os.path.join(root, top)
        files = [full] if os.path.isfile(full) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs
            if f.endswith((".py", ".yaml", ".sh")))
        for f in files:
            h.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def git_state():
    """(commit, dirty) of the checkout, or (None, None) where there is no git repository."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        st = subprocess.run(["git", "status", "--porcelain", "--", *CODE], capture_output=True,
                            text=True)
    except OSError:
        return None, None
    if head.returncode or st.returncode:
        return None, None
    return head.stdout.strip(), bool(st.stdout.strip())
