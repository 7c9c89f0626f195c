"""Tokenize, Detokenize and RenderChat: the served model's tokenizer and chat template, no forward.

They answer exactly what Execute would run: text goes through the same byte caps and plain-text
encoding (prompt_guard.text_prompt_ids), chat through the same guarded rendering in which message
contents never become control tokens (request_validation.chat_prompt). Work is bounded before it
starts (prompt bytes, id counts), and it runs on the calling gRPC handler thread as Execute's
tokenization does, never on the engine thread, whose steps it therefore cannot delay.
"""
from __future__ import annotations

import numpy as np

from . import prompt_guard, request_validation as rv
from .errors import FailedPrecondition, InvalidArgument, NotFound, OrcdError

# DetokenizeRequest.ids. 64Ki ids decode to at most a few MiB of text (a token is a few bytes,
# max_token_bytes at most ~128), inside gRPC's default 4 MiB message limit for realistic ids,
# and in milliseconds; a longer text is decoded in pieces.
MAX_DETOKENIZE_IDS = 65536


def serving(scheduler, model_id: str):
    """The engine a request naming `model_id` (empty: the loaded one) runs on."""
    rv.check_model_id(model_id)
    engine = scheduler.engine
    if engine is None:
        raise FailedPrecondition("no model is loaded; call LoadModel first")
    if model_id and model_id != engine.info.model_id:
        raise NotFound(f"no model {model_id!r} is loaded (serving {engine.info.model_id!r})", field="model_id")
    return engine


def _limits(engine, max_prompt_bytes: int) -> prompt_guard.Limits:
    return prompt_guard.Limits(engine.tokenizer, engine.info.context_length, max_prompt_bytes)


def _messages(chat, prefix: str) -> list[dict]:
    if not chat.messages:
        raise InvalidArgument("chat has no messages", field=prefix)
    for i, msg in enumerate(chat.messages):
        field = f"{prefix}.messages[{i}].role"
        if not msg.role:
            raise InvalidArgument("role must not be empty", field=field)
        prompt_guard.check_role(msg.role, field)
    return [{"role": m.role, "content": m.content} for m in chat.messages]


def _renamed(exc: OrcdError, old: str, new: str) -> OrcdError:
    """exc naming the field under `new` where the shared checks named it under `old`."""
    if not (exc.field or "").startswith(old):
        return exc
    out = type(exc)(str(exc).removeprefix(f"{exc.field}: "), field=new + exc.field[len(old):],
                    retry_after_ms=exc.retry_after_ms)
    return out


def byte_offsets(text: str, spans) -> np.ndarray:
    """Character spans [(start, end)] of `text` as UTF-8 byte spans (int64 [n, 2])."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    at = np.concatenate([[0], np.cumsum(width)])
    return at[np.asarray(spans, np.int64).reshape(-1, 2)]


def tokenize(req, engine, max_prompt_bytes: int, pb):
    which = req.WhichOneof("input")
    if which is None:
        raise InvalidArgument("one of text or chat must be set", field="input")
    if which == "text" and not req.text:
        raise InvalidArgument("text is empty", field="input")
    if which == "chat":
        _messages(req.chat, "input.chat")
        if req.return_offsets:
            raise InvalidArgument("offsets are given for text input only", field="return_offsets")
    limits = _limits(engine, max_prompt_bytes)
    tok, info = engine.tokenizer, engine.info
    if which == "text" and req.return_offsets:
        limits.check_text(req.text, "input.text")
        add_bos = req.add_bos if req.HasField("add_bos") else None
        ids, spans = tok.encode_with_offsets(req.text, add_bos=add_bos)
        offs = byte_offsets(req.text, spans).tolist() if ids else []
        return pb.TokenizeResponse(ids=ids, offsets=[pb.TokenOffset(start=a, end=b) for a, b in offs])
    return pb.TokenizeResponse(ids=rv.prompt_ids(req, tok, info.has_chat_template, limits))


def detokenize(req, engine, pb):
    ids = req.ids
    if len(ids) > MAX_DETOKENIZE_IDS:
        raise InvalidArgument(f"at most {MAX_DETOKENIZE_IDS} ids, got {len(ids)}", field="ids")
    tok = engine.tokenizer
    vocab = int(tok.vocab_size or engine.info.vocab_size)
    rv._check_ids(ids, vocab, "ids")
    return pb.DetokenizeResponse(text=tok.decode(list(ids), skip_special=bool(req.skip_special_tokens)) if ids else "")


def render_chat(req, engine, max_prompt_bytes: int, pb):
    messages = _messages(req.chat, "chat")
    add_bos = req.add_bos if req.HasField("add_bos") else None
    gen = req.add_generation_prompt if req.HasField("add_generation_prompt") else True
    try:
        text, ids = rv.chat_prompt(engine.tokenizer, messages, add_bos, _limits(engine, max_prompt_bytes),
                                   engine.info.has_chat_template, add_generation_prompt=gen)
    except OrcdError as exc:
        raise _renamed(exc, "input.chat", "chat") from exc
    return pb.RenderChatResponse(text=text, ids=ids)
