"""Per-step metadata and CUDA-graph replay: the part of the CUDA backend the runner drives.

A step's int32 arrays (token ids, positions, slots, block tables...) go up in one copy into one
preallocated buffer (`begin_step`), so the ops of a forward pass allocate and copy nothing and a
decode step can be captured once per batch-size bucket and replayed (`graph_step`).
"""
from __future__ import annotations

import numpy as np

from .. import logs
from ..errors import Internal, OrcdError
from .base import StepMeta
from .cuda_context import _capture_lock, _context, free_pinned

log = logs.get_logger("orcd.cuda")


# Keys in the deepest sequence of a decode step above which attention may take
# tuning.attn_splits_deep key slices: the default 32 slices then hold more than one 4-warp pass
# (128 keys) each.
DEEP_CTX = 32 * 128


class CudaStep:
    """What ops need of a step: the host meta and device pointers to its uploaded copies."""

    __slots__ = ("meta", "T", "B", "R", "max_q", "deep", "max_blocks", "block_size",
                 "token_ids", "positions", "q_starts", "ctx_lens", "slot_mapping", "block_tables", "logits_rows")

    def __getattr__(self, name):  # fall through to StepMeta fields (num_tokens, ...)
        return getattr(object.__getattribute__(self, "meta"), name)


class StepMixin:
    """CudaBackend's step metadata buffers and graph cache (state set up in CudaBackend._init)."""

    def _ensure_meta(self, tokens: int, seqs: int, table: int):
        """One device buffer (and a pinned host twin) for every int32 array of a step."""
        need = 4 * tokens + 3 * seqs + table + 8 * 64
        have = self._meta_hosts[0].size if self._meta_buf is not None else 0
        if need <= have:
            return
        # Allocating and freeing device and page-locked memory would void another engine's graph
        # capture running meanwhile (a draft model's, a model being swapped in): not during one.
        with _capture_lock:
            if self._meta_buf is not None:
                self.synchronize()  # a queued step may still read the old buffer
                self._drop_graphs()  # they read the metadata at the old buffer's address
                self._meta_buf.free()
                for host in self._meta_hosts:
                    free_pinned(host)
            need = max(need, 2 * have)
            self._meta_buf = self._persistent(need * 4, "step metadata")
            self._meta_hosts = [self._drv.pagelocked_empty(need, np.int32) for _ in range(2)]

    def reserve_step_meta(self, tokens: int, seqs: int, table: int) -> None:
        """Sizes the step metadata buffer for steps of up to `tokens` tokens, `seqs` sequences and
        `table` block-table entries now: growing it later drops every captured graph (they read
        the old buffer), so the runner reserves its largest step before capturing any."""
        self._ensure_meta(tokens, seqs + 1, table)

    def begin_step(self, meta: StepMeta, feed=None, overlap: bool = False, feed_rows=None):
        """Uploads the step's metadata. overlap: queue it behind the steps already on the stream
        instead of waiting for them (stream order keeps the device buffers safe; the host twins
        alternate). feed: a SampleHandle whose sampled tokens become this step's first token ids,
        copied on the device, so the step can be queued before the host has read them; feed_rows
        [(token, sample, n), ...]: which of them go where (default: all, in order)."""
        self._check_open()
        _context(self.device_index)
        T, B = meta.num_tokens, meta.num_seqs
        tables = np.ascontiguousarray(meta.block_tables, np.int32).reshape(B, -1)
        rows = np.asarray(meta.logits_rows, np.int32)
        if not overlap:
            self.synchronize()
        self.ws.reset()
        self._ensure_meta(max(T, rows.size), B + 1, tables.size)
        st = CudaStep()
        st.meta, st.T, st.B, st.R = meta, T, B, int(rows.size)
        qs = np.asarray(meta.q_starts, np.int32)
        st.max_q = int(np.max(np.diff(qs))) if B else 0
        if meta.max_q is not None:
            if meta.max_q < st.max_q:
                raise Internal(f"a step of up to {st.max_q} tokens a sequence cannot run as one of {meta.max_q}")
            st.max_q = int(meta.max_q)
        st.deep = (bool(meta.deep) if meta.deep is not None
                   else bool(self.tuning.attn_splits_deep and B and int(np.max(meta.ctx_lens)) > DEEP_CTX))
        st.max_blocks, st.block_size = int(tables.shape[1]), int(meta.block_size)
        self._decode_step = st.max_q <= 1
        self._meta_turn ^= 1
        host, base, off = self._meta_hosts[self._meta_turn], self._meta_buf.ptr, 0
        for field, arr in (("token_ids", meta.token_ids), ("positions", meta.positions), ("q_starts", qs),
                           ("ctx_lens", meta.ctx_lens), ("slot_mapping", meta.slot_mapping),
                           ("block_tables", tables), ("logits_rows", rows)):
            a = np.asarray(arr, np.int32).ravel()
            host[off: off + a.size] = a
            setattr(st, field, base + off * 4)
            off += -(-max(a.size, 1) // 64) * 64  # 256-byte aligned segments
        self._drv.memcpy_htod_async(base, host[:off], self.stream)
        if feed is not None:
            for dst, src, n in feed_rows or ((0, 0, feed.R),):
                if dst + n > T or src + n > feed.R:
                    raise Internal(f"a step of {T} tokens cannot take fed tokens {src}..{src + n} of {feed.R} at {dst}")
                self._drv.memcpy_dtod_async(st.token_ids + 4 * dst, feed.tok_ptr + 4 * src, 4 * n, self.stream)
        return st

    # ---- CUDA graphs ----------------------------------------------------------------------
    def graph_ready(self, key) -> bool:
        """Whether `key` replays a captured graph (what the CUDA runner queues steps on)."""
        return key in self._graphs and not self._sync_each

    def graph_step(self, key, meta: StepMeta, record, feed=None, overlap: bool = False, feed_rows=None):
        """Runs `record(ctx)` (a forward pass that only launches kernels) for this step's meta,
        replaying a CUDA graph captured for `key`. Every meta given with one key must have the
        same shapes: then the step's metadata and workspace land at the addresses the graph
        was captured with. The first step of a key runs eagerly (loading modules, rope tables
        and kernel attributes, which a capture must not do); the second is captured."""
        from .cuda_graph import CudaGraph

        ctx = self.begin_step(meta, feed=feed, overlap=overlap, feed_rows=feed_rows)
        hit = self._graphs.get(key)
        if hit is None:
            if key not in self._graph_warm or key in self._graph_failed or self._sync_each:
                self._graph_warm.add(key)
                return record(ctx)
            box = []
            try:
                ours = self._our_kernels().__contains__ if self._pdl else None
                with _capture_lock:
                    graph = CudaGraph(self.stream, lambda: box.append(record(ctx)), programmatic=ours)
            except OrcdError:
                raise  # e.g. the step workspace ran out: the same eagerly
            except Exception as exc:
                # This bucket runs eagerly from now on rather than failing every step; the
                # metadata is already on the device, so the step itself can still run.
                log.warning("CUDA graph capture failed; running that batch size eagerly",
                            extra={"fields": {"key": str(key), "error": str(exc)}})
                self._graph_failed.add(key)
                self.ws.reset()
                return record(ctx)
            hit = self._graphs[key] = (graph, box[0], self.ws.top)
        graph, out, top = hit
        try:
            graph.launch()
        except Exception as exc:
            raise Internal(f"CUDA graph {key} failed to launch: {exc}") from exc
        self._recent.append(f"graph {key}")
        self.ws.top = max(self.ws.top, top)  # what runs after it in this step must not overlap
        return out

    def _our_kernels(self) -> set[str]:
        """The names of the kernels loaded from cuda/*.cu (each calls pdl_enter() first), as opposed
        to a library's (cuBLAS), whose launches must keep full dependencies in a graph."""
        from . import cuda_quant

        return set(self._kernels) | cuda_quant.loaded_kernel_names()

    def _drop_graphs(self) -> None:
        for graph, *_ in self._graphs.values():
            graph.close()
        self._graphs.clear()
        self._graph_warm.clear()
