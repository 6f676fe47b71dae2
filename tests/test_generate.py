"""Batched generation: every row gives the tokens it gives alone; sampling is reproducible; stops work."""

import pytest
import torch

from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.generate import RowSampling, SamplingParams, generate, left_pad, sample, sampling_noise, seen_tokens
from hymba.model import HymbaForCausalLM

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [3, 4], [20, 21, 22, 23, 24, 25, 26]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=97, sliding_window=4, eos_token_id=None)).eval()
    m.init_weights()
    return m


def test_batched_greedy_equals_alone(model):
    batched = generate(model, PROMPTS, max_new_tokens=25)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], max_new_tokens=25)
        assert alone[0, len(prompt):].tolist() == batched[row, -25:].tolist()


def test_batched_logits_equal_alone(model):
    ids, mask = left_pad(PROMPTS, pad_id=0)
    out = generate(model, ids, mask, max_new_tokens=10)
    with torch.no_grad():
        batched = model(out, attention_mask=torch.cat([mask, torch.ones(3, 10, dtype=torch.long)], 1)).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.cat([torch.tensor(prompt), out[row, -10:]])[None]).logits[0]
            torch.testing.assert_close(batched[row, -len(prompt) - 10:], alone, rtol=0, atol=1e-5)


def test_a_prefill_padded_into_its_bucket_equals_each_prompt_alone(model):
    """`PrefillGraphs` runs a group left-padded to its bucket, with all-padding rows past it (eagerly here, the
    reference of the captured graphs): each row's logits and the decode steps after it are each prompt's alone."""
    from hymba.cache import HymbaCache
    from hymba.generate import PrefillGraphs

    cache = HymbaCache(model.config, 4, 48)
    graphs = PrefillGraphs(model, cache, rows=(1, 4), widths=(8, 32), cuda_graph=False, segments=3)
    assert graphs.bucket(3, 17) == (4, 32) and graphs.bucket(1, 5) == (1, 8) and graphs.bucket(5, 8) is None
    ids, mask = left_pad(PROMPTS, pad_id=0)
    calls = []
    with torch.no_grad():
        logits = graphs(ids, mask, between=lambda: calls.append(1))
        assert len(calls) == 2  # between the three segments
        rows = cache.rows(3)
        rows.started = True
        steps = [logits]
        for _ in range(4):
            steps.append(model(steps[-1].argmax(-1)[:, None], cache=rows).logits[:, -1])
        for row, prompt in enumerate(PROMPTS):
            alone = HymbaCache(model.config, 1, 48)
            want = [model(torch.tensor([prompt]), cache=alone).logits[:, -1]]
            for _ in range(4):
                want.append(model(want[-1].argmax(-1)[:, None], cache=alone).logits[:, -1])
            for got, expected in zip(steps, want):
                torch.testing.assert_close(got[row], expected[0], rtol=0, atol=1e-5)


def test_chunked_prefill_gives_same_tokens(model):
    whole = generate(model, PROMPTS, max_new_tokens=12)
    for chunk in (1, 3, 8):
        assert torch.equal(generate(model, PROMPTS, max_new_tokens=12, prefill_chunk=chunk), whole)


def test_tensor_input_and_transformers_shape(model):
    ids = torch.tensor([PROMPTS[0]])
    out = model.generate(ids, max_new_tokens=5)
    assert out.shape == (1, len(PROMPTS[0]) + 5) and torch.equal(out[:, :len(PROMPTS[0])], ids)


def test_sampling_is_reproducible_with_seed(model):
    kwargs = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=30, top_p=0.9, min_p=0.02,
                  repetition_penalty=1.3)
    a = generate(model, PROMPTS, seed=7, **kwargs)
    assert torch.equal(a, generate(model, PROMPTS, seed=7, **kwargs))
    assert not torch.equal(a, generate(model, PROMPTS, seed=8, **kwargs))


def test_eos_stops_a_row_while_others_continue(model):
    greedy = generate(model, PROMPTS, max_new_tokens=20)
    eos = int(greedy[1, -20 + 3])  # the 4th token row 1 generates
    out = generate(model, PROMPTS, max_new_tokens=20, eos_token_id=eos)
    new = out[:, -20:]
    first = new[1].tolist().index(eos)
    assert first <= 3 and (new[1, first + 1:] == model.config.pad_token_id).all()
    for row in (0, 2):  # rows that never produce `eos` go on unchanged
        if eos not in greedy[row, -20:].tolist():
            assert torch.equal(new[row], greedy[row, -20:])


def draws(logits, params: SamplingParams, n=400, seen=None):
    """The set of tokens sampled over n seeds (each a different draw) for one row."""
    rows = RowSampling.of([params] * n)
    seeds = torch.arange(n)
    return set(sample(logits.expand(n, -1), rows, seeds, torch.zeros(n, dtype=torch.long),
                      None if seen is None else seen.expand(n, -1)).tolist())


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert draws(logits, SamplingParams(do_sample=True, top_k=2)) == {0, 1}
    assert draws(logits, SamplingParams(do_sample=True, top_p=0.5)) == {0}  # p(0) = 0.64 covers half the mass
    assert draws(logits, SamplingParams(do_sample=True, min_p=0.3)) == {0, 1}  # p(1)/p(0) = e^-1 >= 0.3 > p(2)/p(0)
    assert draws(logits, SamplingParams(do_sample=True)) == {0, 1, 2, 3, 4}
    assert draws(logits, SamplingParams()) == {0}
    seen = torch.tensor([[True, False, False, False, True]])
    # Penalised: [1.5, 2.0, 1.0, 0.0, -2.0], so greedy picks token 1.
    assert draws(logits, SamplingParams(repetition_penalty=2.0), seen=seen) == {1}


def test_sampling_draws_from_the_distribution():
    """Over many seeds and counters, token frequencies match softmax(logits / T) (a chi-square bound)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20_000
    rows = RowSampling.of([SamplingParams(do_sample=True, temperature=0.7)] * n)
    got = sample(logits.expand(n, -1), rows, torch.arange(n) % 97, torch.arange(n) // 97)
    expected = torch.softmax(logits[0] / 0.7, -1) * n
    chi2 = float(((torch.bincount(got, minlength=6) - expected) ** 2 / expected).sum())
    assert chi2 < 25  # 5 degrees of freedom: p < 1e-4 for a correct sampler


def test_sampling_noise_is_a_function_of_seed_and_counter_only():
    a = sampling_noise(torch.tensor([7, 8, 7]), torch.tensor([0, 0, 1]), 50)
    b = sampling_noise(torch.tensor([7]), torch.tensor([0]), 50)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert bool((a > 0).all()) and torch.isfinite(a).all()


def test_rows_with_different_settings_sample_as_they_would_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    params = [SamplingParams(do_sample=True, top_k=5), SamplingParams(), SamplingParams(do_sample=True, top_p=0.7),
              SamplingParams(do_sample=True, min_p=0.1, temperature=1.5, repetition_penalty=1.3)]
    seen = torch.rand(4, 100) < 0.2
    seeds, counters = torch.tensor([3, 1, 4, 1]), torch.tensor([0, 5, 9, 2])
    batched = sample(logits, RowSampling.of(params), seeds, counters, seen)
    for i, p in enumerate(params):
        alone = sample(logits[i:i + 1], RowSampling.of([p]), seeds[i:i + 1], counters[i:i + 1], seen[i:i + 1])
        assert int(alone) == int(batched[i])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_bad_sampling_parameters_are_one_line_errors(bad):
    with pytest.raises(HymbaError):
        SamplingParams(**bad)


def test_too_long_prompt_is_an_error(model):
    with pytest.raises(HymbaError, match="exceed"):
        generate(model, [list(range(1, 90)) * 3], max_new_tokens=10)


def test_stream_and_complete_join_the_prompt_exactly():
    """Streamed pieces and completions continue the prompt text exactly (the first word keeps its space)."""
    from hymba.generate import complete, stream
    from hymba.tokenizer import HymbaTokenizer

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny")).eval()
    model.init_weights()
    tokenizer = HymbaTokenizer.from_pretrained()
    prompt = "The old castle"
    completion = complete(model, tokenizer, [prompt], max_new_tokens=12)[0]
    assert "".join(stream(model, tokenizer, prompt, max_new_tokens=12)) == completion
    full = generate(model, [prompt], tokenizer=tokenizer, max_new_tokens=12)[0].tolist()
    assert tokenizer.decode(full) == prompt + completion


def test_repetition_penalty_is_batch_invariant(model):
    """Padding must not count as a seen token: with a penalty, padded rows still decode as they do alone."""
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    seen = seen_tokens(ids, mask, vocab_size=10)
    assert seen.nonzero().tolist() == [[0, 5], [0, 6], [0, 7], [1, 8]]  # the pad id 0 is not seen in row 1
    kwargs = dict(max_new_tokens=12, repetition_penalty=1.5)
    batched = generate(model, PROMPTS, **kwargs)
    for row, prompt in enumerate(PROMPTS):
        assert generate(model, [prompt], **kwargs)[0, len(prompt):].tolist() == batched[row, -12:].tolist()


# ---------------------------------------------------------------------------------------------- bad input
IDS = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
LEFT = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
BAD_CALLS = {
    # name -> (generate's arguments after the model, what the message must say)
    "prefill chunk 0": (dict(inputs=PROMPTS, prefill_chunk=0), "prefill_chunk must be an integer >= 1"),
    "negative prefill chunk": (dict(inputs=PROMPTS, prefill_chunk=-1), "prefill_chunk must be an integer >= 1"),
    "max_new_tokens a string": (dict(inputs=PROMPTS, max_new_tokens="5"), "max_new_tokens must be an integer"),
    "seed a string": (dict(inputs=PROMPTS, seed="abc"), "seed must be an integer"),
    "seed past 64 bits": (dict(inputs=PROMPTS, seed=2**64), "seed must be an integer"),
    "temperature nan": (dict(inputs=PROMPTS, do_sample=True, temperature=float("nan")), "temperature must be"),
    "repetition penalty nan": (dict(inputs=PROMPTS, repetition_penalty=float("nan")), "repetition_penalty must"),
    "top_k a float": (dict(inputs=PROMPTS, top_k=2.5), "top_k must be an integer"),
    "float ids": (dict(inputs=torch.tensor([[5.7, 6.2]])), "integer tensor"),
    "3-D ids": (dict(inputs=IDS[None]), "(batch, length)"),
    "empty ids": (dict(inputs=torch.zeros(1, 0, dtype=torch.long)), "(batch, length)"),
    "float ids in lists": (dict(inputs=[[5.7, 6.0]]), "prompt 0 is not a list of integer token ids"),
    "bool ids in lists": (dict(inputs=[[True, False]]), "prompt 0 is not a list of integer token ids"),
    "negative id": (dict(inputs=[[5, -1, 6]]), "token id -1 is outside"),
    "id past the vocabulary": (dict(inputs=[[5, 97]]), "token id 97 is outside"),
    "no prompts": (dict(inputs=[]), "inputs must be"),
    "an empty prompt": (dict(inputs=[[5], []]), "prompt 1 is empty"),
    "strings and ids mixed": (dict(inputs=["hello", [5]]), "mix strings and token ids"),
    "right padding": (dict(inputs=IDS, attention_mask=LEFT.flip(1)), "must be left padding"),
    "a hole in the mask": (dict(inputs=IDS, attention_mask=torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]])),
                           "must be left padding"),
    "mask of another width": (dict(inputs=IDS, attention_mask=LEFT[:, 1:]), "attention_mask is (2, 3)"),
    "mask values other than 0/1": (dict(inputs=IDS, attention_mask=LEFT * 2), "only 0 (padding) and 1"),
    "mask with lists": (dict(inputs=PROMPTS, attention_mask=LEFT), "goes with a tensor of input ids"),
    "empty stop string": (dict(inputs=PROMPTS, stop_strings=[""], tokenizer=object()), "non-empty strings"),
}


@pytest.mark.parametrize("kwargs, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_generate_arguments_are_one_line_errors(model, kwargs, message):
    with pytest.raises(HymbaError) as info:
        generate(model, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_left_padded_tensor_with_mask_is_accepted(model):
    out = generate(model, IDS, LEFT, max_new_tokens=4)
    assert torch.equal(out[1, -4:], generate(model, [[9, 10]], max_new_tokens=4)[0, -4:])


def test_a_stop_string_given_as_a_string_is_one_stop_string():
    """stop_strings="xyz" is the stop string "xyz", not the three stop strings "x", "y" and "z"."""
    from hymba.tokenizer import HymbaTokenizer

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", eos_token_id=None)).eval()
    model.init_weights()
    tokenizer = HymbaTokenizer.from_pretrained()
    kwargs = dict(inputs=["The old castle"], tokenizer=tokenizer, max_new_tokens=12)
    free = generate(model, **kwargs)
    text = tokenizer.decode(free[0, -12:].tolist())
    first = next(c for c in text if c.strip())  # a character the text holds, so a stop on it alone would fire
    stop = first + "\u2603\u2603"  # ... followed by what the text does not hold
    assert stop not in text
    assert torch.equal(generate(model, stop_strings=stop, **kwargs), free)
    assert generate(model, stop_strings=first, **kwargs).shape[1] < free.shape[1]  # the one-character stop fires
    from hymba.generate import complete, stream

    whole = complete(model, tokenizer, ["The old castle"], max_new_tokens=12)[0]
    assert complete(model, tokenizer, ["The old castle"], stop_strings=stop, max_new_tokens=12)[0] == whole
    assert "".join(stream(model, tokenizer, "The old castle", stop_strings=stop, max_new_tokens=12)) == whole


def test_stream_checks_its_arguments_as_generate_does(model):
    from hymba.generate import stream
    from hymba.tokenizer import HymbaTokenizer

    tokenizer = HymbaTokenizer.from_pretrained()
    for bad in (dict(max_new_tokens=0), dict(prefill_chunk=-1), dict(seed="abc"), dict(stop_strings=[""])):
        with pytest.raises(HymbaError):
            next(stream(model, tokenizer, "The old castle", **bad))


def test_the_decode_step_traces_as_one_graph(model):
    """On CUDA `generate` and the engine compile the decode step with fullgraph=True: a graph break anywhere in the
    layer (a data-dependent branch, an untraceable call) would fail there. Traced here with dynamo and AOT autograd
    on the CPU's reference ops, the compiled step equals the eager one."""
    from hymba.cache import HymbaCache
    from hymba.generate import decode_step, prefill

    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.inference_mode():
        traced_cache, eager_cache = HymbaCache(model.config, 2, 32), HymbaCache(model.config, 2, 32)
        prefill(model, traced_cache, ids, None)
        prefill(model, eager_cache, ids, None)
        step = torch.compile(decode_step, backend="aot_eager", fullgraph=True)
        tokens = ids[:, -1]
        for _ in range(3):
            traced, eager = step(model, traced_cache, tokens), decode_step(model, eager_cache, tokens)
            assert torch.allclose(traced, eager, atol=1e-5)
            tokens = eager.argmax(-1)


def test_hymba_pdl_0_in_the_environment_turns_programmatic_launch_off():
    """HYMBA_PDL=0 starts with `hymba.ops.PDL` off, and the compiled step then asks inductor for no PDL either."""
    import os
    import subprocess
    import sys

    read = [sys.executable, "-c", "import hymba.ops; from hymba.generate import inductor_options; "
            "print(hymba.ops.PDL, inductor_options().get('triton.enable_pdl', False))"]
    for value, want in (("0", "False False"), ("1", "True True")):
        out = subprocess.run(read, env={**os.environ, "HYMBA_PDL": value}, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want
