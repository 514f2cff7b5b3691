"""Whether a bundle may run: the one trust policy of every command that runs one.

A bundle may run when its files are exactly the ones manifest.json lists (no file or directory
more, none less, regular files only, every sha256 as listed) and its signature holds: with a
trusted key configured (`--key`, else $PHIKIT_TRUSTED_KEY) the manifest must be signed by that
key; without one, a signed bundle's signature must still be one of this manifest.

Standard library only and self-contained (no import from the bundle, no relative import): run.py
carries this very source (package.py embeds it) and runs it before it imports any other code of
the bundle; the runner (core.py) and phikit import it from here.
"""

import hashlib
import json
import os
import re
import stat
import subprocess
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
# manifest.json signed with an OpenSSH ed25519 key (`ssh-keygen -Y sign`, the SSHSIG format): it
# lists every file's sha256, so the signature binds the whole bundle, and anyone can check it
# with the ssh-keygen every device already has
SIGNATURE = MANIFEST + ".sig"
SIGNATURE_NAMESPACE = "phikit-bundle"
# runtime options `run.py tune` measured fastest on a device (and validated there): written on
# the device beside the manifest, not hashed; the runner checks every value itself (tune.py)
TUNED = "tuned.json"
BUNDLE_FORMAT = "phikit-bundle/1"
# The one directory of a bundle that is not part of it: the runtime venv `phikit deploy` creates
# beside run.py on a device. Everything else is hashed: byte code (the runner writes none: run.py
# and rpc.py run with -B), runtime caches (kept under the user's cache dir, never in the bundle)
# and anything planted is an unexpected file; a symbolic link is refused outright.
VENV_DIR = ".venv"
# the top-level files verification reads itself (the manifest, its signature) or checks value by
# value (tuned.json): not in the manifest's list
UNHASHED = (MANIFEST, SIGNATURE, TUNED)
TRUSTED_KEY_ENV = "PHIKIT_TRUSTED_KEY"
MAX_MANIFEST_BYTES = 64 << 20
MAX_SIGNATURE_BYTES = 64 << 10

# fullmatch: `$` would also match before a final newline
_SHA256 = re.compile(r"[0-9a-f]{64}")

# Bundles whose every file run.py's bootstrap hashed in this process before it imported the
# runner: (real directory, sha256 of the manifest.json bytes they were hashed against). The
# runner it then starts walks the files and checks the signature again, but does not hash the
# same files against the same manifest a second time (seconds for a full-size model on a Pi).
# Only run.py adds to it (phikit, which verifies a bundle again after a change, never does).
HASHED_IN_THIS_PROCESS: set = set()


class BundleError(Exception):
    """The bundle is missing, modified or unusable. Exit code 2."""


def bundle_tree(root) -> tuple:
    """(files, directories) under root, sorted posix paths, from lstat alone: nothing is opened
    and no link followed. Left out: the manifest, its signature, tuned.json and the top-level
    venv. A symbolic link (it can point a verified name at unverified bytes, or shadow a module)
    or anything but a regular file or a directory (a FIFO would hang whoever hashes it, a device
    never ends) is a BundleError."""
    root = Path(root)
    files, dirs, stack = [], [], [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            entries = sorted(entries, key=lambda e: e.name)
        for entry in entries:
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{path}: a symbolic link inside the bundle (not allowed)")
            if stat.S_ISDIR(mode):
                if rel != VENV_DIR:
                    dirs.append(rel)
                    stack.append(path)
            elif not stat.S_ISREG(mode):
                raise BundleError(f"{path}: not a regular file (a FIFO, socket or device file "
                                  "inside the bundle: not allowed)")
            elif rel not in UNHASHED:
                files.append(rel)
    return sorted(files), sorted(dirs)


def bundle_files(root) -> list:
    """Every hashed file of the bundle at root (bundle_tree's files)."""
    return bundle_tree(root)[0]


def open_regular(path):
    """`path` opened for reading only when it is a regular file: a link is not followed, and a
    FIFO is opened without waiting for a writer (then refused), so nothing here can hang."""
    flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
             | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise BundleError(f"{path}: cannot open ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{path}: not a regular file (not allowed)")
    return os.fdopen(fd, "rb")


def read_regular(path, limit: int) -> bytes:
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path}: larger than {limit} bytes")
    return data


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_files(data, path) -> dict:
    """The format and the `files` table: what hashing a bundle needs (a listed path that leaves
    the bundle would have it hash, and report on, a file elsewhere)."""
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a {BUNDLE_FORMAT} manifest")
    files = data.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{path}: field 'files': missing or not a mapping")
    for rel, digest in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if (not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts)
                or "\\" in rel or "\0" in rel):
            raise BundleError(f"{path}: field 'files': {rel!r} is not a relative path inside "
                              "the bundle")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{path}: field 'files': {rel!r}: {digest!r} is not a sha256")
    return files


def _parse_manifest(raw: bytes, path) -> dict:
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BundleError(f"{path}: unreadable manifest: {e}") from None
    manifest_files(manifest, path)  # the fields the runner acts on: Manifest.parse, before use
    return manifest


def _manifest_bytes(root: Path) -> bytes:
    path = root / MANIFEST
    if not os.path.lexists(path):
        raise BundleError(f"{root}: not a phikit bundle ({MANIFEST} missing)")
    return read_regular(path, MAX_MANIFEST_BYTES)


def read_manifest(root) -> dict:
    """manifest.json, its file table checked; nothing else of the bundle is (verify_bundle)."""
    root = Path(root)
    return _parse_manifest(_manifest_bytes(root), root / MANIFEST)


def trusted_key(key=None):
    """The public key a bundle must be signed by: the command line's, else $PHIKIT_TRUSTED_KEY;
    None when neither is configured."""
    if key is not None and str(key) != "":
        return Path(key)
    configured = os.environ.get(TRUSTED_KEY_ENV, "")
    return Path(configured) if configured else None


def _ssh_keygen(args: list, stdin: bytes):
    try:
        return subprocess.run(["ssh-keygen", *args], input=stdin, capture_output=True,
                              timeout=120)
    except FileNotFoundError:
        raise BundleError("checking a signature needs ssh-keygen (OpenSSH; Debian: "
                          "openssh-client)") from None


def _refusal(proc) -> str:
    why = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return why[-1] if why else "ssh-keygen refused it"


def verify_signature(root, public_key, manifest: bytes = None) -> None:
    """The bundle's manifest.json.sig is a valid SSHSIG signature of its manifest.json (the
    bytes given, else the file's), in the phikit namespace, by this ed25519 public key (a
    one-line OpenSSH public key file)."""
    root, public_key = Path(root), Path(public_key)
    try:
        with open(public_key, "rb") as f:
            key = f.read(16 << 10).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{public_key}: cannot read the public key: {e}") from None
    if not key.startswith("ssh-ed25519 ") or "\n" in key or "\r" in key:
        raise BundleError(f"{public_key}: not an OpenSSH ed25519 public key (one line starting "
                          "'ssh-ed25519 ')")
    signature = root / SIGNATURE
    if not os.path.lexists(signature):
        raise BundleError(f"{signature}: missing: the bundle is not signed, and a key is "
                          f"configured ({public_key})")
    proc = _check_sshsig(root, manifest, ["-Y", "verify", "-I", "phikit"],
                         f'phikit namespaces="{SIGNATURE_NAMESPACE}" {key}\n')
    if proc.returncode != 0:
        raise BundleError(f"{signature}: not a signature of this manifest.json by "
                          f"{public_key} ({_refusal(proc)})")


def _check_sshsig(root: Path, manifest, args: list, allowed: str = None):
    """ssh-keygen on copies of the signature and the allowed key (the bundle's files are read
    once, here, as regular files: ssh-keygen never opens a path of the bundle)."""
    data = manifest if manifest is not None else _manifest_bytes(root)
    sig = read_regular(root / SIGNATURE, MAX_SIGNATURE_BYTES)
    with tempfile.TemporaryDirectory() as tmp:
        sig_copy = os.path.join(tmp, "manifest.json.sig")
        with open(sig_copy, "wb") as f:
            f.write(sig)
        extra = []
        if allowed is not None:
            extra = ["-f", os.path.join(tmp, "allowed_signers")]
            with open(extra[1], "w", encoding="utf-8") as f:
                f.write(allowed)
        return _ssh_keygen([*args, *extra, "-n", SIGNATURE_NAMESPACE, "-s", sig_copy], data)


def check_signature(root, manifest: bytes, key=None) -> str:
    """The signature part of the policy, for these manifest bytes. A configured key is
    enforced: unsigned, or signed by any other key, is refused. With no key configured a signed
    bundle's signature must still be a signature of this manifest (a change after signing is
    refused); who signed it is then not known. Returns what was established, for the user."""
    root = Path(root)
    public_key = trusted_key(key)
    if public_key is not None:
        verify_signature(root, public_key, manifest)
        return f"signed by {public_key}"
    if not os.path.lexists(root / SIGNATURE):
        return "unsigned"
    proc = _check_sshsig(root, manifest, ["-Y", "check-novalidate"])
    if proc.returncode != 0:
        raise BundleError(f"{root / SIGNATURE}: not a signature of this manifest.json (the "
                          f"manifest changed after it was signed? {_refusal(proc)})")
    return (f"signed (signer not checked: give --key or set {TRUSTED_KEY_ENV} to check who "
            "signed it)")


def verify(root, key=None) -> tuple:
    """The whole policy; (manifest, sha256 of the manifest.json bytes, what the signature
    established). Cheapest first: the file set (lstat only), the signature, then the hashes."""
    root = Path(root)
    present, dirs = bundle_tree(root)  # first: a FIFO or link is refused before any open
    raw = _manifest_bytes(root)
    manifest = _parse_manifest(raw, root / MANIFEST)
    signed = check_signature(root, raw, key)
    digest = hashlib.sha256(raw).hexdigest()
    _check_files(root, manifest["files"], present, dirs, digest)
    return manifest, digest, signed


def verify_files(root) -> dict:
    """verify without the signature: what `phikit sign` signs (a new signature replaces it)."""
    root = Path(root)
    present, dirs = bundle_tree(root)
    raw = _manifest_bytes(root)
    manifest = _parse_manifest(raw, root / MANIFEST)
    _check_files(root, manifest["files"], present, dirs, None)
    return manifest


def implied_dirs(files) -> set[str]:
    """Every directory the listed files (relative paths) lie in: the only ones a bundle holds."""
    return {rel.rsplit("/", n)[0] for rel in files for n in range(1, rel.count("/") + 1)}


def _check_files(root: Path, expected: dict, present: list, dirs: list, manifest_sha256) -> None:
    """The files present are exactly the ones listed, no directory holds none of them, and each
    has its sha256 (unless run.py's bootstrap hashed them against this very manifest)."""
    for rel in sorted(set(expected) - set(present)):
        raise BundleError(f"{root / rel}: listed in the manifest but missing")
    for rel in sorted(set(present) - set(expected)):
        raise BundleError(f"{root / rel}: not listed in the manifest (unexpected file)")
    # a directory holding no listed file: an empty package or namespace directory can shadow a
    # module as well as a file can
    for rel in sorted(set(dirs) - implied_dirs(expected)):
        raise BundleError(f"{root / rel}: a directory not in the manifest (unexpected "
                          "directory)")
    if (os.path.realpath(root), manifest_sha256) in HASHED_IN_THIS_PROCESS:
        return
    for rel in sorted(expected):
        if sha256_file(root / rel) != expected[rel]:
            raise BundleError(f"{root / rel}: sha256 does not match the manifest (modified "
                              "file)")


def verify_bundle(root, key=None) -> dict:
    """The bundle's manifest, once every file and the signature hold (verify)."""
    return verify(root, key)[0]


def verify_unchanged(root, digest: str, key=None) -> None:
    """The whole policy again, every file hashed, and the manifest still the one whose sha256
    is `digest`: what a process that already runs a bundle checks before it loads its code or
    model again (a worker restarted after a crash)."""
    HASHED_IN_THIS_PROCESS.discard((os.path.realpath(root), digest))
    if verify(root, key)[1] != digest:
        raise BundleError(f"{Path(root) / MANIFEST}: the bundle changed while it ran (a new "
                          "manifest); start the command again to run the new bundle")
