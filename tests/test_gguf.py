"""GGUF backend (llama.cpp) and the ollama target: tokenizer.model, conversion, quantization types,
importance matrix, tokenizer round-trip, Modelfile, runner, Raspberry Pi lock."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, build_bundle, phikit

RECIPE = REPO / "recipes" / "tiny-phi3-int4.yaml"


def eval_strings() -> list[str]:
    out = []
    for line in (REPO / "evalsets" / "tiny-phi3.jsonl").read_text().splitlines():
        row = json.loads(line)
        out += [m["content"] for m in row["messages"]] if "messages" in row else \
            [row.get("text") or row["prompt"]]
    return out


def type_recipe(tmp_path: Path, gguf_type: str, calibration: bool = False) -> Path:
    text = RECIPE.read_text().replace("../", f"{REPO}/")
    text = text.replace("name: tiny-phi3-int4", f"name: tiny-phi3-{gguf_type.lower()}")
    extra = "  calibration: %s/evalsets/tiny-phi3-calibration.txt\n" % REPO if calibration else ""
    text = text.replace("  symmetric: true\n", "  symmetric: true\n" + extra +
                        f"  options:\n    gguf:\n      type: {gguf_type}\n")
    path = tmp_path / f"{gguf_type}.yaml"
    path.write_text(text)
    return path


# --- fast: tokenizer.model and the support checks -------------------------------------------

def test_tokenizer_model_from_tokenizer_json_tokenizes_like_it(tmp_path):
    """SentencePiece with the written proto = tokenizers with tokenizer.json, on the eval set,
    Python sources and whitespace / unicode edge cases."""
    from toolkit.spm import compare_tokenization, write_tokenizer_model

    shutil.copy(TINY / "tokenizer.json", tmp_path / "tokenizer.json")
    write_tokenizer_model(tmp_path)
    texts = eval_strings() + [line for py in sorted((REPO / "toolkit").rglob("*.py"))
                              for line in py.read_text().splitlines()]
    texts += ["", " ", "  two leading", "trailing  ", "\ttab\n\nnewlines", "ünïcödé 中文 🙂 \x00",
              "a  b   c    d", "    0.5", "<|user|> not special to SentencePiece"]
    assert len(texts) > 3000
    assert compare_tokenization(tmp_path, texts) == []


def test_tokenizer_model_refuses_other_tokenizers(tmp_path):
    from toolkit.spm import UnsupportedTokenizer, write_tokenizer_model

    tok = json.loads((TINY / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedTokenizer, match="byte_fallback"):
        write_tokenizer_model(tmp_path)


@pytest.mark.parametrize("change, message", [
    ("  block_size: 32\n", "blocks of 32"),  # replaced by block 128 below
    ("      type: IQ2_XS\n", "needs an importance matrix"),
    ("      type: Q9_9\n", "unknown llama.cpp type"),
    ("      colour: blue\n", "unknown GGUF option"),
], ids=["block-size", "iq2-without-imatrix", "unknown-type", "unknown-option"])
def test_unsupported_gguf_recipes_fail_before_conversion(change, message, tmp_path):
    text = RECIPE.read_text().replace("../", f"{REPO}/")
    if "block_size" in change:
        text = text.replace(change, "  block_size: 128\n")
    else:
        text = text.replace("  symmetric: true\n", "  symmetric: true\n  options:\n    gguf:\n"
                            + change)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    proc = phikit("build", recipe, "--target", "ollama", "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr.replace("\n", " ") and "Traceback" not in proc.stderr


def test_plan_names_the_llama_cpp_type_and_exact_tokenizer():
    proc = phikit("build", "recipes/tiny-phi3-int4.yaml", "--target", "ollama", "--dry-run",
                  check=0)
    text = proc.stdout.replace("\n", " ")
    assert "Q4_0" in text and "token_agreement_min=1.0" in text
    proc = phikit("build", "recipes/phi-3-mini-4k-instruct-q4km.yaml", "--target", "ollama",
                  "--dry-run", check=0)
    assert "Q4_K_M" in proc.stdout and "importance matrix" in proc.stdout.replace("\n", " ")


# --- slow: real conversions -----------------------------------------------------------------

def parse_modelfile(path: Path) -> list[tuple[str, str]]:
    """Ollama's Modelfile grammar: INSTRUCTION args, args may be a \"\"\"multi-line\"\"\" string."""
    text, out = path.read_text(), []
    pattern = re.compile(r'^(?P<cmd>[A-Za-z]+)\s+(?P<arg>"""(?s:.*?)"""|[^\n]*)$', re.M)
    for line in re.sub(r'"""(?s:.*?)"""', lambda m: m[0].replace("\n", "\x00"), text).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = pattern.match(line.replace("\x00", "\n"))
        assert m, f"not a Modelfile instruction: {line!r}"
        out.append((m["cmd"].upper(), m["arg"].strip()))
    return out


def go_template_to_jinja(template: str) -> str:
    """The subset of Go's text/template the Modelfile uses, as Jinja (test-side rendering)."""
    t = template.strip('"')
    t = t.replace("{{- range .Messages }}", "{%- for m in Messages %}")
    t = t.replace("{{ end -}}", "{%- endfor %}").replace("{{ end }}", "{% endfor %}")
    return t.replace("{{ .Role }}", "{{ m.role }}").replace("{{ .Content }}", "{{ m.content }}")


@pytest.fixture(scope="session")
def ollama_bundle(dist) -> Path:
    return build_bundle(dist, "int4", "ollama")


@pytest.mark.slow
def test_ollama_bundle_validates_runs_and_reports_tokenizer(ollama_bundle, tmp_path):
    report_path = tmp_path / "r.json"
    proc = phikit("validate", ollama_bundle, "--json", report_path, check=0)
    assert "33 of 33 did" in proc.stdout.replace("\n", " ")
    report = json.loads(report_path.read_text())
    assert report["candidate"]["runtime"].startswith("llama.cpp")
    assert report["tokenizer"] == {"rows": 33, "identical": 33, "chat_rows": 12}
    assert {"metric": "token_agreement", "bound": 1.0} .items() <= \
        [c for c in report["checks"] if c["metric"] == "token_agreement"][0].items()
    run = subprocess.run([sys.executable, str(ollama_bundle / "run.py"), "--prompt",
                          "What does json.dumps do?", "--chat", "--max-tokens", "12"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr
    lock = (ollama_bundle / "requirements.lock").read_text()
    assert "llama-cpp-python==0.3.36" in lock and "built from source on the device" in lock
    assert "numpy==" in lock


@pytest.mark.slow
def test_modelfile_parses_and_renders_the_reference_ids(ollama_bundle):
    """The Modelfile's directives are Ollama's, FROM points at the GGUF, the stops are Phi-3's,
    and its TEMPLATE, tokenized the way Ollama does (llama.cpp, no rstrip emulation), gives the
    reference's ids on every chat row of the eval set."""
    import jinja2
    import llama_cpp
    from transformers import AutoTokenizer

    model = ollama_bundle / "model"
    directives = parse_modelfile(model / "Modelfile")
    known = {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"}
    assert {d for d, _ in directives} <= known
    assert ("FROM", "./model.gguf") in directives and (model / "model.gguf").is_file()
    params = [a for d, a in directives if d == "PARAMETER"]
    assert 'stop "<|end|>"' in params and 'stop "<|endoftext|>"' in params
    assert "temperature 0.0" in params
    template = go_template_to_jinja(next(a for d, a in directives if d == "TEMPLATE"))
    llm = llama_cpp.Llama(str(model / "model.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(TINY)
    chats = [json.loads(line)["messages"] for line in
             (REPO / "evalsets" / "tiny-phi3.jsonl").read_text().splitlines()
             if "messages" in line]
    assert len(chats) == 12  # system turns and multi-turn histories among them
    for messages in chats:
        rendered = jinja2.Template(template).render(Messages=messages)
        ollama_ids = llm.tokenize(rendered.encode(), add_bos=True, special=True)
        reference = hf(hf.apply_chat_template(messages, add_generation_prompt=True,
                                              tokenize=False), add_special_tokens=False)
        assert ollama_ids == [hf.bos_token_id] + reference["input_ids"]


@pytest.mark.slow
def test_llama_cpp_default_chat_tokenization_drifts_and_validation_sees_it(ollama_bundle,
                                                                           tmp_path):
    """Without the runner's rstrip handling (a bare GGUF dir, no tokenizer.json beside it),
    llama.cpp tokenizes '<|user|>\\n...' with extra tokens: the chat rows fail the round-trip."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(ollama_bundle / "model" / "model.gguf", bare / "model.gguf")
    report_path = tmp_path / "r.json"
    proc = phikit("validate", bare, "--reference", TINY, "--json", report_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    assert report["artifact"] == "bare gguf"
    assert report["tokenizer"]["identical"] == 33 - 12  # exactly the chat rows differ
    first = report["tokenizer_mismatches"][0]
    assert first["candidate_tokens"][:2] == [28705, 13]  # '▁', '\n' after <|user|>
    assert "token_agreement" in proc.stdout


@pytest.mark.slow
@pytest.mark.longest
def test_gguf_types_ordered_by_precision_and_imatrix_applied(ollama_bundle, tmp_path):
    """Q8_0 < Q5_K_M < Q4_0 in KLD, every type passes, and the importance matrix changes the
    IQ4_NL weights (and lowers its KLD) — the figures go in the README."""
    metrics = {"Q4_0": json.loads((ollama_bundle / "parity.json").read_text())["metrics"]}
    for gguf_type, calibrated in [("Q8_0", False), ("Q5_K_M", False), ("Q4_K_M", False),
                                  ("IQ4_NL", False), ("IQ4_NL", True)]:
        out = tmp_path / f"{gguf_type}-{calibrated}"
        phikit("build", type_recipe(tmp_path, gguf_type, calibrated), "--target", "ollama",
               "--out", out, check=0)
        key = gguf_type + ("+imatrix" if calibrated else "")
        metrics[key] = json.loads((out / "parity.json").read_text())["metrics"]
    for key, m in metrics.items():
        print(f"{key:<16} KLD mean {m['kld_mean']:.5f} p99 {m['kld_p99']:.4f} top-1 "
              f"{m['top1']:.3f} greedy {m['greedy_match_mean']:.1f}")
    kld = {k: m["kld_mean"] for k, m in metrics.items()}
    assert kld["Q8_0"] < kld["Q5_K_M"] < kld["Q4_0"]
    assert kld["IQ4_NL+imatrix"] != kld["IQ4_NL"] and kld["IQ4_NL+imatrix"] < kld["Q4_0"]


@pytest.mark.slow
def test_raspberry_pi_gguf_lock_is_aarch64_with_the_source_package(dist, tmp_path):
    out = build_bundle(dist, "int4", "raspberry-pi", "gguf")
    lock = (out / "requirements.lock").read_text()
    assert "linux/aarch64" in lock and "llama-cpp-python==0.3.36" in lock
    assert "build-essential cmake" in lock
    proc = phikit("validate", out, "--emulate", "aarch64")
    assert proc.returncode == 2 and "compiled on the device" in proc.stderr.replace("\n", " ")


@pytest.mark.slow
def test_fp16_gguf_is_nearly_exact(tmp_path):
    text = RECIPE.read_text().replace("../", f"{REPO}/").replace("precision: int4",
                                                                   "precision: fp16")
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text(text.replace("name: tiny-phi3-int4", "name: tiny-phi3-fp16"))
    out = tmp_path / "fp16"
    phikit("build", recipe, "--target", "ollama", "--out", out, check=0)
    m = json.loads((out / "parity.json").read_text())["metrics"]
    assert m["kld_mean"] < 1e-4 and m["top1"] > 0.99


@pytest.mark.slow
def test_streamed_conversion_is_bit_identical_to_one_shot(tmp_path):
    """llama.cpp's converter streams tensors lazily by default (what phikit runs: 1.26 GB peak
    for the full Phi-3-mini); its one-shot mode (--no-lazy) loads everything. Same bytes."""
    from toolkit.backends.llama_cpp_source import converter_dir
    from toolkit.runner.core import sha256_file
    from toolkit.spm import write_tokenizer_model

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(TINY, checkpoint)
    write_tokenizer_model(checkpoint)
    digests = []
    for extra in ([], ["--no-lazy"]):
        out = tmp_path / f"model{len(digests)}.gguf"
        subprocess.run([sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"),
                        str(checkpoint), "--outfile", str(out), "--outtype", "f16", *extra],
                       check=True, capture_output=True, timeout=600)
        digests.append(sha256_file(out))
    assert digests[0] == digests[1]


@pytest.mark.slow
def test_logits_from_a_start_position_are_the_full_passes_rows(ollama_bundle):
    """Validation asks for the logits of a prompt + its generation from the last prompt position
    on, and llama.cpp is asked for no other rows (it skips their output projection): those rows
    are the full pass's, also when `start` falls inside a later batch."""
    import numpy as np

    from toolkit.runner import llamacpp_rt

    session = llamacpp_rt.open_session(ollama_bundle / "model", {})
    ids = session.tokenize("def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # five" * 2)
    full = session.logits(ids)
    session.llm.n_batch = 16  # several batches; the rows asked for start inside the second
    for start in (0, 21, len(ids) - 1):
        rows = session.logits(ids, start=start)
        assert rows.shape == (len(ids) - start, full.shape[1])
        np.testing.assert_allclose(rows, full[start:], atol=1e-3, rtol=0)
