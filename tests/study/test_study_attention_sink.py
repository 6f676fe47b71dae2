"""Attention-sink shares: the recomputed probabilities are the model's own attention, and shares sum to 1."""

from __future__ import annotations

import pytest
import torch

from hymba.model import HymbaForCausalLM
from hymba.ops.attention import visible_keys
from hymba.study.attention_sink import attention_maps, sink_shares
from hymba.study.variants import ModelShape, variant_config

SHAPE = ModelShape(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, global_attn_idx=(0, 3), sliding_window=5, num_memory_tokens=3,
                   mamba_d_state=4, mamba_dt_rank=4)


def _model(name: str) -> HymbaForCausalLM:
    model = HymbaForCausalLM(variant_config(name, SHAPE, 97, 64))
    model.init_weights(torch.Generator().manual_seed(0))
    return model.eval()


@pytest.mark.parametrize("name", ["hymba", "hymba-no-meta", "sequential"])
def test_maps_reproduce_the_attention_output(name):
    """probs @ values must equal what each layer's attention heads output in the model's own forward."""
    model = _model(name)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs = {}

    def recording(i, attention):
        def attention_recorded(*args):
            outputs[i] = attention(*args)
            return outputs[i]
        return attention_recorded

    for i, layer in enumerate(model.model.layers):
        if model.config.has_attention(i):
            layer.mamba.attention = recording(i, layer.mamba.attention)  # the heads' output, before any norm
    maps = attention_maps(model, ids)
    M = model.config.num_memory_tokens
    assert sorted(maps) == sorted(outputs)
    for layer, amap in maps.items():
        b, h, S, _ = amap.probs.shape
        assert (b, h, S) == (2, 4, M + 12)
        torch.testing.assert_close(amap.probs.sum(-1), torch.ones(b, h, S))  # mass over all keys = 1
        positions = torch.arange(S).expand(b, -1)
        hidden = ~visible_keys(positions, positions, None, model.config.window(layer), M)
        assert (amap.probs.masked_select(hidden) == 0).all()  # nothing on keys the layer cannot see
        ours = (amap.probs @ amap.values).transpose(1, 2).reshape(b, S, -1)
        torch.testing.assert_close(ours, outputs[layer], rtol=1e-5, atol=1e-6)


def test_shares_sum_to_one_and_split_meta_from_first_token():
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with_meta, without = sink_shares(_model("hymba"), ids), sink_shares(_model("hymba-no-meta"), ids)
    assert [s["layer"] for s in with_meta] == [0, 1, 2, 3]
    for s in with_meta + without:
        assert abs(s["meta"] + s["first_token"] + s["other"] - 1) < 1e-5 and abs(s["total"] - 1) < 1e-5
        assert 0 < s["first_token"] < 1
    assert all(s["meta"] > 0 for s in with_meta) and all(s["meta"] == 0 for s in without)
    assert [s["window"] for s in with_meta] == [None, 5, 5, None]
