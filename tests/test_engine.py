"""Continuous batching: every request gives what offline `generate` gives it alone, whatever shares the batch."""

import collections
import queue

import pytest
import torch

from hymba.cache import HymbaCache
from hymba.config import HymbaConfig
from hymba.engine import Engine, GenerationParams, QueueFullError, RequestError
from hymba.errors import HymbaError
from hymba.generate import SamplingParams, complete, generate
from hymba.model import HymbaForCausalLM
from hymba.tokenizer import HymbaTokenizer

# Lengths straddle the window (6) and ring (7) of the tiny layout, so rings wrap while others are short.
PROMPTS = [list(range(100, 100 + n)) for n in (3, 17, 9, 30, 1, 12, 5)]
MAX_TOKENS = [20, 5, 33, 12, 40, 7, 25]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HymbaForCausalLM(HymbaConfig.preset("tiny", eos_token_id=None)).eval()
    m.init_weights()
    return m


@pytest.fixture(scope="module")
def tokenizer():
    return HymbaTokenizer.from_pretrained()


def offline(model, prompt, max_tokens, **kwargs) -> list[int]:
    return generate(model, [prompt], max_new_tokens=max_tokens, **kwargs)[0, len(prompt):].tolist()


def run(engine: Engine, jobs, between_steps=None) -> dict[int, list]:
    """Submit (prompt, params) jobs, step the engine to the end; returns each request's outputs, in job order."""
    outputs = queue.Queue()
    ids = [engine.submit(prompt, params, outputs.put) for prompt, params in jobs]
    got = {i: [] for i in ids}
    while any(not out or out[-1].finish_reason is None for out in got.values()):
        engine.step()
        if between_steps is not None:
            between_steps(engine)
        while not outputs.empty():
            out = outputs.get()
            got[out.request_id].append(out)
    return [got[i] for i in ids]


def tokens(outputs) -> list[int]:
    return [o.token_id for o in outputs if o.token_id is not None]


def test_greedy_equals_offline_whatever_shares_the_batch(model, tokenizer):
    # 7 requests through 3 slots: requests join as others finish, at different positions and lengths.
    engine = Engine(model, tokenizer, max_batch=3, max_len=96)
    results = run(engine, [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)])
    for prompt, n, outputs in zip(PROMPTS, MAX_TOKENS, results):
        assert tokens(outputs) == offline(model, prompt, n)
        assert outputs[-1].finish_reason == "length"
    assert engine.stats().running == 0 and sorted(engine._free_rows) == [0, 1, 2]


def test_prefill_warm_up_leaves_no_trace(model, tokenizer):
    # CUDA engines run it at start-up (its shapes compile there); here it runs on the CPU's cache the same way.
    engine, lines = Engine(model, tokenizer, max_batch=3, max_len=96), []
    engine._warm_up_prefill(lines.append)
    assert lines and "warming up" in lines[0]
    results = run(engine, [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS[:4], MAX_TOKENS)])
    for prompt, n, outputs in zip(PROMPTS, MAX_TOKENS, results):
        assert tokens(outputs) == offline(model, prompt, n)


def test_a_finished_requests_row_is_parked_before_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=96)
    outputs = queue.Queue()
    engine.submit(PROMPTS[1], GenerationParams(max_tokens=30), outputs.put)  # row 0, so nothing moves down
    short = engine.submit(PROMPTS[0], GenerationParams(max_tokens=2), outputs.put)
    while short not in engine._running:
        engine.step()
    row = engine._running[short].row
    while short in engine._running:
        engine.step()
    engine.step()  # the next decode step: the row computes parked at position 0, emptied of the request
    assert bool(engine.runner.idle[row]) and int(engine.cache.next_position[row]) <= 1
    assert not any(layout.valid[row, 1:].any() for layout in engine.cache.layouts.values())


def test_eos_ends_a_request_early_and_its_slot_is_reused(model, tokenizer):
    eos = offline(model, PROMPTS[2], 33)[4]  # the 5th token request 2 generates
    engine = Engine(model, tokenizer, max_batch=2, max_len=96, eos_token_id=eos)
    results = run(engine, [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)])
    for prompt, n, outputs in zip(PROMPTS, MAX_TOKENS, results):
        alone = offline(model, prompt, n)
        expected = alone[:alone.index(eos) + 1] if eos in alone else alone
        assert tokens(outputs) == expected
        assert outputs[-1].finish_reason == ("stop" if eos in alone else "length")
    assert len(tokens(results[2])) <= 5


def test_ignore_eos_generates_up_to_max_tokens(model, tokenizer):
    eos = offline(model, PROMPTS[2], 33)[4]
    engine = Engine(model, tokenizer, max_batch=2, max_len=96, eos_token_id=eos)
    (outputs,) = run(engine, [(PROMPTS[2], GenerationParams(max_tokens=33, ignore_eos=True))])
    assert tokens(outputs) == offline(model, PROMPTS[2], 33) and outputs[-1].finish_reason == "length"


def test_free_slots_cannot_leak_nan(model, tokenizer):
    """NaN poured into every free slot before each step changes nothing for the running requests."""
    def poison(engine: Engine):
        free = engine.runner.idle.nonzero()[:, 0]
        for buffer in [*engine.cache.keys.values(), *engine.cache.values.values()]:
            buffer[free] = float("nan")
        for state in engine.cache.ssm.values():
            state.ssm[free], state.conv[free] = float("nan"), float("nan")

    engine = Engine(model, tokenizer, max_batch=4, max_len=96)
    jobs = [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS[:5], MAX_TOKENS[:5])]
    results = run(engine, jobs, between_steps=poison)
    for (prompt, params), outputs in zip(jobs, results):
        assert tokens(outputs) == offline(model, prompt, params.max_tokens)


def test_text_and_stop_strings_equal_offline_complete(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3)
    texts = ["Once upon a time", "The capital of France is", "def main():", "1, 2, 3,"]
    plain = complete(model, tokenizer, texts[:1], max_new_tokens=12)[0]
    stop = plain[4:7]  # a stop string that really occurs, inside the first completion
    for text, got in zip(texts, engine.complete(texts, GenerationParams(max_tokens=12, stop=[stop]))):
        assert got.text == complete(model, tokenizer, [text], max_new_tokens=12, stop_strings=[stop])[0]
        assert got.finish_reason == ("stop" if stop in complete(model, tokenizer, [text], max_new_tokens=12)[0]
                                     else "length")


def test_seeded_sampling_equals_offline(model, tokenizer):
    sampling = SamplingParams(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01,
                              repetition_penalty=1.2)
    engine = Engine(model, tokenizer, max_batch=3, max_len=96)
    jobs = [(p, GenerationParams(max_tokens=n, sampling=sampling, seed=i)) for i, (p, n) in
            enumerate(zip(PROMPTS, MAX_TOKENS))]
    jobs[1] = (PROMPTS[1], GenerationParams(max_tokens=9))  # a greedy neighbour
    for (prompt, params), outputs in zip(jobs, run(engine, jobs)):
        kwargs = vars(params.sampling) if params.seed is not None else {}
        assert tokens(outputs) == offline(model, prompt, params.max_tokens, seed=params.seed, **kwargs)


def test_logprobs_are_the_models(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=64)
    (outputs,) = run(engine, [(PROMPTS[1], GenerationParams(max_tokens=4, logprobs=3))])
    ids = torch.tensor([PROMPTS[1] + tokens(outputs)])
    with torch.no_grad():
        full = torch.log_softmax(model(ids).logits[0, len(PROMPTS[1]) - 1:-1].float(), dim=-1)
    for step, out in enumerate(outputs):
        assert out.logprob.token_id == out.token_id == int(full[step].argmax())
        assert out.logprob.logprob == pytest.approx(float(full[step, out.token_id]), abs=1e-4)
        assert [t for t, _ in out.logprob.top] == full[step].topk(3).indices.tolist()


def test_cancel_frees_the_slot_for_a_waiting_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=96)
    outputs = queue.Queue()
    first = engine.submit(PROMPTS[0], GenerationParams(max_tokens=40), outputs.put)
    second = engine.submit(PROMPTS[1], GenerationParams(max_tokens=5), outputs.put)
    engine.step()
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    engine.cancel(first)
    got = {first: [], second: []}
    while not got[second] or got[second][-1].finish_reason is None:
        engine.step()
        while not outputs.empty():
            out = outputs.get()
            got[out.request_id].append(out)
    # Two steps: the prefill's token, then a decode step whose token is still on the device when the cancel lands.
    assert got[first][-1].finish_reason == "cancelled" and len(tokens(got[first])) == 1
    assert tokens(got[second]) == offline(model, PROMPTS[1], 5)  # in the slot the cancelled one left


def test_scheduler_thread_serves_concurrent_submitters(model, tokenizer):
    with Engine(model, tokenizer, max_batch=2, max_len=96) as engine:
        results = engine.complete(PROMPTS[:4], GenerationParams(max_tokens=6))
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == offline(model, prompt, 6)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_goes_on(model, tokenizer):
    def out_of_memory(tokens):
        raise RuntimeError("out of memory (simulated)")

    engine = Engine(model, tokenizer, max_batch=2, max_len=96)
    working, engine._step_fn = engine._step_fn, out_of_memory
    failed = run(engine, [(p, GenerationParams(max_tokens=5)) for p in PROMPTS[:2]])
    assert [o[-1].finish_reason for o in failed] == ["error", "error"]
    assert failed[0][-1].error == "RuntimeError: out of memory (simulated)"
    assert all(len(tokens(o)) == 1 for o in failed)  # the first token came from the prefill
    engine._step_fn = working
    (outputs,) = run(engine, [(PROMPTS[2], GenerationParams(max_tokens=5))])
    assert tokens(outputs) == offline(model, PROMPTS[2], 5) and engine.stats().finished_total["error"] == 2


def test_bad_requests_and_a_full_queue_are_refused(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=32, max_queue=1)
    for prompt, params, param in [([], GenerationParams(), "prompt"),
                                  ([5] * 32, GenerationParams(max_tokens=1), "prompt"),
                                  ([5] * 20, GenerationParams(max_tokens=13), "max_tokens"),
                                  ([model.config.vocab_size], GenerationParams(), "prompt"),
                                  ([5], GenerationParams(max_tokens=0), "max_tokens"),
                                  ([5], GenerationParams(stop=[""]), "stop"),
                                  ([5], GenerationParams(logprobs=21), "logprobs")]:
        with pytest.raises(RequestError) as info:
            engine.submit(prompt, params)
        assert info.value.param == param
    engine.submit([5], GenerationParams())
    with pytest.raises(QueueFullError):
        engine.submit([5], GenerationParams())
    with pytest.raises(HymbaError, match="max_len"):
        Engine(model, tokenizer, max_len=10_000)


def test_copy_row_and_reset_rows(model):
    cache = HymbaCache(model.config, 3, 40)
    one = HymbaCache(model.config, 1, 40)
    with torch.no_grad():
        model(torch.tensor([PROMPTS[3]]), cache=one)
    cache.copy_rows_from([2], one, [0])
    assert cache.next_position[2] == one.next_position[0] and cache.next_position[:2].eq(0).all()
    for layer, state in one.ssm.items():
        assert torch.equal(cache.ssm[layer].ssm[2], state.ssm[0]) and cache.ssm[layer].ssm[:2].eq(0).all()
    for window, layout in one.layouts.items():
        assert torch.equal(cache.layouts[window].valid[2], layout.valid[0])
    cache.reset_rows([2])
    assert cache.next_position.eq(0).all() and not any(layout.valid.any() for layout in cache.layouts.values())
    assert all(state.ssm.eq(0).all() and state.conv.eq(0).all() for state in cache.ssm.values())
    with pytest.raises(HymbaError, match="same max_len"):
        cache.copy_rows_from([0], HymbaCache(model.config, 1, 41), [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_eager(model, tokenizer):
    gpu = HymbaForCausalLM(model.config).eval().cuda()
    gpu.load_state_dict(model.state_dict())
    jobs = [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    # Slots of 160 tokens hold the smallest prefill bucket (128 tokens + the meta tokens): by default the decode
    # steps and small groups' first prefills replay CUDA graphs.
    engine = Engine(gpu, tokenizer, max_batch=3, max_len=160)
    assert engine.prefill_graphs is not None
    graphed = run(engine, jobs)
    eager = run(Engine(gpu, tokenizer, max_batch=3, max_len=160, cuda_graph=False), jobs)
    eager_prefill = run(Engine(gpu, tokenizer, max_batch=3, max_len=160, prefill_graphs=False), jobs)
    segmented = run(Engine(gpu, tokenizer, max_batch=3, max_len=160, prefill_graph_segments=2), jobs)
    assert ([tokens(o) for o in graphed] == [tokens(o) for o in eager] == [tokens(o) for o in eager_prefill]
            == [tokens(o) for o in segmented])
    for prompt, n, outputs in zip(PROMPTS, MAX_TOKENS, graphed):
        assert tokens(outputs) == offline(gpu, prompt, n, cuda_graph=False)


def test_scheduler_groups_arrivals_under_the_token_budget():
    from hymba.engine import Scheduler

    s = Scheduler(max_batch_tokens=100, max_rows=4, chunk=16, num_meta=4)
    assert s.group_size([10, 10, 10, 10, 10], free_slots=8, decoding=False) == 4  # max_rows
    assert s.group_size([10, 10, 10], free_slots=2, decoding=False) == 2  # free slots
    assert s.group_size([10, 10, 10], free_slots=0, decoding=False) == 0
    # Each row costs meta + its first piece: (4 + 10) x 7 = 98 fits, but the budget is for the widest forward: a
    # 30-token prompt pads the others to a first piece of min(30, 30 - 10 + 16) = 26 tokens.
    assert Scheduler(100, 16, 16, 4).group_size([10] * 9, 16, False) == 7
    assert Scheduler(100, 16, 16, 4).group_size([10, 30, 10], 16, False) == 2
    assert s.group_size([500], free_slots=4, decoding=True) == 1  # the first request always goes, however long
    waiting = Scheduler(1000, 8, 16, 4, prefill_wait_s=0.5)
    assert waiting.group_size([10, 10], 8, decoding=True, oldest_wait_s=0.1) == 0  # not full: wait for more
    assert waiting.group_size([10, 10], 8, decoding=True, oldest_wait_s=0.6) == 2
    assert waiting.group_size([10, 10], 8, decoding=False, oldest_wait_s=0.0) == 2  # nothing to stall
    # A further group in the same step takes only what the step's budget has left, maybe nothing.
    assert s.group_size([10, 10, 10], free_slots=8, decoding=False, budget=30) == 2
    assert s.group_size([30], free_slots=8, decoding=False, budget=15) == 0  # its first piece: 4 + 16 tokens
    # Unpadded groups (the CPU's): the head's length only, first come first served.
    unpadded = Scheduler(1000, 8, 16, 4, pad=False)
    assert unpadded.group_size([10, 10, 12, 10], 8, decoding=False) == 2


def test_arrivals_during_chunked_group_prefills_equal_offline(model, tokenizer):
    """Small pieces and budget: groups take several steps, requests arrive while others prefill and decode (also
    between a prefill's layers, as on CUDA), and each still gets exactly what offline `generate` gives it alone;
    so does the one-at-a-time reference."""
    lengths = [1, *MAX_TOKENS[1:]]  # one request wants a single token: the prefill's, with no decode step
    jobs = [(p, GenerationParams(max_tokens=n)) for p, n in zip(PROMPTS, lengths)]
    want = [offline(model, p, n) for p, n in zip(PROMPTS, lengths)]
    for kwargs in (dict(prefill_chunk=4, max_batch_tokens=40), dict(prefill_chunk=4, decode_during_prefill=True),
                   dict(max_prefill_rows=1)):
        engine = Engine(model, tokenizer, max_batch=4, max_len=96, **kwargs)
        outputs = queue.Queue()
        ids, pending = [], list(jobs)
        got = collections.defaultdict(list)
        while pending or any(not got[i] or got[i][-1].finish_reason is None for i in ids):
            if pending:  # one arrival per step, landing in the middle of other groups' prefills
                ids.append(engine.submit(*pending.pop(0), outputs.put))
            engine.step()
            while not outputs.empty():
                out = outputs.get()
                got[out.request_id].append(out)
        assert [tokens(got[i]) for i in ids] == want, kwargs


def test_a_steps_prefill_groups_keep_to_the_token_budget(model, tokenizer):
    """Rows x (meta tokens + piece) over all of a step's fresh groups stays within max_batch_tokens, as the
    scheduler counts a group (a GPU's groups are fresh: they compute the meta tokens again)."""
    M = model.config.num_memory_tokens
    engine = Engine(model, tokenizer, max_batch=8, max_len=96, max_batch_tokens=3 * (M + 10) + 5)
    engine.meta = None  # every group fresh, as on a GPU
    prefilled = []
    piece = engine._prefill_piece

    def counted():
        prefilled.append(len(engine._group.requests))
        return piece()

    engine._prefill_piece = counted
    for _ in range(6):
        engine.submit([5] * 10, GenerationParams(max_tokens=2))
    engine.step()
    assert prefilled == [3]


def test_cancel_mid_prefill_frees_the_slot(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_len=96, prefill_chunk=4)
    outputs = queue.Queue()
    first = engine.submit(PROMPTS[3], GenerationParams(max_tokens=5), outputs.put)  # 30 tokens: 8 pieces
    second = engine.submit(PROMPTS[1], GenerationParams(max_tokens=5), outputs.put)
    engine.step()
    engine.step()
    engine.cancel(first)
    results = collections.defaultdict(list)
    while not results[second] or results[second][-1].finish_reason is None:
        engine.step()
        while not outputs.empty():
            out = outputs.get()
            results[out.request_id].append(out)
    assert [o.finish_reason for o in results[first]] == ["cancelled"]
    assert tokens(results[second]) == offline(model, PROMPTS[1], 5)


def test_seeded_sampling_is_the_same_under_any_load(model, tokenizer):
    sampling = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95)
    job = (PROMPTS[2], GenerationParams(max_tokens=15, sampling=sampling, seed=1234))
    alone = run(Engine(model, tokenizer, max_batch=1, max_len=96), [job])[0]
    crowd = [(p, GenerationParams(max_tokens=n, sampling=sampling)) for p, n in zip(PROMPTS[3:], MAX_TOKENS[3:])]
    for decode_during_prefill in (False, True):
        busy = run(Engine(model, tokenizer, max_batch=3, max_len=96, prefill_chunk=8,
                          decode_during_prefill=decode_during_prefill), crowd[:2] + [job] + crowd[2:])[2]
        assert tokens(alone) == tokens(busy) == offline(model, job[0], 15, seed=1234, **vars(sampling))


def test_a_failing_prefill_ends_its_group_and_the_engine_goes_on(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=96)
    working = engine._prefill_piece

    def out_of_memory():
        raise RuntimeError("out of memory (simulated)")

    engine._prefill_piece = out_of_memory
    failed = run(engine, [(PROMPTS[0], GenerationParams(max_tokens=5))])[0]
    assert failed[-1].finish_reason == "error" and not tokens(failed)
    engine._prefill_piece = working
    (outputs,) = run(engine, [(PROMPTS[2], GenerationParams(max_tokens=5))])
    assert tokens(outputs) == offline(model, PROMPTS[2], 5)


def test_a_decode_step_failing_between_prefill_layers_ends_only_the_decoding_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=96, decode_during_prefill=True)
    working = engine._step_fn

    def fails_while_prefilling(tokens):
        if engine._group is not None:
            raise RuntimeError("out of memory (simulated)")
        return working(tokens)

    outputs = collections.defaultdict(list)
    decoding = engine.submit(PROMPTS[0], GenerationParams(max_tokens=20), lambda o: outputs[o.request_id].append(o))
    for _ in range(3):
        engine.step()
    engine._step_fn = fails_while_prefilling
    arriving = engine.submit(PROMPTS[2], GenerationParams(max_tokens=5), lambda o: outputs[o.request_id].append(o))
    while not outputs[arriving] or outputs[arriving][-1].finish_reason is None:
        engine.step()
    assert outputs[decoding][-1].finish_reason == "error"
    assert tokens(outputs[arriving]) == offline(model, PROMPTS[2], 5)


def test_replicas_spread_requests_and_answer_as_one_engine(model, tokenizer):
    from hymba.engine import Replicas

    engines = [Engine(model, tokenizer, max_batch=2, max_len=96) for _ in range(2)]
    with Replicas(engines) as replicas:
        outputs = queue.Queue()
        ids = [replicas.submit(p, GenerationParams(max_tokens=n), outputs.put) for p, n in zip(PROMPTS, MAX_TOKENS)]
        assert len(set(ids)) == len(ids)
        got = collections.defaultdict(list)
        while len([i for i in ids if got[i] and got[i][-1].finish_reason]) < len(ids):
            out = outputs.get(timeout=60)
            got[out.request_id].append(out)
        stats = replicas.stats()
    assert [tokens(got[i]) for i in ids] == [offline(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert all(e.stats().requests_total > 0 for e in engines)  # both took work
    assert stats.requests_total == len(ids) and stats.finished_total == {"length": len(ids)} and stats.max_batch == 4


def test_replicas_cancel_reaches_the_engine_that_holds_the_request(model, tokenizer):
    from hymba.engine import Replicas

    replicas = Replicas([Engine(model, tokenizer, max_batch=1, max_len=96) for _ in range(2)])
    outputs = queue.Queue()
    first = replicas.submit(PROMPTS[0], GenerationParams(max_tokens=40), outputs.put)
    second = replicas.submit(PROMPTS[1], GenerationParams(max_tokens=40), outputs.put)
    for engine in replicas.engines:  # one request each: the router sends the second to the idle engine
        engine.step()
        assert engine.stats().waiting == 0
    replicas.cancel(second)
    while True:
        for engine in replicas.engines:
            engine.step()
        seen = [outputs.get() for _ in range(outputs.qsize())]
        if any(o.request_id == second and o.finish_reason for o in seen):
            break
    assert replicas.stats().running == 1 and replicas.stats().finished_total == {"cancelled": 1}
    replicas.cancel(first)
    for engine in replicas.engines:
        engine.stop()


def test_requests_move_down_into_free_rows_and_decode_on(model, tokenizer):
    """When low rows free up, a request in a high row moves down (on the CPU, whenever a hole is below it) and still
    decodes exactly as offline, in the middle of its own generation."""
    engine = Engine(model, tokenizer, max_batch=4, max_len=96)
    jobs = [(PROMPTS[0], GenerationParams(max_tokens=3)), (PROMPTS[1], GenerationParams(max_tokens=3)),
            (PROMPTS[2], GenerationParams(max_tokens=4)), (PROMPTS[3], GenerationParams(max_tokens=30))]
    rows = []
    results = run(engine, jobs, between_steps=lambda e: rows.append(sorted(r.row for r in e._running.values())))
    assert [3] not in rows and [0] in rows  # the long request, admitted into row 3, ended in row 0
    assert [tokens(o) for o in results] == [offline(model, p, params.max_tokens) for p, params in jobs]


def test_a_group_failing_as_it_moves_into_its_slots_gives_them_back(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_len=96)
    working = engine.cache.copy_rows_from

    def out_of_memory(*args):
        raise RuntimeError("out of memory (simulated)")

    engine.cache.copy_rows_from = out_of_memory
    failed = run(engine, [(PROMPTS[0], GenerationParams(max_tokens=5)), (PROMPTS[1], GenerationParams(max_tokens=5))])
    assert [o[-1].finish_reason for o in failed] == ["error", "error"]
    assert sorted(engine._free_rows) == [0, 1] and engine._group is None
    engine.cache.copy_rows_from = working
    results = run(engine, [(p, GenerationParams(max_tokens=4)) for p in PROMPTS[2:4]])
    assert [tokens(o) for o in results] == [offline(model, p, 4) for p in PROMPTS[2:4]]


def test_a_burst_as_large_as_the_slots_prefills_as_one_group(model, tokenizer):
    """By default a group may take every free slot (not a fixed 32 rows), so a wave of arrivals is one prefill forward
    and decodes in step: all 40 requests finish on the same step."""
    engine = Engine(model, tokenizer, max_batch=40, max_len=32)
    groups = []
    prefill_piece = engine._prefill_piece
    engine._prefill_piece = lambda: groups.append(len(engine._group.requests)) or prefill_piece()
    finished_at = []
    for i in range(40):
        engine.submit(list(range(200 + i, 208 + i)), GenerationParams(max_tokens=3),
                      lambda out: out.finish_reason and finished_at.append(engine.decode_steps_total))
    while len(finished_at) < 40:
        engine.step()
    assert groups == [40] and len(set(finished_at)) == 1
