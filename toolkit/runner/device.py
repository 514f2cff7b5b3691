"""`python run.py validate`: the bundle re-measures its parity on the machine it runs on.

The bundle carries everything needed without the checkpoint: the eval set, the reference's
figures (reference_data.py; the very ones the build validated against), the thresholds the
build resolved (manifest recipe.thresholds). The same engine as the build (parity_core.py)
runs the bundle's own runtime here, and the report has the build's format plus this machine:
CPU model, all its flags, OS. Exit 0 when every check passes, 1 when one does not.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from . import parity_core
from .core import (MANIFEST, BundleError, bundle_options, describe_tuned, host_summary,
                   open_bundle)
from .reference_data import load_reference, read_eval_rows


def validate_here(root: Path, out: Path | None, log=lambda s: print(s, file=sys.stderr),
                  overrides: dict[str, Any] | None = None, limit: int | None = None,
                  thresholds: dict[str, Any] | None = None, key: Path | None = None) -> int:
    """limit: the first N eval rows only (a slow device, an emulator); thresholds: bounds in
    place of the bundle's (a subset scatters more than the whole set they were set for); key:
    the trusted key (open_bundle)."""
    session, manifest = open_bundle(root, allow_failed=True, overrides=overrides, key=key)
    try:
        if manifest.reference_file is None:
            raise BundleError(f"{root}: this bundle carries no reference (built by a phikit "
                              "before 'reference_file'): rebuild it to validate on a device")
        if manifest.eval_file is None:
            raise BundleError(f"{root}: this bundle carries no eval set ({MANIFEST} has no "
                              "'eval_file'): rebuild it to validate on a device")
        recipe = manifest.recipe
        reference = load_reference(root / manifest.reference_file)
        rows = read_eval_rows(root / manifest.eval_file)
        total = len(rows)
        if limit:
            rows = {k: rows[k] for k in list(rows)[:limit]}
            reference.texts = [t for t in reference.texts if t.id in rows]
            reference.prompts = [p for p in reference.prompts if p.id in rows]
        given = thresholds
        thresholds = recipe.get("thresholds") or {} if given is None else given
        n = len(reference.texts) + len(reference.prompts)
        done = [0]

        def progress() -> None:
            done[0] += 1
            if done[0] % 4 == 0 or done[0] == n:
                log(f"validate: {done[0]}/{n} rows")

        start = time.perf_counter()
        report = parity_core.evaluate(
            session, reference, rows, thresholds, int(recipe["eval"]["max_new_tokens"]),
            {"file": Path(manifest.eval_file).name,
             "sha256": manifest.files[manifest.eval_file]}, progress)
    finally:
        if hasattr(session, "close"):
            session.close()
    report.update({
        "timing": {"candidate_seconds": round(time.perf_counter() - start, 2)},
        "artifact": "bundle, validated on the device by its own runner (run.py validate)",
        "host": host_summary(all_flags=True),
        # which bundle, in the manifest's own shape: a report read without its bundle names it
        "bundle": {"name": manifest.name, "backend": manifest.backend,
                   "created": manifest.created,
                   "recipe": {"quantization": {"precision": recipe["quantization"]["precision"]}},
                   "target": {"name": manifest.target.get("name")}},
        "notes": list(report["candidate"].get("notes", [])),
    })
    report["runtime_options"] = bundle_options(root, manifest, overrides)
    tuned = describe_tuned(root)
    if tuned:
        report["notes"].append(tuned)
    if limit and limit < total:
        report["notes"].append(f"validated on the first {limit} of the {total} eval rows")
    if given is not None:
        report["notes"].append("bounds given on the command line (--thresholds), not the "
                               "bundle's")
    for check in report["checks"]:
        mark = "ok  " if check["passed"] else "FAIL"
        relation = "<=" if check["kind"] == "max" else ">="
        log(f"{mark} {check['metric']} {check['measured']:.4g} (needs {relation} "
            f"{check['bound']:.4g}){'  ' + check['detail'] if check['detail'] else ''}")
    log(f"parity on this machine ({report['host']['cpu']}, {report['host']['os']}): "
        f"{report['verdict'].upper()}")
    if out is not None:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
        tmp.replace(out)  # a reader never sees half a report
    return 0 if report["verdict"] == "pass" else 1
