"""Presets, ml-collections round trip, and the config.json reader's refusals."""

import copy
import json

import ml_collections
import pytest

import r1v2_jax
from r1v2_jax.convert.hf_config import config_from_dict, find_token_id, read_config
from r1v2_jax.convert.transformers_format import released_config_dict
from r1v2_jax.model.config import ConfigError, ModelConfig, get_preset, model_config


@pytest.mark.parametrize("name", ["tiny", "small", "r1v2_38b"])
def test_presets_round_trip_through_config_dict(name):
    cd = get_preset(name)
    assert isinstance(cd, ml_collections.ConfigDict)
    assert ModelConfig.from_config_dict(cd) == model_config(name)


def test_config_dict_override_and_unknown_field():
    cd = get_preset("tiny")
    cd.text.rope_theta = 10000.0
    assert ModelConfig.from_config_dict(cd).text.rope_theta == 10000.0
    cd.text.rope_thetta = 1.0
    with pytest.raises(ConfigError, match=r"text: unknown field\(s\) \['rope_thetta'\]"):
        ModelConfig.from_config_dict(cd)
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_38b_preset_sizes():
    c = model_config("r1v2_38b")
    assert (c.vision.hidden_size, c.vision.num_layers, c.vision.num_heads, c.vision.head_dim) == (3200, 45, 25, 128)
    assert (c.text.hidden_size, c.text.num_layers, c.text.num_heads, c.text.num_kv_heads) == (5120, 64, 40, 8)
    assert c.text.intermediate_size == 27648 and c.text.vocab_size == 152064 and c.text.rope_theta == 1e6
    assert c.projector_in_features == 12800 and c.tokens_per_tile() == 256


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("image_token_id", 10_000, "outside the vocabulary"),
        ("ps_version", "v3", "ps_version: expected one of"),
        ("downsample_ratio", 0.3, "downsample_ratio: must be 1/k"),
        ("select_layer", 0, "select_layer"),
        ("remat_policy", "sometimes", "remat_policy"),
    ],
)
def test_inconsistent_model_config_is_refused(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        model_config("tiny").replace(**{field: value})


def _released(**top):
    d = released_config_dict(model_config("tiny"))
    d.update(top)
    return d


def test_reader_builds_the_same_config():
    cfg = model_config("tiny")
    assert config_from_dict(released_config_dict(cfg), image_token_id=cfg.image_token_id) == cfg


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda d: d["vision_config"].update(norm_type="batch_norm"), r"vision_config\.norm_type: expected"),
        (lambda d: d["vision_config"].update(hidden_act="relu"), r"vision_config\.hidden_act"),
        (lambda d: d["vision_config"].update(use_moe=True), r"vision_config\.use_moe"),
        (
            lambda d: d["vision_config"].update(num_attention_heads=5),
            r"vision\.hidden_size: 32 is not divisible by num_heads=5",
        ),
        (lambda d: d["vision_config"].pop("hidden_size"), r"vision_config\.hidden_size: missing"),
        (lambda d: d["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}), r"llm_config\.rope_scaling"),
        (lambda d: d["llm_config"].update(use_sliding_window=True), r"llm_config\.use_sliding_window"),
        (lambda d: d["llm_config"].update(num_key_value_heads=3), r"not a multiple of num_kv_heads=3"),
        (lambda d: d["llm_config"].update(model_type="llama"), r"llm_config\.model_type: expected 'qwen2'"),
        (lambda d: d["llm_config"].update(tie_word_embeddings=True), r"tie_word_embeddings"),
        (lambda d: d["llm_config"].update(vocab_size="big"), r"llm_config\.vocab_size: expected int"),
        (lambda d: d.update(ps_version="v9"), r"ps_version: expected 'v1' or 'v2'"),
        (lambda d: d.update(downsample_ratio=0.3), r"downsample_ratio"),
        (lambda d: d.update(force_image_size=50), r"force_image_size"),
        (lambda d: d.update(select_layer=-7), r"select_layer"),
        (lambda d: d.update(model_type="llava"), r"model_type: expected 'internvl_chat'"),
        (lambda d: d.pop("llm_config"), r"llm_config: missing"),
        (lambda d: d["llm_config"].update(secret_sauce=1), r"llm_config: unknown key\(s\) \['secret_sauce'\]"),
        (lambda d: d.update(new_top_level=1), r"<top level>: unknown key\(s\) \['new_top_level'\]"),
    ],
)
def test_reader_refuses_unknown_or_inconsistent_values(mutate, msg):
    d = copy.deepcopy(_released())
    mutate(d)
    with pytest.raises(ConfigError, match=msg) as e:
        config_from_dict(d, image_token_id=255, file="/ckpt/config.json")
    assert "/ckpt/config.json" in str(e.value)


def test_reader_ignores_hf_housekeeping_and_allows_non_strict():
    d = _released()
    d["llm_config"].update(top_k=50, do_sample=False, _name_or_path="x", bos_token_id=151643, max_window_layers=64)
    d["vision_config"].update(drop_path_rate=0.1, use_flash_attn=True, capacity_factor=1.2)
    config_from_dict(d, image_token_id=255)
    d["llm_config"]["future_field"] = 1
    with pytest.raises(ConfigError):
        config_from_dict(d, image_token_id=255)
    assert config_from_dict(d, image_token_id=255, strict=False).text.hidden_size == 48


def test_force_image_size_sets_tile_size_not_position_grid():
    c = config_from_dict(_released(force_image_size=84), image_token_id=255)
    assert c.vision.image_size == 56 and c.tile_size == 84 and c.tokens_per_tile() == 9


def test_token_id_lookup(tmp_path):
    assert find_token_id(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"added_tokens": [{"id": 151667, "content": "<IMG_CONTEXT>"}], "model": {"vocab": {}}})
    )
    assert find_token_id(tmp_path) == 151667
    (tmp_path / "config.json").write_text(json.dumps(released_config_dict(model_config("tiny"))))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        read_config(tmp_path)  # 151667 does not fit the tiny vocabulary
    assert read_config(tmp_path, image_token_id=7).image_token_id == 7


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        r1v2_jax.load_pretrained(str(tmp_path))
