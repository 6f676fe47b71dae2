"""HymbaConfig: the released config.json loads and saves unchanged, presets build, bad configs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM


def test_released_config_loads_with_the_documented_shape(released_config_path):
    config = HymbaConfig.from_json(released_config_path)
    assert (config.num_hidden_layers, config.hidden_size) == (32, 1600)
    assert (config.num_attention_heads, config.num_key_value_heads) == (25, 5)
    assert (config.qk_head_dim, config.value_head_dim, config.d_inner, config.dt_rank) == (64, 128, 3200, 100)
    assert config.global_attn_idx == [0, 15, 31] and config.sliding_window == 1024
    assert [config.window(i) for i in (0, 1, 15, 16, 31)] == [None, 1024, None, 1024, None]
    assert [config.kv_producer(i) for i in (1, 2, 16, 17, 18, 19)] == [1, 1, 16, 16, 16, 19]
    assert config.produces_kv(1) and not config.produces_kv(2) and not config.produces_kv(18)
    with torch.device("meta"):
        layers = HymbaForCausalLM(config).model.layers
    # HYMBA.md: in_proj has 8960 rows in producers, 8000 in reusers (no k, v rows).
    assert layers[1].mamba.in_proj.weight.shape == (8960, 1600)
    assert layers[2].mamba.in_proj.weight.shape == (8000, 1600)


def test_released_config_round_trips_exactly(released_config_path, tmp_path):
    original = json.loads(released_config_path.read_text())
    config = HymbaConfig.from_json(released_config_path)
    assert config.to_dict() == original
    config.to_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == original
    assert HymbaConfig.from_json(tmp_path).to_dict() == original  # a directory resolves to its config.json


@pytest.mark.filterwarnings("error")  # keys unlike any known one are kept without a warning
def test_unknown_keys_are_kept_and_written_back(released_config_path, tmp_path):
    data = json.loads(released_config_path.read_text())
    data["some_future_key"] = {"nested": [1, 2.5, None]}
    data["another_unknown"] = "text"
    config = HymbaConfig.from_dict(data)
    assert config.extra == {"some_future_key": {"nested": [1, 2.5, None]}, "another_unknown": "text"}
    config.to_json(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text()) == data


def test_num_parameters_of_hymba_1_5b():
    assert HymbaConfig.preset("hymba-1.5b").num_parameters() == 1_522_797_824


@pytest.mark.parametrize("name", ["hymba-1.5b", "tiny", "llama-3.2-3b"])
def test_presets_build(name):
    config = HymbaConfig.preset(name)
    with torch.device("meta"):
        model = HymbaForCausalLM(config)
    assert len(model.model.layers) == config.num_hidden_layers


def test_llama_preset_is_llama_3_2_3b():
    config = HymbaConfig.preset("llama-3.2-3b")
    assert set(config.layer_type) == {"a"} and config.num_memory_tokens == 0 and config.kv_reuse_group is None
    assert all(config.window(i) is None for i in range(config.num_hidden_layers))
    # Llama-3.2-3B has 3,212,749,824 parameters; our attention-only layer adds its output RMSNorm
    # (pre_avg_layernorm1, 3072 per layer), which Llama lacks.
    assert config.num_parameters() == 3_212_749_824 + 28 * 3072


def test_preset_overrides_and_unknown_preset(tiny_config):
    assert tiny_config.vocab_size == 97
    with pytest.raises(HymbaError, match="unknown preset"):
        HymbaConfig.preset("hymba-70b")


def test_cache_bytes_match_the_paper_accounting():
    hymba = HymbaConfig.preset("hymba-1.5b")
    assert round(hymba.cache_bytes(8192) / 1e6, 1) == 82.8
    assert round(hymba.cache_bytes(8192, ssm_dtype=torch.float32) / 1e6, 1) == 86.1
    assert hymba.cache_bytes(8192, batch=3) == 3 * hymba.cache_bytes(8192)
    assert round(HymbaConfig.preset("llama-3.2-3b").cache_bytes(8192) / 1e6, 1) == 939.5


# overrides of the tiny preset -> (the key the message must name, what it must say about it)
BAD_CONFIGS = {
    "heads do not divide hidden": ({"num_attention_heads": 5}, "num_attention_heads", "do not divide hidden_size"),
    "kv heads do not divide heads": ({"num_key_value_heads": 3}, "num_key_value_heads", "do not divide"),
    "kv group layer out of range": ({"kv_reuse_group": [[1, 2], [4, 5, 7]]}, "kv_reuse_group", "layer 7 is out of"),
    "kv group holds a global layer": ({"kv_reuse_group": [[1, 2, 3]]}, "kv_reuse_group", "layer 3 is a global"),
    "kv group names a layer twice": ({"kv_reuse_group": [[1, 2], [1, 2]]}, "kv_reuse_group", "layer 1 appears twice"),
    "kv group not consecutive": ({"kv_reuse_group": [[1, 2, 4]]}, "kv_reuse_group", "not a run of consecutive"),
    "kv group producer after reuser": ({"kv_reuse_group": [[2, 1]]}, "kv_reuse_group", "not a run of consecutive"),
    "kv group of one": ({"kv_reuse_group": [[1]]}, "kv_reuse_group", "fewer than 2"),
    "kv group holds an SSM-only layer": ({"layer_type": ["h", "m", "h", "h", "h", "h", "h"]}, "kv_reuse_group",
                                         "layer 1 has no attention"),
    "zero sliding window": ({"sliding_window": 0}, "sliding_window", "positive integer, got 0"),
    "negative sliding window": ({"sliding_window": -4}, "sliding_window", "positive integer, got -4"),
    "bad layer type": ({"layer_type": ["h", "h", "x", "h", "h", "h", "h"]}, "layer_type", "entry 2 is 'x'"),
    "layer type of wrong length": ({"layer_type": ["h"] * 6}, "layer_type", "6 entries for 7 layers"),
    "global layer out of range": ({"global_attn_idx": [0, 7]}, "global_attn_idx", "layer 7 is out of range"),
    "mixture of experts": ({"num_experts": 2}, "num_experts", "2 is not supported"),
    "unknown rope type": ({"rope_type": "yarn"}, "rope_type", "'yarn' is not supported"),
    "negative positions": ({"max_position_embeddings": -1}, "max_position_embeddings", "positive integer, got -1"),
    "global layers not a list": ({"global_attn_idx": 5}, "global_attn_idx", "must be a list of layer indices"),
    "layer index not an integer": ({"global_attn_idx": [0, "3"]}, "global_attn_idx", "must be a list of layer"),
    "kv groups not lists": ({"kv_reuse_group": [1, 2]}, "kv_reuse_group", "must be a list of lists"),
    "layer types as a string": ({"layer_type": "hhhhhhh"}, "layer_type", "must be a list of layer kinds"),
    "dt rank a word": ({"mamba_dt_rank": "big"}, "mamba_dt_rank", "positive or 'auto'"),
    "meta tokens a string": ({"num_memory_tokens": "8"}, "num_memory_tokens", "must be an integer"),
}


@pytest.mark.parametrize("overrides, key, problem", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_invalid_config_is_one_line_naming_the_key(overrides, key, problem):
    with pytest.raises(HymbaError) as info:
        HymbaConfig.preset("tiny", **overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"config `{key}`: ") and problem in message


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(HymbaError, match="no config"):
        HymbaConfig.from_json(tmp_path / "absent.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(HymbaError, match="not valid JSON"):
        HymbaConfig.from_json(tmp_path)


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "a config is a JSON object of keys and values, got list"),
    ('{"kv_reuse_every_i_layer": "2"}', "wrong type"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_config_file_of_the_wrong_shape_names_the_file(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(HymbaError) as info:
        HymbaConfig.from_json(tmp_path)
    assert str(info.value).startswith(str(path)) and problem in str(info.value)
    assert "\n" not in str(info.value)


def test_a_near_miss_of_a_known_key_warns_and_is_kept():
    with pytest.warns(UserWarning, match="'hidden_sise'.*did you mean 'hidden_size'"):
        config = HymbaConfig.from_dict({**HymbaConfig.preset("tiny").to_dict(), "hidden_sise": 3})
    assert config.extra == {"hidden_sise": 3} and config.hidden_size == 64
