"""Parity, typed: the engine is runner/parity_core.py (standard library + numpy, shipped in every
bundle so a device measures with the same code); this module hands it phikit's eval set and
thresholds and returns its report as a ParityReport (report/model.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .evalset import EvalSet
from .report.model import Drift, ParityReport
from .runner import parity_core as core
from .runner.logprobs import log_softmax, topk_kld  # noqa: F401
from .runner.parity_core import (CHECKS, DECODE_TOLERANCE, _decode_problem,  # noqa: F401
                                 common_prefix, within)
from .runner.reference_data import Reference
from .runner.core import Session
from .schema import Thresholds


def evaluate(session: Session, ref: Reference, evalset: EvalSet, thresholds: Thresholds,
             max_new_tokens: int, progress=None) -> ParityReport:
    """The candidate against the reference; complete except what validate adds (timing, host,
    notes)."""
    rows = {r.id: r for r in evalset.rows}
    report = core.evaluate(session, ref, rows, thresholds.bounds(), max_new_tokens,
                           {"file": evalset.path.name, "sha256": evalset.sha256}, progress)
    return ParityReport.model_validate(report)


def position_drift(klds: list[np.ndarray], top1s: list[np.ndarray]) -> Drift | None:
    drift = core.position_drift(klds, top1s)
    return None if drift is None else Drift.model_validate(drift)


def drift_symptom(drift: Drift | dict[str, Any]) -> str:
    return core.drift_symptom(drift.model_dump() if isinstance(drift, Drift) else drift)
