"""The boundary between scheduling and the device: a plan of one step in, a result out.

Above it the engine and scheduler decide what runs (which sequences, how many tokens of each,
where logits and samples are wanted, with which sampling parameters, masks and biases). Below it
a runner executes the plan on its backend and returns tokens, log-probs and the logits rows that
were asked for. How it does so (padding to captured graphs, packed device sampling rows, the
random stream of each row, queuing a step behind the one still running) is the runner's own.
docs/architecture.md draws the picture.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..sampling import Sampler, SamplingParams, TokenSample
from .base import StepMeta


@dataclass(frozen=True)
class Capabilities:
    """What a runner can do, declared once when it is made."""
    name: str                 # the backend's name ("cpu", "cuda")
    memory: str               # "host" (activations allocated per step) or "device" (a reserved workspace)
    device_sampling: bool     # samples where the logits are; only ids and log-probs reach the host
    device_penalties: bool    # repetition/presence/frequency penalties applied there too
    overlap: bool             # launch() may take a plan fed by a step whose tokens the host has not read
    graphs: bool              # pure decode steps replay captured launches
    max_step_tokens: int      # tokens one step may carry (its activations must fit the workspace)
    workspace_bytes: int = 0  # the reserved step workspace (0: none)
    # launch() may take a plan of a changed batch fed so too: some of that step's sequences (in its
    # order, first), then new sequences whose next tokens all fit the step and are each sampled
    overlap_changed: bool = False
    # Logits rows one step may compute: what bounds a scoring prefill chunk, whose every
    # position needs its [V] row of logits (max_logits_rows() of the memory they may take).
    max_logits_rows: int = 1 << 30


@dataclass(eq=False)
class RowSampling:
    """A sequence's sampling, made once per sequence. `state` is the runner's to keep whatever
    it derives from it (a packed row, a random key), so that per step only the token index
    changes."""
    params: SamplingParams
    sampler: Sampler          # the host sampler (its random stream is per sequence)
    state: Any = None
    penalised: bool = field(init=False)  # needs the token history (read on every step: kept)

    def __post_init__(self):
        p = self.params
        self.penalised = p is not None and (p.repetition_penalty != 1.0 or bool(p.presence_penalty)
                                            or bool(p.frequency_penalty))


@dataclass(eq=False, slots=True)
class PlanRow:
    """One sequence's part of a step: tokens [start, start + n) of it.

    tokens None: its one token is the sample of the step the plan follows (StepPlan.after), still
    on the device. Block tables of different rows may share blocks (a shared prompt prefix,
    parallel samples of one prompt): a row only ever writes the slots of its own new positions."""
    seq_id: int
    tokens: list[int] | None
    start: int
    n: int
    block_table: list[int]
    prompt_ids: Sequence[int]        # the history penalties need (references, not copies)
    output_ids: Sequence[int]
    sampling: RowSampling | None
    sample: bool = True              # sample a token from the logits of its last position
    token_index: int = 0             # which output token that sample is (seeds its random draw)
    logits: int = 0                  # how many of its last positions' logits go back to the host
    mask: np.ndarray | None = None   # int32 [ceil(V / 32)] packed bitmask: only these tokens may be sampled
    bias: dict[int, float] | np.ndarray | None = None  # added to the logits before sampling
    # The allowed tokens that follow the output (a constraint's matcher): an object with
    # fill_rows([(row index, it)], bits int32 [R, ceil(V / 32)]) (constraints.Constraint). The
    # runner fills its bitmask while the forward runs; in a step fed ahead (StepPlan.after), not
    # before the step it follows has been collected and its token given to the matcher.
    constraint: Any = None
    # Scoring: None, or the top-N (0..MAX_SCORE_TOP) of the log-probs wanted at each position of
    # the row whose next token is a prompt token (prompt_ids[position + 1], the target). The
    # runner returns, per such position, only the target's log-prob and the top-N (PromptScores),
    # of the raw logits (no mask, bias or penalty), never the rows of logits.
    prompt_logprobs: int | None = None
    # Speculative verification (speculation.py): tokens[1:] are these drafts, and the engine
    # checks them against the row's `logits` (every position's); the runner runs it as any row
    # whose logits are wanted. None: not a verify row.
    drafts: list[int] | None = None

    @property
    def masked(self) -> bool:
        return self.mask is not None or self.constraint is not None

    @property
    def scored(self) -> int:
        """How many of the row's positions (its first ones) are scored."""
        if self.prompt_logprobs is None or self.tokens is None:
            return 0
        return max(0, min(self.start + self.n, len(self.prompt_ids) - 1) - self.start)

    @property
    def logits_count(self) -> int:
        """Logits rows the step computes for the row (its last positions): those that go back to
        the host, the sampled one, and the scored ones."""
        k = max(self.logits, 1 if self.sample else 0)
        m = self.scored
        return max(k, m + (1 if self.sample else 0)) if m else k

    @property
    def decode(self) -> bool:
        """Every token of the row is a generated one (no prompt left)."""
        return self.start >= len(self.prompt_ids)


@dataclass(eq=False)
class StepPlan:
    rows: list[PlanRow]
    block_size: int
    after: "Launched | None" = None  # the step whose samples feed the rows with tokens None (the first rows)
    # (src, dst) KV blocks to copy before the step runs (copy-on-write of a block parallel samples
    # shared); the engine never puts them on a plan with `after`
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def seq_ids(self) -> list[int]:
        return [r.seq_id for r in self.rows]


# Most alternatives a runner returns per scored prompt position (PlanRow.prompt_logprobs).
MAX_SCORE_TOP = 20


@dataclass
class PromptScores:
    """A row's scored prompt positions: entry j is prompt position first + j, its token (the
    target), the target's log-prob given the tokens before it, and the top-N alternatives (ids and
    log-probs, most likely first, lowest id first among equals)."""
    first: int
    targets: np.ndarray      # int32 [m]
    logprobs: np.ndarray     # float32 [m]
    top_ids: np.ndarray      # int32 [m, N]
    top_logprobs: np.ndarray  # float32 [m, N]


@dataclass
class StepResult:
    samples: dict[int, TokenSample] = field(default_factory=dict)  # seq_id -> its new token
    logits: dict[int, np.ndarray] = field(default_factory=dict)    # seq_id -> [k, V] float32
    prompt_logprobs: dict[int, PromptScores] = field(default_factory=dict)  # seq_id -> its scores


@dataclass(eq=False)
class Launched:
    """A step handed to a runner. Its result is either ready or on its way (`pending`, the
    runner's handle); collect() gives it."""
    plan: StepPlan
    result: StepResult | None = None
    pending: Any = None
    feeds: bool = False  # its samples can feed a plan launched before they are collected

    @property
    def seq_ids(self) -> list[int]:
        return self.plan.seq_ids


@dataclass(frozen=True)
class RunnerModel:
    """What a runner needs of the loaded model: its forward pass and the KV geometry."""
    forward: Callable[[Any], Any]  # forward(ctx) -> logits of ctx's logits rows
    hp: Any                        # the adapter's hyperparameters
    n_experts_used: int
    block_size: int
    pad_block: int                 # a block outside the allocator's range, for padding rows
    table_width: int               # blocks of the longest sequence
    max_sequences: int
    copy_blocks: Callable[[list], None] | None = None  # copy_blocks([(src, dst), ...]): backend.copy_kv_blocks


class Runner(ABC):
    capabilities: Capabilities

    def _copy_blocks(self, plan: StepPlan) -> None:
        """The plan's block copies, before its forward (every runner calls it as it runs a plan)."""
        if plan.copies:
            self.model.copy_blocks(plan.copies)

    @abstractmethod
    def launch(self, plan: StepPlan) -> Launched | None:
        """Starts the step. A plan with `after` may be declined (None): the caller then waits for
        `after` and plans again."""

    @abstractmethod
    def collect(self, launched: Launched) -> StepResult:
        """The step's result, waiting for it if needed."""

    def settle(self, launched: Launched) -> None:
        """Queues what of a launched step still waits on the host (a masked sampling), once the
        caller has advanced its rows' matchers past the step before; collect() does it otherwise."""

    def run(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def prepare(self) -> None:
        """Once, after the model has loaded: what the runner would otherwise do on a step's first
        use (capturing graphs), so that no request waits for it."""

    def close(self) -> None:
        pass


def max_step_tokens(hp, workspace_bytes: int, n_exp: int = 0, max_sequences: int = 1) -> int:
    """Tokens one step may carry so that its activations fit the backend's step workspace
    (0: no limit): what the sampled rows' logits and sampling buffers leave, over twice the
    float32 rows a layer keeps alive at once per token. At most 65,535 (a kernel grid's rows)."""
    if not workspace_bytes:
        return 1 << 30
    workspace_bytes -= 2 * 4 * hp.vocab_size * max(1, max_sequences)
    ffn = 3 * hp.d_ff * max(1, n_exp) + (n_exp * hp.d_model if n_exp else 0)
    attn = 2 * (hp.n_heads * hp.head_dim + hp.n_kv_heads * (hp.head_dim + hp.head_dim_v))
    per_token = 4 * (6 * hp.d_model + attn + ffn)
    return max(16, min(65535, int(workspace_bytes) // (2 * per_token)))


def max_logits_rows(vocab_size: int, nbytes: int, at_least: int = 1) -> int:
    """How many float32 rows of logits fit in nbytes (at least `at_least`)."""
    return max(int(at_least), 1, int(nbytes) // (4 * max(1, int(vocab_size))))


def step_meta(plan: StepPlan) -> StepMeta:
    """Where each token of the plan belongs. Rows fed by `after` carry a placeholder token id
    that the runner replaces on the device."""
    bs = plan.block_size
    rows = plan.rows
    ids, pos, slots, starts, ctx_lens, want = [], [], [], [0], [], []
    width = max(len(r.block_table) for r in rows)
    tables = np.full((len(rows), width), -1, np.int32)
    for b, r in enumerate(rows):
        p = np.arange(r.start, r.start + r.n, dtype=np.int32)
        table = np.asarray(r.block_table, np.int32)
        tables[b, : len(table)] = table
        ids.extend(r.tokens if r.tokens is not None else [0] * r.n)
        pos.append(p)
        slots.append(table[p // bs] * bs + p % bs)
        end = starts[-1] + r.n
        want.extend(range(end - r.logits_count, end))
        starts.append(end)
        ctx_lens.append(r.start + r.n)
    return StepMeta(
        token_ids=np.asarray(ids, np.int32), positions=np.concatenate(pos),
        q_starts=np.asarray(starts, np.int32), ctx_lens=np.asarray(ctx_lens, np.int32),
        slot_mapping=np.concatenate(slots).astype(np.int32), block_tables=tables,
        block_size=bs, logits_rows=np.asarray(want, np.int32))


def logits_layout(plan: StepPlan) -> list[tuple[int, int]]:
    """(first, count) of each row's logits rows in the step's output (step_meta's order)."""
    out, at = [], 0
    for r in plan.rows:
        k = r.logits_count
        out.append((at, k))
        at += k
    return out


def score_targets(row: PlanRow) -> np.ndarray:
    """The prompt tokens a row's scored positions predict (int32 [row.scored])."""
    m = row.scored
    return np.asarray(row.prompt_ids[row.start + 1: row.start + 1 + m], np.int32)


def prompt_scores(logits: np.ndarray, row: PlanRow) -> PromptScores:
    """A row's PromptScores from its scored positions' logits ([scored, V], on the host): a
    float64 log-softmax, so this is also the reference the device's kernel is tested against.
    Blocks of rows keep the float64 copy small for long prompts and large vocabularies."""
    m, V = logits.shape
    top = min(int(row.prompt_logprobs or 0), MAX_SCORE_TOP, V)
    targets = score_targets(row)
    lp = np.empty(m, np.float32)
    ids = np.empty((m, top), np.int32)
    tlp = np.empty((m, top), np.float32)
    step = max(1, (1 << 22) // max(V, 1))
    for a in range(0, m, step):
        x = np.asarray(logits[a:a + step], np.float64)
        b = a + x.shape[0]
        mx = x.max(axis=1, keepdims=True)
        lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
        lp[a:b] = x[np.arange(b - a), targets[a:b]] - lse
        if top:
            part = np.argpartition(-x, top - 1, axis=1)[:, :top] if top < V else np.tile(np.arange(V), (b - a, 1))
            vals = np.take_along_axis(x, part, axis=1)
            order = np.lexsort((part, -vals), axis=1)  # largest first, lowest id among equals
            ids[a:b] = np.take_along_axis(part, order, axis=1)
            tlp[a:b] = np.take_along_axis(vals, order, axis=1) - lse[:, None]
    return PromptScores(row.start + 1, targets, lp, ids, tlp)


def bitmask_words(vocab: int) -> int:
    return (int(vocab) + 31) // 32


def pack_bitmask(allowed: np.ndarray) -> np.ndarray:
    """bool [V] -> int32 [ceil(V / 32)]: bit t % 32 of word t // 32 set where token t is allowed
    (llguidance's layout, which the sample kernel reads)."""
    allowed = np.asarray(allowed, bool).reshape(-1)
    w = bitmask_words(allowed.size)
    padded = np.zeros(32 * w, bool)
    padded[: allowed.size] = allowed
    return np.packbits(padded, bitorder="little").view("<i4").astype(np.int32)


def unpack_bitmask(bits: np.ndarray, vocab: int) -> np.ndarray:
    """int32 [..., W] -> bool [..., vocab]: pack_bitmask's inverse."""
    bits = np.ascontiguousarray(bits, "<i4")
    return np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[..., :vocab].astype(bool)


def fill_bitmasks(rows: list[PlanRow], vocab: int) -> np.ndarray | None:
    """int32 [len(rows), ceil(vocab / 32)]: each row's allowed tokens (all bits set for rows
    without a mask), or None when no row has one. A constraint's mask and a row's static mask
    are combined; where the two leave nothing, the constraint's stands alone (a grammar's output
    must stay in its language)."""
    if not any(r.masked for r in rows):
        return None
    bits = np.full((len(rows), bitmask_words(vocab)), -1, np.int32)
    cons = [(i, r.constraint) for i, r in enumerate(rows) if r.constraint is not None]
    if cons:
        type(cons[0][1]).fill_rows(cons, bits)
    for i, r in enumerate(rows):
        if r.mask is not None:
            both = bits[i] & r.mask
            if r.constraint is None or both.any():
                bits[i] = both
    return bits


def masked(x: np.ndarray, row: PlanRow, bits: np.ndarray | None = None) -> np.ndarray:
    """A row's logits with its bias added and its bitmask (bits, else row.mask) applied (a copy)."""
    x = np.array(x, np.float32, copy=True).reshape(-1)
    if row.bias is not None:
        if isinstance(row.bias, dict):
            if row.bias:
                ids = np.fromiter(row.bias.keys(), np.int64, len(row.bias))
                x[ids] += np.fromiter(row.bias.values(), np.float32, len(row.bias))
        else:
            x += np.asarray(row.bias, np.float32).reshape(-1)
    if bits is None:
        bits = row.mask
    if bits is not None:
        x[~unpack_bitmask(bits, x.size)] = -np.inf
    return x


def host_sample(x: np.ndarray, row: PlanRow, bits: np.ndarray | None = None) -> TokenSample:
    """Samples row from its host logits with the sequence's host sampler; bits: the row's
    bitmask of this step (fill_bitmasks), which a constrained row needs."""
    if bits is not None or row.mask is not None or row.bias is not None:
        x = masked(x, row, bits)
    return row.sampling.sampler.sample(x, row.prompt_ids, row.output_ids)
