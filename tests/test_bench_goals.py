"""`make bench`'s goal table (bench/runtime.py): each CPU target's default int4 bundle marked met /
NOT MET against the other engines of the run, never against itself measured in another process.
Synthetic figures; the measurements are the bench's, not the test's."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import runtime  # noqa: E402  (bench/runtime.py)

ORT = {"allow_spinning": True, "threads": "auto"}


def row(decode: float, prefill: float, roof: float, configuration: dict) -> dict:
    return {"decode_tok_s": decode, "prefill_128_ms": prefill, "prefill_1024_ms": 8 * prefill,
            "decode_x_roofline": roof, "configuration": configuration}


def verdicts(rows: dict) -> dict[str, dict]:
    return {g["target"]: g for g in runtime.goals(rows)}


def test_a_default_is_not_measured_against_itself_in_another_process():
    rows = {"onnx-int4": row(90.0, 300, 0.90, ORT),
            # the same artifact and executed configuration, faster by the run's spread
            "onnx-int4-spin": row(95.0, 280, 0.95, ORT),
            "gguf-int4": row(80.0, 320, 0.70, {"extra_buffer_types": True, "threads": "auto"})}
    generic = verdicts(rows)["generic-cpu"]
    assert generic["engine"] == "onnx-int4"
    assert generic["decode_best_other"] == "gguf-int4"
    assert generic["decode_met"] and generic["prefill_met"]


def test_a_faster_configuration_of_the_same_bundle_is_a_rival():
    rows = {"onnx-int4": row(90.0, 300, 0.90, ORT),
            "onnx-int4-no-spin": row(95.0, 280, 0.95, {**ORT, "allow_spinning": False}),
            "onnx-int4-1-thread": row(60.0, 500, 0.60, {**ORT, "threads": 1})}
    generic = verdicts(rows)["generic-cpu"]
    assert generic["decode_best_other"] == "onnx-int4-no-spin"
    assert not generic["decode_met"] and not generic["prefill_met"]
    assert generic["prefill"][128] == ("onnx-int4-no-spin", 300 / 280)


def test_decode_under_the_roofline_goal_is_not_met_even_when_fastest():
    verdict = verdicts({"onnx-int4": row(90.0, 300, 0.84, ORT),
                        "torch-bf16": row(15.0, 400, 0.40, {"threads": "auto"})})["generic-cpu"]
    assert verdict["decode_best_other"] == "torch-bf16"
    assert not verdict["decode_met"] and verdict["prefill_met"]
