"""Recipe and target files: YAML (safe_load) validated by pydantic, errors with file:line:field.

A recipe says what to build (checkpoint, quantization, eval set, parity thresholds); a target says
where it runs (device, backend, execution provider, precisions, runtime packages, platform).
Relative paths inside a file are resolved against that file's folder.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model,
                      field_validator)
from pydantic.fields import FieldInfo

from .errors import PhikitError
from .paths import data_file
from .runner.core import NAME_PATTERN

Precision = Literal["int4", "int8", "fp16", "fp32"]
PRECISION_BITS = {"int4": 4, "int8": 8, "fp16": 16, "fp32": 32}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")  # \Z: `$` also matches before a final newline


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackendOptions(BaseModel):
    """`quantization.options.<backend>`: each backend's own typed options (its `options_model`),
    validated once when the recipe loads; keys it does not know are refused."""

    model_config = ConfigDict(extra="forbid")
    label: ClassVar[str] = "backend"

    @classmethod
    def read(cls, raw: Any, field: str) -> BackendOptions:
        """Validated options, or a PhikitError naming the option (its field: `field.key`)."""
        if not isinstance(raw, dict):
            raise PhikitError(f"expected a mapping of {cls.label} options", field=field)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(map(str, err["loc"]))
            if err["type"] == "extra_forbidden":
                known = ", ".join(sorted(cls.model_fields)) or "none"
                raise PhikitError(f"unknown {cls.label} option {key!r} (known: {known})",
                                  field=field) from None
            raise PhikitError(f"{cls.label} option {key!r}: {err['msg']}",
                              field=f"{field}.{key}") from None

    def given(self) -> dict[str, Any]:
        """The options the recipe set (a backend fills in its own defaults)."""
        return self.model_dump(exclude_unset=True, exclude_none=True)


# backend name -> its options model; toolkit.backends registers every backend's at import
OPTION_MODELS: dict[str, type[BackendOptions]] = {}


class Quantization(Strict):
    precision: Precision
    block_size: int | None = Field(
        None, description="weights per quantization block (int4/int8); None = the backend's "
        "default for the target (backends' default_block_size; `phikit build --dry-run` prints "
        "it)")
    symmetric: bool = True
    accuracy_level: int | None = Field(
        None, ge=0, le=4, description="ORT MatMulNBits compute type; None = phikit's default "
        "for the provider (4, int8 activations, on CPU; the builder's own default otherwise)")
    calibration: Path | None = Field(None, description="local text file for data-aware methods")
    options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="raw options per backend, passed to its tool")

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, v: int | None) -> int | None:
        if v is not None and v != -1 and (v < 16 or v > 256 or v & (v - 1)):
            raise ValueError("must be a power of two from 16 to 256, or -1 for per-channel")
        return v


class EvalConfig(Strict):
    file: Path
    max_tokens: int = Field(128, ge=8, le=131072, description="tokens per teacher-forced text")
    max_new_tokens: int = Field(32, ge=1, le=4096, description="greedy tokens per prompt")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    reference_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the transformers reference; bfloat16 halves its memory "
        "for full-size checkpoints (Phi-3-mini: 7.6 GB instead of 15.3) at bf16's own rounding")


DEFAULT_KLD_DRIFT_MAX = 1.5


class Bounds(Strict):
    """Every field is a bound the candidate must meet; None disables that check."""

    kld_mean_max: float | None = Field(None, ge=0)
    kld_p99_max: float | None = Field(None, ge=0)
    # the tail: KLD's 99.9th percentile over every position (llama.cpp's "99.9% KLD")
    kld_p999_max: float | None = Field(None, ge=0)
    top1_min: float | None = Field(None, ge=0, le=1)
    ppl_ratio_max: float | None = Field(None, ge=1)
    greedy_match_mean_min: float | None = Field(None, ge=0)
    token_agreement_min: float | None = Field(1.0, ge=0, le=1)
    # greedy generation must stop where the model says EOS, and only there
    eos_agreement_min: float | None = Field(1.0, ge=0, le=1)
    # generation must compute what the teacher-forced pass measured (parity.py decode_agreement)
    decode_agreement_min: float | None = Field(1.0, ge=0, le=1)
    # KLD after any position may be at most this many times KLD before it, over the same texts
    # (parity.position_drift): degradation that starts where no landmark of the config says
    kld_drift_max: float | None = Field(DEFAULT_KLD_DRIFT_MAX, ge=1)


# thresholds.backends.<name>: the same bounds, each absent unless given (then it wins for that
# backend over the recipe's general one)
BoundOverrides = create_model(
    "BoundOverrides", __base__=Strict,
    **{name: (f.annotation, FieldInfo.merge_field_infos(f, default=None))
       for name, f in Bounds.model_fields.items()})


class Thresholds(Bounds):
    # one recipe, several backends whose honest error differs: a bound for one of them
    backends: dict[str, BoundOverrides] = Field(default_factory=dict)

    def bounds(self) -> dict[str, float | None]:
        """The bounds alone (what the parity engine checks)."""
        return self.model_dump(exclude={"backends"})


# A recipe or target name becomes part of a directory name (dist/{recipe}-{target}) and a
# service name on a device: a name, never a path or a shell word (the bundle's rule too).


class Recipe(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; "
                      "at most 100 characters, starting with a letter or digit")
    description: str = ""
    source: str = Field(description="HF hub id (org/name) or local checkpoint directory")
    revision: str | None = None
    # Set only by --trust-remote-code (load_recipe refuses it in a file): running code shipped
    # with a checkpoint must be the decision of whoever runs phikit, not of a recipe.
    trust_remote_code: bool = False
    context_length: int | None = Field(None, ge=16, description="tokens the bundle serves "
                                       "(KV cache size); default: the model's maximum")
    quantization: Quantization
    eval: EvalConfig
    thresholds: Thresholds = Thresholds()

    @property
    def source_is_local(self) -> bool:
        """A checkpoint directory on this machine (else a hub id, fetched at build time)."""
        return Path(self.source).is_dir()


class Platform(Strict):
    os: Literal["linux", "macos", "windows"]
    arch: Literal["x86_64", "aarch64", "arm64"]
    python: str = Field("3.11", pattern=r"^3\.\d+$")
    pip_platforms: list[str] = Field(description="pip --platform tags for the lock, best first")


class ExtraLock(Strict):
    """A second lock, e.g. the Linux CPU equivalent of a macOS bundle, used to test it here."""

    file: str = Field(pattern=r"^requirements-[\w.-]+\.lock$")
    platform: Platform
    packages: list[str] = Field(min_length=1)


class Runtime(Strict):
    packages: dict[str, list[str]] = Field(
        description="per backend: the distributions its runner imports on this platform")
    extra_locks: dict[str, list[ExtraLock]] = Field(default_factory=dict)
    source_builds: list[str] = Field(
        default_factory=list, description="distributions with no wheel for this platform: the "
        "lock pins their source package by sha256 and the device compiles it")
    without_dependencies: list[str] = Field(
        default_factory=list, description="distributions locked without their declared "
        "dependencies, which the runner never imports (tokenizers declares huggingface-hub, "
        "whose pyyaml has no Windows-on-Arm wheel)")
    threads: int | Literal["auto"] = "auto"
    options: dict[str, Any] = Field(default_factory=dict)


class Target(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'")
    description: str = ""
    device: Literal["cpu", "gpu", "npu"]
    backend: str = Field(description="default backend")
    backends: list[str] = Field(default_factory=list, description="allowed backends")
    execution_provider: str = "cpu"
    precisions: list[Precision] = Field(min_length=1)
    platform: Platform
    runtime: Runtime
    memory_budget_mb: int | None = Field(None, ge=1)

    def allowed_backends(self) -> list[str]:
        return self.backends or [self.backend]


def _node_at(root: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    """Walk the composed YAML tree along a pydantic error location; the deepest node found."""
    node = root
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    node = v if key != loc[-1] else k
                    break
            else:
                return node
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node
    return node


def _line(root: yaml.Node | None, loc: tuple) -> int | None:
    node = _node_at(root, loc)
    return node.start_mark.line + 1 if node is not None else None


# Recipes and targets are small hand-written files: anything larger, deeper or with YAML aliases
# (which expand: a "billion laughs" document) is refused before it is built into objects.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 32


def _check_yaml_shape(text: str, path: Path) -> None:
    """Walk the YAML event stream (no objects built, no recursion): refuse aliases and nesting
    deeper than MAX_YAML_DEPTH, naming the line."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark else None
        if isinstance(event, yaml.AliasEvent):
            raise PhikitError("YAML aliases (*name) are not accepted in phikit files: write "
                              "the value out", file=path, line=line)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise PhikitError(f"nested deeper than {MAX_YAML_DEPTH} levels", file=path,
                                  line=line)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _unbuildable_scalar(root: yaml.Node | None, path: Path) -> PhikitError:
    """The first scalar, in document order, that PyYAML's safe constructor cannot make a value
    of: an integer longer than Python converts (4300 digits), a timestamp that is no date."""
    constructor = yaml.constructor.SafeConstructor()
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())] if root is not None else []
    while stack:
        node, loc = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                stack += [(value, loc + (key.value,)), (key, loc + (key.value,))]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(value, loc + (i,)) for i, value in reversed(list(enumerate(node.value)))]
        elif node.tag in constructor.yaml_constructors:
            try:
                constructor.yaml_constructors[node.tag](constructor, node)
            except (ValueError, OverflowError) as e:
                # an int's only failure: more digits than Python converts from text
                why = (f"an integer of {sum(c.isdigit() for c in node.value)} digits: longer "
                       "than any value phikit reads" if node.tag == "tag:yaml.org,2002:int"
                       else f"{node.value[:40]!r} is not a valid "
                       f"{node.tag.rsplit(':', 1)[-1]} ({str(e).splitlines()[0][:120]})")
                return PhikitError(why, file=path, line=node.start_mark.line + 1,
                                   field=".".join(map(str, loc)) or None)
    return PhikitError("a value PyYAML cannot read", file=path)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        if not path.is_file():
            raise PhikitError("file not found" if not path.exists() else
                              "not a regular file", file=path)
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise PhikitError(f"larger than {MAX_YAML_BYTES} bytes: not a recipe or target",
                              file=path)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PhikitError(f"cannot read: {e}", file=path) from None
    try:
        _check_yaml_shape(text, path)
        root = yaml.compose(text)
        try:
            return yaml.safe_load(text), root
        except (ValueError, OverflowError):
            # a scalar the constructor cannot make a value of: name it, not the traceback
            raise _unbuildable_scalar(root, path) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise PhikitError(f"invalid YAML: {e.problem or e.context}", file=path,
                          line=mark.line + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise PhikitError(f"invalid YAML: {e}", file=path) from None


M = TypeVar("M", bound=BaseModel)


def validate_document(path: Path, model: type[M], data: Any,
                      root: yaml.Node | None = None) -> M:
    """`data`, read from the file at `path`, as `model`; else a PhikitError naming the file and
    the field of every problem (and its line, given the YAML tree `root`)."""
    if not isinstance(data, dict):
        raise PhikitError(f"expected a mapping of {model.__name__.lower()} fields", file=path, line=1)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # every problem at once, the first as the error's own place, each with its line
        problems = [_problem(path, model, err, root) for err in e.errors()[:MAX_PROBLEMS]]
        first = problems[0]
        more = [str(p) for p in problems[1:]]
        if len(e.errors()) > MAX_PROBLEMS:
            more.append(f"... and {len(e.errors()) - MAX_PROBLEMS} more")
        message = first.message + "".join(f"\n  {m}" for m in more)
        raise PhikitError(message, file=path, line=first.line, field=first.field) from None


MAX_PROBLEMS = 10


def _problem(path: Path, model: type[BaseModel], err: dict, root: yaml.Node | None) -> PhikitError:
    """One validation error as file:line, field and message, with a hint where one helps."""
    loc = tuple(err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
        parent: Any = model
        for key in loc[:-1]:  # the model that owns the mistyped key: suggest its fields
            field = getattr(parent, "model_fields", {}).get(key)
            parent = getattr(field, "annotation", None) if field else None
        known = list(getattr(parent, "model_fields", {}) or {})
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            msg += f" (did you mean '{close[0]}'?)"
        elif known:
            msg += f" (known: {', '.join(known)})"
    elif err["type"] == "literal_error":
        msg = f"{err['msg']} (got {err['input']!r})"
    elif err["type"] == "missing":
        msg = "required field missing"
    return PhikitError(msg, file=path, line=_line(root, loc), field=".".join(map(str, loc)))


SHIPPED = "phikit:"  # a file phikit ships (toolkit/data), the same on every machine


def _existing_file(yaml_path: Path, root: yaml.Node | None, loc: tuple, value: Path) -> Path:
    if str(value).startswith(SHIPPED):
        value = data_file(str(value)[len(SHIPPED):])
    full = value if value.is_absolute() else yaml_path.parent / value
    if not full.is_file():
        what = "not a regular file" if full.exists() else "file not found"
        raise PhikitError(f"{what}: {full}", file=yaml_path, line=_line(root, loc),
                          field=".".join(loc))
    return full.resolve()


def load_recipe(path: str | Path, *, source_override: str | None = None) -> Recipe:
    path = Path(path)
    data, root = _read_yaml(path)
    if isinstance(data, dict) and "trust_remote_code" in data:
        raise PhikitError("cannot be set in a recipe: pass --trust-remote-code on the command "
                          "line (running a checkpoint's own code is the user's decision)",
                          file=path, line=_line(root, ("trust_remote_code",)),
                          field="trust_remote_code")
    recipe = validate_document(path, Recipe, data, root)
    quant = recipe.quantization
    for name in recipe.thresholds.backends:
        loc = ("thresholds", "backends", name)
        if OPTION_MODELS and name not in OPTION_MODELS:
            raise PhikitError(f"no backend {name!r} (known: {', '.join(sorted(OPTION_MODELS))})",
                              file=path, line=_line(root, loc), field=".".join(loc))
    for name, raw in quant.options.items():
        loc = ("quantization", "options", name)
        if OPTION_MODELS and name not in OPTION_MODELS:
            raise PhikitError(f"no backend {name!r} (known: {', '.join(sorted(OPTION_MODELS))})",
                              file=path, line=_line(root, loc), field=".".join(loc))
        try:
            if name in OPTION_MODELS:
                OPTION_MODELS[name].read(raw, ".".join(loc))
        except PhikitError as e:
            model = OPTION_MODELS[name]
            key = (e.field.split(".")[3:4] if e.field else []) or [
                k for k in (raw if isinstance(raw, dict) else {}) if k not in model.model_fields][:1]
            raise PhikitError(e.message, file=path, line=_line(root, (*loc, *key)),
                              field=e.field) from None
    if quant.calibration is not None:
        quant = quant.model_copy(update={"calibration": _existing_file(
            path, root, ("quantization", "calibration"), quant.calibration)})
    ev = recipe.eval.model_copy(update={"file": _existing_file(path, root, ("eval", "file"),
                                                               recipe.eval.file)})
    source = source_override or recipe.source
    beside = path.parent / source  # "models/x" is a hub id's shape too: a directory wins
    if source_override is None and HUB_ID.match(source) and beside.is_dir():
        source = str(beside.resolve())
    elif source_override is None and not HUB_ID.match(source):
        local = Path(source) if Path(source).is_absolute() else beside
        if not local.is_dir():
            raise PhikitError(f"not a directory and not a hub id (org/name): {source}", file=path,
                              line=_line(root, ("source",)), field="source")
        source = str(local.resolve())
    elif source_override is not None and not HUB_ID.match(source) and not Path(source).is_dir():
        raise PhikitError(f"--source: not a directory: {source}")
    elif source_override is not None and Path(source).is_dir():
        source = str(Path(source).resolve())
    return recipe.model_copy(update={"quantization": quant, "eval": ev, "source": source})


def load_target(path: str | Path, known_backends: set[str]) -> Target:
    path = Path(path)
    data, root = _read_yaml(path)
    target = validate_document(path, Target, data, root)
    for loc, name in [(("backend",), target.backend)] + [
            (("backends", i), b) for i, b in enumerate(target.backends)]:
        if name not in known_backends:
            raise PhikitError(f"unknown backend {name!r} (known: {', '.join(sorted(known_backends))})",
                              file=path, line=_line(root, loc), field=".".join(map(str, loc)))
    for name in target.allowed_backends():
        if not target.runtime.packages.get(name):
            raise PhikitError(f"no runtime packages for backend {name!r}", file=path,
                              line=_line(root, ("runtime", "packages")),
                              field=f"runtime.packages.{name}")
    if target.backends and target.backend not in target.backends:
        raise PhikitError(f"default backend {target.backend!r} is not in backends", file=path,
                          line=_line(root, ("backend",)), field="backend")
    return target
