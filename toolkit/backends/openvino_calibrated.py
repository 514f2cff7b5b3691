"""Data-aware OpenVINO int4 export with local calibration text (run as a subprocess).

`optimum-cli export openvino --dataset` accepts hub dataset names only; optimum-intel's Python API
takes a list of strings. Same NNCF algorithms (AWQ, scale estimation, GPTQ, mixed precision by
sensitivity), same tokenizer export as the CLI (optimum's own export_tokenizer).

Usage: python -m toolkit.backends.openvino_calibrated '{"source": ..., "out": ..., ...}'
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def calibration_texts(path: Path, limit: int) -> list[str]:
    """Paragraphs (blank-line separated) of the calibration file, at most `limit`."""
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    return [p for p in paragraphs if len(p) > 20][:limit]


def main(spec: dict) -> None:
    from optimum.exporters.openvino.convert import export_tokenizer
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    source, out = spec["source"], Path(spec["out"])
    texts = calibration_texts(Path(spec["calibration"]), int(spec.get("num_samples") or 128))
    if not texts:
        sys.exit(f"{spec['calibration']}: no calibration paragraphs (need text split by blank lines)")
    config = OVWeightQuantizationConfig(
        bits=4, sym=spec["sym"], group_size=spec["group_size"], ratio=spec.get("ratio", 1.0),
        all_layers=spec.get("all_layers"), backup_precision=spec.get("backup_precision"),
        quant_method="awq" if spec.get("awq") else "default",
        scale_estimation=spec.get("scale_estimation"), gptq=spec.get("gptq"),
        sensitivity_metric=spec.get("sensitivity_metric"), dataset=texts, tokenizer=source,
        num_samples=len(texts))
    model = OVModelForCausalLM.from_pretrained(source, export=True, quantization_config=config,
                                               compile=False)
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(out)
    export_tokenizer(tokenizer, out, task="text-generation-with-past")
    if (Path(source) / "generation_config.json").is_file():
        shutil.copy2(Path(source) / "generation_config.json", out / "generation_config.json")


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
