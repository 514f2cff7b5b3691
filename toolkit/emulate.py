"""Parity on the target ISA: the bundle's runtime runs in an arm64 Debian root under qemu user-mode
emulation, the parity engine on the host talks to it through toolkit/runner/rpc.py.

Why: the aarch64 int4 kernels are not the x86 ones, so x86 parity does not prove Pi parity.
The root (Debian bookworm, as Raspberry Pi OS) is made once with debootstrap and cached under
$PHIKIT_CACHE/emulation; venvs are keyed by the lock's sha256. Needs root, debootstrap,
qemu-user-static and binfmt_misc (`make system-deps` installs them). qemu 7.2 (bookworm) crashes
loading onnxruntime 1.32's aarch64 library (SIGSEGV in its static initialisers); qemu 10 from
bookworm-backports runs it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .checkpoint import cache_root
from .errors import PhikitError
from .lock import resolve_lock
from .runner.core import Sampling, read_manifest, verify_bundle
from .schema import Platform

ARCHES = {"aarch64": {"debian": "arm64", "qemu": "qemu-aarch64"}}


def debian_mirror() -> str:
    """$PHIKIT_DEBIAN_MIRROR, else the Debian mirror this machine's apt already uses."""
    if os.environ.get("PHIKIT_DEBIAN_MIRROR"):
        return os.environ["PHIKIT_DEBIAN_MIRROR"]
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    for path in [Path("/etc/apt/sources.list"), *Path("/etc/apt").glob("sources.list.d/*.list")]:
        for line in path.read_text().splitlines() if path.is_file() else []:
            if line.startswith("deb ") and "security" not in line:
                return line.split()[1]
    raise PhikitError("no Debian mirror found in /etc/apt; set PHIKIT_DEBIAN_MIRROR")
RPC = Path(__file__).resolve().parent / "runner" / "rpc.py"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
# Environment inside the root: Debian's paths, nothing from the host.
ROOT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/root",
            "LANG": "C.UTF-8"}


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except OSError as e:
        raise PhikitError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise PhikitError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


def ensure_binfmt(arch: str) -> None:
    entry = Path("/proc/sys/fs/binfmt_misc") / ARCHES[arch]["qemu"]
    if not entry.exists() and Path("/usr/sbin/update-binfmts").exists():
        if not Path("/proc/sys/fs/binfmt_misc/register").exists():
            subprocess.run(["mount", "binfmt_misc", "-t", "binfmt_misc",
                            "/proc/sys/fs/binfmt_misc"], capture_output=True)
        subprocess.run(["update-binfmts", "--enable", ARCHES[arch]["qemu"]], capture_output=True)
    if not entry.exists() or "enabled" not in entry.read_text():
        raise PhikitError(f"{arch} emulation needs qemu-user-static and binfmt_misc "
                          f"(apt-get install qemu-user-static binfmt-support; "
                          f"update-binfmts --enable {ARCHES[arch]['qemu']})")


def ensure_root(arch: str, log: Callable[[str], None]) -> Path:
    root = cache_root() / "emulation" / f"bookworm-{ARCHES[arch]['debian']}"
    if (root / "usr" / "bin" / "python3").exists():
        return root
    if os.geteuid() != 0:
        raise PhikitError("making the emulated root needs root (debootstrap, chroot)")
    if not shutil.which("debootstrap"):
        raise PhikitError("debootstrap is not installed (apt-get install debootstrap)")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"debootstrap {ARCHES[arch]['debian']} bookworm into {root} (once, a few minutes)")
    _run(["debootstrap", f"--arch={ARCHES[arch]['debian']}", "--variant=minbase",
          "--include=python3,python3-venv,python3-pip,ca-certificates", "bookworm", str(tmp),
          debian_mirror()], "debootstrap")
    tmp.rename(root)
    return root


class _Mounts:
    """/proc, /sys and /dev inside the root for the life of the session (onnxruntime reads
    /proc and /sys for the CPU topology)."""

    def __init__(self, root: Path):
        self.points = []
        for src, kind in (("/proc", "proc"), ("/sys", "bind"), ("/dev", "bind")):
            point = root / src.lstrip("/")
            point.mkdir(exist_ok=True)
            if os.path.ismount(point):
                continue
            cmd = (["mount", "-t", "proc", "proc", str(point)] if kind == "proc"
                   else ["mount", "--bind", src, str(point)])
            _run(cmd, f"mounting {src} in the emulated root")
            self.points.append(point)

    def close(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        self.points = []


class EmulatedSession:
    """A runner Session whose every call runs in the emulated root."""

    def __init__(self, bundle: Path, arch: str, log: Callable[[str], None] = lambda s: None):
        if arch not in ARCHES:
            raise PhikitError(f"cannot emulate {arch!r} (known: {', '.join(ARCHES)})",
                              field="--emulate")
        manifest = verify_bundle(bundle, read_manifest(bundle))
        platform = Platform.model_validate(manifest["target"]["platform"])
        if platform.arch not in (arch, "arm64"):
            raise PhikitError(f"{bundle}: built for {platform.arch}, not {arch}; its lock "
                              "cannot install in the emulated root")
        compiled = sorted(set(manifest["target"]["runtime"].get("source_builds", []))
                          & set(manifest["runtime"]["packages"]))
        if compiled:
            raise PhikitError(f"{bundle}: its runtime ({', '.join(compiled)}) is compiled on the "
                              "device; compiling it under qemu user mode is not supported "
                              "(validate it on this machine's ISA instead)", field="--emulate")
        ensure_binfmt(arch)
        start = time.perf_counter()
        self.root = ensure_root(arch, log)
        lock_text = (bundle / "requirements.lock").read_text()
        lock_sha = hashlib.sha256(lock_text.encode()).hexdigest()[:16]
        work = self.root / "opt" / "phikit"
        venv = work / f"venv-{lock_sha}"
        if not (venv / "bin" / "python").exists():
            wheels = work / f"wheels-{lock_sha}"
            if (bundle / "wheels").is_dir():
                shutil.copytree(bundle / "wheels", wheels, dirs_exist_ok=True)
            else:
                resolve_lock(manifest["runtime"]["packages"], platform, wheels)
            (work / f"lock-{lock_sha}.txt").write_text(lock_text)
            log("installing the bundle's aarch64 wheels in the emulated root")
            inside = f"/opt/phikit/{venv.name}"
            self._chroot(["/usr/bin/python3", "-m", "venv", inside], "venv in the emulated root")
            self._chroot([f"{inside}/bin/python", "-m", "pip", "install", "-q", "--no-index",
                          "--find-links", f"/opt/phikit/{wheels.name}", "--no-deps",
                          "--require-hashes", "-r", f"/opt/phikit/lock-{lock_sha}.txt"],
                         "pip install (emulated)")
        digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode())
        copy = work / "bundles" / f"{manifest['name']}-{digest.hexdigest()[:12]}"
        if not copy.exists():
            shutil.copytree(bundle, copy.with_name(copy.name + ".tmp"), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".venv"))
            copy.with_name(copy.name + ".tmp").rename(copy)
        shutil.copy2(RPC, work / "rpc.py")
        self.setup_seconds = time.perf_counter() - start
        self.mounts = _Mounts(self.root)
        self.proc = subprocess.Popen(
            [CHROOT, str(self.root), f"/opt/phikit/{venv.name}/bin/python", "/opt/phikit/rpc.py",
             f"/opt/phikit/bundles/{copy.name}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=ROOT_ENV)
        attrs = self._call("attrs")
        self.eos_token_ids = tuple(attrs["eos_token_ids"])
        self.context_length = int(attrs["context_length"])
        self.remote_info = self._call("info")

    def _chroot(self, cmd: list[str], what: str) -> None:
        mounts = _Mounts(self.root)
        try:
            _run([CHROOT, str(self.root), *cmd], what, env=ROOT_ENV)
        finally:
            mounts.close()

    def _call(self, op: str, *args) -> Any:
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            raise PhikitError(f"the emulated runtime stopped:\n{err}")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["ok"]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call("tokenize", text, add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("detokenize", list(map(int, ids)))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._call("render_chat", messages)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        r = self._call("logits", list(map(int, ids)))
        return np.frombuffer(base64.b64decode(r["b64"]), dtype=np.float32).reshape(r["shape"])

    def generate(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        yield from self._call("generate", list(map(int, ids)), {
            "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed,
            "stop_token_ids": list(sampling.stop_token_ids)})

    def info(self) -> dict[str, Any]:
        return {**self.remote_info, "emulated_arch": "aarch64", "emulator": "qemu-user",
                "root": "Debian bookworm arm64"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.mounts.close()

