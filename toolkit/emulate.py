"""Parity on another CPU: `run.py validate` (the bundle's runner, runtime and parity engine, as on
a device) under qemu user-mode emulation, against the reference the bundle carries.

  aarch64    in an arm64 Debian root: the aarch64 int4 kernels are not the x86 ones, so x86
             parity does not prove Pi parity.
  x86-64-v3  this machine's venv under `qemu-x86_64 -cpu Haswell`: an AVX2-only CPU (a typical
             laptop or older desktop), so ONNX Runtime, OpenVINO and llama.cpp dispatch to their
             AVX2 kernels instead of this host's AVX-512 / AMX ones. Much slower: qemu
             translates every instruction.

The root (Debian bookworm, as Raspberry Pi OS) is made once with debootstrap and cached under
$PHIKIT_CACHE/emulation; venvs are keyed by the lock's sha256. Needs root, debootstrap,
qemu-user-static and binfmt_misc (`make system-deps` installs them). qemu 7.2 (bookworm) crashes
loading onnxruntime 1.32's aarch64 library (SIGSEGV in its static initialisers); qemu 10 from
bookworm-backports runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from .checkpoint import cache_lock, cache_root
from .errors import PhikitError
from .lock import resolve_lock
from .manifest import BundleManifest
from .runner.core import BundleError, lock_install_args, runtime_module
from .schema import Platform

# aarch64: another ISA (a Debian root, the bundle's own aarch64 wheels); x86-64-v3: another CPU
# class of this ISA (this machine's venv, a CPU model without AVX-512 / AMX / AVX512-FP16).
ARCHES = {"aarch64": {"debian": "arm64", "qemu": "qemu-aarch64"},
          "x86-64-v3": {"qemu": "qemu-x86_64", "cpu": "Haswell-noTSX",
                        "description": "AVX2-only x86-64 (qemu's Haswell model, no AVX-512)",
                        # instruction sets a runtime compiled for this host may need and the
                        # emulated CPU lacks (a feature name starting with one of these)
                        "lacks": ("avx512", "avx_vnni", "amx")}}


def compiled_here(manifest: BundleManifest) -> list[str]:
    """The bundle's runtime packages that are compiled from source where they are installed
    (the target's source_builds), not wheels that pick their kernels at load."""
    return sorted(set(manifest.target["runtime"].get("source_builds", []))
                  & set(manifest.runtime.packages))


def beyond(manifest: BundleManifest, arch: str) -> tuple[list[str], str]:
    """(the instruction sets this machine's build of the bundle's runtime was compiled to use
    and the emulated `arch` lacks, how to build it for that CPU class); nothing for a runtime
    of wheels, or one not installed here (the emulated run itself then says so)."""
    lacks = ARCHES[arch].get("lacks")
    if not lacks or not compiled_here(manifest):
        return [], ""
    try:
        module = runtime_module(manifest.runtime.module)
    except BundleError:
        return [], ""
    probe = getattr(module, "compiled_cpu_features", None)
    features, rebuild = probe() if probe else ([], "")
    return [f for f in features if f.startswith(lacks)], rebuild


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
    """qemu-aarch64 registered with binfmt_misc: through update-binfmts where its database knows
    it, else from systemd-binfmt's binfmt.d line (qemu-user-static 10 registers only there)."""
    qemu = ARCHES[arch]["qemu"]
    root = Path("/proc/sys/fs/binfmt_misc")
    entry = root / qemu
    if not entry.exists():
        if not (root / "register").exists():
            subprocess.run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(root)],
                           capture_output=True)
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", qemu], capture_output=True)
        conf = Path("/usr/lib/binfmt.d") / f"{qemu}.conf"
        if not entry.exists() and conf.is_file():
            line = next((ln for ln in conf.read_text().splitlines()
                         if ln.strip() and not ln.startswith("#")), "")
            try:
                (root / "register").write_text(line)
            except OSError:
                pass
    if not entry.exists() or "enabled" not in entry.read_text():
        raise PhikitError(f"{arch} emulation needs qemu-user-static registered with binfmt_misc "
                          "(as root: apt-get install qemu-user-static; sh scripts/binfmt-aarch64)")


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


class EmulatedValidation:
    """`run.py validate` of a bundle on an emulated CPU: the bundle's own runner, runtime and
    parity engine (the ones a device runs) under qemu, against the reference the bundle
    carries. Set up once (root, venv, a copy of the bundle); `run` validates."""

    def __init__(self, bundle: Path, manifest: BundleManifest, arch: str,
                 log: Callable[[str], None] = lambda s: None):
        """`manifest`: the bundle's, verified by the caller (its files hashed once)."""
        if arch not in ARCHES:
            raise PhikitError(f"cannot emulate {arch!r} (known: {', '.join(ARCHES)})",
                              field="--emulate")
        self.bundle, self.arch, self.log = bundle, arch, log
        self.manifest = manifest
        self.platform = Platform.model_validate(self.manifest.target["platform"])
        start = time.perf_counter()
        self.info = (self._x86_setup() if arch == "x86-64-v3" else self._aarch64_setup())
        self.info.update({"emulated_arch": arch, "emulator": "qemu-user",
                          "setup_seconds": round(time.perf_counter() - start, 1)})

    def _x86_setup(self) -> dict:
        spec = ARCHES["x86-64-v3"]
        if self.platform.arch != "x86_64":
            raise PhikitError(f"{self.bundle}: built for {self.platform.arch}; x86-64-v3 "
                              "emulation runs x86_64 bundles", field="--emulate")
        qemu = shutil.which(spec["qemu"])
        if qemu is None:
            raise PhikitError(f"{spec['qemu']} is not installed (apt-get install qemu-user)",
                              field="--emulate")
        self._check_portable(spec)
        # this machine's interpreter and packages on a CPU model without AVX-512 / AMX
        self.prefix, self.python, self.inside = [qemu, "-cpu", spec["cpu"]], sys.executable, None
        self.run_py, self.env = str(self.bundle / "run.py"), None
        return {"emulated_cpu": f"{spec['cpu']}: {spec['description']}"}

    def _check_portable(self, spec: dict) -> None:
        """Refuse, before minutes of emulation, a runtime that this machine compiled for its
        own CPU with instructions the emulated CPU lacks: it would die of SIGILL."""
        features, rebuild = beyond(self.manifest, self.arch)
        if features:
            raise PhikitError(
                f"{self.bundle}: this machine's {self.manifest.runtime.module} runtime "
                f"was compiled for this CPU ({', '.join(features)}), which the emulated "
                f"{spec['cpu']} lacks: it would stop on an illegal instruction. To emulate "
                f"x86-64-v3, build it for that CPU class: {rebuild}", field="--emulate")

    def _aarch64_setup(self) -> dict:
        arch, bundle, manifest = self.arch, self.bundle, self.manifest
        if self.platform.arch not in (arch, "arm64"):
            raise PhikitError(f"{bundle}: built for {self.platform.arch}, not {arch}; its lock "
                              "cannot install in the emulated root")
        compiled = compiled_here(manifest)
        if compiled:
            raise PhikitError(f"{bundle}: its runtime ({', '.join(compiled)}) is compiled on "
                              "the device; compiling it under qemu user mode is not supported "
                              "(validate it on this machine's ISA instead)", field="--emulate")
        ensure_binfmt(arch)
        with cache_lock(f"emulation-{arch}"):  # one root, venv and bundle copy per cache
            root, venv, copy = self._aarch64_prepare(arch, bundle, manifest)
        self.prefix, self.python, self.inside = [CHROOT, str(root)], \
            f"/opt/phikit/{venv.name}/bin/python", root
        self.run_py, self.env = f"/opt/phikit/bundles/{copy.name}/run.py", ROOT_ENV
        return {"root": "Debian bookworm arm64"}

    def _aarch64_prepare(self, arch: str, bundle: Path,
                         manifest: BundleManifest) -> tuple[Path, Path, Path]:
        """The emulated root, the venv of the bundle's lock in it and the bundle's copy, each
        made once per cache."""
        root = ensure_root(arch, self.log)
        lock_text = (bundle / "requirements.lock").read_text()
        lock_sha = hashlib.sha256(lock_text.encode()).hexdigest()[:16]
        work = root / "opt" / "phikit"
        venv = work / f"venv-{lock_sha}"
        if not (venv / "bin" / "python").exists():
            wheels = work / f"wheels-{lock_sha}"
            if (bundle / "wheels").is_dir():
                shutil.copytree(bundle / "wheels", wheels, dirs_exist_ok=True)
            else:
                resolve_lock(manifest.runtime.packages, self.platform, wheels)
            (work / f"lock-{lock_sha}.txt").write_text(lock_text)
            self.log("installing the bundle's aarch64 wheels in the emulated root")
            inside = f"/opt/phikit/{venv.name}"
            _chroot(root, ["/usr/bin/python3", "-m", "venv", inside], "venv in the emulated root")
            # --no-compile: byte-compiling every installed module under qemu costs minutes;
            # the modules a validation imports compile when first imported
            _chroot(root, [f"{inside}/bin/python", "-m", "pip", *lock_install_args(
                        f"/opt/phikit/lock-{lock_sha}.txt", f"/opt/phikit/{wheels.name}"),
                           "--no-compile"], "pip install (emulated)")
        digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode())
        copy = work / "bundles" / f"{manifest.name}-{digest.hexdigest()[:12]}"
        if not copy.exists():
            shutil.copytree(bundle, copy.with_name(copy.name + ".tmp"), dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", ".venv"))
            copy.with_name(copy.name + ".tmp").rename(copy)
        return root, venv, copy

    def run(self, thresholds: dict, limit: int | None) -> dict:
        """The report `run.py validate` wrote on the emulated CPU, with these bounds (the
        caller's recipe) on the first `limit` eval rows. PhikitError when it wrote none."""
        scratch = (self.inside / "opt" / "phikit") if self.inside else Path(tempfile.mkdtemp())
        name = f"validate-{os.getpid()}-{time.monotonic_ns()}"
        (scratch / f"{name}.thresholds.json").write_text(json.dumps(thresholds))
        seen = "/opt/phikit" if self.inside else str(scratch)  # the paths as the child sees them
        cmd = [*self.prefix, self.python, "-I", self.run_py, "validate",
               "--json", f"{seen}/{name}.json", "--thresholds", f"{seen}/{name}.thresholds.json",
               *(["--limit", str(limit)] if limit else [])]
        # the root's /proc, /sys and /dev mounts are shared: one process in the root at a time
        with cache_lock(f"emulation-{self.arch}") if self.inside else nullcontext():
            mounts = _Mounts(self.inside) if self.inside else None
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                                      timeout=7200)
            finally:
                if mounts is not None:
                    mounts.close()
        out = scratch / f"{name}.json"
        try:
            if proc.returncode == -4:  # SIGILL
                raise PhikitError(f"run.py validate on the emulated {self.arch} CPU stopped on "
                                  "an illegal instruction: a package of this machine was "
                                  "compiled for a newer CPU than the emulated one")
            if proc.returncode not in (0, 1) or not out.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()
                raise PhikitError(f"run.py validate on the emulated {self.arch} CPU wrote no "
                                  f"report (exit {proc.returncode}): "
                                  f"{tail[-1] if tail else ''}")
            data = json.loads(out.read_text())
        finally:
            for leftover in scratch.glob(f"{name}*"):
                leftover.unlink(missing_ok=True)
            if not self.inside:
                shutil.rmtree(scratch, ignore_errors=True)
        data.setdefault("candidate", {}).update(self.info)
        return data


def _chroot(root: Path, cmd: list[str], what: str) -> None:
    mounts = _Mounts(root)
    try:
        _run([CHROOT, str(root), *cmd], what, env=ROOT_ENV)
    finally:
        mounts.close()
