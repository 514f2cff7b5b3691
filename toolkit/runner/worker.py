"""A runner Session in a child process (standard library only): the client side of rpc.py.

A runtime that segfaults, aborts or is OOM-killed takes only its child down. phikit's validation
uses this (toolkit/remote.py: a crash is a one-line error, exit 2), and so does `run.py serve`:
a crash fails the request it was serving (HTTP 500) and the next request starts a new child.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

RPC = Path(__file__).resolve().parent / "rpc.py"


class WorkerCrashed(RuntimeError):
    """The runtime's process died (signal or exit) while it was being used."""


class WorkerOpenError(RuntimeError):
    """The runtime could not open the model (the child said why and exited)."""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return {"SIGKILL": "SIGKILL (killed: out of memory?)"}.get(name, name)
    return f"exit status {code}"


def rpc_command(*, runner: Path | None = None,
                package: str = "phikit_runner", module: str | None = None,
                model_dir: Path | None = None, options: dict[str, Any] | None = None,
                python: str = sys.executable, rpc: Path | str = RPC) -> list[str]:
    """The child's command line for a runtime module + model dir run by `runner`/`package` (a
    bundle the caller has verified, one being staged, or a bare artifact run by phikit's own
    toolkit.runner)."""
    # -I: no user site, PYTHON* variables or cwd on sys.path; -B: no byte code written
    cmd = [python, "-I", "-B", str(rpc)]
    return cmd + ["--runner", str(runner), "--package", package, "--module", str(module),
                  "--model-dir", str(model_dir), "--options", json.dumps(options or {})]


class WorkerSession:
    """The Session protocol (runner/core.py), every call answered by a child running rpc.py.
    With restart=True a call after a crash starts a new child (a server stays up), once
    `before_restart` (the bundle's trust policy, again) has returned: the new child imports the
    runtime's code from disk, which may have changed since the first one did."""

    def __init__(self, cmd: list[str], *, label: str, env: dict[str, str] | None = None,
                 extra_info: dict[str, Any] | None = None, cleanup=None,
                 restart: bool = False, before_restart=None):
        self.cmd, self.env, self.label, self.restart = cmd, env, label, restart
        self.before_restart = before_restart
        self.extra_info = extra_info or {}
        self.cleanup = cleanup
        self._lock = threading.RLock()
        self.stage = "opening the model"
        self.doing = "starting"
        self.proc = None
        self._info: dict[str, Any] | None = None
        self._start()
        self.stage = "use"

    # -- the child ------------------------------------------------------------------------
    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # a pipe nobody reads would fill and block it
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.stderr,
                                         env=self.env)
        except OSError as e:
            raise self._open_error(f"cannot start {self.cmd[0]}: {e.strerror}") from None
        hello = self._reply()
        if "error" in hello:
            self.close()
            raise self._open_error(hello["error"])
        attrs = hello["ok"]
        self.eos_token_ids = tuple(attrs["eos_token_ids"])
        self.context_length = int(attrs["context_length"])
        self.special_tokens = tuple(attrs.get("special_tokens", ()))
        self.known_crash = attrs.get("known_crash")
        self.constrains = attrs.get("constrains")

    def _open_error(self, message: str) -> Exception:
        return WorkerOpenError(f"{self.label}: {message}")

    def _crash_error(self, message: str) -> Exception:
        return WorkerCrashed(message)

    def _crashed(self) -> Exception:
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
        self.close(run_cleanup=not self.restart)
        return self._crash_error(f"the {self.label} runtime crashed ({describe_exit(code)}) "
                                 f"during {self.stage}, while {self.doing}{last}{hint}")

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            raise self._crashed()
        return json.loads(line)

    def _send(self, op: str, args: list, doing: str) -> None:
        if self.proc.poll() is not None and self.restart:
            if self.before_restart is not None:
                self.before_restart()
            self._start()  # the last call crashed it: a server keeps serving
        self.doing = doing
        try:
            self.proc.stdin.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise self._crashed() from None

    def _call(self, op: str, args: list, doing: str) -> Any:
        with self._lock:
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

    def logits_bytes(self, ids: Sequence[int], start: int = 0) -> tuple[list[int], bytes]:
        """(shape, little-endian float32 bytes): numpy is the caller's (logits())."""
        with self._lock:  # the header and its bytes, with no other call between them
            r = self._call("logits", [list(map(int, ids)), int(start)],
                           f"computing logits for {len(ids)} tokens")
            data = self.proc.stdout.read(r["nbytes"])
        if len(data) != r["nbytes"]:
            raise self._crashed()
        return r["shape"], data

    def logits(self, ids: Sequence[int], start: int = 0) -> Any:
        import numpy as np  # every runtime brings numpy

        shape, data = self.logits_bytes(ids, start)
        return np.frombuffer(data, dtype="<f4").reshape(shape)

    def generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        # The pipe is one conversation: a generation holds it until it ends, so another
        # thread's call (a server tokenizing the next request) waits instead of interleaving;
        # this thread's own calls between tokens (detokenize while streaming) re-enter.
        with self._lock:
            yield from self._generate(ids, sampling)

    def _generate(self, ids: Sequence[int], sampling) -> Iterator[int]:
        self._send("generate", [list(map(int, ids)), sampling.wire()],
                   f"generating after a {len(ids)}-token prompt")
        n, finished, pending = 0, False, False
        try:
            while True:
                reply = self._reply()
                if "token" in reply:
                    n += 1
                    pending = True  # the child waits for next / stop
                    yield reply["token"]
                    self.doing = f"generating token {n + 1} after a {len(ids)}-token prompt"
                    self._ack(b"next")
                    pending = False
                    continue
                finished = True
                if "error" in reply:
                    raise ValueError(reply["error"])
                return
        finally:
            # a caller that stopped early (a server's client left): the child stops the
            # runtime's generator and ends its reply, which must not reach the next call
            if not finished and pending and self.proc.poll() is None:
                self._ack(b"stop")
                while "token" in self._reply():
                    pass

    def _ack(self, word: bytes) -> None:
        try:
            self.proc.stdin.write(word + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise self._crashed() from None

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._call("info", [], "reporting its info")
        return {**self._info, **self.extra_info}

    def close(self, run_cleanup: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if run_cleanup and self.cleanup is not None:
            self.cleanup()
            self.cleanup = None
        if not self.stderr.closed:
            self.stderr.close()
