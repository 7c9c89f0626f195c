"""Sampling on the CUDA backend: packed per-row parameters up, one kernel, ids and logprobs down.

A sampling's upload, kernel and download are queued on the stream behind the step; its result is
read through a host event (`sample_result`), and its token ids stay on the device where they can
feed the next step (`begin_step(feed=...)`). Two pinned buffers are used in turn, so a sampling
queued behind another (the CUDA runner's lookahead) never overwrites one not yet read.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import Internal, InvalidArgument
from .cuda_context import _capture_lock, free_pinned


def pack_sampling_row(temperature, top_k, top_p, min_p, seed, repetition_penalty=1.0, presence_penalty=0.0,
                      frequency_penalty=0.0) -> np.ndarray:
    """One row of sample.cu's RowParams (16 32-bit words); the counter (words 6-7), the
    penalty slice (11-12) and the bitmask row (13) are the caller's, per step."""
    row = np.zeros(16, np.uint32)
    f = row.view(np.float32)
    seed = int(seed or 0) & ((1 << 64) - 1)
    f[0], f[2], f[3] = float(temperature), float(top_p), float(min_p)
    row[1] = np.uint32(int(top_k) & 0xFFFFFFFF)
    row[4], row[5] = seed & 0xFFFFFFFF, seed >> 32
    row[13] = 0xFFFFFFFF  # mask_row -1: no bitmask (sample_packed_async sets it per step)
    f[8], f[9], f[10] = float(repetition_penalty), float(presence_penalty), float(frequency_penalty)
    return row


@dataclasses.dataclass
class SampleHandle:
    """A queued sample_packed: its host output view (valid once event has fired), the device
    address of its token ids, and the kernels to name if the wait reports a fault."""
    out: np.ndarray
    R: int
    nt: int
    tok_ptr: int
    event: object
    kernels: tuple = ()


class SamplingMixin:
    """CudaBackend's sampling (state set up in CudaBackend._init)."""

    def sample(self, logits, params_per_row, n_top: int = 0, bits: np.ndarray | None = None):
        """Picks one token per row of logits [R, V] on the GPU; only ids and logprobs come back.

        params_per_row: one object or dict per row with (defaults in brackets) temperature [1.0;
        <= 0 is greedy], top_k [0 = off], top_p [1.0], min_p [0.0], seed [0], counter (the row's
        token index, the Philox counter) [len(output_ids)], repetition_penalty [1.0],
        presence_penalty [0.0], frequency_penalty [0.0], prompt_ids / output_ids (for the
        penalties) [()]. Same seed and counter give the same token.
        Returns (token_ids int32 [R], logprobs float32 [R]) where logprob is the token's log
        probability under the raw (temperature-1, unfiltered) distribution; with n_top > 0 also
        (top_ids int32 [R, n_top], top_logprobs float32 [R, n_top]), most likely first.
        bits: int32 [R, ceil(V / 32)] packed allowed tokens per row (runner.fill_bitmasks), or None;
        logprobs are then of the masked distribution.
        """
        R, V = logits.shape
        if len(params_per_row) != R:
            raise InvalidArgument(f"{len(params_per_row)} sampling rows for {R} rows of logits", field="params")
        if R == 0:
            z = np.zeros(0, np.int32)
            return (z, np.zeros(0, np.float32)) if not n_top else (z, np.zeros(0, np.float32),
                                                                    np.zeros((0, n_top), np.int32),
                                                                    np.zeros((0, n_top), np.float32))

        def get(p, name, default):
            v = p.get(name, default) if isinstance(p, dict) else getattr(p, name, default)
            return default if v is None else v

        prm = np.zeros((R, 16), np.uint32)
        pens = []
        off = 0
        for r, p in enumerate(params_per_row):
            out_ids = list(get(p, "output_ids", ()))
            rep, pres, freq = (float(get(p, "repetition_penalty", 1.0)), float(get(p, "presence_penalty", 0.0)),
                               float(get(p, "frequency_penalty", 0.0)))
            prm[r] = pack_sampling_row(get(p, "temperature", 1.0), get(p, "top_k", 0), get(p, "top_p", 1.0),
                                       get(p, "min_p", 0.0), get(p, "seed", 0), rep, pres, freq)
            ctr = int(get(p, "counter", len(out_ids)))
            prm[r, 6], prm[r, 7] = ctr & 0xFFFFFFFF, (ctr >> 32) & 0xFFFFFFFF
            n = 0
            if rep != 1.0 or pres != 0.0 or freq != 0.0:
                seen = np.unique(np.asarray(list(get(p, "prompt_ids", ())) + out_ids, np.int64))
                gen = np.asarray(out_ids, np.int64)
                counts = np.zeros(seen.size, np.int32)
                if gen.size:
                    u, c = np.unique(gen, return_counts=True)
                    counts[np.searchsorted(seen, u)] = c
                pens.append(np.stack([seen.astype(np.int32), counts], 1))
                n = seen.size
            prm[r, 11], prm[r, 12] = off, n
            off += n
        pen = np.concatenate(pens).astype(np.int32).ravel() if pens else np.zeros(2, np.int32)
        return self.sample_packed(logits, prm, pen, n_top, bits)

    def sample_packed(self, logits, prm: np.ndarray, pen: np.ndarray, n_top: int = 0,
                      bits: np.ndarray | None = None):
        """`sample` with its rows already packed: prm uint32 [R, 16] (pack_sampling_row, then the
        counter in words 6-7 and the row's penalty slice in words 11-12), pen int32 pairs (token
        id, generated count) back to back, bits as in `sample`."""
        return self.sample_result(self.sample_packed_async(logits, prm, pen, n_top, bits))

    def sample_packed_async(self, logits, prm: np.ndarray, pen: np.ndarray, n_top: int = 0,
                            bits: np.ndarray | None = None) -> "SampleHandle":
        """Queues sample_packed's upload, kernel and download; sample_result(handle) waits for them.
        The handle's tok_ptr (the sampled ids on the device) can feed a following step (begin_step).
        bits: int32 [R, ceil(V / 32)] allowed tokens per row, or None. Only the rows that restrict
        anything travel (word 13 of a row, mask_row, says which; -1: none)."""
        R, V = logits.shape
        nt, ntt = int(n_top), max(int(n_top), 1)
        W = (V + 31) // 32
        prm = np.array(prm, np.uint32, copy=True) if bits is not None else prm
        packed = None
        if bits is not None:
            if bits.shape != (R, W):
                raise InvalidArgument(f"bitmask is {bits.shape}, expected {(R, W)}", field="bits")
            keep = np.flatnonzero((bits != -1).any(axis=1))
            mrow = np.full(R, -1, np.int64)
            mrow[keep] = np.arange(keep.size)
            prm[:, 13] = mrow.astype(np.int32).view(np.uint32)
            if keep.size == R:  # every row restricts (a constrained batch): no gathered copy
                packed = np.ascontiguousarray(bits).view(np.uint32).reshape(-1)
            else:
                packed = np.ascontiguousarray(bits[keep]).view(np.uint32).ravel() if keep.size else None
        # One device buffer and its pinned host twin, in 32-bit words:
        #   params [R, 16] | penalties | bitmask rows | (64-word aligned) token ids [R] | logprobs [R]
        #   | top ids | top logprobs
        # so a step costs one upload and one download, both asynchronous on the stream.
        n_bits = 0 if packed is None else packed.size
        n_in = prm.size + pen.size + n_bits
        o_out = -(-n_in // 64) * 64
        n_out = 2 * R + 2 * R * ntt
        words = o_out + n_out
        self._sample_turn ^= 1
        turn = self._sample_turn
        # Sized by the host twin: the device buffer is rounded up to ALIGN bytes, so its nbytes
        # can exceed the host's words and must not be what decides a reallocation.
        host = self._sample_hosts[turn]
        if host is None or host.size < words:
            with _capture_lock:  # as StepMixin._ensure_meta: never during another engine's capture
                if self._sample_bufs[turn] is not None:
                    self.synchronize()  # a queued step may still use it
                    self._sample_bufs[turn].free()
                    free_pinned(host)
                cap = -(-max(words * 2, 16 << 10) // 64) * 64
                self._sample_bufs[turn] = self._persistent(cap * 4, "sampling buffers")
                host = self._sample_hosts[turn] = self._drv.pagelocked_empty(cap, np.uint32)
        base = self._sample_bufs[turn].ptr
        host[: prm.size] = prm.ravel()
        host[prm.size: prm.size + pen.size] = pen.view(np.uint32)
        if n_bits:
            host[prm.size + pen.size: n_in] = packed
        self._drv.memcpy_htod_async(base, host[:n_in], self.stream)
        work = self._out((R, V))
        p_out = base + 4 * o_out
        k = self._k("sample", "sample_rows", "PPiPPPPiPPPi")
        p_bits = base + 4 * (prm.size + pen.size) if n_bits else 0
        self._launch(k, (R, 1, 1), (1024, 1, 1), logits.ptr, work.ptr, np.int32(V), base, base + 4 * prm.size,
                     p_out, p_out + 4 * R, np.int32(nt), p_out + 8 * R, p_out + 8 * R + 4 * R * ntt,
                     p_bits, np.int32(W))
        self._drv.memcpy_dtoh_async(host[o_out: words], p_out, self.stream)
        ev = self._sample_events[turn]
        if ev is None:
            from .cuda_graph import HostEvent

            ev = self._sample_events[turn] = HostEvent()
        ev.record(self.stream)
        return SampleHandle(out=host[o_out: words], R=R, nt=nt, tok_ptr=p_out, event=ev,
                            kernels=tuple(dict.fromkeys(self._recent)))

    def prompt_logprobs(self, logits, rows: np.ndarray, targets: np.ndarray, n_top: int = 0):
        """Per scored position p: the log-prob of targets[p] under the softmax of logits row
        rows[p], and the n_top most likely (ids, log-probs), most likely first; computed on the
        GPU (score.cu), only these arrays copied back. Returns (logprobs float32 [P],
        top_ids int32 [P, n_top], top_logprobs float32 [P, n_top])."""
        self._check_open()
        V = int(logits.shape[1])
        P, nt = int(len(rows)), int(n_top)
        if P == 0:
            return np.zeros(0, np.float32), np.zeros((0, nt), np.int32), np.zeros((0, nt), np.float32)
        # inputs in one int32 block; the workspace holds them for this step only
        idx = self._out((2 * P,), np.int32)
        host = np.concatenate([np.asarray(rows, np.int32), np.asarray(targets, np.int32)])
        self._drv.memcpy_htod_async(idx.ptr, host, self.stream)
        lp = self._out((P,))
        tid, tlp = self._out((P, max(nt, 1)), np.int32), self._out((P, max(nt, 1)))
        k = self._k("score", "prompt_logprobs", "PiPPiPPP")
        self._launch(k, (P, 1, 1), (1024, 1, 1), logits.ptr, np.int32(V), idx.ptr, idx.ptr + 4 * P, np.int32(nt),
                     lp.ptr, tid.ptr, tlp.ptr)
        out = self.to_host(lp), self.to_host(tid)[:, :nt], self.to_host(tlp)[:, :nt]
        del idx, host  # held until the upload has run (to_host synchronised the stream)
        return out

    def gather_row_blocks(self, x, blocks):
        """The rows [start, start + n) of x [R, V] for each (start, n) of blocks, back to back in
        one new workspace tensor (device-to-device copies queued on the stream)."""
        V = int(x.shape[1])
        out = self._out((sum(n for _, n in blocks), V))
        to = 0
        for start, n in blocks:
            if n:
                self._drv.memcpy_dtod_async(out.ptr + 4 * V * to, x.ptr + 4 * V * start, 4 * V * n, self.stream)
                to += n
        return out

    def sample_result(self, h: "SampleHandle"):
        """The token ids and logprobs (and top ids / logprobs when n_top) of a queued sampling."""
        try:
            h.event.wait()
        except Exception as exc:
            raise Internal(f"CUDA error in kernel(s) {', '.join(h.kernels) or '?'}: {exc}") from exc
        R, nt, out = h.R, h.nt, h.out
        toks = out[:R].view(np.int32).copy()
        lps = out[R: 2 * R].view(np.float32).copy()
        if not nt:
            return toks, lps
        tid = out[2 * R: 2 * R + R * nt].view(np.int32).reshape(R, nt).copy()
        tlp = out[2 * R + R * nt: 2 * R + 2 * R * nt].view(np.float32).reshape(R, nt).copy()
        return toks, lps, tid, tlp
