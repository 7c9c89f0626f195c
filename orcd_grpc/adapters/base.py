"""What every adapter shares: hyperparameters read from GGUF metadata and the forward skeleton."""
from __future__ import annotations

from dataclasses import dataclass

from ..backends.base import Backend, KVLayout
from ..gguf_model import GGUFModel
from ..weight_packing import Pack


@dataclass(frozen=True)
class Stage:
    """The part of the model a file holds: layers [first, end), and whether its input is hidden
    states (its token_embd is then a float32 table of them, looked up by row) and its output
    hidden states (no final norm or head). A plain model file is the whole model. Stage files are
    written by bench/stage_check.py, which runs a model too large to ship to a GPU machine in one
    piece as a chain of stages."""
    first: int
    end: int
    hidden_in: bool = False
    hidden_out: bool = False

    KEY = "orcd.stage."

    @classmethod
    def of(cls, m: GGUFModel, n_layers: int) -> "Stage":
        first = m.meta(cls.KEY + "first_layer")
        if first is None:
            return cls(0, n_layers)
        end = int(m.meta(cls.KEY + "end_layer", n_layers))
        if not 0 <= int(first) <= end <= n_layers:
            from ..errors import InvalidArgument

            raise InvalidArgument(f"stage layers [{first}, {end}) do not fit {n_layers} layers",
                                  field=cls.KEY + "first_layer")
        return cls(int(first), end, bool(m.meta(cls.KEY + "hidden_in", False)),
                   bool(m.meta(cls.KEY + "hidden_out", False)))

    @property
    def partial(self) -> bool:
        return self.hidden_in or self.hidden_out


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


def _one(value):
    """A per-layer array's value (validation.check_hparams has made sure they are all equal)."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


class Adapter:
    """Describes one architecture in terms of backend ops. Subclasses set `archs`."""

    archs: tuple[str, ...] = ()
    # Tensors loaded concatenated as one weight (weight_packing applies them at load; the forward
    # reads the packed name when it is there, the parts otherwise).
    packing: tuple[Pack, ...] = ()
    # Tokens per sequence the model is served at, set by load_engine before bind (None: the trained
    # context); phi3's LongRoPE picks its factors by it.
    n_ctx: int | None = None

    def __init__(self, model: GGUFModel):
        self.model = model
        self.hp = self.read_hparams(model)
        self.stage = Stage.of(model, self.hp.n_layers)
        self.w: dict = {}
        self.be: Backend | None = None

    # ---- description ---------------------------------------------------------------------
    @classmethod
    def read_hparams(cls, m: GGUFModel) -> HParams:
        d = int(m.require("embedding_length"))
        n_heads = int(_one(m.require("attention.head_count")))
        n_kv = m.hp("attention.head_count_kv", n_heads)
        head_dim = int(m.hp("attention.key_length", d // n_heads))
        vocab = m.hp("vocab_size")
        if vocab is None:
            vocab = m.fields.count("tokenizer.ggml.tokens")
            if vocab is None:
                vocab = GGUFModel.logical_shape(m.tensor("token_embd.weight"))[0]
        return HParams(
            n_layers=int(m.require("block_count")), d_model=d, n_heads=n_heads,
            n_kv_heads=int(_one(n_kv)),
            head_dim=head_dim, head_dim_v=int(m.hp("attention.value_length", head_dim)),
            d_ff=int(_one(m.hp("feed_forward_length", 0)) or 0), vocab_size=int(vocab),
            eps=float(m.hp("attention.layer_norm_rms_epsilon", 1e-5)),
            context_length=int(m.hp("context_length", 2048)),
            rope_dim=int(m.hp("rope.dimension_count", head_dim)),
            rope_base=float(m.hp("rope.freq_base", 10000.0)),
        )

    def required_tensors(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> logical shape (outermost first) that the file must have."""
        raise NotImplementedError

    def optional_tensors(self) -> set[str]:
        """Tensors the forward pass reads when the file has them, besides required(); the engine
        loads no others. By default every tensor of the file (an adapter that does not say)."""
        return set(self.model.tensors)

    def required(self) -> dict[str, tuple]:
        """required_tensors() narrowed to this file's stage. In a stage file, token_embd (a subset
        of the vocabulary, or the hidden-state table) and output (a slice of the vocabulary) may
        have any number of rows: None in the shape."""
        req, st = self.required_tensors(), self.stage
        if not st.partial and (st.first, st.end) == (0, self.hp.n_layers):
            return req
        out = {}
        for name, shape in req.items():
            if name.startswith("blk."):
                if not st.first <= int(name.split(".")[1]) < st.end:
                    continue
            elif name.startswith("output") and st.hidden_out:
                continue
            elif name in ("token_embd.weight", "output.weight"):
                shape = (None, *shape[1:])
            out[name] = shape
        return out

    def layers(self) -> range:
        return range(self.stage.first, self.stage.end)

    def kv_layout(self, num_blocks: int, block_size: int) -> KVLayout:
        h = self.hp
        return KVLayout(h.n_layers, num_blocks, block_size, h.n_kv_heads, h.head_dim, h.head_dim_v)

    # ---- running -------------------------------------------------------------------------
    def bind(self, backend: Backend, weights: dict) -> None:
        self.be, self.w = backend, weights
        self.prepare()

    def prepare(self) -> None:
        """Derives per-model constants once at load (rope specs, scales)."""

    def forward(self, ctx, kv):
        """Logits [len(ctx.logits_rows), vocab] for one step."""
        raise NotImplementedError
