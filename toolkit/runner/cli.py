"""The bundle's command line: `python run.py --prompt ... | --chat | serve | verify | validate |
tune`.

Standard library only, plus the runtime module the bundle names (through core.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .core import (MANIFEST, TRUSTED_KEY_ENV, BundleError, Sampling, Session, TextStream, chat_ids,
                   check_bundle, open_bundle)


def stream_reply(session: Session, prompt_ids: list[int], sampling: Sampling,
                 out=sys.stdout) -> tuple[str, int, float]:
    """Generate and print as tokens arrive; returns (text, tokens, seconds)."""
    stream, parts, n = TextStream(session), [], 0
    start = time.perf_counter()
    for token in session.generate(prompt_ids, sampling):
        n += 1
        piece = stream.push(token)
        parts.append(piece)
        out.write(piece)
        out.flush()
    return "".join(parts), n, time.perf_counter() - start


def _report_speed(n: int, seconds: float) -> None:
    rate = n / seconds if seconds > 0 else 0.0
    print(f"\n[{n} tokens, {seconds:.2f} s, {rate:.1f} tok/s]", file=sys.stderr)


def chat_loop(session: Session, sampling: Sampling, system: str | None,
              first: str | None = None) -> None:
    """Interactive chat; `first` (--prompt) is sent as the first user turn."""
    try:
        import readline  # noqa: F401 - line editing and history for input(), where it exists
    except ImportError:
        pass
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    print("chat: /reset starts over; /exit, an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        if first is not None:
            line, first = first, None
            print(f"> {line}")
        else:
            try:
                line = input("> ")
            except EOFError:
                break
        if not line.strip() or line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = chat_ids(session, messages)
        text, n, seconds = stream_reply(session, ids, sampling)
        _report_speed(n, seconds)
        messages.append({"role": "assistant", "content": text})


def build_parser(prog: str = "run.py") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run a phikit bundle.")
    ap.add_argument("command", nargs="?",
                    choices=["generate", "verify", "serve", "validate", "tune"],
                    default="generate", help="validate: re-measure parity here against the "
                    "reference the bundle carries (exit 1 when a check fails); tune: measure "
                    "runtime options here, keep the fastest that validates (tuned.json)")
    ap.add_argument("--bundle", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="bundle directory (default: the one this runner sits in)")
    ap.add_argument("--prompt", help="prompt text; with --chat-format it is sent as a user turn")
    ap.add_argument("--chat", action="store_true", help="interactive chat")
    ap.add_argument("--raw", action="store_true", help="send --prompt as plain text, no chat template")
    ap.add_argument("--system", help="system message for chat prompts")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--threads", type=int, help="override the bundle's thread count")
    ap.add_argument("--key", type=Path, help="every command: the manifest must be signed by "
                    "this OpenSSH ed25519 public key (ssh-keygen -Y; file like id_ed25519.pub); "
                    f"default: ${TRUSTED_KEY_ENV}")
    ap.add_argument("--json", type=Path, help="validate: write the parity report here")
    ap.add_argument("--limit", type=int, help="validate: the first N eval rows only")
    ap.add_argument("--candidates", help="tune: thread counts to try, e.g. 1,2,4 (default: 1, "
                    "half the cores, all of them)")
    ap.add_argument("--thresholds", type=Path, help="validate: a JSON object of bounds in place "
                    "of the bundle's (e.g. for a --limit subset)")
    ap.add_argument("--allow-failed", action="store_true", help="run a bundle that failed parity")
    ap.add_argument("--host", default="127.0.0.1", help="serve: address (loopback by default)")
    ap.add_argument("--port", type=int, default=8000, help="serve: port")
    ap.add_argument("--api-key", help="serve: require 'Authorization: Bearer KEY'")
    limits = ap.add_argument_group("serve limits")
    limits.add_argument("--backlog", type=int, default=128, help="pending connections queued")
    limits.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a connection may stall in a read or write")
    limits.add_argument("--max-connections", type=int, default=64,
                        help="connections served at once (more wait in the backlog)")
    limits.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for the model (more get 429 + Retry-After)")
    limits.add_argument("--request-timeout", type=float, default=30.0,
                        help="seconds from a request's first byte to its last (a client "
                             "trickling bytes is dropped)")
    limits.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host header name answered besides the loopback names and the "
                             "bound address (repeatable; '*' for any, e.g. behind a proxy)")
    ap.add_argument("--in-process", action="store_true",
                    help="serve: run the runtime in the server's process (by default it runs "
                         "in a child that a crash restarts: the request fails with HTTP 500, "
                         "the server stays up)")
    return ap


def main(argv: list[str] | None = None, prog: str = "run.py") -> int:
    args = build_parser(prog).parse_args(argv)
    # Runtimes must not phone home from a device; the runtime modules also switch theirs off.
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        if args.command == "verify":
            checked, signed = check_bundle(args.bundle, args.key)
            print(f"ok: {len(checked.files)} files match {MANIFEST}, {signed}")
            from .core import describe_tuned

            tuned = describe_tuned(args.bundle)
            if tuned:
                print(tuned)
            return 0
        if args.command == "tune":
            from .tune import tune

            try:
                threads = ([int(x) for x in args.candidates.split(",")] if args.candidates
                           else None)
            except ValueError:
                raise BundleError(f"--candidates: thread counts like 1,2,4, got "
                                  f"{args.candidates!r}") from None
            return tune(args.bundle, threads, key=args.key)
        overrides = {"threads": args.threads} if args.threads else {}
        if args.command == "validate":
            from .device import validate_here

            bounds = None
            if args.thresholds is not None:
                import json

                try:
                    bounds = json.loads(args.thresholds.read_text(encoding="utf-8"))
                except (OSError, ValueError) as e:
                    raise BundleError(f"{args.thresholds}: not a JSON object of bounds: {e}")
                if not isinstance(bounds, dict):
                    raise BundleError(f"{args.thresholds}: not a JSON object of bounds")
            return validate_here(args.bundle, args.json, overrides=overrides, limit=args.limit,
                                 thresholds=bounds, key=args.key)
        session, manifest = open_bundle(args.bundle, allow_failed=args.allow_failed,
                                        overrides=overrides, worker=args.command == "serve"
                                        and not args.in_process, key=args.key)
        sampling = Sampling(max_new_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
        if args.command == "serve":
            from .server import Limits, serve

            serve(session, manifest.name, args.host, args.port, args.api_key,
                  limits=Limits(backlog=args.backlog, timeout=args.timeout,
                                max_connections=args.max_connections,
                                max_queue=args.max_queue,
                                request_timeout=args.request_timeout,
                                allowed_hosts=tuple(args.allow_host)))
            return 0
        if args.chat:
            chat_loop(session, sampling, args.system, args.prompt)
            return 0
        if args.prompt is None:
            print(f"{prog}: give --prompt TEXT or --chat", file=sys.stderr)
            return 2
        if args.raw:
            ids = session.tokenize(args.prompt)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            ids = chat_ids(session, messages)
        _, n, seconds = stream_reply(session, ids, sampling)
        _report_speed(n, seconds)
        return 0
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
