"""BundleManifest: a bundle's manifest.json, typed, as phikit writes and reads it.

The runner reads the same document with the standard library only (runner/core.py's Manifest,
which checks every field it trusts). On the writer's side a field a stage forgets or misspells
fails the build instead of shipping; phikit's readers (validate, emulate) read it back with
`parse`, so a field they need is named when it is missing, not met as a KeyError. `format`,
`phikit` and `files` (every file's sha256) are set by package.finish_manifest, once the bundle's
files are final.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .schema import validate_document


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
    # None until finish_manifest completes the bundle (the document a build's stages hand on);
    # every manifest.json has all three: the runner's trust check refuses one without `format`
    # (it accepts only BUNDLE_FORMAT) or `files`, and every phikit that wrote that format
    # wrote `phikit`
    format: str | None = None
    phikit: str | None = None  # the phikit version that wrote it
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
    files: dict[str, str] | None = None  # relative path -> sha256, last (as manifest.json has it)

    @classmethod
    def parse(cls, document: Any, file: Path) -> BundleManifest:
        """A bundle's manifest.json (`document`: the JSON its caller read and, where it runs
        the bundle, verified) as the model; a PhikitError naming `file` and the field when it
        is not one."""
        return validate_document(file, cls, document)

    def fields(self) -> dict[str, Any]:
        """The JSON object as written: without the fields finish_manifest has yet to set."""
        unset = {k for k in ("format", "phikit", "files") if getattr(self, k) is None}
        return self.model_dump(mode="json", exclude=unset)
