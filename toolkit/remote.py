"""The candidate runtime in a child process, as phikit's validation uses it.

One seam for three jobs: isolation (a runtime that segfaults, aborts or is OOM-killed takes only
its child down and becomes a one-line error, exit 2), other CPU classes (the child runs under
`qemu-x86_64 -cpu Haswell`) and other ISAs (the child runs in an emulated aarch64 root). The
protocol and its client are the runner's own (runner/rpc.py, runner/worker.py): bundles ship them
for `run.py serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import PhikitError
from .paths import REPO
from .runner.core import MANIFEST, Manifest
from .runner.worker import RPC, WorkerSession, rpc_command

__all__ = ["RPC", "RemoteSession", "RuntimeCrashed", "local_session", "rpc_command"]



class RuntimeCrashed(PhikitError):
    """The candidate runtime's process died (signal or exit) while phikit was using it. Exit 2."""


class RemoteSession(WorkerSession):
    """A WorkerSession whose failures are phikit's one-line errors (exit 2)."""

    def __init__(self, cmd: list[str], *, runtime: str, label: str | None = None, **kw):
        self.runtime = runtime
        super().__init__(cmd, label=label or runtime, **kw)
        self.stage = "validation"

    def _open_error(self, message: str) -> Exception:
        return PhikitError(f"{self.label}: {message}")

    def _crash_error(self, message: str) -> Exception:
        return RuntimeCrashed(message)


def local_session(module: str, model_dir: Path, options: dict[str, Any] | None = None,
                  runner: Path | None = None, prefix: Sequence[str] = (),
                  label: str | None = None,
                  extra_info: dict[str, Any] | None = None) -> RemoteSession:
    """A runtime module run in a child on this machine; `runner` holds phikit_runner/ (a staged
    bundle: what is validated is what ships), else phikit's own toolkit/runner is used."""
    cmd = rpc_command(runner=runner or REPO,
                      package="phikit_runner" if runner else "toolkit.runner",
                      module=module, model_dir=model_dir, options=options)
    return RemoteSession([*prefix, *cmd], runtime=module, label=label, extra_info=extra_info)


def bundle_session(bundle: Path, manifest: dict[str, Any],
                   overrides: dict[str, Any] | None = None, **kw) -> RemoteSession:
    """A bundle its caller has already verified (so the child does not hash it again), run by
    the bundle's own runner with its manifest's runtime module and options."""
    typed = Manifest.parse(manifest, bundle / MANIFEST)
    return local_session(typed.runtime_module, bundle / typed.model_dir,
                         {**typed.runtime_options, **(overrides or {})}, runner=bundle, **kw)
