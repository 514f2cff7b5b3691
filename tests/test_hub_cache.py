"""Hub ids offline: a Hugging Face cache laid out as the hub client writes it (blobs, refs,
snapshots of symlinks), read by the real `huggingface_hub` with HF_HUB_OFFLINE=1 — a revision,
an interrupted download and a model that is not there."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, TINY



def commit(repo: Path, name: str, files: dict[str, bytes], partial: tuple[str, ...] = ()) -> str:
    """One snapshot the way huggingface_hub stores it: content in blobs/<sha256> (or
    blobs/<sha>.incomplete while downloading), snapshots/<commit>/<file> a relative link."""
    sha = hashlib.sha1(name.encode()).hexdigest()
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    for file, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        if file in partial:  # the bytes so far, never linked into the snapshot
            (repo / "blobs" / f"{blob}.incomplete").write_bytes(data[: len(data) // 3])
            continue
        (repo / "blobs" / blob).write_bytes(data)
        (snap / file).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs" / name).write_text(sha)
    return sha


def resolve(hf_home: Path, source: str, revision: str | None = None) -> dict:
    """toolkit.checkpoint.resolve_source in a fresh interpreter (huggingface_hub reads
    HF_HOME when it is imported)."""
    code = ("import json, sys\nfrom toolkit.checkpoint import resolve_source, checkpoint_digest\n"
            "from toolkit.errors import PhikitError\n"
            "try:\n    p = resolve_source(sys.argv[1], sys.argv[2] or None)\n"
            "    print(json.dumps({'path': str(p), 'digest': checkpoint_digest(p)}))\n"
            "except PhikitError as e:\n    print(json.dumps({'error': str(e)}))\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1",
           "PHIKIT_CACHE": str(hf_home.parent / "phikit")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code, source, revision or ""], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_offline_hub_cache_revisions_and_an_interrupted_download(tmp_path):
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--acme--tiny-phi3"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    files = {f.name: f.read_bytes() for f in TINY.iterdir() if f.is_file()}
    main = commit(repo, "main", files)
    config = json.loads(files["config.json"])
    v1 = commit(repo, "v1", {**files, "config.json": json.dumps(
        {**config, "rope_theta": 20000.0}).encode()})
    commit(repo, "partial", files, partial=("model.safetensors",))

    got = resolve(hf_home, "acme/tiny-phi3")
    assert got["path"] == str(repo / "snapshots" / main)
    local = resolve(hf_home, str(TINY))  # the same files as a local directory: same digest
    assert got["digest"] == local["digest"]
    tagged = resolve(hf_home, "acme/tiny-phi3", "v1")
    assert tagged["path"].endswith(v1) and tagged["digest"] != got["digest"]

    cut = resolve(hf_home, "acme/tiny-phi3", "partial")["error"]
    assert "incomplete 'acme/tiny-phi3'" in cut and "model.safetensors" in cut
    absent = resolve(hf_home, "acme/not-there")["error"]
    assert "cannot fetch 'acme/not-there'" in absent and "HF_HUB_OFFLINE" in absent
    assert "Traceback" not in absent
