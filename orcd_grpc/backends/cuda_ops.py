"""The CUDA backend's dense ops and MoE: matmuls through cuda_quant, norms, activations, splits.

Outputs come from the step workspace (`_out`); a tensor's block goes back to the workspace when
its last reference is dropped, so scratch that a queued launch still reads (int8 roundings, the
MoE grouping) is held in a local until the launch that reads it is queued.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import Internal, InvalidArgument
from .cuda_context import _context, _tls
from .cuda_step import CudaStep
from .cuda_tensor import CudaTensor


class OpsMixin:
    """CudaBackend's matmul, norm, elementwise, split and MoE ops (state set up in CudaBackend._init)."""

    # Whether the step being recorded has one-token rows only (set by begin_step; outside a step,
    # not): its matmuls of more than GEMV_MAX_T rows may take the int8 GEMM (cuda_quant.i8_eligible)
    _decode_step = False

    def embed(self, w, ctx: CudaStep):
        from . import cuda_quant

        y = self._out((ctx.T, w.k))
        self._quant_call("embed", cuda_quant.embed, ctx.token_ids, w, y.ptr, ctx.T, self.stream, self.tuning)
        return y

    def linear(self, x, w, bias=None):
        from . import cuda_quant

        T = math.prod(x.shape[:-1])
        if x.shape[-1] != w.k:
            raise InvalidArgument(f"linear: input has {x.shape[-1]} features, weight "
                                  f"{getattr(w, '_orcd_name', '?')} expects {w.k}", field="x")
        y = self._out((T, w.n))
        if self._blas is not None and 0 < self.tuning.gemm_blas_min <= T:
            from . import cuda_blas

            if cuda_blas.takes(w.qtype, w.n_experts) and cuda_blas.matmul(self, x, w, y, T, bias):
                return y
        # int8 input: the quantized rows and their scales, from x's producer (tuning.fuse_q8) or made
        # here and kept on x for its next matmul (gate and up, when not fused)
        x8, ready = None, False
        if cuda_quant.i8_eligible(w, T, self.tuning, self._decode_step):
            ready = x.q8 is not None
            xq, xd = x.q8 if ready else self._q8_scratch(T * w.k)
            x8 = (xq.ptr, xd.ptr)
        self._quant_call("matmul", cuda_quant.matmul, x.ptr, w, y.ptr, T, self.stream,
                         bias_ptr=bias.ptr if bias is not None else None, x8=x8, x8_ready=ready,
                         tuning=self.tuning, sms=self.limits.sms)
        if x8 is not None and not ready:
            x.q8 = (xq, xd)
        return y

    def _q8_rows(self, rows: int, d: int) -> bool:
        """Whether a producer of `rows` rows of d features writes their int8 rounding beside them, for
        the int8-input GEMV that follows (tuning.fuse_q8)."""
        from .cuda_quant import i8_rows

        return self.tuning.fuse_q8 and d % 32 == 0 and i8_rows(rows, self.tuning, self._decode_step)

    def _quant_call(self, what, fn, *args, **kw):
        if getattr(_tls, "guard", None) is None:
            _context(self.device_index)
        try:
            fn(*args, **kw)
        except self._drv.Error as exc:
            raise Internal(f"CUDA {what} kernel failed: {exc}") from exc
        self._recent.append(what)
        if self._sync_each:
            self.synchronize(what)

    def rms_norm(self, x, w, eps, residual=None):
        d = x.shape[-1]
        rows = x.size // d
        out = self._out(x.shape)
        s = self._out(x.shape) if residual is not None else x
        vec = int(d % 4 == 0)
        args = (x.ptr, residual.ptr if residual is not None else 0, s.ptr if residual is not None else 0,
                out.ptr, w.ptr, np.int32(rows), np.int32(d), np.float32(eps), np.int32(vec))
        if d <= 1024 and rows > self.tuning.norm_block_rows:
            k = self._k("norm", "rms_norm_warp", "PPPPPiifi")
            self._launch(k, (-(-rows // 8), 1, 1), (256, 1, 1), *args)
        else:  # few rows: a block per row, or one warp walks the whole row alone (4.5 us at d = 896)
            threads = 512 if d > 4096 else 256 if d > 1024 else max(32, -(-d // 4 // 32) * 32)
            if self._q8_rows(rows, d):
                out.q8 = self._q8_scratch(rows * d)
                k = self._k("norm", "rms_norm_block_q8", "PPPPPiifPP")
                self._launch(k, (rows, 1, 1), (threads, 1, 1), *args[:-1], out.q8[0].ptr, out.q8[1].ptr)
            else:
                k = self._k("norm", "rms_norm_block", "PPPPPiifi")
                self._launch(k, (rows, 1, 1), (threads, 1, 1), *args)
        return out, s

    def _binary(self, name, a, b, s=0.0):
        if b is not None and a.shape != b.shape:
            raise InvalidArgument(f"{name}: shapes {a.shape} and {b.shape} differ", field=name)
        y = self._out(a.shape)
        n = a.size
        k = self._k("elementwise", name, "PPPqf")
        work = n // 4 if n % 4 == 0 else n
        self._launch(k, (max(1, min(-(-work // 256), 4096)), 1, 1), (256, 1, 1), a.ptr,
                     b.ptr if b is not None else 0, y.ptr, np.int64(n), np.float32(s))
        return y

    def silu_mul(self, gate, up):
        return self._binary("silu_mul_f32", gate, up)

    def gelu_mul(self, gate, up):
        return self._binary("gelu_mul_f32", gate, up)

    def add(self, a, b):
        return self._binary("add_f32", a, b)

    def scale(self, x, s):
        return self._binary("scale_f32", x, None, s)

    def gather_rows(self, x, ctx: CudaStep):
        d = x.size // x.shape[0]
        y = self._out((ctx.R, *x.shape[1:]))
        if ctx.R:
            k = self._k("elementwise", "gather_rows_f32", "PPPii")
            self._launch(k, (max(1, min(-(-d // 256), 16)), ctx.R, 1), (256, 1, 1), x.ptr, ctx.logits_rows, y.ptr,
                         np.int32(ctx.R), np.int32(d))
        return y

    def glu_fused(self, x, act: str = "silu"):
        rows, F = x.size // x.shape[-1], x.shape[-1] // 2
        y = self._out((*x.shape[:-1], F))
        if self._q8_rows(rows, F):
            y.q8 = self._q8_scratch(rows * F)
            k = self._k("elementwise", "silu_halves_q8" if act == "silu" else "gelu_halves_q8", "PPPPi")
            self._launch(k, (-(-F // 256), rows, 1), (256, 1, 1), x.ptr, y.ptr, y.q8[0].ptr, y.q8[1].ptr, np.int32(F))
            return y
        k = self._k("elementwise", "silu_halves_f32" if act == "silu" else "gelu_halves_f32", "PPii")
        if rows and F:
            self._launch(k, (max(1, min(-(-(rows * F) // 256), 4096)), 1, 1), (256, 1, 1), x.ptr, y.ptr,
                         np.int32(rows), np.int32(F))
        return y

    def split(self, x, sizes):
        rows, width = x.size // x.shape[-1], x.shape[-1]
        if sum(sizes) != width:
            raise InvalidArgument(f"split sizes {sizes} do not add up to {width}", field="sizes")
        if self.tuning.split_views and rows == 1 and all(w % 4 == 0 for w in sizes):
            # one row: each piece is contiguous already; 16-byte aligned offsets keep vector loads legal
            offs = np.cumsum([0, *sizes[:-1]])
            return [CudaTensor(x.ptr + 4 * int(o), (*x.shape[:-1], w), x.dtype, x.owner) for o, w in zip(offs, sizes)]
        if 1 < len(sizes) <= 3 and rows:  # one launch for all pieces
            outs = [self._out((*x.shape[:-1], w)) for w in sizes]
            ptrs = [o.ptr for o in outs] + [0] * (3 - len(sizes))
            ws = list(sizes) + [0] * (3 - len(sizes))
            k = self._k("elementwise", "split3_f32", "PPPPiiiii")
            self._launch(k, (max(1, min(-(-max(sizes) // 1024), 8)), rows, len(sizes)), (256, 1, 1), x.ptr, *ptrs,
                         np.int32(rows), np.int32(width), *(np.int32(w) for w in ws))
            return outs
        k = self._k("elementwise", "copy_cols_f32", "PPiiii")
        outs, col = [], 0
        for w in sizes:
            y = self._out((*x.shape[:-1], w))
            if rows and w:
                self._launch(k, (max(1, min(-(-w // 1024), 8)), rows, 1), (256, 1, 1), x.ptr, y.ptr,
                             np.int32(rows), np.int32(width), np.int32(col), np.int32(w))
            outs.append(y)
            col += w
        return outs

    def moe(self, x, router_logits, k, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act="silu", alpha=1.702, limit=7.0):
        from . import cuda_quant

        T, d = x.shape
        E = router_logits.shape[-1]
        if not 0 < k <= min(E, 32) or act not in ("silu", "swiglu_oai"):
            raise InvalidArgument(f"moe: k={k} of {E} experts, act={act!r}", field="moe")
        F = w_gate.n
        ids = self._out((T, k), np.int32)
        wts = self._out((T, k))
        self._launch(self._k("moe", "moe_route", "PiiiPP"), (max(1, -(-T // 8)), 1, 1), (256, 1, 1),
                     router_logits.ptr, np.int32(T), np.int32(E), np.int32(k), ids.ptr, wts.ptr)
        gu = self._out((2, T, k, F))  # gate's slots, then up's (one launch writes both: moe_matmul_pair)
        g, u = gu.row_slice(0, 1).reshape(T, k, F), gu.row_slice(1, 2).reshape(T, k, F)
        bp = lambda b: b.ptr if b is not None else None  # noqa: E731
        # many slots per expert: grouped GEMM (slots sorted by expert once, on the device, into an int32
        # workspace shared by the three projections); few: one GEMV per slot
        ne = w_gate.n_experts or E
        grouped = (cuda_quant.moe_use_grouped(T, k, ne)
                   and all(w.n_experts == ne for w in (w_gate, w_up, w_down)))
        # (kept referenced until the down projection is queued: a dropped block is reused by the next _out)
        gws = self._out((cuda_quant.moe_workspace_ints(T, k, ne),), np.int32) if grouped else None
        gkw = dict(workspace_ptr=gws.ptr if grouped else None, grouped=grouped, tuning=self.tuning,
                   sms=self.limits.sms)
        # int8 input (tuning.moe_int8, and moe_int8_prompt for steps with prompt tokens): the per-slot
        # GEMVs (gate and up in one launch on one rounding of x) or the grouped int8 GEMM
        i8g = grouped and all(cuda_quant.moe_grouped_i8(w, T, k, self.tuning, self._decode_step)
                              for w in (w_gate, w_up, w_down))
        x8 = xs = None
        if i8g or (cuda_quant.moe_i8_eligible(w_gate, grouped, self.tuning)
                   and cuda_quant.moe_i8_eligible(w_up, grouped, self.tuning)):
            xs = self._q8_scratch(T * d)
            x8 = (xs[0].ptr, xs[1].ptr)
        if cuda_quant.moe_pair_eligible(w_gate, w_up, grouped, self.tuning):
            self._quant_call("moe_matmul_pair", cuda_quant.moe_matmul_pair, x.ptr, w_gate, w_up, ids.ptr, gu.ptr, T, k,
                             self.stream, x8, bias_gate_ptr=bp(b_gate), bias_up_ptr=bp(b_up), tuning=self.tuning,
                             sms=self.limits.sms)
        else:
            self._quant_call("moe_matmul", cuda_quant.moe_matmul, x.ptr, w_gate, ids.ptr, g.ptr, T, k, self.stream,
                             bias_ptr=bp(b_gate), x8=x8, **gkw)
            self._quant_call("moe_matmul", cuda_quant.moe_matmul, x.ptr, w_up, ids.ptr, u.ptr, T, k, self.stream,
                             bias_ptr=bp(b_up), grouped_ready=grouped, x8=x8, x8_ready=x8 is not None, **gkw)
        n = T * k * F
        flags = (np.int64(n), np.int32(act == "swiglu_oai"), np.float32(alpha), np.float32(limit))
        a = a8 = a_s = None
        if i8g or cuda_quant.moe_i8_eligible(w_down, grouped, self.tuning):
            # the down projection takes the activation's int8 rounding, written by moe_act_q8 itself
            a_s = self._q8_scratch(n)
            a8 = (a_s[0].ptr, a_s[1].ptr)
            self._launch(self._k("moe", "moe_act_q8", "PPPPqiff"), (-(-n // 256), 1, 1), (256, 1, 1),
                         g.ptr, u.ptr, *a8, *flags)
        else:
            a = self._out((T, k, F))
            self._launch(self._k("moe", "moe_act", "PPPqiff"), (max(1, min(-(-n // 256), 4096)), 1, 1), (256, 1, 1),
                         g.ptr, u.ptr, a.ptr, *flags)
        y = self._out((T, k, d))
        self._quant_call("moe_matmul", cuda_quant.moe_matmul, a.ptr if a is not None else None, w_down, ids.ptr, y.ptr,
                         T, k, self.stream, bias_ptr=bp(b_down), x_per_slot=True, grouped_ready=grouped, x8=a8,
                         x8_ready=a8 is not None, **gkw)
        out = self._out((T, d))
        self._launch(self._k("moe", "moe_combine", "PPPiii"), (max(1, min(-(-d // 256), 8)), T, 1), (256, 1, 1),
                     y.ptr, wts.ptr, out.ptr, np.int32(T), np.int32(k), np.int32(d))
        return out

