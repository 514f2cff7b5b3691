"""The README is a manual whose commands work (issue 40): every fenced `bash` / `sh` / `console`
block is run, in order, the way a newcomer would run it: in an empty folder, with phikit's wheel
(built from this tree) and a checkpoint of one's own (`my-phi3/`, here the embedded tiny model
under another name). The install goes into a fresh venv; PHIKIT_CACHE is the session's, so
conversions and references this session made are reused (what is measured is still measured).

Two kinds of block are not run as written, each for a stated reason:
- ```bash device```: needs a device (SSH to a Pi, Ollama): listed and skipped, and kept few;
- `make TARGET`: `make test` would run this suite inside itself and `make install` would rebuild
  the shared development venv, so each `make` line is checked with `make -n` (the target exists
  and runs what the README says); `make demo` itself is tests/test_demo.py's subject."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO, TINY, build_wheel, reachable

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
RUNNABLE = {"bash", "sh", "console"}
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
MAX_DEVICE_BLOCKS = 3
# what each `make` target's dry run must show (the README's claim about it)
MAKE_RUNS = {"demo": "phikit demo", "test": "pytest", "install": "pip"}


def blocks() -> list[tuple[str, str, list[str], int]]:
    """(language, info string, commands, line) of every fenced block."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        lang, info, body = m.group(1), m.group(2).strip(), m.group(3)
        line = text.count("\n", 0, m.start()) + 1
        out.append((lang, info, commands(body, lang), line))
    return out


def commands(body: str, lang: str) -> list[str]:
    lines, current = [], ""
    for raw in body.splitlines():
        line = raw[2:] if lang == "console" and raw.startswith("$ ") else raw
        if lang == "console" and not raw.startswith("$ ") and not current:
            continue  # console output
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip() and not current.strip().startswith("#"):
                lines.append(current.strip())
            current = ""
    return lines


def runnable() -> list[tuple[list[str], int]]:
    return [(cmds, line) for lang, info, cmds, line in blocks()
            if lang in RUNNABLE and "device" not in info.split()]


def device_blocks() -> list[tuple[list[str], int]]:
    return [(cmds, line) for lang, info, cmds, line in blocks()
            if lang in RUNNABLE and "device" in info.split()]


def is_make(command: str) -> bool:
    return command.split()[0] == "make"


def test_the_readme_is_a_manual_of_at_most_400_lines():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 400
    for heading in ("## Install", "## Two commands", "## Your own checkpoint", "## Commands",
                    "## A bundle", "## Parity metrics", "## Limits"):
        assert heading in text, heading
    assert "phikit init" in text and "--source" in text and "--precision" in text
    assert runnable(), "no command is run"


def test_device_blocks_are_few():
    found = device_blocks()
    assert len(found) <= MAX_DEVICE_BLOCKS, [line for _, line in found]


@pytest.mark.parametrize("line", [line for _, line in device_blocks()])
def test_device_block(line):
    cmds = next(c for c, at in device_blocks() if at == line)
    pytest.skip(f"README.md:{line} needs a device (a Pi over SSH, Ollama): {'; '.join(cmds)}")


def test_make_lines_name_targets_that_run_what_the_readme_says():
    lines = [c for cmds, _ in runnable() for c in cmds if is_make(c)]
    assert lines
    for command in lines:
        target = command.split()[1]
        assert target in MAKE_RUNS, f"README runs `{command}`: say here what it must run"
        # -B: what the target runs, even on a machine where it is up to date
        proc = subprocess.run(["make", "-n", "-B", "-C", str(REPO), target], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert MAKE_RUNS[target] in proc.stdout, (command, proc.stdout[-2000:])






@pytest.mark.slow
@pytest.mark.longest
@pytest.mark.xdist_group("test_readme")
def test_every_readme_command_runs(tmp_path):
    work = tmp_path / "newcomer"
    work.mkdir()
    wheel = build_wheel(work, tmp_path / "src")
    text = README.read_text(encoding="utf-8")
    assert f"./{wheel.name}" in text, f"the README installs another wheel than {wheel.name}"
    shutil.copytree(TINY, work / "my-phi3")  # a checkpoint of one's own
    script, notes = ["set -euo pipefail"], []
    torch_ok = reachable(TORCH_INDEX + "/torch/")
    for cmds, line in runnable():
        script.append(f"echo '### README.md:{line}' >&2")
        for command in cmds:
            if is_make(command):
                continue  # dry-run checked above
            if TORCH_INDEX in command and not torch_ok:
                command = command.replace(f"--index-url {TORCH_INDEX}", "")
                notes.append(f"{TORCH_INDEX} unreachable: torch from the configured index")
            script.append(command)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PHIKIT_PATH", "PHIKIT_LLAMA_CPP"))}
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # what the commands were for, checked on what they left behind
    recipe = yaml.safe_load((work / "recipes" / "my-phi3-int4.yaml").read_text())
    assert recipe["source"] == "../my-phi3" and recipe["eval"]["file"].startswith("phikit:")
    for bundle in ("my-phi3-pi", "my-phi3-ollama"):
        manifest = json.loads((work / "dist" / bundle / "manifest.json").read_text())
        assert manifest["parity"]["verdict"] == "pass", bundle
    assert (work / "dist" / "my-phi3-ollama" / "model" / "Modelfile").is_file()
    assert (work / "dist" / "my-phi3-pi.html").is_file()
    assert "precision fp9 is not allowed" in (work / "error.txt").read_text()
    assert (work / ".github" / "workflows" / "phikit.yml").is_file()
    rows = {r["name"]: r for r in json.loads((work / "doctor.json").read_text())[0]["rows"]}
    assert "usable" in rows["gguf"]["status"] and "usable" in rows["onnx"]["status"]
    print("\n".join(notes))
