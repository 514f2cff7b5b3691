"""A synthetic bundle (no model needed) for the attacks in this directory."""

from __future__ import annotations

from pathlib import Path

from toolkit.package import finish_manifest, publish, staging_dir, write_runner


def synthetic_bundle(out: Path, name: str = "b") -> Path:
    """A well-formed ONNX-runner bundle whose model dir holds only a config.json."""
    stage = staging_dir(out)
    (stage / "model").mkdir()
    (stage / "model" / "config.json").write_text("{}")
    write_runner(stage, "ortgenai")
    finish_manifest(stage, {"name": name, "model_dir": "model",
                            "runtime": {"module": "ortgenai"}, "parity": {"verdict": "pass"}})
    return publish(stage, out, passed=True)
