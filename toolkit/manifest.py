"""BundleManifest: what a build writes as manifest.json, typed.

The runner reads the same document with the standard library only (runner/core.py's Manifest,
which checks every field it trusts); this model is the writer's side, so a field a stage forgets
or misspells fails the build instead of shipping. `files` (every file's sha256), `format` and
`phikit` are added by package.finish_manifest, once the bundle's files are final.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuntimeSection(_Strict):
    module: str  # phikit_runner/<module>.py: the runtime the bundle runs on
    options: dict[str, Any]
    packages: list[str]  # the target's runtime packages (what requirements.lock pins)


class SourceSection(_Strict):
    id: str  # the hub id, or the local checkpoint directory
    sha256: str  # checkpoint_digest: the checkpoint's files, by name and sha256
    architecture: str


class ConversionSection(_Strict):
    cached: bool
    tool: str


class ParitySection(_Strict):
    verdict: Literal["pass", "fail"]
    metrics: dict[str, Any]
    checks: list[dict[str, Any]]


class BundleManifest(_Strict):
    name: str
    created: str
    recipe: dict[str, Any]  # the Recipe, as validated (model_dump)
    target: dict[str, Any]  # the Target, as validated (model_dump)
    backend: str
    model_dir: str
    eval_file: str
    reference_file: str
    runtime: RuntimeSection
    source: SourceSection
    toolchain: dict[str, Any]
    conversion: ConversionSection
    parity: ParitySection

    def fields(self) -> dict[str, Any]:
        """The JSON object finish_manifest completes and writes."""
        return self.model_dump(mode="json")
