"""A KV cache for decoding that writes into pre-allocated buffers instead of concatenating (opt-in:
``HFBackend(growing_kv=True)``).

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies the layer's
whole cache every token: in a torch profile of one decode step at batch 64 on the 2-core CPU, ``aten::cat`` took
half the step (1.1 s of 2.3 s over three steps). :class:`GrowingLayer` keeps the same interface and returns views
of a buffer that grows in chunks, so a step writes only its new token; the views have a ``DynamicLayer``'s layout,
so attention and the generated tokens are unchanged (tests/test_bench.py). A single decode step got 17–24% faster
at batch 64–128, but end-to-end generation in ``cai bench`` showed no consistent gain (docs/performance.md), which
is why the backend does not use it by default.
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicCache, DynamicLayer

GROW_CHUNK = 128  # tokens of head-room added when a buffer fills (one generate call's answers usually fit)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views of a pre-allocated buffer grown ``GROW_CHUNK`` at a time."""

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf: Any = None
        self._vbuf: Any = None
        self._len = 0

    def _reserve(self, like, length: int) -> None:
        capacity = 0 if self._kbuf is None else self._kbuf.shape[-2]
        if length <= capacity:
            return
        b, h, _, d = like.shape
        kbuf, vbuf = like.new_empty((b, h, length + GROW_CHUNK, d)), like.new_empty((b, h, length + GROW_CHUNK, d))
        if self._len:
            kbuf[..., : self._len, :] = self._kbuf[..., : self._len, :]
            vbuf[..., : self._len, :] = self._vbuf[..., : self._len, :]
        self._kbuf, self._vbuf = kbuf, vbuf

    def _views(self) -> None:
        self.keys = self._kbuf[..., : self._len, :]
        self.values = self._vbuf[..., : self._len, :]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(key_states, self._len + n)
        self._kbuf[..., self._len : self._len + n, :] = key_states
        self._vbuf[..., self._len : self._len + n, :] = value_states
        self._len += n
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        self._len = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._len = max(0, self._len + tokens_to_remove)
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._kbuf = self._kbuf.repeat_interleave(repeats, dim=0)
            self._vbuf = self._vbuf.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices) -> None:
        if self.get_seq_length() > 0:
            self._kbuf, self._vbuf = self._kbuf[indices, ...], self._vbuf[indices, ...]
            self._views()

    def reorder_cache(self, beam_idx) -> None:
        self.batch_select_indices(beam_idx)


def growing_cache(config, copy_of: DynamicCache | None = None) -> DynamicCache:
    """An empty decoding cache of :class:`GrowingLayer` for ``config``'s layers, or a copy of ``copy_of`` (a shared
    prefix's cache) in that form. Models with sliding-window layers keep transformers' own layers."""
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return DynamicCache(config=config) if copy_of is None else _plain_copy(copy_of)
    growing = [GrowingLayer() for _ in cache.layers]
    cache.layers = list(growing)
    if copy_of is not None:
        for mine, theirs in zip(growing, copy_of.layers, strict=True):
            source: Any = theirs  # a DynamicLayer: the shared prefix was encoded with transformers' default cache
            if source.is_initialized and source.get_seq_length() > 0:
                mine.update(source.keys, source.values)
    return cache


def _plain_copy(cache: DynamicCache) -> DynamicCache:
    import copy

    return copy.deepcopy(cache)
