"""A runner Session served over stdin/stdout (standard library + the runtime).

The parity engine never loads a candidate runtime in its own process: it starts this file in a
child (natively, under qemu-user for another CPU class or ISA, or inside an emulated root) and
calls the Session through it, so a runtime that segfaults, aborts or is OOM-killed takes only the
child down. Start it as
  python rpc.py --runner DIR --module M --model-dir D [--package P] [--options JSON]
a runtime module from DIR/P (P defaults to phikit_runner). The parent has verified DIR (a bundle,
or one being staged) before it starts the child, and again before every restart (worker.py):
this file imports from DIR and verifies nothing itself.
Protocol (binary pipes, one JSON object per line):
  request   {"op": "tokenize" | "detokenize" | "render_chat" | "logits" | "generate" | "info",
             "args": [...]}
  replies   {"ok": result} | {"error": message}; `generate` first sends {"token": id} per token
            and waits for a line `next` (go on) or `stop` (close the runtime's generator);
            `logits` replies {"ok": {"shape": [n, vocab], "nbytes": N}} followed by N raw bytes
            of little-endian float32.
  The first line the child writes (unasked) is the hello: {"ok": {"eos_token_ids", "context_length",
  "special_tokens", "known_crash"}} once the session is open, or {"error": why} when it cannot open.
Anything the runtime prints to stdout is moved to stderr: stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


def source_only_imports(root: str) -> None:
    """Modules found under `root` (a bundle) are compiled from their verified source: byte code
    there is never read, and no native extension loads from it. Every other directory keeps its
    own byte code (a runtime's imports compile once at install, not at every start)."""
    import importlib.machinery as machinery

    class SourceOnlyLoader(machinery.SourceFileLoader):
        def get_code(self, fullname):
            return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)

    finder = machinery.FileFinder.path_hook((SourceOnlyLoader, machinery.SOURCE_SUFFIXES))
    root = os.path.realpath(root)
    venv = os.path.join(root, ".venv")  # what its lock installed there is not the bundle's

    def hook(path: str):
        real = os.path.realpath(path or os.curdir)
        inside = real == root or real.startswith(root + os.sep)
        if not inside or real == venv or real.startswith(venv + os.sep):
            raise ImportError("not the bundle's own code")  # the next hook handles it
        return finder(path)

    sys.path_hooks.insert(0, hook)
    sys.path_importer_cache.clear()


def _open(args: argparse.Namespace):
    # No runtime uses PyTorch and no bundle's lock installs it. Where the host has it (phikit's
    # own environment), transformers (mlx-lm's tokenizer) would import it anyway: seconds per
    # worker, and a process unlike the one on the device. Hidden, transformers sees no torch.
    sys.modules.setdefault("torch", None)
    source_only_imports(str(args.runner))
    sys.path.insert(0, str(args.runner))
    core = importlib.import_module(f"{args.package}.core")
    return core, core.open_session(args.module, args.model_dir, json.loads(args.options))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rpc.py")
    ap.add_argument("--runner", type=Path)
    ap.add_argument("--package", default="phikit_runner")
    ap.add_argument("--module")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--options", default="{}")
    args = ap.parse_args(argv)
    # the protocol gets its own descriptor; fd 1 (what native libraries print to) becomes stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj) -> None:
        out.write(json.dumps(obj, default=str).encode() + b"\n")
        out.flush()

    try:
        core, session = _open(args)
    except Exception as e:  # noqa: BLE001 - the parent reports it as "cannot open"
        # the runner's own BundleError already names the model dir and the runtime
        send({"error": str(e) if type(e).__name__ == "BundleError" else
              f"cannot open the model: {type(e).__name__}: {e}"})
        return 2
    send({"ok": {"eos_token_ids": list(session.eos_token_ids),
                 "context_length": session.context_length,
                 "special_tokens": list(getattr(session, "special_tokens", ()) or ()),
                 "known_crash": getattr(session, "known_crash", None),
                 "constrains": getattr(session, "constrains", None)}})
    stdin = sys.stdin.buffer

    def handle(line: bytes) -> None:
        """One request; a generate also serves the requests its caller makes between tokens
        (a server detokenizes as it streams) until that caller says next or stop."""
        request = json.loads(line)
        op, params = request["op"], request.get("args", [])
        try:
            if op == "logits":
                import numpy as np  # every runtime brings numpy

                start = int(params[1]) if len(params) > 1 else 0
                arr = np.ascontiguousarray(session.logits(params[0], start), dtype="<f4")
                send({"ok": {"shape": list(arr.shape), "nbytes": arr.nbytes}})
                out.write(memoryview(arr).cast("B"))
                out.flush()
                return
            if op == "generate":
                n, tokens = 0, session.generate(params[0], core.Sampling.from_wire(params[1]))
                for token in tokens:
                    send({"token": int(token)})
                    n += 1
                    while (word := stdin.readline().strip()) not in (b"next", b"stop", b""):
                        handle(word)
                    if word != b"next":  # stop: the caller has enough (a client left)
                        tokens.close()  # the runtime stops now
                        break
                result = n
            elif op == "info":
                result = session.info()
            elif op in ("tokenize", "detokenize", "render_chat"):
                result = getattr(session, op)(*params)
            else:
                raise ValueError(f"unknown op {op!r}")
            send({"ok": result})
        except Exception as e:  # noqa: BLE001 - reported to the caller, who decides
            send({"error": f"{type(e).__name__}: {e}"})

    while line := stdin.readline():
        handle(line)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The caller closed the pipe: every answer is written and nothing is left to save. Skip the
    # interpreter's teardown, where torch's and MLX's destructors take seconds per worker.
    os._exit(code)
