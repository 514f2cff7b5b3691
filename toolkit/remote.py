"""The candidate runtime in a child process: a Session whose calls go through runner/rpc.py.

One seam for three jobs: isolation (a runtime that segfaults, aborts or is OOM-killed takes only
its child down and becomes a one-line error), other CPU classes (the child runs under
`qemu-x86_64 -cpu Haswell`) and other ISAs (the child runs in an emulated aarch64 root).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import PhikitError
from .runner.core import Sampling

RUNNER_DIR = Path(__file__).resolve().parent / "runner"
RPC = RUNNER_DIR / "rpc.py"
REPO = RUNNER_DIR.parent.parent


class RuntimeCrashed(PhikitError):
    """The candidate runtime's process died (signal or exit) while phikit was using it. Exit 2."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return {"SIGKILL": "SIGKILL (killed: out of memory?)"}.get(name, name)
    return f"exit status {code}"


def rpc_command(*, bundle: Path | None = None, runner: Path | None = None,
                package: str = "phikit_runner", module: str | None = None,
                model_dir: Path | None = None, options: dict[str, Any] | None = None,
                python: str = sys.executable, rpc: Path | str = RPC) -> list[str]:
    """The child's command line for a bundle, or for a runtime module + model dir (a bundle being
    staged, whose runner is `runner`/phikit_runner; a bare artifact, run by toolkit.runner)."""
    cmd = [python, "-I", "-B", str(rpc)]  # -I: no user site, PYTHON* variables or cwd on
    # sys.path; -B: no byte code written into the bundle
    if bundle is not None:
        return cmd + ["--bundle", str(bundle)]
    return cmd + ["--runner", str(runner or REPO), "--package", package, "--module", str(module),
                  "--model-dir", str(model_dir), "--options", json.dumps(options or {})]


def local_session(module: str, model_dir: Path, options: dict[str, Any] | None = None,
                  runner: Path | None = None, prefix: Sequence[str] = (),
                  label: str | None = None) -> "RemoteSession":
    """A runtime module run in a child on this machine; `runner` holds phikit_runner/ (a staged
    bundle: what is validated is what ships), else toolkit/runner is used."""
    cmd = rpc_command(runner=runner, package="phikit_runner" if runner else "toolkit.runner",
                      module=module, model_dir=model_dir, options=options)
    return RemoteSession([*prefix, *cmd], runtime=module, label=label)


class RemoteSession:
    """A runner Session whose every call runs in a child process (see runner/rpc.py)."""

    def __init__(self, cmd: list[str], *, runtime: str, label: str | None = None,
                 env: dict[str, str] | None = None, extra_info: dict[str, Any] | None = None,
                 cleanup=None):
        self.runtime, self.label = runtime, label or runtime
        self.extra_info = extra_info or {}
        self.cleanup = cleanup
        self.stage = "opening the model"
        self.doing = "starting"
        self.stderr = tempfile.TemporaryFile()  # a pipe nobody reads would fill and block it
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self.stderr, env=env)
        except OSError as e:
            raise PhikitError(f"cannot start the {self.label} runtime: {cmd[0]}: {e.strerror}") \
                from None
        self._info: dict[str, Any] | None = None
        hello = self._reply()
        if "error" in hello:
            self.close()
            raise PhikitError(f"{self.label}: {hello['error']}")
        attrs = hello["ok"]
        self.eos_token_ids = tuple(attrs["eos_token_ids"])
        self.context_length = int(attrs["context_length"])
        self.known_crash = attrs.get("known_crash")
        self.stage = "validation"

    # -- protocol -------------------------------------------------------------------------
    def _crashed(self) -> RuntimeCrashed:
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        tail = []
        if not self.stderr.closed:
            self.stderr.seek(0)
            tail = [ln.strip() for ln in self.stderr.read().decode(errors="replace").splitlines()
                    if ln.strip()]
        last = f"; its last words: {tail[-1][:300]}" if tail else ""
        hint = f". Known issue: {self.known_crash}" if self.known_crash else ""
        self.close()
        return RuntimeCrashed(f"the {self.label} runtime crashed ({describe_exit(code)}) during "
                              f"{self.stage}, while {self.doing}{last}{hint}")

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise self._crashed()
        return json.loads(line)

    def _send(self, op: str, args: list, doing: str) -> None:
        self.doing = doing
        try:
            self.proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._crashed() from None

    def _call(self, op: str, args: list, doing: str) -> Any:
        self._send(op, args, doing)
        reply = self._reply()
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["ok"]

    # -- Session --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call("tokenize", [text, add_special_tokens],
                          f"tokenizing {len(text)} characters")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("detokenize", [list(map(int, ids))], f"decoding {len(ids)} tokens")

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._call("render_chat", [messages], "rendering the chat template")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        r = self._call("logits", [list(map(int, ids))],
                       f"computing logits for {len(ids)} tokens")
        data = self.proc.stdout.read(r["nbytes"])
        if len(data) != r["nbytes"]:
            raise self._crashed()
        return np.frombuffer(data, dtype="<f4").reshape(r["shape"])

    def generate(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        self._send("generate", [list(map(int, ids)), {
            "max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed,
            "stop_token_ids": list(sampling.stop_token_ids)}],
            f"generating after a {len(ids)}-token prompt")
        n, finished = 0, False
        try:
            while True:
                reply = self._reply()
                if "token" in reply:
                    n += 1
                    self.doing = f"generating token {n + 1} after a {len(ids)}-token prompt"
                    yield reply["token"]
                    continue
                finished = True
                if "error" in reply:
                    raise ValueError(reply["error"])
                return
        finally:
            # a caller that stopped early: the rest of this reply must not reach the next call
            while not finished and self.proc.poll() is None:
                finished = "token" not in self._reply()

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._call("info", [], "reporting its info")
        return {**self._info, **self.extra_info}

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None
        if not self.stderr.closed:
            self.stderr.close()
