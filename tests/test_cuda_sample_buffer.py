"""CudaBackend.sample_packed's pinned buffers, exercised on the CPU with the driver stubbed:
a host twin must always hold every word the step uses (its device buffer is rounded up to
256 bytes, so the device size alone is not a safe test for reuse), and two queued samplings
(lookahead) must not share one."""
from __future__ import annotations

import numpy as np

from orcd_grpc.backends import cuda as cuda_mod
from orcd_grpc.backends.cuda_memory import ALIGN


class _FakeDrv:
    """Device memory as one uint32 array per allocation; copies and the kernel act on it."""

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.next = 1 << 20

    def alloc(self, nbytes):
        nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)  # as DeviceBuffer rounds
        base, self.next = self.next, self.next + nbytes + (1 << 20)
        self.mem[base] = np.zeros(nbytes // 4, np.uint32)
        return base, nbytes

    def _at(self, ptr):
        for base, arr in self.mem.items():
            if base <= ptr < base + arr.size * 4:
                return arr, (ptr - base) // 4
        raise AssertionError(f"pointer 0x{ptr:x} outside every allocation")

    @staticmethod
    def pagelocked_empty(n, dtype):
        return np.empty(n, dtype)

    def memcpy_htod_async(self, ptr, host, stream=None):
        arr, i = self._at(ptr)
        assert i + host.size <= arr.size
        arr[i: i + host.size] = host.view(np.uint32)

    def memcpy_dtoh_async(self, host, ptr, stream=None):
        arr, i = self._at(ptr)
        assert i + host.size <= arr.size
        host.view(np.uint32)[:] = arr[i: i + host.size]


class _Event:
    def record(self, stream):
        pass

    def wait(self):
        pass


class _Buf:
    def __init__(self, drv, nbytes):
        self.ptr, self.nbytes = drv.alloc(nbytes)

    def free(self):
        pass


def _backend():
    be = object.__new__(cuda_mod.CudaBackend)
    drv = _FakeDrv()
    be._drv, be.stream = drv, None
    be._sample_bufs, be._sample_hosts, be._sample_turn = [None, None], [None, None], 0
    be._sample_events = [_Event(), _Event()]
    be._recent = []
    be._persistent = lambda nbytes, what: _Buf(drv, nbytes)
    be._out = lambda shape, dtype=np.float32: cuda_mod.CudaTensor(drv.alloc(4 * int(np.prod(shape)))[0], shape, dtype)
    be._k = lambda module, name, sig: None
    be.synchronize = lambda what=None: None

    def launch(k, grid, block, logits, work, V, prm, pen, tok, lp, n_top, tid, tlp, bits=0, W=0, shared=0):
        R = grid[0]
        for r in range(R):  # token = row + 100, logprob = -row, top ids / logprobs from the row too
            a, i = drv._at(tok + 4 * r)
            a[i] = r + 100
            a, i = drv._at(lp + 4 * r)
            a[i] = np.float32(-r).view(np.uint32)
            ntt = max(int(n_top), 1)
            for j in range(ntt):
                a, i = drv._at(tid + 4 * (r * ntt + j))
                a[i] = 1000 * r + j
                a, i = drv._at(tlp + 4 * (r * ntt + j))
                a[i] = np.float32(-j).view(np.uint32)

    be._launch = launch
    return be


def test_sample_buffer_regrows_by_host_words():
    be = _backend()
    logits = cuda_mod.CudaTensor(1 << 10, (1, 50), np.float32)
    prm = np.zeros((1, 16), np.uint32)
    # First call: 8260 words (params 16 + penalties 8200, outputs 4) -> a 16520-word host twin,
    # whose device buffer rounds up to 16576 words.
    out = be.sample_packed(logits, prm, np.zeros(8200, np.int32), 1)
    assert [int(x) for x in out[0]] == [100]
    # Second call: 16554 words (inputs 16496 -> outputs at 16512, 42 output words with n_top 20):
    # more than the host twin holds but within the rounded device buffer.
    toks, lps, tid, tlp = be.sample_packed(logits, prm, np.zeros(16480, np.int32), 20)
    assert toks.tolist() == [100] and lps.tolist() == [0.0]
    assert tid.shape == (1, 20) and tid[0].tolist() == list(range(20))
    assert tlp[0].tolist() == [-float(j) for j in range(20)]
    assert max(h.size for h in be._sample_hosts if h is not None) >= 16554


def test_regrowth_frees_the_old_pinned_twin_under_the_capture_lock():
    """A twin that grows frees the old page-locked allocation at once, holding the capture lock (left
    to the collector, its cuMemFreeHost could land inside another engine's graph capture and void
    it)."""
    from orcd_grpc.backends.cuda_context import _capture_lock

    freed = []

    class _HostAllocation(bytearray):  # what a pagelocked array's .base is: it has free()
        def free(self):
            freed.append(_capture_lock._is_owned())

    be = _backend()
    be._drv.pagelocked_empty = lambda n, dtype: np.ndarray((n,), dtype, buffer=_HostAllocation(n * np.dtype(dtype).itemsize))
    logits = cuda_mod.CudaTensor(1 << 10, (1, 50), np.float32)
    prm = np.zeros((1, 16), np.uint32)
    be.sample_packed(logits, prm, np.zeros(10, np.int32), 1)
    be.sample_packed(logits, prm, np.zeros(10, np.int32), 1)  # the other twin
    assert freed == []
    be.sample_packed(logits, prm, np.zeros(40000, np.int32), 1)  # outgrows the first twin
    assert freed == [True]


def test_two_queued_samplings_keep_their_own_buffers():
    """Two samplings queued before either is read (a step queued ahead) land in different twins:
    reading the first after the second was queued still gives the first's results, and the first's
    device token ids (what feeds the next step) are not the second's."""
    be = _backend()
    prm = np.zeros((3, 16), np.uint32)
    a = be.sample_packed_async(cuda_mod.CudaTensor(1 << 10, (3, 50), np.float32), prm, np.zeros(2, np.int32), 0)
    b = be.sample_packed_async(cuda_mod.CudaTensor(1 << 10, (2, 50), np.float32), prm[:2], np.zeros(2, np.int32), 2)
    assert a.tok_ptr != b.tok_ptr
    assert not np.shares_memory(a.out, b.out)
    toks_b, _, tid_b, _ = be.sample_result(b)
    toks_a, lps_a = be.sample_result(a)
    assert toks_a.tolist() == [100, 101, 102] and lps_a.tolist() == [0.0, -1.0, -2.0]
    assert toks_b.tolist() == [100, 101] and tid_b.tolist() == [[0, 1], [1000, 1001]]


def test_fit_workspace_grows_by_the_logits_rows_and_keeps_one_when_refused(monkeypatch):
    """CudaBackend.workspace_for / fit_workspace, the device stubbed: the workspace a model needs
    is the default plus two float32 rows per sequence (rounded to MiB); a growth the VRAM budget
    refuses raises and leaves the backend a workspace of the old size; a given size (argument or
    ORCD_WORKSPACE_MB) stays."""
    import pytest

    from orcd_grpc.backends.cuda_memory import MiB, Workspace
    from orcd_grpc.errors import ResourceExhausted

    monkeypatch.setattr(cuda_mod, "_context", lambda device=0: None)
    drv, limit = _FakeDrv(), {"bytes": 1 << 40}

    def persistent(nbytes, what):
        if nbytes > limit["bytes"]:
            raise ResourceExhausted(f"{what} needs {nbytes} bytes", field="max_vram")
        return _Buf(drv, nbytes)

    be = object.__new__(cuda_mod.CudaBackend)
    be.closed, be.device_index, be._owned = False, 0, set()
    be._persistent = persistent
    be.synchronize = lambda what=None: None
    dropped = []
    be._drop_graphs = lambda: dropped.append(1)
    be._ws_given, be._ws_base = False, 64 * MiB
    be.workspace_bytes = be._ws_base
    be.ws = Workspace(_Buf(drv, be._ws_base))

    vocab, seqs = 151_936, 256
    want = be.workspace_for(vocab, seqs)
    assert want == -(-(64 * MiB + 8 * vocab * seqs) // MiB) * MiB and be.workspace_bytes == 64 * MiB
    be.fit_workspace(want)
    assert be.workspace_bytes == want == be.ws.size and dropped == [1]
    be.fit_workspace(want)  # the same size again: nothing reallocated
    assert dropped == [1]

    limit["bytes"] = want  # a larger growth is refused
    with pytest.raises(ResourceExhausted):
        be.fit_workspace(be.workspace_for(vocab, 2 * seqs))
    assert be.workspace_bytes == want == be.ws.size  # still a workspace, of the old size

    be._ws_given = True  # a size given (argument, ORCD_WORKSPACE_MB) is what every model gets
    assert be.workspace_for(vocab, 4 * seqs) == want
