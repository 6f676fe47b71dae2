"""HymbaCache: prefill + cached decode equals one full forward; the allocation equals the analytic formula."""

import pytest
import torch

from hymba.cache import HymbaCache
from hymba.config import HymbaConfig
from hymba.model import HymbaForCausalLM

LAYOUTS = {
    "tiny": {},
    "window<8": dict(sliding_window=5),
    "window<meta": dict(sliding_window=3, num_memory_tokens=8),
    "groups-of-3": dict(num_hidden_layers=8, global_attn_idx=[0, 4, 7], kv_reuse_group=[[1, 2, 3], [5, 6]]),
    "no-meta": dict(num_memory_tokens=0),
    "no-reuse": dict(kv_reuse_group=None),
    "mixed-layers": dict(layer_type=["h", "a", "a", "m", "h", "h", "a"]),
    "all-global": dict(sliding_window=None, kv_reuse_group=[[1, 2]]),
}


def make_model(layout: str, seed: int = 0) -> HymbaForCausalLM:
    torch.manual_seed(seed)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=101, **LAYOUTS[layout])).eval()
    model.init_weights()
    return model


def teacher_forced(model, ids, prompt_len, chunk=None, attention_mask=None):
    """Logits at every position from prefill(prompt) + one cached decode step per remaining token."""
    cache = HymbaCache(model.config, ids.shape[0], ids.shape[1])
    outs = []
    with torch.no_grad():
        starts = [0] if chunk is None else list(range(0, prompt_len, chunk))
        for i, start in enumerate(starts):
            end = prompt_len if chunk is None else min(prompt_len, start + chunk)
            mask = attention_mask[:, :end] if (attention_mask is not None and i == 0) else None
            if mask is not None and chunk is not None:
                raise ValueError("chunked prefill with padding goes through hymba.generate.prefill")
            outs.append(model(ids[:, start:end], attention_mask=mask, cache=cache).logits)
        for t in range(prompt_len, ids.shape[1]):
            outs.append(model(ids[:, t:t + 1], cache=cache).logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("chunk", [None, 4])
def test_cached_decode_equals_full_forward(layout, chunk):
    model = make_model(layout)
    window = model.config.sliding_window or 8
    length = max(40, 3 * window + 12)  # well past three windows, so the ring wraps several times
    ids = torch.randint(0, 101, (2, length))
    with torch.no_grad():
        full = model(ids).logits
    cached = teacher_forced(model, ids, prompt_len=11, chunk=chunk)
    assert torch.isfinite(cached).all()
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_official_tiny_cached_decode(official_tiny_dir):
    model = HymbaForCausalLM.from_pretrained(official_tiny_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 3 * model.config.sliding_window + 20))
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(teacher_forced(model, ids, prompt_len=7), full, rtol=0, atol=1e-5)


def test_left_padded_prefill_then_decode_equals_alone():
    model = make_model("window<meta")
    lengths = [30, 9, 21]
    seqs = [torch.randint(1, 101, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
    extra = torch.randint(1, 101, (3, 15))
    batched = teacher_forced(model, torch.cat([ids, extra], 1), prompt_len=width,
                             attention_mask=torch.cat([mask, torch.ones_like(extra)], 1))
    for row, seq in enumerate(seqs):
        alone_ids = torch.cat([seq, extra[row]])[None]
        with torch.no_grad():
            alone = model(alone_ids).logits[0]
        torch.testing.assert_close(batched[row, width - len(seq):], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["tiny", "window<meta", "groups-of-3", "no-meta", "mixed-layers"])
def test_allocated_bytes_match_formula(layout):
    config = make_model(layout).config
    for max_len, dtype in [(4, torch.float32), (50, torch.bfloat16)]:
        cache = HymbaCache(config, batch=3, max_len=max_len, dtype=dtype)
        assert cache.nbytes() == config.cache_bytes(max_len, batch=3, dtype=dtype, ssm_dtype=torch.float32)


def test_released_cache_size():
    config = HymbaConfig.preset("hymba-1.5b")
    assert round(config.cache_bytes(8192) / 1e6, 1) == 82.8  # the paper's count: every entry bf16
    assert round(config.cache_bytes(8192, ssm_dtype=torch.float32) / 1e6, 1) == 86.1  # ours: float32 SSM state


def test_restoring_step_state_undoes_decode_steps():
    """CUDA-graph capture warms the decode step up on the live cache; restoring `step_state()` after each run must
    leave it exactly as a cache those runs never touched (no later slot visible, no ring entry evicted early)."""
    from hymba.generate import decode_step, prefill

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257)).eval()
    model.init_weights()
    ids = torch.randint(1, 257, (3, 20))
    with torch.inference_mode():
        touched, fresh = HymbaCache(model.config, 3, 40), HymbaCache(model.config, 3, 40)
        for cache in (touched, fresh):
            prefill(model, cache, ids, None)
        saved = [t.clone() for t in touched.step_state()]
        for _ in range(3):
            decode_step(model, touched, torch.zeros(3, dtype=torch.long))
            for live, copy in zip(touched.step_state(), saved):
                live.copy_(copy)
        tokens = ids[:, -1]
        for _ in range(4):
            want = decode_step(model, fresh, tokens)
            torch.testing.assert_close(decode_step(model, touched, tokens), want)
            tokens = want.argmax(-1)


def test_a_row_view_reads_and_writes_the_rows_in_place():
    from hymba.config import HymbaConfig
    from hymba.generate import batch_buckets, decode_step, prefill
    from hymba.model import HymbaForCausalLM

    assert batch_buckets(1) == [1] and batch_buckets(6) == [1, 2, 4, 6] and batch_buckets(8) == [1, 2, 4, 8]
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny")).eval()
    model.init_weights()
    ids = torch.randint(3, 1000, (2, 9))
    whole, alone = HymbaCache(model.config, 3, 32), HymbaCache(model.config, 2, 32)
    view = whole.rows(2)
    with torch.no_grad():
        want = prefill(model, alone, ids, None)
        got = prefill(model, view, ids, None)
        assert torch.equal(got, want)
        assert torch.equal(decode_step(model, view, want.argmax(-1)), decode_step(model, alone, want.argmax(-1)))
    for layer, state in alone.ssm.items():
        assert torch.equal(whole.ssm[layer].ssm[:2], state.ssm) and whole.ssm[layer].ssm[2].eq(0).all()
    assert whole.next_position[:2].tolist() == alone.next_position.tolist() and int(whole.next_position[2]) == 0


def test_a_forward_past_the_allocation_is_refused():
    from hymba.errors import HymbaError

    model = make_model("all-global")
    M = model.config.num_memory_tokens
    with torch.no_grad(), pytest.raises(HymbaError, match="sized for"):  # fresh: the width alone says so
        model(torch.ones(1, 9, dtype=torch.long), cache=HymbaCache(model.config, 1, 8))
    cache = HymbaCache(model.config, 1, 8)
    with torch.no_grad():
        model(torch.ones(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(HymbaError, match="sized for"):  # continuing: positions M+6 .. M+8 past M+8 slots
            model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    assert M + 8 == cache.layouts[None].capacity
