"""The shapes CUDA graphs are captured at, and a step's metadata padded to them.

A graph replays the shapes it was captured with, so every step of a bucket is padded to them: its
rows to a batch-size bucket, a mixed step's tokens to a token bucket, every block table to the
longest a sequence can have. Padding rows write their KV into the model's spare block (pad_block)
and attend only to what they write there. The runner picks the bucket; this module builds the
padded StepMeta from the plan, host work on every step.
"""
from __future__ import annotations

import functools

import numpy as np

from .base import StepMeta
from .runner import RunnerModel, StepPlan, step_meta

# Batch sizes that decode steps are padded to and captured at as CUDA graphs.
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# Token counts that steps carrying prompt tokens are padded to (ORCD_MIXED_GRAPHS), with their rows
# padded to a GRAPH_BUCKETS size. Padding tokens cost a real token's compute, so the buckets are
# about 1.5x apart; steps of more tokens than ORCD_MIXED_MAX_TOKENS (their kernels long beside their
# launches) stay eager.
MIXED_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)

# What a step of padding rows alone (CudaRunner.prepare) pads from.
NO_ROWS = StepMeta(token_ids=np.zeros(0, np.int32), positions=np.zeros(0, np.int32), q_starts=np.zeros(1, np.int32),
                   ctx_lens=np.zeros(0, np.int32), slot_mapping=np.zeros(0, np.int32),
                   block_tables=np.zeros((0, 1), np.int32), block_size=1, logits_rows=np.zeros(0, np.int32))


def mixed_token_buckets(tuning) -> list[int]:
    """The token buckets a mixed step may pad to: up to ORCD_MIXED_MAX_TOKENS."""
    return [b for b in MIXED_TOKEN_BUCKETS if b <= tuning.mixed_max_tokens]


def mixed_bucket(tokens: int, rows: int, row_buckets, token_buckets, max_tokens: int,
                 pad_room: int) -> tuple[int, int] | None:
    """(row bucket, token bucket) a step of `tokens` tokens in `rows` rows pads to, or None: the
    token bucket must hold the tokens and fit the step workspace (max_tokens), the tokens it lacks
    go to one padding row (at most pad_room of them: its table's slots) that the row bucket holds too."""
    tb = next((b for b in token_buckets if b >= tokens), 0)
    if not tb or tb > max_tokens or tb - tokens > pad_room:
        return None
    nb = next((b for b in row_buckets if b >= rows + (tb > tokens)), 0)
    return (nb, tb) if nb else None


@functools.lru_cache(maxsize=8)
def _columns(width: int) -> np.ndarray:
    """0..width-1, made once per table width rather than on every decode step."""
    cols = np.arange(width)
    cols.flags.writeable = False
    return cols


def decode_meta(plan: StepPlan, nb: int, m: RunnerModel, deep: bool = False) -> StepMeta:
    """A decode step padded to nb one-token rows, its block tables to the longest a sequence
    can have. One array write per row, the rest whole-batch. deep: the graph key's depth class
    (attention's key slices), whatever the rows' own depths."""
    bs, rows = plan.block_size, plan.rows
    B = len(rows)
    tables = np.full((nb, m.table_width), -1, np.int32)     # [nb, table_width]
    tables[B:, 0] = m.pad_block
    pos = np.zeros(nb, np.int32)                             # [nb]
    ids = np.zeros(nb, np.int32)                             # [nb]; a fed row's id is written on the device
    slots = np.full(nb, m.pad_block * bs, np.int32)          # [nb]
    pos[:B] = [r.start for r in rows]
    ids[:B] = [0 if r.tokens is None else r.tokens[0] for r in rows]
    if B < 24:
        for b, r in enumerate(rows):
            bt = r.block_table
            tables[b, : len(bt)] = bt
            slots[b] = bt[r.start // bs] * bs + r.start % bs
    else:  # whole-batch: all tables in one masked write (row-major, as they are concatenated)
        lens = np.fromiter(map(len, (r.block_table for r in rows)), np.int64, B)
        flat: list[int] = []
        for r in rows:
            flat += r.block_table
        flat = np.asarray(flat, np.int32)
        tables[:B][_columns(m.table_width)[None, :] < lens[:, None]] = flat
        p = pos[:B]
        slots[:B] = flat[np.cumsum(lens) - lens + p // bs] * bs + p % bs
    ar = np.arange(nb + 1, dtype=np.int32)
    return StepMeta(token_ids=ids, positions=pos, q_starts=ar, ctx_lens=pos + 1, slot_mapping=slots,
                    block_tables=tables, block_size=bs, logits_rows=ar[:nb], deep=deep)


def mixed_meta(plan: StepPlan, nb: int, tb: int, m: RunnerModel) -> StepMeta:
    """A step of prompt chunks and decode rows (step_meta's) padded to tb tokens and nb rows, the
    kernels' max_q pinned to tb so the grids are the captured ones too. The tokens it lacks form
    one padding row at positions 0.. of the spare block, every entry of its table that block (its
    slots wrap there; it attends only to what it writes this step); further padding rows have no
    token. One logits row per row: the sampled rows' first."""
    bs = plan.block_size
    meta = step_meta(plan) if plan.rows else NO_ROWS
    T, B = meta.num_tokens, meta.num_seqs
    p = np.arange(tb - T, dtype=np.int32)                    # [tb - T] the padding row's positions
    ids = np.zeros(tb, np.int32)                             # [tb]
    ids[:T] = meta.token_ids
    starts = np.full(nb + 1, tb, np.int32)                   # [nb + 1]
    starts[: B + 1] = meta.q_starts
    ctx = np.zeros(nb, np.int32)                             # [nb]
    ctx[:B] = meta.ctx_lens
    tables = np.full((nb, m.table_width), m.pad_block, np.int32)  # [nb, table_width]
    tables[:B] = -1
    tables[:B, : meta.block_tables.shape[1]] = meta.block_tables
    if B < nb:
        ctx[B] = tb - T
    rows = np.full(nb, tb - 1, np.int32)                     # [nb]
    rows[: len(meta.logits_rows)] = meta.logits_rows
    return StepMeta(token_ids=ids, positions=np.concatenate([meta.positions, p]), q_starts=starts, ctx_lens=ctx,
                    slot_mapping=np.concatenate([meta.slot_mapping, m.pad_block * bs + p % bs]).astype(np.int32),
                    block_tables=tables, block_size=bs, logits_rows=rows, max_q=tb)


def verify_meta(plan: StepPlan, nb: int, n: int, m: RunnerModel) -> StepMeta:
    """A verify step padded to nb rows of n tokens each (decode_meta's shapes, n tokens a row):
    a padding row's tokens sit at positions 0..n-1 of the spare block and attend to those alone."""
    bs, rows = plan.block_size, plan.rows
    tables = np.full((nb, m.table_width), -1, np.int32)     # [nb, table_width]
    tables[len(rows):, 0] = m.pad_block
    pos = np.tile(np.arange(n, dtype=np.int32), nb)         # [nb * n]
    slots = (m.pad_block * bs + pos).astype(np.int32)       # [nb * n]
    ids = np.zeros(nb * n, np.int32)                         # [nb * n]
    for b, r in enumerate(rows):
        bt = np.asarray(r.block_table, np.int32)
        tables[b, : len(bt)] = bt
        p = np.arange(r.start, r.start + n, dtype=np.int32)
        pos[b * n:(b + 1) * n] = p
        slots[b * n:(b + 1) * n] = bt[p // bs] * bs + p % bs
        ids[b * n:(b + 1) * n] = r.tokens
    return StepMeta(token_ids=ids, positions=pos, q_starts=np.arange(nb + 1, dtype=np.int32) * n,
                    ctx_lens=pos[n - 1::n] + 1, slot_mapping=slots, block_tables=tables, block_size=bs,
                    logits_rows=np.arange(nb * n, dtype=np.int32))
