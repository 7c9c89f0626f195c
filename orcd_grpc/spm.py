"""SentencePiece-style ("llama" vocabulary) tokenization, as llama.cpp does it, kept compact.

llama.cpp splits a text run into UTF-8 characters and, while it can, merges the adjacent pair
whose concatenation is the vocabulary token of highest score (ties: the leftmost pair); pieces
that end up outside the vocabulary become byte tokens (<0xXX>). HF tokenizers' BPE can be made to
do the same with a merge list of every split of every token, but for a 262,144-token vocabulary
it holds the vocabulary twice as Rust strings plus 514,847 merges: about 70 MiB resident, more
than a quarter of Gemma 3 270M's weights. Here the vocabulary is one byte buffer, its offsets and
an open-addressing hash table of token ids (about 7 MiB for Gemma 3), and the merge loop runs in
Numba (nogil, cached), a binary heap over the run's symbols.

What stays as the HF-based tokenizer did it (tokenizer.py's Tokenizer relies on it):
- Control tokens are never merge results, so client text can never become one; user-defined
  tokens are recognised in raw text always, control and unknown-type tokens only when
  `encode_special_tokens` is False (llama.cpp's parse_special); by leftmost-longest match, as HF's
  added vocabulary does. Where llama.cpp gives them its RSTRIP attribute (phi-3, by the model's
  name), whitespace after them is dropped.
- Offsets are character spans of the input; a prepended "\u2581" counts as part of its run's
  first character; a byte-fallback token spans its whole character.
- decode() follows HF's decoder chain: "\u2581" as a space, runs of <0xXX> tokens as UTF-8 (one
  U+FFFD per byte token where the run is not valid UTF-8), one leading space stripped when the
  vocabulary prefixes one.
"""
from __future__ import annotations

import re

import numba
import numpy as np

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
_JIT = dict(cache=True, nogil=True)
# small helpers inlined: a call per probe or heap step would cost more than the step
_INLINE = dict(_JIT, inline="always")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@numba.njit(**_INLINE)
def _hash(buf, a, b):
    h = np.uint64(14695981039346656037)  # FNV-1a
    for i in range(a, b):
        h = (h ^ np.uint64(buf[i])) * np.uint64(1099511628211)
    return h


@numba.njit(**_INLINE)
def _same(blob, a, b, text, c, d):
    if b - a != d - c:
        return False
    for i in range(b - a):
        if blob[a + i] != text[c + i]:
            return False
    return True


@numba.njit(**_JIT)
def _fill_table(blob, off, table):
    """table [power of two] of token ids (-1: empty) by their text's hash; of tokens with the
    same text the first id stays (as a dict built with setdefault)."""
    mask = table.shape[0] - 1
    for t in range(off.shape[0] - 1):
        a, b = off[t], off[t + 1]
        if a == b:
            continue
        i = np.int64(_hash(blob, a, b) & np.uint64(mask))
        while True:
            cur = table[i]
            if cur < 0:
                table[i] = t
                break
            if _same(blob, off[cur], off[cur + 1], blob, a, b):
                break
            i = (i + 1) & mask


@numba.njit(**_INLINE)
def _find(blob, off, table, text, a, b):
    """The id of the token spelled text[a:b], or -1."""
    mask = table.shape[0] - 1
    i = np.int64(_hash(text, a, b) & np.uint64(mask))
    while True:
        t = table[i]
        if t < 0:
            return -1
        if _same(blob, off[t], off[t + 1], text, a, b):
            return t
        i = (i + 1) & mask


@numba.njit(**_INLINE)
def _before(es, el, x, y):
    """Heap order of pairs x, y: higher score first, then the leftmost (llama.cpp's comparator)."""
    return es[x] > es[y] or (es[x] == es[y] and el[x] < el[y])


@numba.njit(**_INLINE)
def _push(heap, n, es, el, entry):
    """Sifts pair `entry` up into heap[:n + 1]; returns n + 1."""
    i = n
    heap[i] = entry
    while i > 0:
        p = (i - 1) >> 1
        if not _before(es, el, heap[i], heap[p]):
            break
        heap[i], heap[p] = heap[p], heap[i]
        i = p
    return n + 1


@numba.njit(**_INLINE)
def _pop(heap, n, es, el):
    """The top pair of heap[:n]; heap[:n - 1] stays a heap."""
    top = heap[0]
    n -= 1
    heap[0] = heap[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _before(es, el, heap[c + 1], heap[c]):
            c += 1
        if not _before(es, el, heap[c], heap[i]):
            break
        heap[i], heap[c] = heap[c], heap[i]
        i = c
    return top


@numba.njit(**_INLINE)
def _is_space(text, start, size, j):
    """Whether symbol j is U+2581 (UTF-8 E2 96 81)."""
    a = start[j]
    return size[j] == 3 and text[a] == 0xE2 and text[a + 1] == 0x96 and text[a + 2] == 0x81


@numba.njit(**_JIT)
def encode_run(text, blob, off, table, scores, mergeable, byte_ids, unk, split_ascii, split_other, ids, spans):
    """Tokens of one run of normalized UTF-8 text (uint8): their ids into `ids` and the byte span
    [start, end) of each into `spans` [n, 2] (both at least len(text) long); returns the count.

    The run is cut before each U+2581 that no token can span: one whose left neighbour is an
    ASCII character c with split_ascii[c], or any other character but U+2581 when split_other.
    Merges never cross such a cut, so each piece merges on its own, with the same result as one
    heap over the whole run and a heap the size of a word (a 2 MiB prompt's heap of millions of
    pairs spent its time in cache misses)."""
    n = text.shape[0]
    start = np.empty(n, np.int64)
    size = np.empty(n, np.int64)
    m = 0
    i = 0
    while i < n:
        c = text[i]
        k = 1 if c < 0xC0 else (2 if c < 0xE0 else (3 if c < 0xF0 else 4))
        k = min(k, n - i)
        start[m], size[m] = i, k
        m += 1
        i += k
    if m == 0:
        return 0
    prev = np.arange(m) - 1
    nxt = np.arange(m) + 1
    nxt[m - 1] = -1
    cuts = np.empty(m + 1, np.int64)  # the pieces' first symbols, then m
    nc = 1
    cuts[0] = 0
    for j in range(1, m):
        if _is_space(text, start, size, j):
            if size[j - 1] == 1:
                ok = split_ascii[text[start[j - 1]]]
            else:
                ok = split_other and not _is_space(text, start, size, j - 1)
            if ok:
                cuts[nc] = j
                nc += 1
                prev[j] = -1
                nxt[j - 1] = -1
    cuts[nc] = m
    longest = 0
    for q in range(nc):
        longest = max(longest, cuts[q + 1] - cuts[q])
    cap = 3 * longest + 1  # a piece's pairs at first, at most two more per merge
    es = np.empty(cap, np.float32)  # each pair pushed: its token's score, left, right, bytes
    el = np.empty(cap, np.int64)
    er = np.empty(cap, np.int64)
    ez = np.empty(cap, np.int64)
    heap = np.empty(cap, np.int64)  # pair numbers
    for q in range(nc):
        pushed = 0
        h = 0
        for j in range(cuts[q] + 1, cuts[q + 1]):
            a, b = start[j - 1], start[j] + size[j]
            t = _find(blob, off, table, text, a, b)
            if t >= 0 and mergeable[t]:
                es[pushed], el[pushed], er[pushed], ez[pushed] = scores[t], j - 1, j, b - a
                h = _push(heap, h, es, el, pushed)
                pushed += 1
        while h > 0:
            top = _pop(heap, h, es, el)
            h -= 1
            left, right, want = el[top], er[top], ez[top]
            if size[left] == 0 or size[right] == 0 or size[left] + size[right] != want:
                continue  # a stale pair: one side has merged since
            size[left] += size[right]
            size[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            for side in range(2):  # the new pairs: (left's left, left) and (left, its new right)
                x = prev[left] if side == 0 else left
                y = left if side == 0 else nxt[left]
                if x < 0 or y < 0:
                    continue
                a, b = start[x], start[y] + size[y]
                t = _find(blob, off, table, text, a, b)
                if t >= 0 and mergeable[t]:
                    es[pushed], el[pushed], er[pushed], ez[pushed] = scores[t], x, y, b - a
                    h = _push(heap, h, es, el, pushed)
                    pushed += 1
    count = 0
    for q in range(nc):
        j = cuts[q]
        while j >= 0:
            a, b = start[j], start[j] + size[j]
            t = _find(blob, off, table, text, a, b)
            if t >= 0:
                ids[count] = t
                spans[count, 0], spans[count, 1] = a, b
                count += 1
            else:  # a character outside the vocabulary: its bytes (or one unknown token)
                for r in range(a, b):
                    t = byte_ids[text[r]]
                    if t < 0 and unk < 0:
                        continue  # neither a byte piece nor an unknown token: dropped (as HF's BPE)
                    if t < 0:
                        t = unk
                        if count > 0 and ids[count - 1] == unk and spans[count - 1, 1] >= a:
                            spans[count - 1, 1] = b  # consecutive unknowns fuse
                            continue
                    ids[count] = t
                    spans[count, 0], spans[count, 1] = a, b
                    count += 1
            j = nxt[j]
    return count


class Encoding:
    """What HF's Encoding gives tokenizer.Tokenizer: ids, and character offsets made only when
    read (a tuple per token is most of a large prompt's heap, and only Tokenize asks)."""

    __slots__ = ("ids", "_first", "_last")

    def __init__(self, ids: list[int], first: np.ndarray, last: np.ndarray):
        self.ids, self._first, self._last = ids, first, last

    @property
    def offsets(self) -> list[tuple[int, int]]:
        return list(zip(self._first.tolist(), self._last.tolist()))


def _trie_pattern(words: list[str]) -> str:
    """A regex matching any of `words`, the longest at a position (a trie, greedy): linear in the
    text whatever the word count, where an alternation of 6,000 words is not."""
    trie: dict = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = True

    def emit(node) -> str:
        ends = "" in node
        kids = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not kids:
            return ""
        body = kids[0] if len(kids) == 1 else "(?:" + "|".join(kids) + ")"
        return f"(?:{body})?" if ends else body

    return emit(trie)


class SpmTokenizer:
    """The duck type tokenizer.Tokenizer uses: encode_special_tokens, encode_batch, decode."""

    def __init__(self, tokens: list[str], types: np.ndarray, scores: np.ndarray, *, unk_id: int | None,
                 space_prefix: bool, rstrip: np.ndarray | None = None):
        n = len(tokens)
        enc = [t.encode("utf-8") for t in tokens]
        self._blob = np.frombuffer(b"".join(enc), np.uint8)
        self._off = np.zeros(n + 1, np.int64)
        np.cumsum([len(b) for b in enc], out=self._off[1:])
        del enc
        self._table = np.full(1 << max(4, (2 * n - 1).bit_length()), -1, np.int32)
        _fill_table(self._blob, self._off, self._table)
        self._scores = np.ascontiguousarray(scores, np.float32)
        self._types = np.asarray(types, np.int8)
        self._mergeable = (self._types != CONTROL) & (self._types != BYTE) & (self._types != UNKNOWN)
        self._byte_ids = np.full(256, -1, np.int64)
        for i in np.flatnonzero(self._types == BYTE):
            m = _BYTE_TOKEN.fullmatch(tokens[i])
            if m and self._byte_ids[int(m.group(1), 16)] < 0:
                self._byte_ids[int(m.group(1), 16)] = i
        self._unk = -1 if unk_id is None else int(unk_id)
        # where encode_run may cut a run: before a U+2581 whose left neighbour no mergeable token
        # has just before a U+2581 (Gemma 3 has one such token, ">\u2581</")
        self._split_ascii = np.ones(128, np.bool_)
        self._split_other = True
        for t, ok in zip(tokens, self._mergeable.tolist()):
            if ok and SPACE in t[1:]:
                for k in range(1, len(t)):
                    if t[k] == SPACE and t[k - 1] != SPACE:
                        if ord(t[k - 1]) < 128:
                            self._split_ascii[ord(t[k - 1])] = False
                        else:
                            self._split_other = False
        self.space_prefix = space_prefix
        self.encode_special_tokens = True  # as HF's switch: True encodes control text as text
        # llama.cpp splits these out of raw text first: user-defined always, control and unknown
        # ones only where special text is parsed
        added = [i for i in np.flatnonzero((self._types == CONTROL) | (self._types == USER_DEFINED)
                                           | (self._types == UNKNOWN)) if tokens[i]]
        self._added = {}
        for i in added:  # the first id of a text wins
            self._added.setdefault(tokens[i], int(i))
        self._added_re = re.compile(_trie_pattern(list(self._added))) if self._added else None
        # added tokens that swallow the whitespace after them (tokenizer._rstrip)
        self._rstrip = frozenset(np.flatnonzero(rstrip).tolist()) if rstrip is not None else frozenset()
        self.encode("a")  # numba's cached kernel loaded now, not by the first request

    # ---- vocabulary ---------------------------------------------------------------------------
    def _text(self, i: int) -> str:
        return self._blob[self._off[i]:self._off[i + 1]].tobytes().decode("utf-8", "replace")

    # ---- encoding -----------------------------------------------------------------------------
    def _segments(self, text: str):
        """(start, end, added token id or -1) pieces of text, in order."""
        pos = 0
        if self._added_re is not None:
            for m in self._added_re.finditer(text):
                tid = self._added[m.group()]
                if (self.encode_special_tokens and self._types[tid] != USER_DEFINED) or m.start() < pos:
                    continue
                if m.start() > pos:
                    yield pos, m.start(), -1
                pos = m.end()
                if tid in self._rstrip:  # the token's span takes the whitespace (as HF's rstrip)
                    while pos < len(text) and text[pos] in " \t\n\v\f\r":
                        pos += 1
                yield m.start(), pos, tid
        if pos < len(text):
            yield pos, len(text), -1

    def _run(self, text: str, s: int, e: int, ids: list, firsts: list, lasts: list) -> None:
        norm = (SPACE if self.space_prefix else "") + text[s:e].replace(" ", SPACE)
        buf = np.frombuffer(norm.encode("utf-8"), np.uint8)
        out = np.empty(len(buf), np.int64)
        spans = np.empty((len(buf), 2), np.int64)
        n = encode_run(buf, self._blob, self._off, self._table, self._scores, self._mergeable, self._byte_ids,
                       self._unk, self._split_ascii, self._split_other, out, spans)
        # each byte -> the input character it belongs to ("\u2581" for " " keeps the count of
        # characters; the prefix counts as the run's first character)
        char_of = np.cumsum((buf & 0xC0) != 0x80) - 1
        if self.space_prefix:
            char_of = np.maximum(char_of - 1, 0)
        firsts.append(char_of[spans[:n, 0]] + s)
        lasts.append(char_of[spans[:n, 1] - 1] + s + 1)
        ids.append(out[:n])

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        ids: list[np.ndarray] = []
        firsts: list[np.ndarray] = []
        lasts: list[np.ndarray] = []
        for s, e, tid in self._segments(text):
            if tid >= 0:
                ids.append(np.array([tid], np.int64))
                firsts.append(np.array([s], np.int64))
                lasts.append(np.array([e], np.int64))
            else:
                self._run(text, s, e, ids, firsts, lasts)
        if not ids:
            return Encoding([], np.zeros(0, np.int64), np.zeros(0, np.int64))
        return Encoding(np.concatenate(ids).tolist(), np.concatenate(firsts), np.concatenate(lasts))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[Encoding]:
        return [self.encode(t) for t in texts]

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        pending = bytearray()
        pending_n = 0

        def flush():
            nonlocal pending, pending_n
            if pending_n:
                try:
                    parts.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    parts.append("\ufffd" * pending_n)
                pending, pending_n = bytearray(), 0

        n = len(self._off) - 1
        for i in ids:
            i = int(i)
            if not 0 <= i < n or (skip_special_tokens and self._types[i] == CONTROL):
                continue
            text = self._text(i).replace(SPACE, " ")
            m = _BYTE_TOKEN.fullmatch(text) if len(text) == 6 else None
            if m:
                pending.append(int(m.group(1), 16))
                pending_n += 1
                continue
            flush()
            parts.append(text)
        flush()
        out = "".join(parts)
        if self.space_prefix and out.startswith(" "):
            out = out[1:]
        return out
