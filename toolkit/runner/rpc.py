"""A bundle's Session served over stdin/stdout as JSON lines (standard library + the runtime).

Used to run the parity engine on the host against a runtime that runs elsewhere, e.g. inside an
emulated aarch64 root: `python rpc.py BUNDLE_DIR`. One request per line:
  {"op": "tokenize" | "detokenize" | "render_chat" | "logits" | "generate" | "info" | "attrs",
   "args": [...]}
One reply per line: {"ok": result} or {"error": message}. Logits travel as base64 float32.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path


def main() -> int:
    bundle = Path(sys.argv[1])
    sys.path.insert(0, str(bundle))
    from phikit_runner.core import Sampling, open_bundle  # the bundle's own runner code

    session, _ = open_bundle(bundle, allow_failed=True)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        op, args = request["op"], request.get("args", [])
        try:
            if op == "logits":
                import numpy as np

                arr = np.ascontiguousarray(session.logits(args[0]), dtype=np.float32)
                result = {"shape": list(arr.shape),
                          "b64": base64.b64encode(arr.tobytes()).decode()}
            elif op == "generate":
                result = list(session.generate(args[0], Sampling(**args[1])))
            elif op == "info":
                result = session.info()
            elif op == "attrs":
                result = {"eos_token_ids": list(session.eos_token_ids),
                          "context_length": session.context_length}
            elif op in ("tokenize", "detokenize", "render_chat"):
                result = getattr(session, op)(*args)
            else:
                raise ValueError(f"unknown op {op!r}")
            out.write(json.dumps({"ok": result}) + "\n")
        except Exception as e:  # noqa: BLE001 - reported to the caller, who decides
            out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
