"""Soak a real bundle's server: N chat completions from C concurrent clients against
`python BUNDLE/run.py serve`, printing failures and the resident memory of the server process
and its runtime worker (VmRSS from /proc) at the start and after each quarter, so a leak shows
as a slope. No timed assertion: figures only.

    .venv/bin/python bench/server_soak.py BUNDLE [--requests 1000] [--clients 64]
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """VmRSS of a process and its children (the runtime worker), in MB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


ERRORS: dict[str, int] = {}


def request(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError as e:
        ERRORS[type(e).__name__] = ERRORS.get(type(e).__name__, 0) + 1
        return 0
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--in-process", action="store_true", help="serve without a runtime worker")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, str(args.bundle / "run.py"), "serve", "--port",
                               str(port), "--max-queue", str(args.requests),
                               *(["--in-process"] if args.in_process else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"messages": [{"role": "user", "content": "What does json.dumps do?"}],
                       "max_tokens": args.max_tokens}).encode()
    try:
        for _ in range(600):
            if request(port, body) == 200:
                break
            time.sleep(0.5)
        else:
            raise SystemExit("the server did not answer")
        ERRORS.clear()  # refusals while it started
        quarter = max(1, args.requests // 4)
        samples = [(0, rss_mb(server.pid))]
        failures: dict[int, int] = {}
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for done in range(0, args.requests, quarter):
                n = min(quarter, args.requests - done)
                for status in pool.map(lambda _: request(port, body), range(n)):
                    if status != 200:
                        failures[status] = failures.get(status, 0) + 1
                samples.append((done + n, rss_mb(server.pid)))
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(timeout=30)
    first, last = samples[0][1], samples[-1][1]
    print(f"bundle {args.bundle.name}: {args.requests} requests, {args.clients} concurrent "
          f"clients, {sum(failures.values())} failures {failures or ''}, {seconds:.1f} s "
          f"({args.requests / seconds:.0f} req/s)" + (f"; client errors {ERRORS}" if ERRORS else ""))
    print("RSS (server + runtime worker), MB after N requests: "
          + ", ".join(f"{n}: {mb:.0f}" for n, mb in samples))
    print(f"RSS start {first:.0f} MB, end {last:.0f} MB, slope "
          f"{(last - first) / args.requests * 1000:+.1f} MB per 1000 requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
