"""The parity report: what `parity` measures, `validate` completes, `build` ships as parity.json
and every renderer reads. One typed model, versioned: `ParityReport.read` upgrades a report an
earlier phikit wrote (and refuses one from a later format) instead of each reader guessing.

Adding a metric: a field on `Metrics`, computed in `parity`, shown by a renderer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

# written by runner/parity_core.py (which ships in bundles): the same numbers on both sides
from ..runner.parity_core import KLD_HISTOGRAM_EDGES, REPORT_VERSION  # noqa: E402,F401

# REPORT_VERSION 1: before the version field (no position bands, decode or EOS checks, host or
# timing); 2: bands, landmarks, eos/decode problems, host; `version` written


class _Part(BaseModel):
    # every field is one this version knows: a misspelt or unknown key is an error where it is
    # written or read, never a value a renderer silently misses (a later format is refused by
    # its version; an earlier one upgraded by ParityReport.read)
    model_config = ConfigDict(extra="forbid")


class _Sparse(_Part):
    """A part whose unmeasured fields are absent from the JSON rather than null."""

    @model_serializer(mode="wrap")
    def _drop_unmeasured(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class Check(_Part):
    metric: str
    measured: float
    bound: float
    kind: Literal["max", "min"]
    passed: bool
    detail: str = ""

    @property
    def relation(self) -> str:
        return "≤" if self.kind == "max" else "≥"

    def describe(self, *, mark: bool = False, detail: bool = False) -> str:
        """`kld_mean 0.0312 (needs ≤ 0.02)`; with mark, `FAIL` / `ok  ` in front; with detail,
        where it is worst after it. The one wording of a check (terminal, JUnit, Markdown)."""
        line = f"{self.metric} {self.measured:.4g} (needs {self.relation} {self.bound:.4g})"
        if mark:
            line = f"{'ok  ' if self.passed else 'FAIL'} {line}"
        if detail and self.detail:
            line += f"  {self.detail}"
        return line

    def missed_by(self, value: float) -> bool:
        """Whether one text's or prompt's value is on the wrong side of this overall check's
        bound (what the renderers mark; the verdict is `passed`)."""
        return value > self.bound if self.kind == "max" else value < self.bound


class BandWorst(_Part):
    id: str
    kld_mean: float
    position: int


class Band(_Sparse):
    name: str
    description: str
    start: int
    end: int | None = None
    positions: int = 0
    checked: bool = False
    kld_mean: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    worst: BandWorst | None = None
    prompts: int | None = None
    greedy_match_mean: float | None = None

    @model_serializer(mode="wrap")
    def _drop_unmeasured(self, handler):
        data = handler(self)  # `end: null` means open-ended: always written
        return {k: v for k, v in data.items() if v is not None or k == "end"}


class Metrics(_Sparse):
    positions: int = 0
    texts: int = 0
    prompts: int = 0
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_p999: float | None = None  # the tail a few broken positions in thousands live in
    kld_max: float | None = None
    top1: float | None = None
    ppl_reference: float | None = None
    ppl_candidate: float | None = None
    ppl_ratio: float | None = None
    ppl_delta: float | None = None
    kld_histogram: list[int] | None = None
    greedy_match_mean: float | None = None
    greedy_match_min: int | None = None
    greedy_exact: float | None = None
    token_agreement: float | None = None
    eos_agreement: float | None = None
    decode_agreement: float | None = None
    decode_checked_prompts: int | None = None
    # KLD after a position / KLD before it, at the worst split (parity.position_drift)
    kld_drift: float | None = None
    kld_drift_from: int | None = None
    # positions the eval reached (the longest text, or prompt + generation) and the context the
    # bundle claims to serve (validate.py: a note where the first is short of the second)
    context_reached: int | None = None
    context_claimed: int | None = None

    def scalars(self) -> dict[str, float | int]:
        """Every measured number (the manifest's summary): no lists."""
        return {k: v for k, v in self.model_dump().items() if not isinstance(v, list)}


class TextRow(_Part):
    id: str
    tokens: int
    kld_mean: float
    kld_max: float
    kld_max_position: int
    top1: float
    top1_by_position: list[int] = []


class DriftWindow(_Part):
    start: int
    end: int
    positions: int
    kld_mean: float
    top1: float


class DriftSplit(_Part):
    position: int
    texts: int
    kld_before: float
    kld_after: float
    ratio: float


class Drift(_Part):
    """KLD and top-1 over successive position windows (the plot), and the ratio of KLD after
    each window boundary to KLD before it over the same texts (the check): quantization error is
    flat in position, a long-context defect rises from wherever it starts."""
    window: int
    floor: float
    windows: list[DriftWindow] = []
    splits: list[DriftSplit] = []

    @property
    def worst(self) -> DriftSplit | None:
        return max(self.splits, key=lambda s: s.ratio, default=None)


class PromptRow(_Sparse):
    id: str
    match: int
    prompt_tokens: int
    candidate_ids: list[int]
    reference_ids: list[int]
    common_text: str | None = None  # absent in reports before it existed: renderers compare text
    reference_tokens: int
    candidate_tokens: int
    exact: bool
    reference_text: str = ""
    candidate_text: str = ""


class Problem(_Part):
    id: str
    problem: str


class TokenizerSummary(_Part):
    rows: int
    identical: int
    chat_rows: int = 0


class EvalSetRef(_Part):
    file: str
    sha256: str


class ParityReport(_Sparse):
    version: int = REPORT_VERSION
    verdict: Literal["pass", "fail"]
    checks: list[Check]
    metrics: Metrics
    bands: list[Band] = []
    drift: Drift | None = None
    landmarks: dict[str, int] = {}
    thresholds: dict[str, float | None] = {}
    texts: list[TextRow] = []
    prompts: list[PromptRow] = []
    # two shapes (tokenization / decoding differ); renderers show their fields as given
    tokenizer_mismatches: list[dict[str, Any]] = []
    eos_problems: list[Problem] = []
    decode_problems: list[Problem] = []
    tokenizer: TokenizerSummary | None = None
    candidate: dict[str, Any] = {}  # what the runtime says about itself (free-form, per runtime)
    reference: dict[str, Any] = {}
    evalset: EvalSetRef | None = None
    # completed by validate
    timing: dict[str, float] = {}
    artifact: str | None = None
    host: dict[str, Any] = {}
    emulation: dict[str, Any] | None = None
    reused: dict[str, Any] | None = None  # a build's cached validation: key, measured_at
    # completed by run.py validate on a device (runner/device.py): which bundle it validated,
    # in the manifest's shape, and the runtime options in force there
    bundle: dict[str, Any] | None = None
    runtime_options: dict[str, Any] = {}
    notes: list[str] = []

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def check(self, metric: str) -> Check | None:
        return next((c for c in self.checks if c.metric == metric), None)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def read(cls, data: Any) -> ParityReport:
        """A report from JSON, upgraded from an earlier version. ValueError names what is wrong
        (the caller adds the file)."""
        if not isinstance(data, dict) or "verdict" not in data or "checks" not in data:
            raise ValueError("not a parity report (no verdict / checks)")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > REPORT_VERSION:
            raise ValueError(f"report version {version!r} is newer than this phikit reads "
                             f"({REPORT_VERSION}): upgrade phikit")
        data = {**data, "version": REPORT_VERSION}  # v1 -> v2: the new parts default to empty
        data.setdefault("metrics", {})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None
