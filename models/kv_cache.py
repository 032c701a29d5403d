"""Preallocated static KV cache with slot management and rollback."""
from __future__ import annotations

import torch

from models.config import TransformerConfig


class KVCache:
    """Preallocated static cache: per-layer K/V tensors [num_slots, num_kv_heads, max_len, head_dim].

    An int8 cache (the w8a8 graphs' one, see export.onnx_export) also keeps each cached key and
    value vector's float32 scale: ``k_scale[layer]`` / ``v_scale[layer]`` [num_slots, num_kv_heads,
    max_len], the vector being ``k[layer][s, h, t] * k_scale[layer][s, h, t]``.

    ``k[layer]`` / ``v[layer]`` are views into one tensor per K and V. A slot holds one sequence;
    ``lengths[slot]`` counts its cached tokens (positions 0 .. length-1 are valid, anything after
    is stale and masked out by the model). ``lengths`` always lives on the CPU so that schedulers
    can read it without a device sync; the K/V tensors live on ``device``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots and max_len must be >= 1, got {num_slots}, {max_len}")
        self.config = config
        self.num_slots = int(num_slots)
        self.max_len = int(max_len)
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (config.num_layers, self.num_slots, config.num_kv_heads, self.max_len, config.head_dim)
        # Ordinary (non-inference) tensors even when built under torch.inference_mode(), so the
        # cache can be updated in place whether or not the forward runs in inference mode.
        with torch.inference_mode(False):
            self.k_all = torch.zeros(shape, dtype=dtype, device=self.device)
            self.v_all = torch.zeros(shape, dtype=dtype, device=self.device)
            self.k: list[torch.Tensor] = list(self.k_all.unbind(0))
            self.v: list[torch.Tensor] = list(self.v_all.unbind(0))
            self.k_scale: list[torch.Tensor] = []
            self.v_scale: list[torch.Tensor] = []
            if dtype == torch.int8:
                scales = torch.zeros(2, *shape[:-1], dtype=torch.float32, device=self.device)
                self.k_scale, self.v_scale = list(scales[0].unbind(0)), list(scales[1].unbind(0))
            self.lengths = torch.zeros(self.num_slots, dtype=torch.int64)
        self._free: list[int] = list(range(self.num_slots))
        self._in_use: set[int] = set()

    def allocate(self) -> int:
        """Return a free slot id with length 0; RuntimeError when every slot is taken."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.num_slots} slots are in use")
        slot = min(self._free)
        self._free.remove(slot)
        self._in_use.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its contents become garbage."""
        slot = int(slot)
        if slot not in self._in_use:
            raise ValueError(f"slot {slot} is not allocated")
        self._in_use.remove(slot)
        self._free.append(slot)
        self.lengths[slot] = 0

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back: keep its first ``length`` tokens."""
        slot = int(slot)
        cur = int(self.lengths[slot])
        if not 0 <= length <= cur:
            raise ValueError(f"cannot truncate slot {slot} of length {cur} to {length}")
        self.lengths[slot] = int(length)

    def num_free(self) -> int:
        return len(self._free)
