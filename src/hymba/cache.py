"""`HymbaCache`: generation state, allocated once for (batch, max length) and updated in place.

Per KV-producing layer, keys and values live in a preallocated buffer of slots:

    global layer:    [meta 0..M-1 | token positions M .. M+max_len-1]          (slot = position)
    windowed layer:  [meta 0..M-1 | ring of window+1 token slots]              (slot = M + (pos - M) % ring)

KV-reusing layers own nothing and attend over their producer's buffers. Every SSM layer holds its float32
state (d_inner x d_state) and its conv state (the last d_conv-1 inputs). Which buffered key a query may see
is decided from the position stored beside each slot (`hymba.ops.attention`), so the ring needs no
reordering and decoding needs no `torch.cat`: one token per row is written into its slot and attention runs
over the whole buffer.

A prefill chunk attends over [buffer before the chunk, the chunk's own keys] (the first chunk into a fresh cache
over its own keys alone) and then writes into the buffer only the keys that stay needed (meta tokens, and for a
ring the last window+1 positions of each row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hymba.config import HymbaConfig
from hymba.errors import HymbaError
from hymba.ops import capturing_cuda_graph, device_tensor


@dataclass
class SSMState:
    ssm: torch.Tensor  # (b, d_inner, d_state) float32
    conv: torch.Tensor  # (b, d_inner, d_conv - 1)


class KeyLayout:
    """The slots shared by every producer layer of one kind (global, or windowed): positions and validity."""

    def __init__(self, batch: int, num_meta: int, ring: int | None, capacity: int, device):
        self.num_meta, self.ring, self.capacity = num_meta, ring, capacity
        self.positions = torch.zeros(batch, capacity, dtype=torch.long, device=device)  # (b, S)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (b, S)
        self.attend_pos: torch.Tensor | None = None  # key positions/validity the current forward attends over
        self.attend_valid: torch.Tensor | None = None
        self.write: tuple[torch.Tensor, ...] | None = None  # (rows, chunk index, slot) to copy after attending

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        if self.ring is None:
            return positions
        M = self.num_meta
        return torch.where(positions < M, positions, M + (positions - M) % self.ring)

    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None, decoding: bool, fresh: bool) -> None:
        """Plan this forward's writes. Decoding writes first and attends over the buffer; a prefill chunk
        attends over [old buffer, chunk] (over the chunk alone when the cache is `fresh`: nothing in the buffer is
        valid yet) and writes the entries that stay needed."""
        b, T = positions.shape
        if decoding:
            # No bounds check here: it would cost a host sync per token (and break CUDA graphs); the cache
            # is sized for prompt + max_new_tokens by its allocator.
            slot = self.slots(positions[:, 0])
            rows = torch.arange(b, device=positions.device)
            self.write = (rows, torch.zeros_like(rows), slot)
            self.positions[rows, slot] = positions[:, 0]
            self.valid[rows, slot] = torch.ones_like(slot, dtype=torch.bool)  # a device tensor: graph-capturable
            self.attend_pos, self.attend_valid = self.positions, self.valid
            return
        keep = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid.clone()
        if self.ring is not None:
            end = torch.where(keep, positions, -1).amax(dim=1, keepdim=True) + 1  # next position of each row
            keep &= (positions < self.num_meta) | (positions >= end - self.ring)
        elif fresh:  # positions count from 0 within the forward, so its width bounds them without a device read
            if T > self.capacity:
                raise HymbaError(f"a forward of {T} positions (meta tokens and padding included) into a cache sized "
                                 f"for {self.capacity}; allocate it for the full prompt + max_new_tokens")
        elif not capturing_cuda_graph(positions) and bool((positions[keep] >= self.capacity).any()):
            raise HymbaError(f"the prompt needs more than the {self.capacity} positions the cache was sized for; "
                             "allocate it for the full prompt + max_new_tokens")
        # Every entry writes (a fixed-size, sync-free plan): one not kept writes its row's last kept entry again, into
        # that entry's slot, so duplicate writes carry the same bytes. Rows (b, 1) broadcast against the (b, T) rest.
        order = torch.arange(T, device=positions.device)
        last_kept = torch.where(keep, order, 0).amax(dim=1, keepdim=True)  # (b, 1); 0 if a row keeps nothing
        index = torch.where(keep, order, last_kept)
        rows = torch.arange(b, device=positions.device)[:, None]
        written = positions.gather(1, index)  # the position each write carries
        slot = self.slots(written)
        self.write = (rows, index, slot)
        chunk_valid = torch.ones_like(keep) if valid is None else valid
        if fresh:
            self.attend_pos, self.attend_valid = positions, chunk_valid
        else:
            self.attend_pos = torch.cat([self.positions, positions], dim=1)
            self.attend_valid = torch.cat([self.valid, chunk_valid], dim=1)
        self.positions[rows, slot] = written
        self.valid[rows, slot] = keep.gather(1, index)


class HymbaCache:
    """Preallocated KV, SSM and conv state for `batch` sequences of up to `max_len` tokens (meta not counted)."""

    def __init__(self, config: HymbaConfig, batch: int, max_len: int, device=None, dtype: torch.dtype = None):
        device = torch.device(device or "cpu")
        dtype = dtype or torch.float32
        self.config, self.batch, self.max_len = config, batch, max_len
        M = config.num_memory_tokens
        self.layouts: dict[int | None, KeyLayout] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, SSMState] = {}
        for layer in range(config.num_hidden_layers):
            if config.produces_kv(layer):
                window = config.window(layer)
                if window not in self.layouts:
                    ring = None if window is None or window + 1 >= max_len else window + 1
                    self.layouts[window] = KeyLayout(batch, M, ring, M + (max_len if ring is None else ring), device)
                capacity = self.layouts[window].capacity
                # Head-major, as attention reads them: a (b, hkv, S, d) buffer is a matmul operand without a copy.
                self.keys[layer] = torch.zeros(batch, config.num_key_value_heads, capacity, config.qk_head_dim,
                                               device=device, dtype=dtype)  # (b, hkv, S, dqk)
                self.values[layer] = torch.zeros(batch, config.num_key_value_heads, capacity, config.value_head_dim,
                                                 device=device, dtype=dtype)  # (b, hkv, S, dv)
            if config.has_ssm(layer):
                self.ssm[layer] = SSMState(
                    ssm=torch.zeros(batch, config.d_inner, config.mamba_d_state, device=device, dtype=torch.float32),
                    conv=torch.zeros(batch, config.d_inner, config.mamba_d_conv - 1, device=device, dtype=dtype))
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)  # per row, meta included
        self.started = False
        self.decoding = False  # whether the current forward is one decode step (set by `begin`)

    # ------------------------------------------------------------------ used by the model's forward
    def begin(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Called once per forward before the layers, with that forward's positions (b, T) and validity."""
        decoding = self.started and positions.shape[1] == 1
        for layout in self.layouts.values():
            layout.begin(positions, valid, decoding, fresh=not self.started)
        self.decoding = decoding

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store a producer's new K,V (b, hkv, T, d); return what its queries attend over:
        (keys (b, hkv, S', dqk), values (b, hkv, S', dv), key positions (b, S'), key validity (b, S'))."""
        layout = self.layouts[self.config.window(layer)]
        k_buf, v_buf = self.keys[layer], self.values[layer]
        rows, index, slot = layout.write
        if self.decoding:
            keys, values = k_buf, v_buf
        elif not self.started:  # the first forward into this cache: nothing in the buffer is valid yet
            keys, values = k, v
        else:
            keys, values = torch.cat([k_buf, k], dim=2), torch.cat([v_buf, v], dim=2)
        k_buf[rows, :, slot] = k[rows, :, index]  # (n, hkv, d) entries into their slots
        v_buf[rows, :, slot] = v[rows, :, index]
        return keys, values, layout.attend_pos, layout.attend_valid

    def ssm_layer(self, layer: int) -> SSMState:
        return self.ssm[layer]

    def advance(self, positions: torch.Tensor, valid: torch.Tensor | None) -> None:
        """After a forward: each row's next position is one past its last real token."""
        last = positions if valid is None else torch.where(valid, positions, -1)
        torch.maximum(self.next_position, last.amax(dim=1) + 1, out=self.next_position)  # in place: graph-safe
        self.started = True

    def step_state(self) -> list[torch.Tensor]:
        """What a decode step changes besides the K/V bytes of the slot it writes: next positions, each key slot's
        position and validity, SSM and conv states. Restoring these undoes a step, since a slot marked invalid
        again is never read (the next real step overwrites its K/V)."""
        layouts = [t for layout in self.layouts.values() for t in (layout.positions, layout.valid)]
        return [self.next_position, *layouts, *(t for s in self.ssm.values() for t in (s.ssm, s.conv))]

    # ------------------------------------------------------------------ rows as slots (continuous batching)
    def rows(self, n: int) -> HymbaCache:
        """A cache over this one's first `n` rows, sharing their storage: a forward through it reads and writes those
        rows in place. A decode step captured for `n` rows runs on such a view (`hymba.generate.DecodeRunner`), and a
        prefill into it fills the rows a decode over the whole cache then continues. The view starts as this cache
        is (`started`); set it to False before a first prefill into rows that were reset."""
        if not 1 <= n <= self.batch:
            raise HymbaError(f"a view of {n} rows of a cache of {self.batch}")
        view = object.__new__(HymbaCache)
        view.config, view.batch, view.max_len = self.config, n, self.max_len
        view.layouts = {}
        for window, layout in self.layouts.items():
            part = object.__new__(KeyLayout)
            part.num_meta, part.ring, part.capacity = layout.num_meta, layout.ring, layout.capacity
            part.positions, part.valid = layout.positions[:n], layout.valid[:n]
            part.attend_pos = part.attend_valid = part.write = None
            view.layouts[window] = part
        view.keys = {layer: t[:n] for layer, t in self.keys.items()}
        view.values = {layer: t[:n] for layer, t in self.values.items()}
        view.ssm = {layer: SSMState(s.ssm[:n], s.conv[:n]) for layer, s in self.ssm.items()}
        view.next_position = self.next_position[:n]
        view.started, view.decoding = self.started, False
        return view

    def reset_rows(self, rows: list[int] | torch.Tensor) -> None:
        """Empty `rows`: no key visible, zero SSM and conv state, next position 0. In place (CUDA-graph safe).

        K/V bytes are left as they are: with `valid` cleared no query can see them, and refilling a row
        (`copy_rows_from`) overwrites them anyway.
        """
        if not isinstance(rows, torch.Tensor):
            rows = device_tensor(rows, torch.long, self.next_position.device)
        for layout in self.layouts.values():
            layout.valid.index_fill_(0, rows, False)
            layout.positions.index_fill_(0, rows, 0)
        for state in self.ssm.values():
            state.ssm.index_fill_(0, rows, 0.0)
            state.conv.index_fill_(0, rows, 0.0)
        self.next_position.index_fill_(0, rows, 0)

    def copy_rows_from(self, rows: list[int], other: HymbaCache, other_rows: list[int]) -> None:
        """Make each of `rows` hold exactly `other`'s row at the same place in `other_rows`: K/V, key positions and
        validity, SSM and conv state, next position. Both caches must have the same config and layout (same
        `max_len`). One indexed copy per tensor whatever the number of rows, and in place, so a CUDA graph
        captured over this cache stays valid."""
        if other.config is not self.config and other.config != self.config:
            raise HymbaError("copy_rows_from needs two caches of the same model config")
        for window, layout in self.layouts.items():
            if other.layouts[window].capacity != layout.capacity:
                raise HymbaError(f"copy_rows_from: key layouts differ ({other.layouts[window].capacity} vs "
                                 f"{layout.capacity} slots); allocate both caches with the same max_len")
        device = self.next_position.device
        dst, src = device_tensor(rows, torch.long, device), device_tensor(other_rows, torch.long, device)
        pairs = [(self.next_position, other.next_position)]
        for window, layout in self.layouts.items():
            pairs += [(layout.positions, other.layouts[window].positions), (layout.valid, other.layouts[window].valid)]
        pairs += [(self.keys[layer], other.keys[layer]) for layer in self.keys]
        pairs += [(self.values[layer], other.values[layer]) for layer in self.values]
        for layer, state in self.ssm.items():
            pairs += [(state.ssm, other.ssm[layer].ssm), (state.conv, other.ssm[layer].conv)]
        for mine, theirs in pairs:
            mine.index_copy_(0, dst, theirs.index_select(0, src))

    # ------------------------------------------------------------------ accounting
    def nbytes(self) -> int:
        """Bytes of K/V, SSM and conv state allocated (the per-slot position bookkeeping is not counted)."""
        tensors = [*self.keys.values(), *self.values.values()]
        tensors += [t for s in self.ssm.values() for t in (s.ssm, s.conv)]
        return sum(t.numel() * t.element_size() for t in tensors)
