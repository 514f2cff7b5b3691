"""Nothing is sent anywhere (issue 17, item 4). ONNX Runtime and ORT GenAI keep a device id and
an event store under ~/.cache/Microsoft when their telemetry is on, and OpenVINO's Python package
writes ~/intel/{stats,openvino_ga_cid} as it reports to Google Analytics: a fresh HOME that stays
empty shows that neither started. (No network here: the files are the witness.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

RUNTIMES = "onnxruntime, onnxruntime_genai, openvino, openvino_genai, openvino_tokenizers"


# Both runtimes switch their telemetry off by themselves where these say "a CI job" (OpenVINO's
# opt_in_checker._run_in_ci; ORT GenAI's native library reads the same names): a CI run would
# otherwise test a quietness that the user's device never gets.
CI_MARKERS = ("CI", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI",
              "TEAMCITY_VERSION", "BUILD_BUILDID", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI")


def device_environ() -> dict[str, str]:
    """This process's environment as on a user's device: no CI markers, no opt-out of ours."""
    drop = {*CI_MARKERS, "ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", "PYTHONPATH"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def files_under(home) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def run_in_fresh_home(tmp_path, code: str, env: dict[str, str] | None = None) -> list[str]:
    home = tmp_path / "home"
    home.mkdir(parents=True)
    base = device_environ()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**base, **(env or {}), "HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return files_under(home)


def test_the_witness_works(tmp_path):
    """Without phikit the runtimes do write their telemetry files (else the tests below prove
    nothing)."""
    written = run_in_fresh_home(tmp_path, f"import {RUNTIMES}")
    assert any("onnxruntime" in f for f in written), written
    assert any(f.startswith("intel") for f in written), written


def test_the_runner_imports_runtimes_quietly(tmp_path):
    """What a bundle does on a device: the runner's core first, then its runtime."""
    code = ("import sys; sys.path.insert(0, 'toolkit'); import runner.core; "
            f"import {RUNTIMES}")
    assert run_in_fresh_home(tmp_path, code) == []


def test_phikit_and_its_converters_run_quietly(tmp_path):
    from toolkit.backends.common import quiet_env

    assert run_in_fresh_home(tmp_path, f"import toolkit, {RUNTIMES}") == []
    # a converter subprocess (optimum-cli, the ORT GenAI builder) gets the same environment
    env = {k: v for k, v in quiet_env().items() if k in ("ORT_DISABLE_TELEMETRY", "PYTHONPATH")}
    assert run_in_fresh_home(tmp_path / "tool", f"import {RUNTIMES}", env) == []


def test_an_explicit_user_choice_is_kept(tmp_path):
    code = "import toolkit, os; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HOME": str(tmp_path), "ORT_DISABLE_TELEMETRY": "0"})
    assert out.stdout.strip() == "0"


# --- name resolution, counted: each command runs in its own network namespace whose only
# resolver is a logger on 127.0.0.1:53 (answers NXDOMAIN, records every name asked) ---------

DNS_LOGGER = r'''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
log = open(sys.argv[1], "a")
while True:
    data, addr = s.recvfrom(4096)
    i, parts = 12, []
    while i < len(data) and data[i]:
        parts.append(data[i + 1:i + 1 + data[i]].decode(errors="replace"))
        i += data[i] + 1
    log.write(".".join(parts) + "\n")
    log.flush()
    s.sendto(data[:2] + b"\x81\x83" + data[4:6] + b"\0" * 6 + data[12:], addr)
'''
NETNS = r'''
set -e
ip link set lo up
echo "nameserver 127.0.0.1" > "$WORK/resolv.conf"
mount --bind "$WORK/resolv.conf" /etc/resolv.conf
"$PY" "$WORK/dns.py" "$WORK/queries.log" &
logger=$!
sleep 0.5
set +e
"$@"
echo "exit $?" > "$WORK/exit"
sleep 2  # uploads are asynchronous: give them time to ask for their host
kill $logger
'''
# telemetry uploads are asynchronous (the witness's first lookups came seconds after its
# generation): every process under test stays alive this long after its work
LINGER = 10
GENERATE_THEN_LINGER = (
    "import runpy, sys, time\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    f"time.sleep({LINGER})\n")
SERVE_ONCE = r'''
import json, subprocess, sys, time, urllib.request
LINGER = int(sys.argv[2])
bundle, port = sys.argv[1], "8765"
server = subprocess.Popen([sys.executable, bundle + "/run.py", "serve", "--port", port],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
for _ in range(240):
    try:
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", body,
                {"Content-Type": "application/json"}), timeout=30) as r:
            assert r.status == 200
            break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("no answer")
time.sleep(LINGER)
server.terminate()
server.wait()
'''


def queries_in_netns(tmp_path, *cmd: str, env: dict[str, str] | None = None
                     ) -> tuple[list[str], list[str]]:
    """(names resolved, files written under HOME) while cmd runs with no network but a logging
    resolver."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip (util-linux, iproute2) for a network namespace")
    work = tmp_path / "netns"
    (work / "home").mkdir(parents=True)
    (work / "dns.py").write_text(DNS_LOGGER)
    (work / "queries.log").write_text("")
    base = device_environ()
    proc = subprocess.run(["unshare", "-n", "-m", "sh", "-c", NETNS, "netns", *cmd],
                          env={**base, **(env or {}), "WORK": str(work), "PY": sys.executable,
                               "HOME": str(work / "home")},
                          capture_output=True, text=True, timeout=600)
    assert (work / "exit").read_text().strip() == "exit 0", proc.stdout + proc.stderr
    names = [n for n in (work / "queries.log").read_text().splitlines() if n]
    return names, files_under(work / "home")


OG_GENERATE = (
    "import onnxruntime_genai as og, sys\n"
    "m = og.Model(sys.argv[1]); t = og.Tokenizer(m); p = og.GeneratorParams(m)\n"
    "p.set_search_options(max_length=16); g = og.Generator(m, p)\n"
    "g.append_tokens(t.encode('hi'))\n"
    "while not g.is_done(): g.generate_next_token()\n"
    f"import time; time.sleep({LINGER})\n")


@pytest.mark.slow
def test_the_dns_witness_works(int4_bundle, tmp_path):
    """ORT GenAI used directly (no phikit) asks for Microsoft's telemetry host."""
    names, _ = queries_in_netns(tmp_path, sys.executable, "-c", OG_GENERATE,
                                str(int4_bundle / "model"))
    assert any("microsoft.com" in n for n in names), names


@pytest.mark.slow
@pytest.mark.parametrize("fixture, mode", [("int4_bundle", "generate"), ("int4_bundle", "serve"),
                                           ("ov_int4_bundle", "generate"),
                                           ("mlx_int4_bundle", "generate")],
                         ids=["ortgenai-generate", "ortgenai-serve", "openvino-generate",
                              "mlx-generate"])
def test_bundles_resolve_no_name(fixture, mode, request, tmp_path):
    bundle = request.getfixturevalue(fixture)
    cmd = ([sys.executable, "-c", GENERATE_THEN_LINGER, str(bundle / "run.py"), "--prompt", "hi",
            "--max-tokens", "8"] if mode == "generate"
           else [sys.executable, "-c", SERVE_ONCE, str(bundle), str(LINGER)])
    names, written = queries_in_netns(tmp_path, *cmd)
    assert names == [] and written == [], (names, written)
