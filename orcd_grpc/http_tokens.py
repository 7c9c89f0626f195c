"""/tokenize and /detokenize of the HTTP front door, in vLLM's bodies, over the worker's token
services (token_service.py): the same encoding Execute runs, the same caps, on a threadpool
thread (never the engine thread). They take the roles of the gRPC Tokenize and Detokenize
methods and draw on the caller's request rate limit like any call.

  POST /tokenize    {"prompt": str | "messages": [...], "add_special_tokens", "add_generation_prompt",
                     "return_token_strs", "model"}
                    -> {"tokens": [ids], "count": n, "max_model_len": context, "token_strs"?: [...]}
  POST /detokenize  {"tokens": [ids], "model"} -> {"prompt": text}
"""
from __future__ import annotations

import re
from typing import Union

from pydantic import BaseModel, ConfigDict

from . import openai_schema as oa, token_service
from .errors import InvalidArgument, OrcdError
from .proto import pb
from .request import Unavailable

TOKENIZE = "/orcd.v1.Worker/Tokenize"
DETOKENIZE = "/orcd.v1.Worker/Detokenize"


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = ""
    prompt: Union[str, None] = None
    messages: list[oa.ChatMessage] | None = None
    # unset: the model's own BOS rule, what completions and chat completions run
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = ""
    tokens: list[int]


def param_of(field: str | None) -> str | None:
    """The body's name for the field a token_service error names."""
    if not field:
        return None
    if field == "model_id":
        return "model"
    if field == "ids":
        return "tokens"
    m = re.match(r"(?:input\.)?chat(?:\.messages)?(.*)$", field)
    if m:
        return "messages" + m[1]
    if field.startswith("input"):
        return "prompt"
    return field


def renamed(err: OrcdError) -> OrcdError:
    """err naming the body's field (so the error body's `param` and message use it)."""
    param = param_of(err.field)
    if param == err.field:
        return err
    out = type(err)(str(err).removeprefix(f"{err.field}: "), field=param, retry_after_ms=err.retry_after_ms)
    return out


def _engine(scheduler, model: str):
    if scheduler.engine is None:
        raise Unavailable("no model is loaded yet")
    return token_service.serving(scheduler, model)


def tokenize(scheduler, body: TokenizeBody, max_prompt_bytes: int) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidArgument("give one of prompt or messages", field="prompt")
    engine = _engine(scheduler, body.model)
    if body.prompt is not None:
        req = pb.TokenizeRequest(text=body.prompt)
        if body.add_special_tokens is not None:
            req.add_bos = body.add_special_tokens
        ids = list(token_service.tokenize(req, engine, max_prompt_bytes, pb).ids)
    else:
        chat = pb.ExecuteRequest()
        oa.chat_messages(body, chat)
        # unset add_bos: the model's rule, as chat completions run it (so count is their prompt_tokens)
        req = pb.RenderChatRequest(chat=chat.chat, add_generation_prompt=body.add_generation_prompt)
        if body.add_special_tokens is not None:
            req.add_bos = body.add_special_tokens
        ids = list(token_service.render_chat(req, engine, max_prompt_bytes, pb).ids)
    out = {"tokens": ids, "count": len(ids), "max_model_len": int(engine.info.context_length)}
    if body.return_token_strs:
        tok = engine.tokenizer
        out["token_strs"] = [tok.token_bytes(i).decode("utf-8", "replace") for i in ids]
    return out


def detokenize(scheduler, body: DetokenizeBody) -> dict:
    engine = _engine(scheduler, body.model)
    for i, t in enumerate(body.tokens):
        if not 0 <= t <= oa.UINT32_MAX:
            raise InvalidArgument(f"must be a token id, got {t}", field=f"tokens[{i}]")
    text = token_service.detokenize(pb.DetokenizeRequest(ids=body.tokens), engine, pb).text
    return {"prompt": text}
