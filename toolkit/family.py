"""The Phi-3 / Phi-3.5 family: each member's published traits, the remote-code rule, and the
support matrix (member x backend x precision) computed from the backends' own `support` checks.

Why a registry of published configs: a recipe names a hub id, and `phikit build --dry-run` must
plan (and refuse what cannot work) offline, before anything is downloaded. The fields below are
the ones converters key on, copied from each checkpoint's config.json on the hub; a local
download is always read from its own config.json instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import ModelInfo, model_info_from_config, read_model_info
from .errors import PhikitError
from .paths import EVALSETS_DIR, MODELS_DIR, REPO, TARGETS_DIR

if TYPE_CHECKING:  # schema imports stay local at run time, as elsewhere in this module
    from .schema import Recipe


_MINI = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
         "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
         "original_max_position_embeddings": 4096, "sliding_window": 2047}
_LONGROPE = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
             "rope_scaling": {"type": "longrope"}}
_MEDIUM = {**_MINI, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
           "num_attention_heads": 40, "num_key_value_heads": 10}
_SMALL = {"architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
          "hidden_size": 4096, "ff_intermediate_size": 14336, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 100352,
          "max_position_embeddings": 8192, "original_max_position_embeddings": 8192,
          "auto_map": {"AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM"}}
_VISION = {**_MINI, **_LONGROPE, "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v",
           "sliding_window": 262144,
           "auto_map": {"AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}}


@dataclass(frozen=True)
class Member:
    name: str
    trait: str  # what converters get wrong about it
    hub_id: str | None  # None for the embedded fixtures
    config: dict[str, Any]
    fixture: str | None = None  # the tiny trained model with the same trait

    def info(self) -> ModelInfo:
        if self.hub_id is None:
            return read_model_info(MODELS_DIR / self.name)
        return model_info_from_config(self.config, self.hub_id)


MEMBERS = [
    Member("Phi-3-mini-4k-instruct", "sliding window 2047", "microsoft/Phi-3-mini-4k-instruct",
           _MINI, "tiny-phi3"),
    Member("Phi-3-mini-128k-instruct", "LongRoPE 4k -> 128k",
           "microsoft/Phi-3-mini-128k-instruct", {**_MINI, **_LONGROPE, "sliding_window": 262144},
           "tiny-phi3-longrope"),
    Member("Phi-3.5-mini-instruct", "LongRoPE 4k -> 128k", "microsoft/Phi-3.5-mini-instruct",
           {**_MINI, **_LONGROPE, "sliding_window": 262144}, "tiny-phi3-longrope"),
    Member("Phi-3-medium-4k-instruct", "GQA 40 heads / 10 KV heads",
           "microsoft/Phi-3-medium-4k-instruct", _MEDIUM, "tiny-phi3-gqa"),
    Member("Phi-3-medium-128k-instruct", "GQA + LongRoPE", "microsoft/Phi-3-medium-128k-instruct",
           {**_MEDIUM, **_LONGROPE, "sliding_window": 131072}, "tiny-phi3-gqa"),
    Member("Phi-3.5-MoE-instruct", "16 experts top-2 + LongRoPE", "microsoft/Phi-3.5-MoE-instruct",
           {"architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "hidden_size": 4096,
            "intermediate_size": 6400, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_local_experts": 16, "num_experts_per_tok": 2,
            "vocab_size": 32064, **_LONGROPE, "sliding_window": 131072}, "tiny-phimoe"),
    Member("Phi-3-small-8k-instruct", "remote code (tiktoken, block-sparse attention)",
           "microsoft/Phi-3-small-8k-instruct", _SMALL),
    Member("Phi-3-small-128k-instruct", "remote code + LongRoPE",
           "microsoft/Phi-3-small-128k-instruct",
           {**_SMALL, "max_position_embeddings": 131072, "rope_scaling": {"type": "longrope"}}),
    Member("Phi-3-vision-128k-instruct", "remote code, image encoder",
           "microsoft/Phi-3-vision-128k-instruct", _VISION),
    Member("Phi-3.5-vision-instruct", "remote code, image encoder",
           "microsoft/Phi-3.5-vision-instruct", _VISION),
    Member("tiny-phi3", "embedded fixture (Phi-3-mini shape)", None, {}),
    Member("tiny-phi3-longrope", "fixture: LongRoPE 64 -> 512, window 47", None, {}),
    Member("tiny-phi3-gqa", "fixture: 8 heads / 2 KV heads, window 47", None, {}),
    Member("tiny-phimoe", "fixture: 4 experts top-2, LongRoPE, window 47", None, {}),
]
BY_HUB_ID = {m.hub_id.lower(): m for m in MEMBERS if m.hub_id}


def known_info(source: str) -> ModelInfo | None:
    """The model's traits without downloading it: its own config.json for a local directory,
    the published config for a known hub id, else None (read after the download)."""
    if Path(source).is_dir():
        return read_model_info(Path(source))
    member = BY_HUB_ID.get(source.lower())
    return member.info() if member else None


def needs_remote_code(info: ModelInfo) -> bool:
    """Is the architecture missing from transformers, so that loading it would import Python
    files shipped with the checkpoint (its config's auto_map)?"""
    if info.model_type not in TRANSFORMERS_NATIVE:
        # importing transformers' config registry takes seconds: only for a type not known here
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if info.model_type not in CONFIG_MAPPING_NAMES:
            return True
    return bool(info.raw.get("auto_map")) and info.architecture in REMOTE_ONLY


REMOTE_ONLY = {"Phi3SmallForCausalLM", "Phi3VForCausalLM"}
# model types that the pinned transformers implements (tests/test_family.py holds it to that)
TRANSFORMERS_NATIVE = frozenset({"phi3", "phimoe"})


def check_remote_code(info: ModelInfo | None, trusted: bool, source: str) -> None:
    """Refuse, before any work, a checkpoint that needs remote code unless the user said so."""
    if info is None or trusted or not needs_remote_code(info):
        return
    raise PhikitError(
        f"{source} is {info.architecture}, which transformers does not include: loading it "
        "means running remote code (the Python files the checkpoint ships, named by its "
        "config's auto_map). phikit never runs remote code by default. Read that code, then "
        "pass --trust-remote-code to let transformers (the reference) and the converter import "
        "and execute it.")


# --- the support matrix --------------------------------------------------------------------

MATRIX_PRECISIONS = ("int4", "int8", "fp32")


def matrix_recipe(backend, info: ModelInfo, source: str, precision: str,
                  eval_file: Path) -> Recipe:
    """The recipe a matrix cell is asked about: the backend's usual form of the precision
    (its matrix_form hook)."""
    from .schema import EvalConfig, Quantization, Recipe

    quant, fields = backend.matrix_form(info, precision)
    return Recipe(name="matrix", source=source, quantization=Quantization(**quant),
                  eval=EvalConfig(file=eval_file), **fields)


@dataclass(frozen=True)
class Cell:
    member: str
    backend: str
    precision: str
    reason: str | None  # None: supported
    context_cap: int | None = None  # supported only up to this many tokens

    @property
    def supported(self) -> bool:
        return self.reason is None


def support_matrix() -> list[Cell]:
    """Every member x backend x precision, answered by the same checks `phikit build` runs."""
    from .backends import BACKENDS
    from .backends.common import with_block_size
    from .schema import load_target

    cells = []
    # each backend is shown on the target a user would pick it for
    targets = {name: load_target(TARGETS_DIR / f"{b.home_target}.yaml", set(BACKENDS))
               for name, b in BACKENDS.items()}
    eval_file = EVALSETS_DIR / "tiny-phi3.jsonl"
    for member in MEMBERS:
        try:
            info = member.info()
        except PhikitError as e:  # a fixture not generated yet
            for b in BACKENDS:
                cells += [Cell(member.name, b, p, f"no checkpoint: {e}") for p in MATRIX_PRECISIONS]
            continue
        for name, backend in BACKENDS.items():
            target = targets[name]
            for precision in MATRIX_PRECISIONS:
                recipe = with_block_size(matrix_recipe(
                    backend, info, member.hub_id or str(MODELS_DIR / member.name), precision,
                    eval_file), backend, target)
                cap = None
                if precision not in target.precisions:
                    reason = f"target {target.name} does not allow {precision}"
                else:
                    reason = backend.support(info, target, recipe)
                    window = info.sliding_window
                    if reason and window:
                        # a backend that ignores the window may still serve up to it
                        capped = recipe.model_copy(update={
                            "context_length": int(window) + 1, "eval": recipe.eval.model_copy(
                                update={"max_tokens": min(recipe.eval.max_tokens, window + 1)})})
                        if backend.support(info, target, capped) is None:
                            reason, cap = None, int(window) + 1
                cells.append(Cell(member.name, name, precision, reason, cap))
    return cells


def matrix_rows(cells: list[Cell]) -> tuple[list[str], list[list[str]], dict[str, str]]:
    """(header, rows, footnotes): one row per member, one column per backend; a cell lists the
    supported precisions, or a footnote number with the reason."""
    from .backends import BACKENDS

    notes: dict[str, str] = {}
    remote = {m.name for m in MEMBERS if _safe_remote(m)}
    header = ["member", "trait"] + [f"{n} ({b.home_target})" for n, b in BACKENDS.items()]
    rows = []
    for member in MEMBERS:
        row = [member.name + (" †" if member.name in remote else ""), member.trait]
        for b in BACKENDS:
            mine = [c for c in cells if c.member == member.name and c.backend == b]
            ok = [c.precision for c in mine if c.supported]
            refused = [c for c in mine if not c.supported]
            caps = {c.context_cap for c in mine if c.supported and c.context_cap}
            parts = [" ".join(ok) + "".join(f" (≤ {cap} tokens)" for cap in caps)] if ok else []
            for c in refused:
                key = notes.setdefault(c.reason, str(len(notes) + 1))
                label = f"[{key}]" if len(refused) == len(mine) else f"{c.precision} no [{key}]"
                if label not in parts:
                    parts.append(label)
            row.append("; ".join(parts) if ok else "no " + " ".join(parts))
        rows.append(row)
    return header, rows, {v: k for k, v in notes.items()}


def _safe_remote(member: Member) -> bool:
    try:
        return needs_remote_code(member.info())
    except PhikitError:
        return False


def matrix_markdown() -> str:
    header, rows, notes = matrix_rows(support_matrix())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    lines.append("Cells list the precisions `phikit build` accepts; `no [n]` means refused "
                 "before conversion, for reason n; `(≤ N tokens)`: only with the recipe's "
                 "`context_length` (and `eval.max_tokens`) at most N, because the backend "
                 "ignores the sliding window. † needs `--trust-remote-code`.")
    lines.append("")
    lines += [f"{n}. {reason}" for n, reason in sorted(notes.items(), key=lambda kv: int(kv[0]))]
    return "\n".join(lines) + "\n"


def update_matrix_doc(readme: Path = REPO / "docs" / "family.md") -> None:
    """Regenerate docs/family.md's matrix section (between its begin/end markers) from the code."""
    text = readme.read_text(encoding="utf-8")
    begin, end = "<!-- matrix:begin -->\n", "<!-- matrix:end -->"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + matrix_markdown() + end + tail, encoding="utf-8")
