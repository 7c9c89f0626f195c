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
    mask: np.ndarray | None = None   # bool [V]: only these tokens may be sampled
    bias: dict[int, float] | np.ndarray | None = None  # added to the logits before sampling

    @property
    def decode(self) -> bool:
        """Every token of the row is a generated one (no prompt left)."""
        return self.start >= len(self.prompt_ids)


@dataclass(eq=False)
class StepPlan:
    rows: list[PlanRow]
    block_size: int
    after: "Launched | None" = None  # the step whose samples feed the rows with tokens None
    # (src, dst) KV blocks to copy before the step runs (copy-on-write of a block parallel samples
    # shared); the engine never puts them on a plan with `after`
    copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def seq_ids(self) -> list[int]:
        return [r.seq_id for r in self.rows]


@dataclass
class StepResult:
    samples: dict[int, TokenSample] = field(default_factory=dict)  # seq_id -> its new token
    logits: dict[int, np.ndarray] = field(default_factory=dict)    # seq_id -> [k, V] float32


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

    def run(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

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
        k = max(r.logits, 1 if r.sample else 0)
        want.extend(range(end - k, end))
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
        k = max(r.logits, 1 if r.sample else 0)
        out.append((at, k))
        at += k
    return out


def masked(x: np.ndarray, row: PlanRow) -> np.ndarray:
    """A row's logits with its bias added and its mask applied (a copy)."""
    x = np.array(x, np.float32, copy=True).reshape(-1)
    if row.bias is not None:
        if isinstance(row.bias, dict):
            if row.bias:
                ids = np.fromiter(row.bias.keys(), np.int64, len(row.bias))
                x[ids] += np.fromiter(row.bias.values(), np.float32, len(row.bias))
        else:
            x += np.asarray(row.bias, np.float32).reshape(-1)
    if row.mask is not None:
        x[~np.asarray(row.mask, bool).reshape(-1)] = -np.inf
    return x


def host_sample(x: np.ndarray, row: PlanRow) -> TokenSample:
    """Samples row from its host logits with the sequence's host sampler."""
    if row.mask is not None or row.bias is not None:
        x = masked(x, row)
    return row.sampling.sampler.sample(x, row.prompt_ids, row.output_ids)
