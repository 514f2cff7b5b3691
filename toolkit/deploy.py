"""`phikit deploy BUNDLE user@host[:dir]`: copy over SSH what changed, verify, install, smoke-run.

Uses the system's OpenSSH client (ssh + tar streams), so ~/.ssh/config, agents and jump hosts work
as users expect. Steps:
  1. probe the host: architecture, Python version, free disk (refuse before copying anything)
  2. sha256 of the files already there; copy only the ones that differ
  3. `run.py verify` on the host (every hash, with the host's own Python)
  4. a venv from requirements.lock (offline from the bundle's wheels/ when it carries them),
     recreated only when the lock changed
  5. a smoke prompt, then `run.py validate`: parity re-measured on the host with its own
     CPU and runtime build, the report copied back beside the bundle (exit 1 when it fails)
  6. with --tune, `run.py tune` there (tuned.json: the fastest options that validate there)
  7. with --service, a systemd unit for `run.py serve` (only for a bundle that validated there)
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import PhikitError
from .runner.core import (MANIFEST, SIGNATURE, BundleError, Manifest, check_bundle,
                          lock_install_args)
from .runner.trust import implied_dirs

ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64"}
VENV = ".venv"  # inside the bundle dir on the host; bundle verification ignores it


@dataclass
class Remote:
    user_host: str
    directory: str
    port: int | None = None
    identity: Path | None = None
    options: list[str] = field(default_factory=list)

    def ssh_args(self) -> list[str]:
        args = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *self.options]
        if self.port:
            args += ["-p", str(self.port)]
        if self.identity:
            args += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return args + ["--", self.user_host]  # "--": a destination is never an ssh option

    def run(self, script: str, *, stdin: Any = None, check: bool = True,
            timeout: int = 1800, step: str = "remote command") -> subprocess.CompletedProcess:
        """stdin: bytes, or a readable file (streamed: a bundle is never held in memory).
        With check, a non-zero exit is a PhikitError naming `step`."""
        streamed = stdin is not None and not isinstance(stdin, bytes)
        proc = subprocess.run(self.ssh_args() + [f"sh -c {shlex.quote(script)}"],
                              input=None if streamed else stdin,
                              stdin=stdin if streamed else None,
                              capture_output=True, timeout=timeout)
        if proc.returncode == 255:
            raise PhikitError(_ssh_error(self.user_host, proc.stderr.decode(errors="replace")))
        if check and proc.returncode != 0:
            err = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise PhikitError(f"{self.user_host}: {step} failed (exit {proc.returncode}): "
                              f"{err[-1] if err else ''}")
        return proc


def _ssh_error(host: str, stderr: str) -> str:
    text = stderr.strip().splitlines()[-1] if stderr.strip() else "ssh failed"
    if "Permission denied" in stderr:
        return f"{host}: authentication refused ({text})"
    if any(s in stderr for s in ("Connection refused", "Could not resolve", "timed out",
                                 "No route to host", "Network is unreachable")):
        return f"{host}: host unreachable ({text})"
    return f"{host}: ssh failed ({text})"


# Each matched whole (fullmatch: `$` would let a final newline into a remote shell or a unit).
# [user@]host: a host name, an address or a Host alias of ~/.ssh/config; never an option
DESTINATION = re.compile(r"(?:[A-Za-z0-9._][A-Za-z0-9._-]*@)?[A-Za-z0-9_][A-Za-z0-9._-]*")
# what a systemd unit line and a remote shell take without quoting surprises
PLAIN_PATH = re.compile(r"[A-Za-z0-9_./+-]+")
BIND_ADDRESS = re.compile(r"[A-Za-z0-9.:_-]+")


def parse_destination(dest: str, bundle_name: str) -> tuple[str, str]:
    user_host, _, directory = dest.partition(":")
    if not DESTINATION.fullmatch(user_host):
        raise PhikitError(f"destination must be [user@]host[:dir] (host: a name, an address or "
                          f"an alias from ~/.ssh/config), got {dest!r}", field="destination")
    return user_host, directory or f"phikit/{bundle_name}"


PROBE = r"""
PY={python}
command -v "$PY" >/dev/null 2>&1 || {{ echo "nopython"; exit 0; }}
set -e
mkdir -p {dir}
echo "arch $(uname -m)"
echo "python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
echo "free_kb $(df -Pk {dir} | awk 'NR==2 {{print $4}}')"
cd {dir} && "$PY" - <<'EOF'
import hashlib, json, os, stat
# everything but the venv, byte code and leftovers included (what is not the bundle's is
# removed); a link, FIFO or device is listed unread ("-": it is replaced, never opened)
out, dirs = {{}}, []
for root, subdirs, files in os.walk("."):
    if root == ".":
        subdirs[:] = [d for d in subdirs if d != "{venv}"]
    for d in list(subdirs):
        p = os.path.join(root, d)[2:]
        if os.path.islink(p):
            subdirs.remove(d)
            out[p] = "-"
        else:
            dirs.append(p)
    for f in files:
        p = os.path.join(root, f)[2:]
        if not stat.S_ISREG(os.lstat(p).st_mode):
            out[p] = "-"
            continue
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[p] = h.hexdigest()
print("hashes " + json.dumps(out))
print("dirs " + json.dumps(dirs))
EOF
"""


def probe(remote: Remote, python: str) -> dict:
    proc = remote.run(PROBE.format(python=shlex.quote(python), dir=shlex.quote(remote.directory),
                                   venv=VENV), step="probing the host")
    info: dict = {}
    for line in proc.stdout.decode().splitlines():
        if line == "nopython":
            raise PhikitError(f"{remote.user_host}: no {python} on the host (use --python)")
        key, _, value = line.partition(" ")
        info[key] = json.loads(value) if key in ("hashes", "dirs") else value
    if "hashes" not in info or not info.get("free_kb", "").isdigit():
        raise PhikitError(f"{remote.user_host}: the probe of {remote.directory} did not finish "
                          f"({proc.stderr.decode(errors='replace').strip()[-200:]})")
    return info


def check_host(info: dict, manifest: Manifest, bundle_bytes: int, remote: Remote) -> None:
    platform = manifest.target["platform"]
    want = ARCH_ALIASES.get(platform["arch"], platform["arch"])
    have = ARCH_ALIASES.get(info.get("arch", "?"), info.get("arch", "?"))
    if want != have:
        raise PhikitError(f"{remote.user_host}: the bundle is built for {want} "
                          f"({manifest.target['name']}) but the host is {have}; "
                          "nothing was copied")
    need = tuple(int(x) for x in platform["python"].split("."))
    got = tuple(int(x) for x in info.get("python", "0.0").split("."))
    if got < need:
        raise PhikitError(f"{remote.user_host}: Python {info.get('python')} is too old; the "
                          f"bundle's lock is for Python {platform['python']}")
    if got != need:
        raise PhikitError(f"{remote.user_host}: Python {info.get('python')} on the host, but the "
                          f"bundle's lock pins wheels for Python {platform['python']}")
    free = int(info.get("free_kb", 0)) * 1024
    if free < bundle_bytes * 2:  # the files plus a venv of the runtime wheels
        raise PhikitError(f"{remote.user_host}: disk full: {free / 1e6:.0f} MB free in "
                          f"{remote.directory}, need about {bundle_bytes * 2 / 1e6:.0f} MB")


def wanted_files(bundle: Path, manifest: Manifest) -> dict[str, str]:
    """What the host's directory must hold (besides the venv): every listed file by its sha256,
    the manifest and, when the bundle has one, its signature ("-": always sent, it is what the
    host verifies against)."""
    wanted = dict(manifest.files)
    wanted[MANIFEST] = "-"
    if (bundle / SIGNATURE).is_file():
        wanted[SIGNATURE] = "-"
    return wanted


def changed_files(bundle: Path, manifest: Manifest, remote_hashes: dict[str, str]) -> list[str]:
    wanted = wanted_files(bundle, manifest)
    return sorted(rel for rel, digest in wanted.items() if remote_hashes.get(rel) != digest)


def copy_files(bundle: Path, files: list[str], remote: Remote) -> None:
    """One tar stream from the local tar straight into ssh: no copy of the bundle in memory."""
    with subprocess.Popen(["tar", "-cf", "-", "-C", str(bundle), "--", *files],
                          stdout=subprocess.PIPE) as tar:
        remote.run(f"mkdir -p {shlex.quote(remote.directory)} && tar -xf - -C "
                   f"{shlex.quote(remote.directory)}", stdin=tar.stdout)
        tar.stdout.close()
        if tar.wait() != 0:
            raise PhikitError(f"{bundle}: tar could not read the bundle (exit {tar.returncode})")


def remove_stale(bundle: Path, manifest: Manifest, info: dict, remote: Remote) -> list[str]:
    """Remove from the host what this bundle does not hold: files of an older bundle, byte code
    and caches a run left (`run.py verify` there refuses every unlisted file or directory, so
    one left behind would fail every later deploy), an old signature, the tuned.json measured
    for the bundle before (--tune measures this one). Directories go whole, topmost first."""
    wanted = set(wanted_files(bundle, manifest))
    needed = implied_dirs(wanted)
    stale_dirs = sorted(d for d in info.get("dirs", []) if d not in needed)
    topmost = [d for d in stale_dirs if not any(d.startswith(o + "/") for o in stale_dirs)]
    stale = topmost + sorted(rel for rel in set(info["hashes"]) - wanted
                             if not any(rel.startswith(d + "/") for d in topmost))
    if stale:
        remote.run(f"cd {shlex.quote(remote.directory)} && rm -rf -- "
                   + " ".join(shlex.quote(s) for s in stale), step="removing stale files")
    return stale


# Every step's exit code counts (set -e): the lock's stamp, which makes the next deploy keep the
# venv, is written only after pip succeeded, and a venv whose install failed is removed, so the
# next deploy builds it again.
INSTALL = r"""
set -e
cd {dir}
LOCK_SHA=$(sha256sum requirements.lock | cut -d' ' -f1)
[ -n "$LOCK_SHA" ]
if [ ! -x {venv}/bin/python ] || [ "$(cat {venv}/.lock-sha256 2>/dev/null)" != "$LOCK_SHA" ]; then
  rm -rf {venv}
  trap 'rm -rf {venv}' EXIT
  {python} -m venv {venv}
  if [ -d wheels ]; then
    {venv}/bin/python -m pip {install_offline}
  else
    {venv}/bin/python -m pip {install}
  fi
  echo "$LOCK_SHA" > {venv}/.lock-sha256
  trap - EXIT
  echo installed
else
  echo unchanged
fi
"""

UNIT = """[Unit]
Description=phikit {name} (OpenAI-compatible server)
After=network-online.target

[Service]
WorkingDirectory={dir}
ExecStart={dir}/{venv}/bin/python {dir}/run.py serve --host {host} --port {port}
Restart=on-failure

[Install]
WantedBy=default.target
"""


# The report goes to a temporary file on the host (never into the bundle: verify would refuse
# the extra file) and comes back on stdout; the runner's own lines go to stderr.
VALIDATE = ('out=$(mktemp) && {py} {dir}/run.py --bundle {dir} validate --json "$out" >&2; '
            'rc=$?; cat "$out"; rm -f "$out"; exit $rc')


def device_report_path(bundle: Path, user_host: str) -> Path:
    host = re.sub(r"[^A-Za-z0-9._-]", "_", user_host.split("@")[-1])
    return bundle.parent / f"{bundle.name}.{host}.parity.json"


def validate_on_host(remote: Remote, bundle: Path, d: str, report: Path | None,
                     log: Callable[[str], None]) -> dict:
    """`run.py validate` on the host; its report saved locally. PhikitError when it fails."""
    proc = remote.run(VALIDATE.format(py=f"{d}/{VENV}/bin/python", dir=d), check=False)
    try:
        data = json.loads(proc.stdout.decode(errors="replace"))
    except ValueError:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise PhikitError(f"{remote.user_host}: run.py validate wrote no report (exit "
                          f"{proc.returncode}): {err[-1] if err else ''}") from None
    path = report or device_report_path(bundle, remote.user_host)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    host = data.get("host") or {}
    failed = [c["metric"] for c in data.get("checks", []) if not c.get("passed")]
    log(f"parity on {remote.user_host} ({host.get('cpu')}, {host.get('os')}): "
        f"{str(data.get('verdict')).upper()}" + (f", failed {', '.join(failed)}" if failed else "")
        + f"; report: {path} (phikit compare {bundle} {path})")
    if data.get("verdict") != "pass":
        raise PhikitError(f"the bundle failed validation on {remote.user_host} "
                          f"({', '.join(failed)}): see {path}")
    return data


def deploy(bundle: Path, dest: str, *, port: int = 8000, identity: Path | None = None,
           ssh_port: int | None = None, python: str = "python3", service: bool = False,
           host_bind: str = "127.0.0.1", ssh_options: list[str] | None = None,
           key: Path | None = None, validate: bool = True, report: Path | None = None,
           tune: bool = False, log: Callable[[str], None] = print) -> dict:
    # never ship a modified bundle, one whose manifest fields (its name reaches a remote shell
    # and a unit file) are not what the runner accepts, nor, with a key, one it did not sign;
    # what deploy reads of the manifest is the runner's checked Manifest, so it acts on no
    # field a device's runner would refuse
    try:
        manifest, signed = check_bundle(bundle, key)
    except BundleError as e:
        raise PhikitError(f"refusing to deploy: {e}") from None
    log(f"manifest {signed}")
    if manifest.verdict != "pass":
        raise PhikitError(f"{bundle}: parity verdict is not 'pass'; refusing to deploy")
    if not BIND_ADDRESS.fullmatch(host_bind):
        raise PhikitError(f"--host must be an address or a host name, got {host_bind!r}",
                          field="--host")
    user_host, directory = parse_destination(dest, manifest.name)
    remote = Remote(user_host, directory, ssh_port, identity, ssh_options or [])
    size = sum((bundle / rel).stat().st_size for rel in manifest.files)
    info = probe(remote, python)
    check_host(info, manifest, size, remote)
    # The probe's `mkdir -p` made an absolute path of the directory possible to resolve.
    remote.directory = remote.run(f"cd {shlex.quote(directory)} && pwd").stdout.decode().strip()
    to_copy = changed_files(bundle, manifest, info["hashes"])
    total = len(manifest.files) + 1 + int((bundle / SIGNATURE).is_file())  # + manifest, sig
    log(f"copying {len(to_copy)} of {total} files to "
        f"{user_host}:{remote.directory}")
    copy_files(bundle, to_copy, remote)
    stale = remove_stale(bundle, manifest, info, remote)
    d, py = shlex.quote(remote.directory), shlex.quote(python)
    remote.run(f"{py} {d}/run.py verify --bundle {d}", step="run.py verify")
    log("verified every sha256 on the host")
    venv_state = remote.run(INSTALL.format(
        dir=d, venv=VENV, python=py, install=shlex.join(lock_install_args()),
        install_offline=shlex.join(lock_install_args(wheels="wheels"))),
        step="the runtime venv (pip install of requirements.lock)").stdout.decode().strip()
    log(f"runtime venv: {venv_state.splitlines()[-1]}")
    smoke = remote.run(f"{d}/{VENV}/bin/python {d}/run.py --bundle {d} --prompt "
                       f"'What does json.dumps do?' --max-tokens 8", step="the smoke prompt")
    log(f"smoke prompt: {smoke.stdout.decode(errors='replace').strip()[:80]!r}")
    device = validate_on_host(remote, bundle, d, report, log) if validate else None
    if tune:
        tuned = remote.run(f"{d}/{VENV}/bin/python {d}/run.py --bundle {d} tune", check=False)
        lines = tuned.stderr.decode(errors="replace").strip().splitlines()
        if tuned.returncode != 0:
            raise PhikitError(f"{user_host}: run.py tune failed (exit {tuned.returncode}): "
                              f"{lines[-1] if lines else ''}")
        log(f"tuned on the host: {lines[-1] if lines else ''}")
    if service:
        if not PLAIN_PATH.fullmatch(remote.directory):
            raise PhikitError(f"{user_host}:{remote.directory}: --service needs a directory "
                              "path of letters, digits and . _ / + - (it goes into a unit file)")
        unit_name = shlex.quote(f"phikit-{manifest.name}.service")
        unit = UNIT.format(name=manifest.name, dir=remote.directory, venv=VENV,
                           host=host_bind, port=port)
        remote.run(
            "command -v systemctl >/dev/null || { echo 'systemd is not available on the host' "
            ">&2; exit 3; }; mkdir -p ~/.config/systemd/user && cat > "
            f"~/.config/systemd/user/{unit_name} && systemctl --user daemon-reload && "
            f"systemctl --user enable --now {unit_name}", stdin=unit.encode())
        log(f"service {unit_name} started on port {port}")
    return {"copied": to_copy, "removed": stale, "directory": remote.directory,
            "venv": venv_state.splitlines()[-1], "device_parity": device}
