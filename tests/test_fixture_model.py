"""The embedded tiny-phi3: Phi-3's real tokenizer and config form, trained, small."""

from __future__ import annotations

import json

import pytest

from conftest import TINY


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def test_config_is_published_phi3_form():
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["model_type"] == "phi3"
    assert cfg["vocab_size"] == 32064
    assert cfg["max_position_embeddings"] == cfg["original_max_position_embeddings"]
    assert "rope_scaling" in cfg and "rope_parameters" not in cfg  # transformers-4 form
    assert cfg["hidden_size"] // cfg["num_attention_heads"] % 16 == 0  # ORT GQA kernels
    gen = json.loads((TINY / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [32000, 32001, 32007]


def test_special_tokens_at_phi3_ids(tokenizer):
    expected = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002,
                "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
                "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010}
    for token, token_id in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    added = {t["content"]: t for t in json.loads((TINY / "tokenizer.json").read_text())[
        "added_tokens"]}
    assert added["<|user|>"]["rstrip"] is True and added["<|user|>"]["normalized"] is False
    assert added["<|endoftext|>"]["rstrip"] is False


def test_llama2_bpe_with_byte_fallback(tokenizer):
    ids = tokenizer("héllo 🙂 𝔘")["input_ids"]
    assert ids[0] == 1  # BOS
    assert ids[-4:] == [243, 160, 151, 155]  # '𝔘' is not in the vocab: four byte tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "héllo 🙂 𝔘"
    assert len(tokenizer) == 32011


def test_chat_template_and_rstrip(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    assert ids[0] == 32010 and ids[-1] == 32001 and 32007 in ids
    # rstrip: the newline after <|user|> is eaten (no <0x0A> = 13), as with the published Phi-3
    # tokenizer: [32010, 1824 '▁What', 349 '▁is', ...].
    assert ids[1:3] == [1824, 349] and 13 not in ids


def test_trained_and_small():
    report = json.loads((TINY / "training_report.json").read_text())
    assert report["parameters"] < 10_000_000
    held = report["held_out"]
    assert held["model_perplexity"] <= held["unigram_perplexity"] / 5, held


def test_weights_load_and_predict(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
    ids = tokenizer("Return the number of items in a container.", return_tensors="pt")
    with torch.inference_mode():
        logp = torch.log_softmax(model(**ids).logits[0], -1)
    # A trained model is far from uniform (log 32064 = 10.4 nats).
    nll = -logp[:-1].gather(-1, ids["input_ids"][0, 1:, None]).mean().item()
    assert nll < 7.0


# --- the family fixtures: each keeps its member's trait in the published form -------------

FAMILY = {"tiny-phi3-longrope": "Phi3ForCausalLM", "tiny-phi3-gqa": "Phi3ForCausalLM",
          "tiny-phimoe": "PhiMoEForCausalLM"}


@pytest.mark.parametrize("member, architecture", FAMILY.items())
def test_family_fixture_published_form_and_trained(member, architecture):
    path = TINY.parent / member
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [architecture]  # the name the converters match
    assert "rope_parameters" not in cfg and cfg["sliding_window"] == 47
    if cfg.get("rope_scaling"):  # LongRoPE: a factor per rotary frequency, short != long
        rope = cfg["rope_scaling"]
        assert rope["type"] == "longrope"
        assert len(rope["short_factor"]) == len(rope["long_factor"]) == 16
        assert rope["short_factor"] != rope["long_factor"]
        assert cfg["original_max_position_embeddings"] == 64 < cfg["max_position_embeddings"]
    else:
        assert cfg["original_max_position_embeddings"] == cfg["max_position_embeddings"]
    report = json.loads((path / "training_report.json").read_text())
    assert report["parameters"] < 10_000_000
    held = report["held_out"]
    assert held["model_perplexity"] <= held["unigram_perplexity"] / 5, held


def test_gqa_fixture_groups_heads():
    cfg = json.loads((TINY.parent / "tiny-phi3-gqa" / "config.json").read_text())
    assert cfg["num_key_value_heads"] * 4 == cfg["num_attention_heads"]  # Phi-3-medium's 40:10
    assert cfg["hidden_size"] // cfg["num_attention_heads"] % 16 == 0


def test_phimoe_fixture_has_published_tensor_names_and_loads():
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = TINY.parent / "tiny-phimoe"
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["attention_bias"] and cfg["lm_head_bias"]
    assert cfg["rope_scaling"]["long_mscale"] == cfg["rope_scaling"]["short_mscale"] > 1.2
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for e in range(cfg["num_local_experts"]):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names and "lm_head.bias" in names
    assert not any("gate_up_proj" in n for n in names)  # not transformers 5's fused form
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert type(model).__name__ == "PhimoeForCausalLM"
