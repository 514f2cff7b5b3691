"""Defects in what a bundle claims rather than in what it computes (issue 37): a context length
halved in one file, an EOS id lost from a set, a Modelfile Ollama would serve wrongly, a chat
template whose system or multi-turn branch is broken. Parity over the eval set cannot see most of
them (no eval row reaches the halved context, no generation ends on the lost id); the static
checks (toolkit/artifact_checks.py) and the eval set's system / multi-turn chats must.

planters.py registers these beside the computational defects (the same table, the same test).
"""

from __future__ import annotations

import json
import re

import numpy as np
from pathlib import Path

from .formats import edit_json, gguf_reader, gguf_rewrite, gguf_scalar, set_ir_rt_info
from .formats import OnnxModel, OpenVinoIR
from .planters import (END, RUNTIME_POSITIONS, Ctx, Defect, NotPlantable, flush,
                       gguf_long_factors_short, inv_freq, mlx_long_factors_short,
                       onnx_long_factors_short, ov_find_table, ov_long_factors_short,
                       ov_replace_positions)

LOST_EOS = 32001  # <|assistant|>: in generation_config's list, never where an eval reply ends
WRONG_GGUF_EOS = 2  # </s>: a converter that writes Llama's eos id into a Phi-3 GGUF
STATIC_KEEP = ("kld_mean", "top1", "token_agreement")  # the computation itself is untouched


def halve(value: int) -> int:
    return int(value) // 2


def break_branch(template: str, role: str) -> str:
    """The template's branch for `role` without its <|end|>: only chats with a turn of that role
    render differently (the system branch, or the assistant turns of a multi-turn history)."""
    m = re.search(rf"""['"]{role}['"]""", template)
    assert m, f"the chat template has no {role!r} branch"
    end = template.index(END, m.end())
    return template[:end] + template[end + len(END):]


def template_files(model_dir: Path, change) -> list[str]:
    """chat_template.jinja and tokenizer_config.json's chat_template, where present."""
    changed = []
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(change(jinja.read_text(encoding="utf-8")), encoding="utf-8")
        changed.append(jinja.name)
    config = model_dir / "tokenizer_config.json"
    if config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")):
        edit_json(config, lambda c: c.update(chat_template=change(c["chat_template"])))
        changed.append(config.name)
    return changed


# --- positions past what a short eval reaches ---------------------------------------------------

WRAP = 512  # a RoPE table tabulated for 512 positions, reused past them (position mod 512)


def onnx_positions_wrap(ctx: Ctx) -> str:
    """cos/sin_cache rows from WRAP on repeat the first WRAP rows: positions < WRAP (every
    position an eval of 128-token texts reaches) are exact."""
    m = OnnxModel(ctx.model_dir)
    cos, sin = m.tensor("cos_cache"), m.tensor("sin_cache")
    pos = np.arange(cos.shape[0], dtype=np.int64)
    freqs = inv_freq(ctx.theta, 2 * cos.shape[1])
    assert cos.shape[0] > WRAP and np.allclose(cos, np.cos(pos[:, None] * freqs), atol=2e-3)
    angles = (pos % WRAP)[:, None].astype(np.float64) * freqs
    cos[...], sin[...] = np.cos(angles), np.sin(angles)
    flush(cos, sin)
    return f"model.onnx.data: cos_cache/sin_cache rows >= {WRAP} = rows of position mod {WRAP}"


def ov_positions_wrap(ctx: Ctx) -> str:
    import openvino.opset13 as ops

    def wrap(positions):
        kind = positions.get_element_type().to_dtype()
        return ops.floor_mod(positions, ops.constant(kind.type(WRAP)))

    return ov_replace_positions(ctx, wrap, f"mod {WRAP}")


# --- LongRoPE: a long-factor error flat in position ----------------------------------------------

LONG_FACTOR_ERROR = 1.15  # every long factor 15% too large (a converter's wrong factor list)


def onnx_long_factors_off(ctx: Ctx) -> str:
    m = OnnxModel(ctx.model_dir)
    _, long = ctx.rope_factors
    for fn, name in ((np.cos, "cos_cache_large"), (np.sin, "sin_cache_large")):
        t = m.constant(name)
        table = m.array(t).astype(np.float64)
        pos = np.arange(table.shape[0], dtype=np.float64)[:, None]
        scale = m.array(m.constant("cos_cache_large"))[0, 0]  # cos(0) x the attention factor
        dim = 2 * table.shape[1]
        assert np.allclose(table, scale * fn(pos * inv_freq(ctx.theta, dim, long)), atol=2e-3)
        m.set_array(t, scale * fn(pos * inv_freq(ctx.theta, dim, long * LONG_FACTOR_ERROR)))
    m.save_graph()
    return f"model.onnx: cos/sin_cache_large with long factors x {LONG_FACTOR_ERROR}"


def ov_long_factors_off(ctx: Ctx) -> str:
    ir = OpenVinoIR(ctx.model_dir)
    _, long = ctx.rope_factors
    name = ov_find_table(ir, long)
    t = ir.tensor(name)
    t[...] = t * LONG_FACTOR_ERROR
    flush(t)
    return f"openvino_model.bin: long_factor ({name}) x {LONG_FACTOR_ERROR}"


def mlx_long_factors_off(ctx: Ctx) -> str:
    """mlx-lm reads the factor lists from config.json."""
    def change(c: dict) -> None:
        c["rope_scaling"]["long_factor"] = [f * LONG_FACTOR_ERROR
                                            for f in c["rope_scaling"]["long_factor"]]
    edit_json(ctx.model_dir / "config.json", change)
    return f"config.json: rope_scaling.long_factor x {LONG_FACTOR_ERROR}"


# --- context ------------------------------------------------------------------------------------


def onnx_halved_context(ctx: Ctx) -> str:
    def change(c: dict) -> None:
        c["model"]["context_length"] = halve(c["model"]["context_length"])
    edit_json(ctx.model_dir / "genai_config.json", change)
    return "genai_config.json: model.context_length halved"


def config_halved_context(ctx: Ctx) -> str:
    """openvino_genai and mlx-lm read the model's length from config.json."""
    edit_json(ctx.model_dir / "config.json", lambda c: c.update(
        max_position_embeddings=halve(c["max_position_embeddings"])))
    return "config.json: max_position_embeddings halved"


def gguf_halved_context(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    value = gguf_scalar(reader, "phi3.context_length")
    value[0] = halve(value[0])
    reader.data.flush()
    return f"model.gguf: phi3.context_length halved to {int(value[0])}"


def modelfile_halved_num_ctx(ctx: Ctx) -> str:
    path = ctx.model_dir / "Modelfile"
    text, n = re.subn(r"(?m)^PARAMETER num_ctx (\d+)$",
                      lambda m: f"PARAMETER num_ctx {halve(int(m.group(1)))}",
                      path.read_text(encoding="utf-8"))
    assert n == 1, "the Modelfile has no num_ctx"
    path.write_text(text, encoding="utf-8")
    return "Modelfile: num_ctx halved"


# --- EOS ----------------------------------------------------------------------------------------


def _without_lost(ids) -> list[int]:
    ids = [ids] if isinstance(ids, int) else list(ids)
    assert LOST_EOS in ids, ids
    return [i for i in ids if i != LOST_EOS]


def onnx_eos_id_lost(ctx: Ctx) -> str:
    edit_json(ctx.model_dir / "genai_config.json", lambda c: c["model"].update(
        eos_token_id=_without_lost(c["model"]["eos_token_id"])))
    return f"genai_config.json: model.eos_token_id without {LOST_EOS}"


def generation_eos_id_lost(ctx: Ctx) -> str:
    """openvino_genai, mlx-lm and the GGUF runner stop at generation_config.json's ids."""
    edit_json(ctx.model_dir / "generation_config.json", lambda c: c.update(
        eos_token_id=_without_lost(c["eos_token_id"])))
    return f"generation_config.json: eos_token_id without {LOST_EOS}"


def gguf_eos_token(ctx: Ctx) -> str:
    reader = gguf_reader(ctx.model_dir)
    value = gguf_scalar(reader, "tokenizer.ggml.eos_token_id")
    value[0] = WRONG_GGUF_EOS
    reader.data.flush()
    return f"model.gguf: tokenizer.ggml.eos_token_id {WRONG_GGUF_EOS}"


# --- chat templates -----------------------------------------------------------------------------


def _files_branch(role: str):
    def plant(ctx: Ctx) -> str:
        changed = template_files(ctx.model_dir, lambda t: break_branch(t, role))
        assert changed, f"no chat template in {ctx.model_dir}"
        return f"{' and '.join(changed)}: {role} branch without {END}"
    return plant


def _ov_branch(role: str):
    def plant(ctx: Ctx) -> str:
        """openvino_genai renders the tokenizer IR's rt_info chat_template."""
        set_ir_rt_info(ctx.model_dir / "openvino_tokenizer.xml", "chat_template",
                       lambda t: break_branch(t, role))
        template_files(ctx.model_dir, lambda t: break_branch(t, role))
        return f"openvino_tokenizer.xml rt_info chat_template: {role} branch without {END}"
    return plant


def _gguf_branch(role: str):
    def plant(ctx: Ctx) -> str:
        reader = gguf_reader(ctx.model_dir, "r")
        template = reader.fields["tokenizer.chat_template"].contents()
        del reader
        gguf_rewrite(ctx.model_dir, {"tokenizer.chat_template": break_branch(template, role)})
        return f"model.gguf: tokenizer.chat_template {role} branch without {END}"
    return plant


def _modelfile(change, what: str):
    def plant(ctx: Ctx) -> str:
        path = ctx.model_dir / "Modelfile"
        before = path.read_text(encoding="utf-8")
        after = change(before)
        assert after != before, f"Modelfile unchanged by {what}"
        path.write_text(after, encoding="utf-8")
        return f"Modelfile: {what}"
    return plant


def _template_without_end(text: str) -> str:
    head, body, tail = re.match(r'(?s)(.*TEMPLATE """)(.*?)(""".*)', text).groups()
    return head + body.replace(END, "") + tail


def _system_as_user(text: str) -> str:
    """A TEMPLATE that writes every system turn as a user turn (a broken system branch)."""
    return text.replace("<|{{ .Role }}|>", '<|{{ if eq .Role "system" }}user{{ else }}'
                                           '{{ .Role }}{{ end }}|>')


NO_MODELFILE = NotPlantable("this target serves through the bundle's runner: no Modelfile")

CLAIM_DEFECTS = [
    Defect("long_factors_off_int4", f"LongRoPE long factors x {LONG_FACTOR_ERROR}, int4 bundle",
           ("kld_mean[past_original]", "kld_mean"), keep=("token_agreement",),
           family="tiny-phi3-longrope", hosts=()),
    # int4 host: the bounds of tiny-phi3-longrope-int4 come from honest measurements now (they
    # were hand-set at 4.5-10x the honest KLD, under which this defect passed)
    Defect("long_factors_short_int4", "LongRoPE long factors replaced by the short ones, int4 "
           "bundle", ("kld_mean[past_original]", "kld_mean"), family="tiny-phi3-longrope",
           hosts=()),
    # every position < 512 exact: an eval whose texts stop at 128 tokens measures nothing else
    Defect("positions_wrap", f"RoPE positions >= {WRAP} wrap to position mod {WRAP}",
           ("kld_drift", "kld_mean"), keep=("token_agreement",)),
    Defect("halved_context", "context length halved in an artifact file (genai_config.json, "
           "config.json, GGUF metadata)", ("context_agreement",), keep=STATIC_KEEP),
    Defect("eos_id_lost", f"EOS id {LOST_EOS} lost from the runtime's EOS set",
           ("eos_ids_kept",), keep=STATIC_KEEP),
    Defect("gguf_eos_token", f"GGUF tokenizer.ggml.eos_token_id = {WRONG_GGUF_EOS}",
           ("eos_ids_kept",), keep=STATIC_KEEP),
    Defect("system_branch", "chat template's system branch without <|end|>",
           ("token_agreement",), keep=("kld_mean", "top1")),
    Defect("multiturn_branch", "chat template's assistant-turn branch without <|end|>",
           ("token_agreement",), keep=("kld_mean", "top1")),
    Defect("modelfile_num_ctx", "Modelfile num_ctx halved", ("context_agreement",),
           keep=STATIC_KEEP),
    Defect("modelfile_no_end_stop", "Modelfile without PARAMETER stop \"<|end|>\"",
           ("served_stops",), keep=STATIC_KEEP),
    Defect("modelfile_template_without_end", "Modelfile TEMPLATE without <|end|>",
           ("served_template_agreement",), keep=STATIC_KEEP),
    Defect("modelfile_system_branch", "Modelfile TEMPLATE writes system turns as user turns",
           ("served_template_agreement",), keep=STATIC_KEEP),
]

CLAIM_WRITTEN = {
    ("long_factors_off_int4", "onnx"): onnx_long_factors_off,
    ("long_factors_off_int4", "openvino"): ov_long_factors_off,
    ("long_factors_off_int4", "mlx"): mlx_long_factors_off,
    ("long_factors_off_int4", "gguf"): NotPlantable("llama.cpp refuses LongRoPE (no host)"),
    ("long_factors_short_int4", "onnx"): onnx_long_factors_short,
    ("long_factors_short_int4", "openvino"): ov_long_factors_short,
    ("long_factors_short_int4", "mlx"): mlx_long_factors_short,
    ("long_factors_short_int4", "gguf"): gguf_long_factors_short,
    ("positions_wrap", "onnx"): onnx_positions_wrap,
    ("positions_wrap", "openvino"): ov_positions_wrap,
    ("positions_wrap", "mlx"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="mlx-lm (its attention modules' RoPE offset = cache.offset)")),
    ("positions_wrap", "gguf"): NotPlantable(RUNTIME_POSITIONS.format(
        runtime="llama.cpp (the batch's pos[] from n_past)")),
    ("halved_context", "onnx"): onnx_halved_context,
    ("halved_context", "openvino"): config_halved_context,
    ("halved_context", "mlx"): config_halved_context,
    ("halved_context", "gguf"): gguf_halved_context,
    ("eos_id_lost", "onnx"): onnx_eos_id_lost,
    ("eos_id_lost", "openvino"): generation_eos_id_lost,
    ("eos_id_lost", "mlx"): generation_eos_id_lost,
    ("eos_id_lost", "gguf"): generation_eos_id_lost,
    ("gguf_eos_token", "gguf"): gguf_eos_token,
    ("system_branch", "onnx"): _files_branch("system"),
    ("system_branch", "openvino"): _ov_branch("system"),
    ("system_branch", "mlx"): _files_branch("system"),
    ("system_branch", "gguf"): _gguf_branch("system"),
    ("multiturn_branch", "onnx"): _files_branch("assistant"),
    ("multiturn_branch", "openvino"): _ov_branch("assistant"),
    ("multiturn_branch", "mlx"): _files_branch("assistant"),
    ("multiturn_branch", "gguf"): _gguf_branch("assistant"),
    ("modelfile_num_ctx", "gguf"): modelfile_halved_num_ctx,
    ("modelfile_no_end_stop", "gguf"): _modelfile(
        lambda t: t.replace(f'PARAMETER stop "{END}"\n', ""), f"stop {END} removed"),
    ("modelfile_template_without_end", "gguf"): _modelfile(
        _template_without_end, f"{END} removed from TEMPLATE"),
    ("modelfile_system_branch", "gguf"): _modelfile(
        _system_as_user, "system turns rendered as <|user|>"),
}
for _name in ("gguf_eos_token", "modelfile_num_ctx", "modelfile_no_end_stop",
              "modelfile_template_without_end", "modelfile_system_branch"):
    for _backend in ("onnx", "openvino", "mlx"):
        CLAIM_WRITTEN[(_name, _backend)] = (
            NO_MODELFILE if _name.startswith("modelfile") else
            NotPlantable("no GGUF in this backend's bundle"))
