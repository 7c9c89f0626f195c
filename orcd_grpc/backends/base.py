"""The operations an adapter is written in.

An adapter describes an architecture once, as a sequence of these ops; the NumPy backend (the
reference) and the CUDA backend implement them, so both run the same adapter code.

Conventions shared by every backend:
- Activations are float32 and row-major. A step processes T tokens from B sequences flattened
  into one [T, d] matrix (sequence after sequence, as in `StepMeta.q_starts`).
- Tensors returned by a backend support `.shape` and `.reshape(*shape)` (a view, no copy).
- Weights are what `load_weight` returned: the NumPy backend dequantizes them to float32, the CUDA
  backend keeps them in their GGUF format in VRAM. A 2-D weight is [n_out, n_in] (GGUF ne reversed),
  and `linear` computes x @ W^T.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class YarnSpec:
    """YaRN context extension (as llama.cpp applies it): rotation dims whose wavelength is long
    compared with the original context are interpolated by `factor`, short ones extrapolated, and a
    ramp between beta_fast and beta_slow mixes the two; attention magnitudes scale by attn_factor."""
    factor: float
    orig_ctx: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    ext_factor: float = 1.0
    attn_factor: float = 1.0  # multiplied into cos/sin (llama.cpp's mscale), 1 + 0.1*ln(factor) folded in by the adapter
    # True: the ramp ends are floor(low) / ceil(high) (llama.cpp's ggml_rope_yarn_corr_dims).
    # False: the exact fractional ends, as gpt-oss was trained (HF rope_parameters "truncate": false).
    truncate: bool = True


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """Rotary position embedding of the first `dim` features of each head.

    neox=False rotates interleaved pairs (2i, 2i+1) (llama GGUF files, whose Q/K rows the converter
    permuted for this); neox=True rotates pairs (i, i + dim/2) (qwen2, phi3, gemma3, gpt-oss).
    theta_i = pos * base^(-2i/dim) / freq_factors[i] (freq_factors: phi3 long/short rope factors).
    """
    dim: int
    base: float
    neox: bool
    freq_factors: np.ndarray | None = None
    yarn: YarnSpec | None = None
    attn_factor: float = 1.0  # multiplies cos and sin (phi3 LongRoPE scaling)


@dataclass
class StepMeta:
    """Where each token of a step belongs; built by the engine on the host once per step."""
    token_ids: np.ndarray      # int32 [T]
    positions: np.ndarray      # int32 [T] position of each token in its sequence
    q_starts: np.ndarray       # int32 [B+1] offsets of each sequence's tokens in the T rows
    ctx_lens: np.ndarray       # int32 [B] tokens in each sequence's cache after this step
    slot_mapping: np.ndarray   # int32 [T] KV slot (block * block_size + offset) each token writes
    block_tables: np.ndarray   # int32 [B, max_blocks] (-1 padded)
    block_size: int
    logits_rows: np.ndarray    # int32 [R] rows of T whose logits are needed (last token of sampling sequences)
    # The most tokens any sequence has in the step as the kernels are to assume (their grids): None,
    # the step's own; a graph-replayed step of mixed rows pins it to its bucket's (cuda_runner)
    max_q: int | None = None
    # Whether decode attention may split keys as for a deep context (tuning.attn_splits_deep): None,
    # from the step's own contexts; a graph-replayed decode step pins it to its key's (cuda_runner)
    deep: bool | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.ctx_lens.shape[0])


@dataclass
class KVLayout:
    n_layers: int
    num_blocks: int
    block_size: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int

    def bytes(self, elem_size: float) -> int:
        """elem_size: bytes a cached value takes (KV_VALUE_BYTES)."""
        return int(self.n_layers * self.num_blocks * self.block_size * self.n_kv_heads
                   * (self.head_dim_k + self.head_dim_v) * elem_size)


#: bytes of one cached key or value element for each KV cache type (Q8_0: blocks of 32 int8 levels
#: and one float16 scale, as GGML's Q8_0)
KV_VALUE_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


class Backend(ABC):
    name: str = "?"
    #: the KV cache types the backend stores
    kv_types: tuple[str, ...] = ("f32",)
    #: the type this backend's caches are allocated as (set by the loader before sizing them)
    kv_type: str = "f32"
    # Host backends allocate step activations as they go (admission sizes them at load); device
    # backends reserve a workspace up front.
    host_memory: bool = False
    memory_name: str = "memory"  # what memory_available() measures, for messages
    workspace_bytes: int = 0  # the step workspace a device backend reserves (0: none)
    # Whether packs of mixed types may be re-encoded as one Q8_0 matrix (weight_packing.Switches.widen)
    widen_packs: bool = True

    @property
    def kv_elem_size(self) -> float:
        """Bytes of one cached key or value element in this backend's caches."""
        return KV_VALUE_BYTES[self.kv_type]

    # ---- memory -------------------------------------------------------------------------
    def before_weights(self) -> None:
        """Called once a load has passed its admission check, before its first weight."""

    @abstractmethod
    def load_weight(self, name: str, raw: np.ndarray, qtype, shape: tuple[int, ...]):
        """Makes a weight resident. raw: the GGUF tensor's data as gguf's reader gives it; shape:
        logical shape, outermost first (e.g. (n_out, n_in) or (n_experts, n_out, n_in))."""

    @abstractmethod
    def weight_nbytes(self, qtype, shape: tuple[int, ...], raw_nbytes: int) -> int:
        """Bytes `load_weight` will hold for such a tensor (for admission before loading)."""

    @abstractmethod
    def from_host(self, array: np.ndarray):
        """A small float32 host array made resident (e.g. derived constants)."""

    @abstractmethod
    def to_host(self, x) -> np.ndarray:
        ...

    @abstractmethod
    def alloc_kv(self, layout: KVLayout):
        ...

    def step_bytes(self, hp, max_sequences: int, context_length: int, largest_weight: int = 0) -> int:
        """Peak host bytes of one step beyond weights and KV cache (a host backend's activations,
        allocated per step; admission counts them at load)."""
        from ..admission import cpu_step_bytes

        return cpu_step_bytes(hp, max_sequences, context_length, largest_weight)

    def workspace_for(self, vocab_size: int, max_sequences: int) -> int:
        """The step workspace a model of this vocabulary served to max_sequences needs (a device
        backend's: the sampled rows' logits come out of it, and what they leave bounds a step's
        tokens); computed, not allocated, so a dry run can report it."""
        return int(self.workspace_bytes)

    def fit_workspace(self, nbytes: int) -> None:
        """Makes the step workspace nbytes (workspace_for's answer), once a load has passed its
        admission check."""

    def release_map(self, model) -> None:
        """Called while the weights of `model` (the GGUFModel) load, every LOAD_RELEASE_BYTES of
        them, and once all are resident, before the KV cache: a backend that copies every weight
        gives back the file map's pages read so far."""

    def memory_available(self) -> int | None:
        """Bytes that may still be allocated, None when unbounded (host memory)."""
        return None

    def gpu_info(self) -> dict | None:
        """The device's description for HardwareInfo (None: no GPU)."""
        return None

    def runner(self, model):
        """The runner that executes step plans on this backend (backends/runner.py)."""
        from .host_runner import HostRunner

        return HostRunner(self, model)

    def begin_step(self, meta: StepMeta):
        """Per-step state the ops need (device copies of meta); passed back to ops as `ctx`."""
        return meta

    def close(self) -> None:
        pass

    # ---- ops ----------------------------------------------------------------------------
    @abstractmethod
    def embed(self, w, ctx):
        """[T, d]: rows of the embedding table for ctx's token ids."""

    @abstractmethod
    def linear(self, x, w, bias=None):
        """[T, n_out] = x @ W^T (+ bias)."""

    @abstractmethod
    def rms_norm(self, x, w, eps: float, residual=None):
        """With residual: s = x + residual; returns (rmsnorm(s) * w, s). Without: (rmsnorm(x) * w, x).
        x may be [T, d] or [T, H, d] (then the norm is per head, w is [d])."""

    @abstractmethod
    def rope(self, x, ctx, spec: RopeSpec):
        """x: [T, H, D]; rotates by ctx's positions; returns a tensor of the same shape."""

    def rope_pair(self, q, k, ctx, spec: RopeSpec):
        """rope of q [T, Hq, D] and k [T, Hk, D] with the same spec (one launch on a GPU)."""
        return self.rope(q, ctx, spec), self.rope(k, ctx, spec)

    def qkv_rope_store(self, qkv, kv, layer: int, ctx, spec: RopeSpec, n_heads: int, n_kv_heads: int,
                       head_dim: int, head_dim_v: int):
        """A fused Q/K/V projection's rows [T, Hq*Dk + Hkv*Dk + Hkv*Dv] -> q [T, Hq, Dk] roped; k
        (roped) and v are written into the paged cache at ctx's slots, as attention() would write
        them, so that attention(q, None, None, ...) follows (one kernel instead of three on a GPU)."""
        T = qkv.shape[0]
        q, k, v = self.split(qkv, [n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim_v])
        q, k = self.rope_pair(q.reshape(T, n_heads, head_dim), k.reshape(T, n_kv_heads, head_dim), ctx, spec)
        self.store_kv(k, v.reshape(T, n_kv_heads, head_dim_v), kv, layer, ctx)
        return q

    @abstractmethod
    def store_kv(self, k, v, kv, layer: int, ctx):
        """Writes k, v ([T, Hkv, Dk], [T, Hkv, Dv]) into the paged cache at ctx's slots (slot < 0:
        a padding token, not written)."""

    def copy_kv_blocks(self, kv, pairs: list[tuple[int, int]]) -> None:
        """For each (src, dst) block pair, copies block src's K and V rows of every layer over
        block dst's, in order, after every step launched before (a device backend queues it on
        the step's stream): the copy-on-write of a block that parallel samples shared."""
        raise NotImplementedError(f"{self.name} backend cannot copy KV blocks")

    @abstractmethod
    def attention(self, q, k, v, kv, layer: int, ctx, *, scale: float, window: int = 0,
                  sinks=None, softcap: float = 0.0):
        """Writes k, v ([T, Hkv, Dk], [T, Hkv, Dv]) into the paged cache at ctx's slots (k = v =
        None: already written, by qkv_rope_store), then causal attention of q [T, Hq, Dk] over each sequence's cached keys (GQA: query head h uses
        kv head h // (Hq // Hkv)). window > 0: a query at position p sees keys at positions
        > p - window. sinks [Hq]: a per-head logit that joins the softmax denominator only.
        softcap > 0: scores = softcap * tanh(scores / softcap). Returns [T, Hq * Dv]."""

    @abstractmethod
    def silu_mul(self, gate, up):
        """silu(gate) * up."""

    @abstractmethod
    def gelu_mul(self, gate, up):
        """gelu_tanh(gate) * up."""

    def glu_fused(self, x, act: str = "silu"):
        """x [T, 2F] holding [gate | up] per row (a fused gate/up projection): act(gate) * up."""
        gate, up = self.split(x, [x.shape[-1] // 2] * 2)
        return self.silu_mul(gate, up) if act == "silu" else self.gelu_mul(gate, up)

    @abstractmethod
    def add(self, a, b):
        ...

    @abstractmethod
    def scale(self, x, s: float):
        ...

    @abstractmethod
    def gather_rows(self, x, ctx):
        """x[ctx.logits_rows]."""

    def moe(self, x, router_logits, k: int, w_gate, w_up, w_down, b_gate=None, b_up=None, b_down=None, *,
            act: str = "silu", alpha: float = 1.702, limit: float = 7.0):
        """Mixture-of-experts FFN. x [T, d]; router_logits [T, E]; w_gate, w_up [E, F, d];
        w_down [E, d, F]; optional biases b_gate, b_up [E, F], b_down [E, d].
        Per token t: S = the k experts with the largest router_logits[t] (ties: lower index
        first); their weights p = softmax(router_logits[t, S]) (softmax over the k picked logits
        only); out[t] = sum_{e in S} p_e * (W_down[e] @ a_e + b_down[e]), with
        g = W_gate[e] @ x[t] + b_gate[e], u = W_up[e] @ x[t] + b_up[e] and
          act="silu":       a = silu(g) * u
          act="swiglu_oai": g' = min(g, limit), u' = clip(u, -limit, limit),
                            a = g' * sigmoid(alpha * g') * (u' + 1)      (gpt-oss)
        Returns [T, d]."""
        raise NotImplementedError(f"{self.name} backend has no moe op")

    @abstractmethod
    def split(self, x, sizes: list[int]):
        """Splits [T, sum(sizes)] column-wise into [T, size] tensors."""
