"""Checkpoints: exact round trips, the released tensor names, clear errors, hub ids offline, one copy in memory."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hymba.checkpoint import INDEX_NAME, WEIGHTS_NAME
from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.model import HymbaForCausalLM


def assert_identical(a: HymbaForCausalLM, b: HymbaForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name


def saved_names(directory: Path) -> dict[str, tuple]:
    shapes = {}
    for file in directory.glob("model*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    return shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical(tiny_config, tmp_path, dtype):
    model = HymbaForCausalLM(tiny_config).to(dtype)
    model.save_pretrained(tmp_path)
    loaded = HymbaForCausalLM.from_pretrained(tmp_path, dtype="auto")  # dtype from the saved config
    assert loaded.dtype == dtype
    assert_identical(model, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert all(p.requires_grad for p in loaded.parameters())  # loadable for training, too
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")


def test_loading_in_another_dtype(tiny_config, tmp_path):
    model = HymbaForCausalLM(tiny_config)
    model.save_pretrained(tmp_path)
    loaded = HymbaForCausalLM.from_pretrained(tmp_path, dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    assert_identical(model.to(torch.bfloat16), loaded)


def test_default_dtype_on_the_cpu_is_float32_as_in_the_cli(tiny_config, tmp_path):
    """A bf16 checkpoint loads as float32 on the CPU both through the API and `hymba generate` (which passes
    no dtype unless --dtype is given)."""
    HymbaForCausalLM(tiny_config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert HymbaForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    assert HymbaForCausalLM.from_pretrained(tmp_path, device="cpu").dtype == torch.float32
    assert HymbaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16

    from hymba.generate_cli import load_model_and_tokenizer

    assert load_model_and_tokenizer(str(tmp_path), "cpu", None)[0].dtype == torch.float32
    assert load_model_and_tokenizer(str(tmp_path), "cpu", "bfloat16")[0].dtype == torch.bfloat16


def test_sharded_save_loads_back_identically(tiny_config, tmp_path):
    model = HymbaForCausalLM(tiny_config)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (tmp_path / WEIGHTS_NAME).exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(saved_names(tmp_path))
    assert_identical(model, HymbaForCausalLM.from_pretrained(tmp_path))


def test_unsharded_save_over_a_sharded_one_drops_the_index(tiny_config, tmp_path):
    model = HymbaForCausalLM(tiny_config)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()
    assert_identical(model, HymbaForCausalLM.from_pretrained(tmp_path))


def test_save_over_another_layout_leaves_no_stale_weights(tiny_config, tmp_path):
    """Old shards (or an old single file) would be dead weight that tools globbing *.safetensors still load."""
    model = HymbaForCausalLM(tiny_config)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [WEIGHTS_NAME]
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert not (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / INDEX_NAME).exists()
    assert_identical(model, HymbaForCausalLM.from_pretrained(tmp_path))


def test_saved_files_get_the_usual_permissions(tiny_config, tmp_path):
    """Saved checkpoints are shared; they must be as readable as any file the user creates (umask)."""
    HymbaForCausalLM(tiny_config).save_pretrained(tmp_path)
    (tmp_path / "plain").write_text("")
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    for name in ("config.json", WEIGHTS_NAME):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_saved_names_are_the_released_format(official_tiny_dir, tmp_path):
    """A model built from the official-tiny config saves exactly the tensor names and shapes the release wrote."""
    config = HymbaConfig.from_json(official_tiny_dir)
    HymbaForCausalLM(config).save_pretrained(tmp_path)
    assert saved_names(tmp_path) == saved_names(official_tiny_dir)


def test_side_files_are_copied(official_tiny_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", WEIGHTS_NAME):
        (source / name).write_bytes((official_tiny_dir / name).read_bytes())
    (source / "tokenizer.json").write_text('{"fake": true}')
    HymbaForCausalLM.from_pretrained(source).save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").read_text() == '{"fake": true}'


def test_mismatched_checkpoint_lists_every_problem_in_one_error(tiny_config, tmp_path):
    HymbaForCausalLM(tiny_config).save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["model.layers.3.mamba.D.0"]
    state["model.layers.9.mamba.surprise"] = torch.zeros(3)
    state["model.final_layernorm.weight"] = torch.ones(7)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(HymbaError) as info:
        HymbaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "missing: model.layers.3.mamba.D.0" in message
    assert "unexpected: model.layers.9.mamba.surprise" in message
    assert "mis-shaped: model.final_layernorm.weight (7,) (expected (64,))" in message


# how a checkpoint is damaged -> (the file, what it is overwritten with: None deletes it)
DAMAGE = {
    "truncated weights": (WEIGHTS_NAME, lambda data: data[:5000]),
    "random weights": (WEIGHTS_NAME, lambda data: os.urandom(5000)),
    "empty weights": (WEIGHTS_NAME, lambda data: b""),
    "config is a list": ("config.json", lambda data: b"[1, 2]"),
    "global layer not a list": ("config.json", lambda data: json.dumps({**json.loads(data), "global_attn_idx": 5})),
    "index not JSON": (INDEX_NAME, lambda data: b"{not json"),
    "index without weight_map": (INDEX_NAME, lambda data: b"{}"),
    "truncated shard": ("model-00001-of-*", lambda data: data[:100]),
    "shard missing": ("model-00001-of-*", None),
}


@pytest.mark.parametrize("name, damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_is_one_line_naming_the_file(tiny_config, tmp_path, name, damage):
    sharded = name != WEIGHTS_NAME
    HymbaForCausalLM(tiny_config).save_pretrained(tmp_path, max_shard_bytes=200_000 if sharded else 5 << 30)
    file = next(tmp_path.glob(name))
    if damage is None:
        file.unlink()
    else:
        broken = damage(file.read_bytes())
        file.write_bytes(broken.encode() if isinstance(broken, str) else broken)
    with pytest.raises(HymbaError) as info:
        HymbaForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert file.name in message and "\n" not in message


def test_unknown_device_is_an_error(tiny_config, tmp_path):
    HymbaForCausalLM(tiny_config).save_pretrained(tmp_path)
    with pytest.raises(HymbaError, match="unknown device 'tpu'"):
        HymbaForCausalLM.from_pretrained(tmp_path, device="tpu")
    with pytest.raises(HymbaError, match="not supported"):
        HymbaForCausalLM.from_pretrained(tmp_path, device="mps")


def test_missing_directory_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (tmp_path / "absent", "absent", "./absent/", "a/b/c"):
        with pytest.raises(HymbaError, match="no checkpoint directory"):
            HymbaForCausalLM.from_pretrained(path)


def test_pickle_only_checkpoint_is_refused_unopened(tiny_config, tmp_path):
    """A .bin checkpoint is a pickle, i.e. code; it must be refused without being unpickled."""
    tiny_config.to_json(tmp_path / "config.json")
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HymbaError, match="only safetensors"):
        HymbaForCausalLM.from_pretrained(tmp_path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- hub ids
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache. huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into `constants` at
    import, and snapshot_download reads `constants` at call time, so both the environment (for subprocesses)
    and the constants (for this process) are set."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_loads_from_the_offline_cache(tiny_config, tmp_path, offline_hub):
    model = HymbaForCausalLM(tiny_config)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--some-org--hymba-tiny"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = HymbaForCausalLM.from_pretrained("some-org/hymba-tiny")
    assert Path(loaded.checkpoint_dir).resolve() == snapshot.resolve()
    assert_identical(model, loaded)


def test_unknown_hub_id_offline_is_an_error(offline_hub):
    with pytest.raises(HymbaError, match="could not fetch some-org/not-there"):
        HymbaForCausalLM.from_pretrained("some-org/not-there")


# ---------------------------------------------------------------------------------------------- memory
LOAD_AND_MEASURE = textwrap.dedent("""
    import resource, sys
    import torch
    from hymba.config import HymbaConfig
    from hymba.model import HymbaForCausalLM

    torch.set_num_threads(2)
    # One-time costs that are no part of loading: meta-device construction imports torch's meta kernels,
    # and a first forward loads the CPU kernels.
    with torch.device("meta"):
        HymbaForCausalLM(HymbaConfig.preset("tiny"))
    with torch.no_grad():
        HymbaForCausalLM(HymbaConfig.preset("tiny", vocab_size=97))(torch.zeros(1, 3, dtype=torch.long))
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    baseline = peak()
    model = HymbaForCausalLM.from_pretrained(sys.argv[1])
    with torch.no_grad():  # touch every weight, so lazily mapped pages count as well
        checksum = sum(float(p.sum()) for p in model.parameters())
    print(baseline, peak(), checksum)
""")


def test_loading_allocates_the_weights_once(tmp_path):
    """Peak RSS of loading a ~100 MB checkpoint (in a fresh process) stays under 1.6x its size above the
    interpreter's baseline: the weights are in memory once, never as a loaded copy plus a model copy."""
    config = HymbaConfig.preset("tiny", hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                                num_attention_heads=8, num_key_value_heads=2, v_head_dim=128, mamba_dt_rank=32,
                                vocab_size=8000, global_attn_idx=[0, 5], kv_reuse_group=[[1, 2], [3, 4]])
    HymbaForCausalLM(config).save_pretrained(tmp_path)
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert size > 100e6
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    baseline, peak, checksum = map(float, result.stdout.split())
    ratio = (peak - baseline) / size
    print(f"checkpoint {size / 1e6:.1f} MB, baseline RSS {baseline / 1e6:.1f} MB, peak RSS {peak / 1e6:.1f} MB, "
          f"load cost {ratio:.2f}x the checkpoint")
    assert checksum == checksum  # not NaN: the weights were read
    assert ratio < 1.6, f"loading took {ratio:.2f}x the checkpoint size"
