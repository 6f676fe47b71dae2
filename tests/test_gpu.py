"""Same answers on the GPU: the fast paths (Triton scan/conv, FlexAttention, CUDA-graph decode) against the
float32 CPU reference. Skipped without CUDA; run on a GPU machine with `pytest tests/test_gpu.py`."""

import pytest
import torch

from hymba.config import HymbaConfig
from hymba.generate import generate
from hymba.model import HymbaForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def test_official_tiny_greedy_bf16_gpu_matches_cpu_float32(official_tiny_dir):
    cpu = HymbaForCausalLM.from_pretrained(official_tiny_dir, dtype=torch.float32)
    gpu = HymbaForCausalLM.from_pretrained(official_tiny_dir, dtype=torch.bfloat16, device="cuda")
    prompts = [[1, 5, 9, 13, 17, 21, 25], [1, 2, 3], [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90]]
    want = generate(cpu, prompts, max_new_tokens=20)
    got = generate(gpu, prompts, max_new_tokens=20)
    # bf16 may flip a near-tie: require the first 8 tokens of every row and 90% overall to agree.
    assert torch.equal(got[:, -20:-12].cpu(), want[:, -20:-12])
    assert (got[:, -20:].cpu() == want[:, -20:]).float().mean() >= 0.9


def test_gpu_batched_equals_unbatched():
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257, sliding_window=16)).cuda().eval()
    model.init_weights()
    prompts = [list(range(1, 40)), [7, 8, 9], list(range(100, 120))]
    batched = generate(model, prompts, max_new_tokens=24)
    for row, prompt in enumerate(prompts):
        assert generate(model, [prompt], max_new_tokens=24)[0, len(prompt):].tolist() == batched[row, -24:].tolist()


def test_cuda_graph_decode_equals_eager():
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257)).cuda().eval()
    model.init_weights()
    prompts = [list(range(1, 30)), [3, 4, 5, 6]]
    eager = generate(model, prompts, max_new_tokens=30, cuda_graph=False)
    assert torch.equal(generate(model, prompts, max_new_tokens=30, cuda_graph=True), eager)


@pytest.mark.parametrize("switch, kernel_module, kernel_name, batches", [
    ("hymba.ops.mlp.FUSED_MAX_ROWS", "hymba.ops.mlp.triton", "gate_up_swiglu_triton", (1, 7)),
    ("hymba.ops.linear.SMALL_ROWS_MAX", "hymba.ops.linear.triton", "small_rows_linear", (1, 7)),
    # (the rows it runs at by default; at 8 rows and more its sums round differently from the other kernels')
    ("hymba.ops.scan.FUSED_STEP_MAX_ROWS", "hymba.ops.scan.triton_step", "ssm_step_triton", (1, 2)),
    ("hymba.ops.scan.ROWS_STEP_MAX_ROWS", "hymba.ops.scan.triton_step", "ssm_step_rows_triton", (3, 7)),
])
def test_fused_decode_kernels_give_the_plain_paths_tokens(monkeypatch, switch, kernel_module, kernel_name, batches):
    """bf16 decode with a decode-rows kernel switched on (the fused gate/up SwiGLU, the small-rows projections, the SSM
    heads' two-kernel step) against the path without it: the same greedy tokens at two batch sizes (the second
    left-padded) for 64 steps past the sliding window, eager and captured, and the kernel ran."""
    import importlib

    module_name, _, limit = switch.rpartition(".")
    switched, kernels = importlib.import_module(module_name), importlib.import_module(kernel_module)
    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257, sliding_window=16)).cuda().eval()
    model.init_weights()
    model.to(torch.bfloat16)
    calls = []
    kernel = getattr(kernels, kernel_name)
    monkeypatch.setattr(kernels, kernel_name, lambda *args: calls.append(1) or kernel(*args))
    for batch in batches:
        prompts = [list(range(1 + row, 12 + 3 * row)) for row in range(batch)]
        monkeypatch.setattr(switched, limit, 0)
        plain = generate(model, prompts, max_new_tokens=80, cuda_graph=False)
        assert not calls
        monkeypatch.setattr(switched, limit, 8)
        for cuda_graph in (False, True):
            # (compiled with the kernel inside: tests/ops/test_mlp_triton.py, tests/ops/test_linear_triton.py)
            assert torch.equal(generate(model, prompts, max_new_tokens=80, cuda_graph=cuda_graph, compile=False),
                               plain)
            assert calls, "the kernel did not run"
            calls.clear()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fast_prefill_matches_reference(dtype, tol):
    """A long prompt (FlexAttention, Triton scan and conv) against the CPU float32 reference path."""
    torch.manual_seed(0)
    config = HymbaConfig.preset("tiny", vocab_size=257, sliding_window=64, num_memory_tokens=16)
    cpu = HymbaForCausalLM(config).eval()
    cpu.init_weights()
    gpu = HymbaForCausalLM(config).to("cuda", dtype).eval()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(1, 257, (2, 700))
    mask = torch.ones_like(ids)
    mask[1, :123] = 0  # left padding longer than the window
    with torch.no_grad():
        want = cpu(ids, attention_mask=mask).logits
        got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits.float().cpu()
    keep = mask.bool()
    assert rel(got[keep], want[keep]) < tol


def test_training_step_gradients_match_reference():
    torch.manual_seed(0)
    config = HymbaConfig.preset("tiny", vocab_size=257)
    cpu = HymbaForCausalLM(config)
    cpu.init_weights()
    gpu = HymbaForCausalLM(config).cuda()
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(1, 257, (2, 300))
    cpu(ids, labels=ids).loss.backward()
    gpu(ids.cuda(), labels=ids.cuda()).loss.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert rel(p_gpu.grad.cpu(), p_cpu.grad) < 1e-3, name


def test_compiled_elementwise_pieces_match_their_reference():
    """RMSNorm, RoPE, SwiGLU and the branch fusion run compiled on CUDA; each equals its eager reference."""
    from hymba.model import apply_rope
    from hymba.ops.mlp import swiglu
    from hymba.ops.norm import average_of_norms, rms_norm

    torch.manual_seed(0)
    x = torch.randn(3, 37, 2 * 100, device="cuda", dtype=torch.bfloat16)[..., ::2]  # odd shape, not contiguous
    weight = torch.randn(100, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.randn(2, 1, 37, 100, device="cuda", dtype=torch.bfloat16).unbind(0)
    cases = [(rms_norm, (x, weight, 1e-6)), (apply_rope, (x[:, None], cos[:, None], sin[:, None])),
             (swiglu, (x, x.flip(1))), (average_of_norms, (x, weight, x.flip(1), weight.flip(0), 1e-6))]
    for fn, args in cases:
        assert rel(fn(*args).float(), fn.reference(*args).float()) < 1e-2, fn.__name__
    leaf = x.detach().float().requires_grad_()
    rms_norm(leaf, weight.float(), 1e-6).square().sum().backward()
    compiled_grad, leaf.grad = leaf.grad, None
    rms_norm.reference(leaf, weight.float(), 1e-6).square().sum().backward()
    assert rel(compiled_grad, leaf.grad) < 1e-5


def test_compiled_cuda_graph_decode_equals_eager_step():
    """The whole decode step compiled as one graph (custom ops for the Triton kernels) and captured, against eager."""
    from hymba.cache import HymbaCache
    from hymba.generate import CudaGraphDecoder, decode_step, prefill

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257)).cuda().eval()
    model.init_weights()
    ids = torch.randint(1, 257, (3, 20), device="cuda")
    with torch.inference_mode():
        caches = [HymbaCache(model.config, 3, 40, device="cuda") for _ in range(2)]
        for cache in caches:
            prefill(model, cache, ids, None)
        graph = CudaGraphDecoder(model, caches[0], 3, compile=True)
        tokens = ids[:, -1]
        for _ in range(12):
            want = decode_step(model, caches[1], tokens).clone()
            got = graph(tokens).clone()
            assert rel(got, want) < 1e-4
            tokens = want.argmax(-1)



def test_pdl_launches_give_the_same_logits(monkeypatch):
    """The captured bf16 decode step with its Triton kernels launched as programmatic dependents (`hymba.ops.PDL`, the
    default on sm_90+) and without: the same logits, bit for bit, for 12 steps past the sliding window."""
    import hymba.ops
    from hymba.cache import HymbaCache
    from hymba.generate import CudaGraphDecoder, prefill

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257, sliding_window=16)).cuda().eval()
    model.init_weights()
    model.to(torch.bfloat16)
    ids = torch.randint(1, 257, (3, 24), device="cuda")
    logits = {}
    with torch.inference_mode():
        for pdl in (True, False):
            monkeypatch.setattr(hymba.ops, "PDL", pdl)
            cache = HymbaCache(model.config, 3, 64, device="cuda", dtype=torch.bfloat16)
            prefill(model, cache, ids, None)
            graph = CudaGraphDecoder(model, cache, 3)
            tokens, steps = ids[:, -1], []
            for _ in range(12):
                steps.append(graph(tokens).clone())
                tokens = steps[-1].argmax(-1)
            logits[pdl] = torch.stack(steps)
    assert torch.equal(logits[True], logits[False])


def test_chunked_loss_matches_full_logits_under_bf16_autocast():
    """The trainer's loss (LM head + cross-entropy a chunk of tokens at a time) on the GPU, the vocabulary of the
    release, against F.cross_entropy of full float32 logits under the same autocast: value and both gradients."""
    from hymba.ops.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

    torch.manual_seed(0)
    hidden = torch.randn(3000, 256, device="cuda", requires_grad=True)
    weight = (0.05 * torch.randn(32001, 256, device="cuda")).requires_grad_()
    targets = torch.randint(0, 32001, (3000,), device="cuda")
    targets[::7] = -100
    results = []
    for fn, kw in ((linear_cross_entropy, dict(chunk_size=1024)), (linear_cross_entropy_ref, {})):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(hidden, weight, targets, **kw)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for ours, ref in zip(*results):
        assert rel(ours, ref) < 1e-2


def test_compiled_layers_training_step_matches_eager_in_bf16():
    """`hymba train --compile` (each layer compiled by inductor) gives eager's bf16 gradients, within bf16 rounding
    (the compiled kernels fuse, so they round at other places)."""
    from hymba.train import trainer

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257)).cuda()
    model.init_weights()
    rt = trainer.Runtime(rank=0, world_size=1, device=torch.device("cuda"), amp_dtype=torch.bfloat16)
    seq = torch.randint(1, 257, (2, 301), device="cuda")
    batch = [(seq[:, :-1], seq[:, 1:])]

    def grads():
        model.zero_grad(set_to_none=True)
        loss = trainer.accumulate_gradients(model, batch, seq[:, 1:].numel(), rt)
        return loss, {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager = grads()
    trainer.compile_layers(model)
    compiled_loss, compiled = grads()
    assert rel(compiled_loss, eager_loss) < 1e-2
    for name in eager:
        assert rel(compiled[name], eager[name]) < 3e-2, name


def test_captured_prefill_equals_its_eager_run():
    """`PrefillGraphs`' replays give the logits and cache rows of the same padded forward run eagerly, bucket after
    bucket and again after other buckets ran (they share one memory pool), with other work queued between a
    forward's segments (as the engine's decode steps are)."""
    from hymba.cache import HymbaCache
    from hymba.generate import PrefillGraphs, left_pad

    torch.manual_seed(0)
    model = HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=257, sliding_window=16)).cuda().eval()
    model.init_weights()
    groups = [[list(range(1, 40)), [7, 8, 9]], [list(range(100, 220))], [[5] * 7, list(range(9, 30)), [3, 4]]]
    captured_cache, eager_cache = (HymbaCache(model.config, 4, 200, device="cuda") for _ in range(2))
    captured = PrefillGraphs(model, captured_cache, rows=(2, 4), widths=(32, 64, 128), segments=2)
    eager = PrefillGraphs(model, eager_cache, rows=(2, 4), widths=(32, 64, 128), cuda_graph=False)
    captured.capture()
    other = torch.randn(256, 256, device="cuda")  # work queued between a forward's segments
    with torch.inference_mode():
        for ids_list in groups + groups[::-1]:
            ids, mask = left_pad(ids_list, 0, "cuda")
            for cache in (captured_cache, eager_cache):
                cache.reset_rows(list(range(4)))
            calls = []
            got, want = captured(ids, mask, lambda: calls.append(other @ other)), eager(ids, mask)  # noqa: B023
            assert rel(got, want) < 1e-5 and len(calls) == len(captured.cuts) == 1
            k = len(ids_list)
            for layer, state in eager_cache.ssm.items():
                assert rel(captured_cache.ssm[layer].ssm[:k], state.ssm[:k]) < 1e-5
            assert torch.equal(captured_cache.next_position[:k], eager_cache.next_position[:k])
