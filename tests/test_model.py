"""The model: official logits, exact equivalences (KV reuse, windows, padding), every layout trains, the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from safetensors.torch import load_file

from hymba.config import HymbaConfig
from hymba.model import ForwardContext, HymbaForCausalLM, HymbaMixer, rope_cos_sin


def small_config(**overrides) -> HymbaConfig:
    """A 4-layer hybrid small enough that any layout trains in milliseconds."""
    base = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, v_head_dim=16, mamba_d_state=4, mamba_dt_rank=4, num_memory_tokens=4,
                sliding_window=3, global_attn_idx=[0], kv_reuse_group=[[1, 2]], max_position_embeddings=256,
                orig_max_position_embeddings=64, torch_dtype="float32")
    return HymbaConfig(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_official_tiny_logits(official_tiny_dir, dtype, tol):
    """The released code's float32 logits; bf16 within its ~8-bit mantissa over 8 layers."""
    ref = load_file(official_tiny_dir / "reference.safetensors")
    model = HymbaForCausalLM.from_pretrained(official_tiny_dir, dtype=dtype)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    assert logits.dtype == dtype and logits.shape == ref["logits"].shape
    assert rel_err(logits, ref["logits"]) < tol


def test_official_tiny_logits_with_left_padding(official_tiny_dir):
    """The release can only run batch 1 unpadded; padded rows must still give its logits on their tokens."""
    ref = load_file(official_tiny_dir / "reference.safetensors")
    model = HymbaForCausalLM.from_pretrained(official_tiny_dir)
    ids, pad = ref["input_ids"], 15  # more than the window (12) and the meta count (8)
    padded = torch.cat([torch.zeros(2, pad, dtype=ids.dtype), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[1, :pad] = 0
    mask[0, :pad + 3] = 0  # row 0 also drops its first three tokens
    with torch.no_grad():
        logits = model(padded, attention_mask=mask).logits
        short = model(ids[:1, 3:]).logits
    assert rel_err(logits[1, pad:], ref["logits"][1]) < 1e-4
    assert rel_err(logits[0, pad + 3:], short[0]) < 1e-5


# ---------------------------------------------------------------------------------------------- KV reuse
def _context(config: HymbaConfig, batch: int, length: int, dtype: torch.dtype) -> ForwardContext:
    positions = torch.arange(length).expand(batch, -1)
    return ForwardContext(positions=positions, valid=None, rope=rope_cos_sin(config, positions, dtype))


def _in_proj_with_kv(reuser: HymbaMixer, producer: HymbaMixer, kv_rows: torch.Tensor) -> torch.Tensor:
    """A producer's in_proj weight laid out [q, k, v, u, z] from a reuser's [q, u, z] and given k, v rows."""
    q, u, z = torch.split(reuser.in_proj.weight, reuser.split_sizes)
    return torch.cat([q, kv_rows, u, z])


def _kv_rows(producer: HymbaMixer) -> torch.Tensor:
    q_rows = producer.split_sizes[0]
    kv = producer.split_sizes[1] + producer.split_sizes[2]
    return producer.in_proj.weight[q_rows:q_rows + kv]


@torch.no_grad()
def test_kv_reusing_mixer_equals_producing_mixer_fed_the_same_kv():
    """Layer 2 reuses layer 1's K,V. A stand-alone producing layer 2 whose k, v rows are layer 1's computes the
    same K,V from the same input, so its output must equal the reuser's - and must not with other k, v rows."""
    shared = small_config()  # layer 2 reuses layer 1
    own = small_config(kv_reuse_group=None)  # layer 2 produces its own K,V
    model = HymbaForCausalLM(shared).double()
    producer, reuser = model.model.layers[1].mamba, model.model.layers[2].mamba
    assert reuser.reuses_kv and not producer.reuses_kv

    standalone = HymbaMixer(own, 2).double()
    weights = {k: v for k, v in reuser.state_dict().items() if k != "in_proj.weight"}
    weights["in_proj.weight"] = _in_proj_with_kv(reuser, producer, _kv_rows(producer))
    standalone.load_state_dict(weights)

    h = torch.randn(2, 17, shared.hidden_size, dtype=torch.float64)
    ctx = _context(shared, 2, 17, torch.float64)
    _, shared_kv = producer(h, ctx)  # layer 1's K,V, for the rest of its group
    reused, passed_on = reuser(h, ctx, shared_kv)
    assert passed_on is None  # only producers hand K,V on
    computed, _ = standalone(h, _context(own, 2, 17, torch.float64))
    torch.testing.assert_close(reused, computed, rtol=1e-12, atol=1e-12)

    # The same check with any other k, v rows fails: the output (less the residual h) really depends on the shared K,V.
    standalone.in_proj.weight.copy_(_in_proj_with_kv(reuser, producer, torch.randn_like(_kv_rows(producer))))
    assert rel_err(standalone(h, _context(own, 2, 17, torch.float64))[0] - h, reused - h) > 1e-3


@torch.no_grad()
def test_kv_reuse_whole_model_with_padding():
    """If layer 1 adds nothing to the residual stream, layer 2 sees layer 1's input; then reusing layer 1's K,V
    equals layer 2 computing K,V with layer 1's k, v rows - for the whole model, padding and all."""
    shared, own = small_config(), small_config(kv_reuse_group=None)
    a = HymbaForCausalLM(shared).double()
    layer1, layer2 = a.model.layers[1], a.model.layers[2]
    layer1.mamba.out_proj.weight.zero_()
    layer1.moe.experts[0].down_proj.weight.zero_()
    for norm in (layer1.input_layernorm, layer2.input_layernorm):
        norm.weight.copy_(1 + 0.1 * torch.randn(shared.hidden_size))
    layer2.input_layernorm.weight.copy_(layer1.input_layernorm.weight)

    b = HymbaForCausalLM(own).double()
    state = a.state_dict()
    state["model.layers.2.mamba.in_proj.weight"] = _in_proj_with_kv(layer2.mamba, layer1.mamba,
                                                                     _kv_rows(layer1.mamba))
    b.load_state_dict(state)

    ids = torch.randint(0, shared.vocab_size, (3, 14))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, 10:] = 0
    torch.testing.assert_close(a(ids, mask).logits, b(ids, mask).logits, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- windows
@torch.no_grad()
def test_window_covering_the_sequence_equals_global_attention():
    """Meta tokens are always visible and text tokens are at most L-1 apart, so window L-1 is global attention;
    window L-2 is not (key j is visible iff i - j <= window: the boundary is inclusive)."""
    length = 13
    windowed = HymbaForCausalLM(small_config(sliding_window=length - 1)).double()
    everywhere = HymbaForCausalLM(small_config(sliding_window=None)).double()
    narrower = HymbaForCausalLM(small_config(sliding_window=length - 2)).double()
    everywhere.load_state_dict(windowed.state_dict())
    narrower.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 61, (2, length))
    reference = everywhere(ids).logits
    torch.testing.assert_close(windowed(ids).logits, reference, rtol=0, atol=0)
    differs = narrower(ids).logits
    torch.testing.assert_close(differs[:, :-1], reference[:, :-1], rtol=0, atol=0)  # only the last query loses a key
    assert rel_err(differs[:, -1], reference[:, -1]) > 1e-6


# ---------------------------------------------------------------------------------------------- layouts
LAYOUTS = {
    "one layer": dict(num_hidden_layers=1, global_attn_idx=[0], kv_reuse_group=None),
    "two layers, one group": dict(num_hidden_layers=2, global_attn_idx=[], kv_reuse_group=[[0, 1]]),
    "five layers, groups of 2 and 3, window < meta": dict(
        num_hidden_layers=5, global_attn_idx=[], kv_reuse_group=[[0, 1], [2, 3, 4]], sliding_window=2),
    "window > meta": dict(num_hidden_layers=3, global_attn_idx=[2], kv_reuse_group=[[0, 1]], sliding_window=9,
                          num_memory_tokens=2),
    "no meta tokens": dict(num_memory_tokens=0),
    "no kv reuse": dict(kv_reuse_group=None),
    "all global (sliding_window None)": dict(sliding_window=None, global_attn_idx=[], kv_reuse_group=[[0, 1], [2, 3]]),
    "layer types a m h": dict(num_hidden_layers=5, layer_type=["a", "m", "h", "h", "a"], kv_reuse_group=[[2, 3, 4]]),
    "mamba only": dict(layer_type=["m"] * 4, global_attn_idx=[], kv_reuse_group=None),
    "attention only, untied, no MLP": dict(layer_type=["a"] * 4, tie_word_embeddings=False, intermediate_size=0,
                                           num_memory_tokens=0),
}


@pytest.mark.parametrize("overrides", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_every_layout_runs_and_trains(overrides):
    config = small_config(**overrides)
    model = HymbaForCausalLM(config)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert out.logits.shape == (2, 11, config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_layouts_cover_the_named_parameters():
    """The layout test above checks every parameter; make sure the special ones are among them."""
    names = {n.split("layers.0.")[-1] for n, _ in HymbaForCausalLM(small_config()).named_parameters()}
    for name in ("model.memory_tokens", "mamba.pre_avg_layernorm1.weight", "mamba.pre_avg_layernorm2.weight",
                 "mamba.A_log.0", "mamba.D.0", "mamba.dt_proj.0.bias", "mamba.conv1d.bias"):
        assert name in names


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padded_batch_equals_rows_alone(tiny_config, side):
    """Each row of a padded batch gives the logits it gives alone, on its real tokens; rows 1 and 3 are padded by
    more than the window (6) and the meta count (8). float32: batch shapes change reduction orders (~1e-6)."""
    model = HymbaForCausalLM(tiny_config).eval()
    lengths = [20, 5, 12, 1]
    longest = max(lengths)
    ids = torch.randint(3, tiny_config.vocab_size, (len(lengths), longest))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1 if side == "left" else 0
        mask[row, :n] = 0 if side == "left" else 1
    batched = model(ids, attention_mask=mask).logits
    assert torch.isfinite(batched).all()
    for row in range(len(lengths)):
        real = mask[row].bool()
        alone = model(ids[row][real][None]).logits[0]
        torch.testing.assert_close(batched[row][real], alone, rtol=1e-5, atol=1e-4)
        assert rel_err(batched[row][real], alone) < 2e-6


# ---------------------------------------------------------------------------------------------- loss
def test_loss_is_shifted_mean_cross_entropy_ignoring_minus_100(tiny_config):
    model = HymbaForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6] = -100
    out = model(ids, labels=labels)
    logp = F.log_softmax(out.logits.detach().double(), dim=-1)
    total, count = 0.0, 0
    for b in range(3):
        for t in range(8):  # position t predicts token t+1
            if labels[b, t + 1] != -100:
                total -= logp[b, t, labels[b, t + 1]].item()
                count += 1
    assert count == 3 * 8 - 3 - 1
    assert abs(out.loss.item() - total / count) < 1e-5


def test_loss_without_logits_and_with_shifted_labels(tiny_config):
    """The trainer's call (shifted targets, summed, no logits) gives the loss of the logits, and the same gradients."""
    model = HymbaForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 11))
    targets = ids[:, 1:].clone()
    targets[1] = -100  # a row with nothing to learn
    out = model(ids[:, :-1], shift_labels=targets, loss_reduction="sum", return_logits=False)
    assert out.logits is None
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids[:, :-1]).logits
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    assert rel_err(out.loss, ref) < 1e-6
    for name, p in model.named_parameters():
        assert rel_err(grads[name], p.grad) < 1e-5, name
    labels = torch.cat([ids[:, :1], targets], 1)  # the same targets, aligned with the inputs
    assert rel_err(model(ids, labels=labels, loss_reduction="sum").loss, ref) < 1e-6


def test_logits_to_keep_gives_the_last_positions(tiny_config):
    model = HymbaForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=2).logits
    torch.testing.assert_close(last, full[:, -2:], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- precision
def test_norms_return_their_input_dtype_rounded_once():
    """Under autocast a norm's weight is float32 and its input bf16: the result is the float32 value rounded once, as
    the next projection's cast would have rounded it; with one dtype throughout nothing changes."""
    from hymba.ops.norm import average_of_norms, rms_norm

    torch.manual_seed(0)
    a, b = (torch.randn(3, 5, 24).to(torch.bfloat16) for _ in range(2))
    wa, wb = 1 + 0.1 * torch.randn(24), 1 + 0.1 * torch.randn(24)

    def norm32(x, w):  # the release's RMSNorm with a float32 weight: normalised, cast back to x's dtype, scaled
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    got = rms_norm(a, wa, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, norm32(a, wa).to(torch.bfloat16))
    got = average_of_norms(a, wa, b, wb, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, ((norm32(a, wa) + norm32(b, wb)) / 2).to(torch.bfloat16))
    a32 = a.float()
    assert torch.equal(rms_norm(a32, wa, 1e-6), norm32(a32, wa))
    bf_weight = wa.to(torch.bfloat16)
    assert torch.equal(rms_norm(a, bf_weight, 1e-6), bf_weight * norm32(a, torch.ones(24)).to(torch.bfloat16))


def test_bf16_residual_stream_under_autocast(tiny_config):
    """`residual_in_autocast_dtype`: under autocast the stream between layers is bf16 and the loss stays within bf16
    rounding of the float32 stream's; without autocast the switch changes nothing."""
    torch.manual_seed(0)
    model = HymbaForCausalLM(tiny_config)
    model.init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    seen = []
    hook = model.model.layers[1].register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    losses = {}
    for bf16_stream in (False, True):
        model.model.residual_in_autocast_dtype = bf16_stream
        with torch.no_grad():
            losses["fp32", bf16_stream] = model(ids, labels=ids).loss
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses["autocast", bf16_stream] = model(ids, labels=ids).loss
    hook.remove()
    assert seen == [torch.float32, torch.float32, torch.float32, torch.bfloat16]
    assert torch.equal(losses["fp32", False], losses["fp32", True])
    assert rel_err(losses["autocast", True], losses["autocast", False]) < 2e-2
    assert rel_err(losses["autocast", True], losses["fp32", False]) < 2e-2
