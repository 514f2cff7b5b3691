"""The Phi-3 / Phi-3.5 family without conversions: remote-code refusal, every real checkpoint's
recipe planning offline, the support matrix (and docs/family.md's copy of it), position bands."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO, phikit
from toolkit.family import BY_HUB_ID, matrix_markdown
from toolkit.parity import evaluate, log_softmax
from toolkit.reference import PromptRef, Reference, TextRef
from toolkit.schema import Thresholds

REAL_RECIPES = sorted(p for p in (REPO / "recipes").glob("phi-3*.yaml"))


def _documented_dry_run(recipe: Path) -> list[str]:
    """The dry-run command each real recipe's header documents."""
    m = re.search(r"`phikit build (\S+) (.*?)--dry-run`", recipe.read_text().replace("\n# ", " "))
    assert m, f"{recipe.name}: no documented dry-run command"
    return [m.group(1), *m.group(2).split(), "--dry-run"]


@pytest.mark.parametrize("recipe", REAL_RECIPES, ids=lambda p: p.stem)
def test_every_real_checkpoint_recipe_plans_offline(recipe):
    proc = phikit("build", *_documented_dry_run(recipe), check=0)
    assert "plan" in proc.stdout and "convert" in proc.stdout


def test_every_family_member_has_a_recipe():
    sources = {re.search(r"^source: (\S+)", p.read_text(), re.M).group(1).lower()
               for p in REAL_RECIPES}
    assert set(BY_HUB_ID) <= sources, set(BY_HUB_ID) - sources


def _published_small(tmp_path: Path) -> Path:
    ckpt = tmp_path / "phi-3-small"
    ckpt.mkdir()
    cfg = dict(BY_HUB_ID["microsoft/phi-3-small-8k-instruct"].config)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt


def test_remote_code_is_refused_before_any_work(tmp_path):
    ckpt = _published_small(tmp_path)
    out = tmp_path / "bundle"
    proc = phikit("build", "recipes/phi-3-small-8k-instruct-int4.yaml", "--source", ckpt,
                  "--target", "apple-metal", "--out", out, check=2)
    assert "remote code" in proc.stderr and "--trust-remote-code" in proc.stderr
    assert "Phi3SmallForCausalLM" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    # validation loads the reference with transformers: the same rule, before loading anything
    proc = phikit("validate", REPO / "models" / "tiny-phi3", "--reference", ckpt, check=2)
    assert "remote code" in proc.stderr


def test_the_types_taken_as_native_are_in_transformers():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from toolkit.family import TRANSFORMERS_NATIVE

    assert TRANSFORMERS_NATIVE <= set(CONFIG_MAPPING_NAMES)


def test_remote_code_cannot_be_switched_on_by_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = (REPO / "recipes" / "phi-3-small-8k-instruct-int4.yaml").read_text()
    recipe.write_text(text.replace("name: ", "trust_remote_code: true\nname: ", 1)
                      .replace("../evalsets", str(REPO / "evalsets")))
    proc = phikit("build", recipe, "--target", "apple-metal", "--dry-run", check=2)
    assert "trust_remote_code" in proc.stderr and "--trust-remote-code" in proc.stderr
    assert re.search(r"r\.yaml:\d+:", proc.stderr), proc.stderr


def test_unsupported_combination_fails_before_conversion_with_the_reason(tmp_path):
    proc = phikit("build", "recipes/phi-3.5-moe-instruct-int4.yaml", "--target", "generic-cpu",
                  "--out", tmp_path / "b", check=2)
    assert "longrope RoPE style is not currently supported" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_the_matrix_doc_is_generated_from_the_code():
    doc = (REPO / "docs" / "family.md").read_text()
    m = re.search(r"<!-- matrix:begin -->\n(.*?)<!-- matrix:end -->", doc, re.S)
    assert m, "docs/family.md has no generated matrix section"
    assert m.group(1) == matrix_markdown(), "docs/family.md's matrix is stale: make matrix"


def test_list_matrix_prints_every_member():
    proc = phikit("list", "--matrix", check=0)
    for name in ("Phi-3.5-MoE", "Phi-3-small-8k", "tiny-phimoe"):
        assert name in proc.stdout


# --- position bands: a candidate wrong only past a landmark fails there --------------------

class _FakeSession:
    """Returns the reference's own distribution, perturbed from position `wrong_from` on."""

    def __init__(self, logp: dict[tuple, np.ndarray], wrong_from: int | None):
        self.logp, self.wrong_from = logp, wrong_from

    def logits(self, ids, start=0):
        if tuple(ids) not in self.logp:  # a prompt + its generation: predict what was generated
            out = np.full((len(ids), 64), -10.0)
            out[np.arange(len(ids) - 1), ids[1:]] = 0.0
            return out[start:]
        out = self.logp[tuple(ids)].copy()
        if self.wrong_from is not None:
            out[self.wrong_from:] = np.roll(out[self.wrong_from:], 1, axis=-1)
        return out

    def tokenize(self, text):
        return [int(t) for t in text.split()]

    def detokenize(self, ids):
        return " ".join(map(str, ids))

    def generate(self, prompt, sampling):
        yield from [1, 2, 3]

    def info(self):
        return {"runtime": "fake"}


def _reference(rng, n_texts=3, length=120, vocab=50):
    texts, logp = [], {}
    for i in range(n_texts):
        ids = rng.integers(0, vocab, length)
        lp = log_softmax(rng.normal(0, 3, (length, vocab)))
        order = np.argsort(-lp, axis=-1)
        texts.append(TextRef(f"t{i}", ids.astype(np.int32), order.astype(np.int32),
                             np.take_along_axis(lp, order, -1).astype(np.float32),
                             lp[np.arange(length - 1), ids[1:]].astype(np.float32)))
        logp[tuple(ids.tolist())] = lp
    prompts = [PromptRef("p0", np.arange(60, dtype=np.int32), np.array([1, 2, 3], np.int32),
                         False)]
    meta = {"landmarks": {"sliding_window": 47, "original_length": 64}}
    return Reference(texts, prompts, meta), logp


def _evalset(ref):
    rows = [SimpleNamespace(id=t.id, kind="text", value=" ".join(map(str, t.ids.tolist())))
            for t in ref.texts]
    rows.append(SimpleNamespace(id="p0", kind="prompt", value=" ".join(map(str, range(60)))))
    return SimpleNamespace(rows=rows, path=Path("e.jsonl"), sha256="0")


@pytest.mark.parametrize("wrong_from, failing_band", [(None, None), (47, "past_window"),
                                                      (64, "past_original")])
def test_bands_fail_where_the_candidate_is_wrong(wrong_from, failing_band):
    ref, logp = _reference(np.random.default_rng(0))
    thresholds = Thresholds(kld_mean_max=0.5, top1_min=0.6)
    report = evaluate(_FakeSession(logp, wrong_from), ref, _evalset(ref), thresholds, 3)
    bands = {b.name: b for b in report.bands}
    assert set(bands) == {"before_window", "past_window", "before_original", "past_original"}
    assert bands["past_original"].positions == 3 * (120 - 64)
    assert bands["past_original"].prompts == 0 and bands["past_window"].prompts == 1
    failed = {c.metric for c in report.checks if not c.passed}
    if failing_band is None:
        assert report.verdict == "pass", failed
        return
    assert f"kld_mean[{failing_band}]" in failed
    assert "kld_mean[before_window]" not in failed
    detail = next(c.detail for c in report.checks if c.metric == f"kld_mean[{failing_band}]")
    assert f"positions >= {wrong_from}" in detail and "worst text" in detail
