"""Tokenizers for GGUF models, built from the tokenizer.ggml.* metadata.

Two vocabulary families are supported, matching llama.cpp's behaviour (its conformance cases are
the tests):

* ``gpt2``: byte-level BPE, with HF `tokenizers`. The pre-tokenizer regexes are llama.cpp's, one
  per ``tokenizer.ggml.pre`` family, applied in sequence as isolated splits. Control tokens
  become HF *special* added tokens and user-defined tokens plain added tokens, which reproduces
  llama.cpp's rule that user-defined text is always recognised and control text only when asked
  (``encode_special``).
* ``llama``: SentencePiece-style: llama.cpp merges, at every step, the adjacent pair whose
  concatenation is the vocabulary token of highest score (spm.py, the same rules for added
  tokens; a fraction of the memory an HF BPE takes for it).
"""
from __future__ import annotations

import json
import os
import pathlib
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .errors import InvalidArgument
from .gguf_metadata import field_value, read_gguf_metadata
from .prompt_guard import release_heap
from .spm import SpmTokenizer

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts llama.cpp treats as end of generation, and as control tokens whatever type the file gives
# them (it overrides the type of a "control-looking token"): they end generation here too, and
# client text spelling one is text, never the token.
END_OF_TURN_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
)

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k (GPT-4o / GPT-OSS); the case classes of the original need no rewriting in Oniguruma.
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_GPT4O_RE = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
             rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in order, ignore_merges, add_bos default)
_LLAMA3 = ([_LLAMA3_RE], True, True)
_QWEN2 = ([_QWEN2_RE], False, False)
_SMOLLM = ([r"\p{N}", _GPT2_RE], False, False)
_GPT2 = ([_GPT2_RE], False, False)
_GPT4O = ([_GPT4O_RE], False, False)
_BPE_DEFAULT = ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False)
BPE_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1"), _LLAMA3),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _SMOLLM),
    **dict.fromkeys(("gpt-2", "gpt2", "mpt", "olmo", "jais", "phi-2", "trillion",
                     "granite-docling"), _GPT2),
    **dict.fromkeys(("gpt-4o", "minimax-m2"), _GPT4O),
    "default": _BPE_DEFAULT,
}

_META_KEYS = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template",
    "general.name",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


# --------------------------------------------------------------------------------------------
# Reading tokenizer metadata (gguf_metadata.py: the values without GGUFReader.contents()).

def metadata_from_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Tokenizer metadata from GGUFReader.fields (or an already plain dict of values)."""
    out = {}
    for key in _META_KEYS:
        if key in fields:
            value = fields[key]
            out[key] = field_value(value) if hasattr(value, "parts") else value
    return out


# --------------------------------------------------------------------------------------------

def _token_bytes_table(tokens: list[str], types: np.ndarray, byte_level: bool) -> list[bytes]:
    table = []
    for tok, ty in zip(tokens, types.tolist()):
        if ty in (CONTROL, USER_DEFINED, UNKNOWN):
            # llama.cpp renders these as their literal text in both vocabulary families
            table.append(tok.encode("utf-8"))
        elif byte_level:
            try:
                table.append(bytes(_BYTE_DECODER[c] for c in tok))
            except KeyError:  # not a byte-level token after all; its text is the best guess
                table.append(tok.encode("utf-8"))
        elif ty == BYTE and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            table.append(bytes([int(tok[3:5], 16)]))
        else:
            table.append(tok.replace("\u2581", " ").encode("utf-8"))
    return table


def _add_special(hf: HFTokenizer, tokens: list[str], types: np.ndarray) -> None:
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero(types == CONTROL)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == USER_DEFINED)]
    if control:
        hf.add_special_tokens(control)
    if user:
        hf.add_tokens(user)


def _rstrip(meta: dict, vocab: dict[str, int], types: np.ndarray) -> np.ndarray | None:
    """Added tokens that take the whitespace after them with them: llama.cpp sets this by the
    model's name, for phi-3 (every control and user-defined token but <unk>, <s> and
    <|endoftext|>), so that a chat template's newline after <|user|> is no token there."""
    name = str(meta.get("general.name") or "").lower()
    if "phi-3" not in name and "phi3" not in name:
        return None
    out = (types == CONTROL) | (types == USER_DEFINED) | (types == UNKNOWN)
    for text, value in (("<unk>", False), ("<s>", False), ("<|endoftext|>", False), ("</s>", True)):
        if text in vocab:
            out[vocab[text]] = value
    return out


def _as_id(value) -> int | None:
    return None if value is None else int(value)


class Tokenizer:
    """Text <-> token ids for one model; see the module docstring for how it is built."""

    def __init__(self, hf: HFTokenizer, *, token_bytes: list[bytes], special: np.ndarray,
                 bos_id: int | None, eos_ids: frozenset[int], add_bos: bool,
                 chat_template: str | None, bos_text: str = "", eos_text: str = "",
                 covers_all_bytes: bool = False):
        self._hf = hf
        # encode() and encode_special() differ only in HF's encode_special_tokens switch, which
        # lives on the instance; the lock keeps one request's setting from leaking into
        # another's. (A second instance would cost seconds to build for a 262k vocabulary.)
        self._lock = threading.Lock()
        # One buffer and its offsets: a bytes object per token costs ~40 bytes of header each
        # (about 8 MiB more for a 262k vocabulary).
        self._bytes_blob = b"".join(token_bytes)
        self._bytes_at = np.zeros(len(token_bytes) + 1, np.int64)
        np.cumsum([len(b) for b in token_bytes], out=self._bytes_at[1:])
        self._special = special
        self.vocab_size = len(token_bytes)
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = bool(add_bos and bos_id is not None)
        self.chat_template = chat_template or None
        self.bos_token = bos_text
        self.eos_token = eos_text
        # Every token stands for at most this many bytes of input text, so a text of n bytes
        # needs at least ceil(n / max_token_bytes) tokens: a bound known before tokenizing.
        # It holds only where no token can swallow an unbounded run of input (an unknown token
        # fused over unencodable text, a normalizer that shrinks text); elsewhere it is None.
        self.max_token_bytes = (max(1, int(np.diff(self._bytes_at).max(initial=1)))
                                if covers_all_bytes else None)
        from .chat_template import check_template

        # Compiled once here, so a broken template is known (and logged) when the model loads.
        self.template_error = check_template(self.chat_template)
        # Texts of the control tokens, for telling which client strings could spell one.
        self.control_texts = frozenset(
            b.decode("utf-8", "replace") for b in map(self._bytes_of, np.flatnonzero(special)) if b)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any]) -> "Tokenizer":
        return cls._from_metadata(metadata_from_fields(fields))

    @classmethod
    def from_gguf_file(cls, path: str | os.PathLike) -> "Tokenizer":
        return cls._from_metadata(read_gguf_metadata(path))

    @classmethod
    def _from_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise InvalidArgument("vocabulary is missing or empty", field="tokenizer.ggml.tokens")
        tokens = list(tokens)
        n = len(tokens)
        types = meta.get("tokenizer.ggml.token_type")
        types = np.full(n, NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        if types.shape != (n,):
            raise InvalidArgument(f"has {types.size} entries for {n} tokens",
                                  field="tokenizer.ggml.token_type")
        # Duplicate strings cannot share one vocabulary map; the first id wins, like llama.cpp.
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        end_of_turn = [vocab[t] for t in END_OF_TURN_TEXTS if t in vocab]
        if end_of_turn:
            types = types.copy()
            types[end_of_turn] = CONTROL

        if kind == "gpt2":
            pre = meta.get("tokenizer.ggml.pre") or "default"
            if pre not in BPE_PRE:
                raise InvalidArgument(f"pre-tokenizer {pre!r} is not supported "
                                      f"(supported: {', '.join(sorted(BPE_PRE))})",
                                      field="tokenizer.ggml.pre")
            regexes, ignore_merges, add_bos_default = BPE_PRE[pre]
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise InvalidArgument("BPE vocabulary has no merges", field="tokenizer.ggml.merges")
            pairs = []
            for m in merges:
                left, sep, right = m.partition(" ")
                if not sep:
                    raise InvalidArgument(f"merge {m!r} is not 'left right'",
                                          field="tokenizer.ggml.merges")
                pairs.append((left, right))
            hf = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
            hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            hf.decoder = decoders.ByteLevel()
            byte_level = True
            # Byte-level: a token's bytes are exactly the input it covers. Bytes without a piece
            # (SmolLM2 lacks \x04, \xff, ...) are dropped by HF, so only a text made mostly of
            # those could fit yet be refused: no prompt anyone means.
            covers_all = True
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores")
            scores = (np.zeros(n, np.float32) if scores is None
                      else np.asarray(scores, np.float32))
            unk_id = _as_id(meta.get("tokenizer.ggml.unknown_token_id"))
            # llama.cpp prefixes a space to every run of text that starts the input or follows
            # an added token
            space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            hf = SpmTokenizer(tokens, types, scores, unk_id=unk_id if unk_id is not None and 0 <= unk_id < n else None,
                              space_prefix=space_prefix, rstrip=_rstrip(meta, vocab, types))
            add_bos_default = True
            byte_level = False
            # With all 256 byte pieces, byte fallback covers any text and no unknown token occurs.
            covers_all = int(np.count_nonzero(types == BYTE)) >= 256
        else:
            raise InvalidArgument(f"tokenizer model {kind!r} is not supported (gpt2, llama)",
                                  field="tokenizer.ggml.model")
        if kind == "gpt2":
            _add_special(hf, tokens, types)

        bos_id = _as_id(meta.get("tokenizer.ggml.bos_token_id"))
        eos_id = _as_id(meta.get("tokenizer.ggml.eos_token_id"))
        eos = {i for i in (eos_id, _as_id(meta.get("tokenizer.ggml.eot_token_id")),
                           _as_id(meta.get("tokenizer.ggml.eom_token_id")))
               if i is not None and 0 <= i < n}
        eos |= set(end_of_turn)
        if "<|channel|>" in vocab and "<|return|>" in vocab and "<|end|>" in vocab:
            # Harmony (GPT-OSS): <|end|> closes one message (the analysis before the answer,
            # say), not the turn; <|return|> and <|call|> end generation.
            eos.discard(vocab["<|end|>"])
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(
            hf, token_bytes=_token_bytes_table(tokens, types, byte_level),
            special=(types == CONTROL), bos_id=bos_id, eos_ids=frozenset(eos),
            add_bos=add_bos_default if add_bos is None else bool(add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            bos_text=tokens[bos_id] if bos_id is not None and 0 <= bos_id < n else "",
            eos_text=tokens[eos_id] if eos_id is not None and 0 <= eos_id < n else "",
            covers_all_bytes=covers_all)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike,
                            fields: Mapping[str, Any] | None = None) -> "Tokenizer":
        """An HF tokenizer.json; bos/eos/template come from `fields` (GGUF) or, failing that,
        from a tokenizer_config.json beside it."""
        path = pathlib.Path(path)
        hf = HFTokenizer.from_file(str(path))
        hf.post_processor = None  # BOS is added by encode(), not by HF's template processing
        n = hf.get_vocab_size(with_added_tokens=True)
        added = hf.get_added_tokens_decoder()
        special = np.zeros(n, bool)
        for tid, tok in added.items():
            special[tid] = tok.special
        byte_level = "ByteLevel" in json.dumps(json.loads(hf.to_str()).get("decoder"))
        table = []
        for tid in range(n):
            text = hf.id_to_token(tid) or ""
            if tid in added:
                table.append(added[tid].content.encode("utf-8"))
            elif byte_level:
                table.append(bytes(_BYTE_DECODER[c] for c in text)
                             if all(c in _BYTE_DECODER for c in text) else text.encode())
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                table.append(bytes([int(text[3:5], 16)]))
            else:
                table.append(text.replace("\u2581", " ").encode("utf-8"))

        config = {}
        cfg_path = path.with_name("tokenizer_config.json")
        if cfg_path.is_file():
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        meta = metadata_from_fields(fields) if fields is not None else {}

        def token_text(v):
            return v.get("content") if isinstance(v, dict) else v

        def lookup(key, cfg_key):
            if key in meta:
                return _as_id(meta[key])
            text = token_text(config.get(cfg_key))
            return hf.token_to_id(text) if text else None

        bos_id = lookup("tokenizer.ggml.bos_token_id", "bos_token")
        eos_id = lookup("tokenizer.ggml.eos_token_id", "eos_token")
        eos = {i for i in (eos_id, _as_id(meta.get("tokenizer.ggml.eot_token_id")),
                           _as_id(meta.get("tokenizer.ggml.eom_token_id"))) if i is not None}
        for t in END_OF_TURN_TEXTS:
            tid = hf.token_to_id(t)
            if tid is not None and special[tid]:
                eos.add(tid)
        add_bos = meta.get("tokenizer.ggml.add_bos_token", config.get("add_bos_token", False))
        template = meta.get("tokenizer.chat_template") or config.get("chat_template")
        if isinstance(template, list):  # HF allows named templates; "default" is the chat one
            template = next((t.get("template") for t in template if t.get("name") == "default"),
                            None)
        return cls(hf, token_bytes=table, special=special, bos_id=bos_id,
                   eos_ids=frozenset(eos), add_bos=bool(add_bos), chat_template=template,
                   bos_text=hf.id_to_token(bos_id) if bos_id is not None else "",
                   eos_text=hf.id_to_token(eos_id) if eos_id is not None else "")

    # ---- use --------------------------------------------------------------------------------

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        want = self.add_bos if add_bos is None else add_bos
        if want and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; control-token text in it is encoded as ordinary text."""
        return self._with_bos(self._encode(text, plain=True), add_bos)

    def encode_special(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Like encode(), but control tokens written in `text` become their ids.

        Chat templates often write the BOS token themselves; no second one is added then.
        """
        ids = self._encode(text, plain=False)
        if ids and ids[0] == self.bos_id:
            return ids
        return self._with_bos(ids, add_bos)

    def encode_parts(self, parts: list[tuple[str, bool]], add_bos: bool | None = None) -> list[int]:
        """Token ids of the concatenated `parts`, each (text, special): control-token text is
        recognised only in parts marked special. BOS as in encode_special()."""
        ids: list[int] = []
        for text, special in parts:
            if text:
                ids += self._encode(text, plain=not special)
        return self.bos_unless_present(ids, add_bos)

    def bos_unless_present(self, ids: list[int], add_bos: bool | None = None) -> list[int]:
        """encode_special()'s BOS rule: a template that wrote BOS itself gets no second one."""
        if ids and ids[0] == self.bos_id:
            return ids
        return self._with_bos(ids, add_bos)

    def encode_with_offsets(self, text: str, add_bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """encode() and each id's (start, end) character span in `text`; an added BOS is (0, 0)."""
        enc = self._encoding(text, plain=True)
        ids, spans = list(enc.ids), list(enc.offsets)
        with_bos = self._with_bos(ids, add_bos)
        return with_bos, [(0, 0)] * (len(with_bos) - len(ids)) + spans

    def _encode(self, text: str, plain: bool) -> list[int]:
        return self._encoding(text, plain).ids

    def _encoding(self, text: str, plain: bool):
        if not isinstance(text, str):
            raise InvalidArgument(f"expected str, got {type(text).__name__}", field="text")
        with self._lock:
            self._hf.encode_special_tokens = plain
            # encode_batch releases the GIL; encode holds every other thread, signal handlers
            # included, for the whole tokenization (bench/tokenize_cost.py).
            enc = self._hf.encode_batch([text], add_special_tokens=False)[0]
        release_heap(len(text))
        return enc

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes `token_id` adds to the output text (b"" for control tokens if skipped)."""
        if not 0 <= token_id < self.vocab_size:
            raise InvalidArgument(f"token id {token_id} outside [0, {self.vocab_size})",
                                  field="token_id")
        if skip_special and self._special[token_id]:
            return b""
        return self._bytes_of(token_id)

    def _bytes_of(self, token_id: int) -> bytes:
        return self._bytes_blob[self._bytes_at[token_id]:self._bytes_at[token_id + 1]]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and bool(self._special[token_id])

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **limits: Any) -> str:
        """`limits`: max_chars, timeout_s (chat_template.render_chat's)."""
        from .chat_template import render_chat

        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token, eos_token=self.eos_token, **limits)
