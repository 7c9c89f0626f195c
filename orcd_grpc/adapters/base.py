"""What every adapter shares: hyperparameters read from GGUF metadata and the forward skeleton."""
from __future__ import annotations

from dataclasses import dataclass

from ..backends.base import Backend, KVLayout
from ..gguf_model import GGUFModel


@dataclass
class HParams:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    head_dim_v: int
    d_ff: int
    vocab_size: int
    eps: float
    context_length: int
    rope_dim: int
    rope_base: float


class Adapter:
    """Describes one architecture in terms of backend ops. Subclasses set `archs`."""

    archs: tuple[str, ...] = ()

    def __init__(self, model: GGUFModel):
        self.model = model
        self.hp = self.read_hparams(model)
        self.w: dict = {}
        self.be: Backend | None = None

    # ---- description ---------------------------------------------------------------------
    @classmethod
    def read_hparams(cls, m: GGUFModel) -> HParams:
        d = int(m.require("embedding_length"))
        n_heads = int(m.require("attention.head_count"))
        n_kv = m.hp("attention.head_count_kv", n_heads)
        head_dim = int(m.hp("attention.key_length", d // n_heads))
        vocab = m.hp("vocab_size")
        if vocab is None:
            vocab = len(m.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in m.fields \
                else GGUFModel.logical_shape(m.tensor("token_embd.weight"))[0]
        return HParams(
            n_layers=int(m.require("block_count")), d_model=d, n_heads=n_heads,
            n_kv_heads=int(n_kv if not isinstance(n_kv, list) else n_kv[0]),
            head_dim=head_dim, head_dim_v=int(m.hp("attention.value_length", head_dim)),
            d_ff=int(m.hp("feed_forward_length", 0) or 0), vocab_size=int(vocab),
            eps=float(m.hp("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(m.hp("context_length", 2048)),
            rope_dim=int(m.hp("rope.dimension_count", head_dim)),
            rope_base=float(m.hp("rope.freq_base", 10000.0)),
        )

    def required_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> logical shape (outermost first) that the file must have."""
        raise NotImplementedError

    def kv_layout(self, num_blocks: int, block_size: int) -> KVLayout:
        h = self.hp
        return KVLayout(h.n_layers, num_blocks, block_size, h.n_kv_heads, h.head_dim, h.head_dim_v)

    def fused_weights(self) -> dict[str, list[str]]:
        """New name -> tensors the engine loads concatenated by rows instead (see llama)."""
        return {}

    # ---- running -------------------------------------------------------------------------
    def bind(self, backend: Backend, weights: dict) -> None:
        self.be, self.w = backend, weights
        self.prepare()

    def prepare(self) -> None:
        """Derives per-model constants once at load (rope specs, scales)."""

    def forward(self, ctx, kv):
        """Logits [len(ctx.logits_rows), vocab] for one step."""
        raise NotImplementedError
