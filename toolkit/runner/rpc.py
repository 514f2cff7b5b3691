"""A runner Session served over stdin/stdout (standard library + the runtime).

The parity engine never loads a candidate runtime in its own process: it starts this file in a
child (natively, under qemu-user for another CPU class or ISA, or inside an emulated root) and
calls the Session through it, so a runtime that segfaults, aborts or is OOM-killed takes only the
child down. Start it as
  python rpc.py --bundle DIR                         a phikit bundle (its own phikit_runner)
  python rpc.py --runner DIR --module M --model-dir D [--package P] [--options JSON]
                                                     a runtime module from DIR/P (P defaults to
                                                     phikit_runner), e.g. a bundle being staged
Protocol (binary pipes, one JSON object per line):
  request   {"op": "tokenize" | "detokenize" | "render_chat" | "logits" | "generate" | "info",
             "args": [...]}
  replies   {"ok": result} | {"error": message}; `generate` first sends {"token": id} per token
            and waits for a line `next` (go on) or `stop` (close the runtime's generator);
            `logits` replies {"ok": {"shape": [n, vocab], "nbytes": N}} followed by N raw bytes
            of little-endian float32.
  The first line the child writes (unasked) is the hello: {"ok": {"eos_token_ids", "context_length",
  "known_crash"}} once the session is open, or {"error": why} when it cannot open.
Anything the runtime prints to stdout is moved to stderr: stdout carries only the protocol.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


def _open(args: argparse.Namespace):
    if args.bundle is not None:
        sys.path.insert(0, str(args.bundle))
        core = importlib.import_module("phikit_runner.core")
        session, _ = core.open_bundle(args.bundle, allow_failed=True)
        return core, session
    sys.path.insert(0, str(args.runner))
    core = importlib.import_module(f"{args.package}.core")
    return core, core.open_session(args.module, args.model_dir, json.loads(args.options))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rpc.py")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--runner", type=Path)
    ap.add_argument("--package", default="phikit_runner")
    ap.add_argument("--module")
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--options", default="{}")
    args = ap.parse_args(argv)
    sys.pycache_prefix = os.devnull  # never read byte code from a bundle's __pycache__
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
                 "known_crash": getattr(session, "known_crash", None)}})
    stdin = sys.stdin.buffer

    def handle(line: bytes) -> None:
        """One request; a generate also serves the requests its caller makes between tokens
        (a server detokenizes as it streams) until that caller says next or stop."""
        request = json.loads(line)
        op, params = request["op"], request.get("args", [])
        try:
            if op == "logits":
                import numpy as np  # every runtime brings numpy

                arr = np.ascontiguousarray(session.logits(params[0]), dtype="<f4")
                send({"ok": {"shape": list(arr.shape), "nbytes": arr.nbytes}})
                out.write(memoryview(arr).cast("B"))
                out.flush()
                return
            if op == "generate":
                n, tokens = 0, session.generate(params[0], core.Sampling(**params[1]))
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
    sys.exit(main())
