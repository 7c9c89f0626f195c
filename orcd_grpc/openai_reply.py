"""The OpenAI reply objects (issue #21): completion and chat bodies, stream chunks, usage, and the
log-probs of each endpoint, built from the scheduler's events. No HTTP here (http_run.py sends
them), and no request parsing (openai_schema.py).
"""
from __future__ import annotations

import codecs
import math
import time

from .request import LENGTH, STOP_STRING, STOP_TOKEN
from .tool_stream import TOOL_CALLS

FINISH_REASONS = {STOP_TOKEN: "stop", STOP_STRING: "stop", LENGTH: "length", TOOL_CALLS: "tool_calls"}


def finite(x):
    # JSON has no -Infinity: a banned token's logprob is reported as vLLM does, -9999.0
    return x if x is None or math.isfinite(x) else -9999.0


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _top_dict(pairs) -> dict:
    """{token text: logprob}; two ids of one text (invalid UTF-8 pieces) keep the larger."""
    out: dict = {}
    for text, lp in pairs:
        lp = finite(lp)
        if text not in out or lp > out[text]:
            out[text] = lp
    return out


class LogprobsBuilder:
    """Collects per-token logprobs in the shape of one endpoint: completions' four parallel lists,
    or chat's list of {token, logprob, bytes, top_logprobs}."""

    def __init__(self, kind: str, tokenizer):
        self.kind = kind
        self.tokenizer = tokenizer
        self.offset = 0  # characters of the choice's text before the next token
        self.content: list = []
        self.tokens: list[str] = []
        self.token_logprobs: list = []
        self.top: list = []
        self.offsets: list[int] = []

    def _piece(self, token_id: int, skip_special: bool = False) -> bytes:
        try:
            return self.tokenizer.token_bytes(int(token_id), skip_special=skip_special)
        except Exception:
            return b""

    def add_prompt(self, prompt_ids: list[int], entries: list, *, echo_text: str, plain_text: bool) -> dict:
        """Completions' echo: the prompt's tokens with their log-probs (`entries`: the scheduler's
        PromptLogprobsEvent entries for positions 1.., in order) ahead of the generated ones, as
        OpenAI returns them: no log-prob and no alternatives for the first token (nothing predicts
        it), and each position's alternatives with its own token among them. text_offset counts
        characters of `echo_text`: the prompt as given, where a BOS the tokenizer added
        (`plain_text`) takes no room, or the decoded ids, where it does. Returns this part alone."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        start = len(self.tokens)
        at = self.offset
        for i, tid in enumerate(prompt_ids):
            self.offsets.append(at)
            at += len(decoder.decode(self._piece(tid, skip_special=plain_text)))
            if i == 0:
                self.tokens.append(self._piece(tid).decode("utf-8", "replace"))
                self.token_logprobs.append(None)
                self.top.append(None)
                continue
            _, text, lp, alts = entries[i - 1]
            self.tokens.append(text)
            self.token_logprobs.append(finite(lp))
            self.top.append(_top_dict([(t, a) for _, t, a in alts] + [(text, lp)]))
        self.offset += len(echo_text)
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:], "text_offset": self.offsets[start:]}

    def add(self, ev) -> dict:
        """Adds one TokenEvent; returns the logprobs of this token alone (a stream chunk's)."""
        raw = self._piece(ev.token_id)
        token = raw.decode("utf-8", "replace")
        lp = finite(ev.logprob)
        if self.kind == "chat":
            entry = {"token": token, "logprob": lp, "bytes": list(raw),
                     "top_logprobs": [{"token": t, "logprob": finite(a), "bytes": list(t.encode("utf-8"))}
                                      for _, t, a in ev.top]}
            self.content.append(entry)
            return {"content": [entry], "refusal": None}
        top = _top_dict((t, a) for _, t, a in ev.top)
        one = {"tokens": [token], "token_logprobs": [lp], "top_logprobs": [top], "text_offset": [self.offset]}
        self.tokens.append(token)
        self.token_logprobs.append(lp)
        self.top.append(top)
        self.offsets.append(self.offset)
        self.offset += len(ev.text)
        return one

    def result(self) -> dict:
        if self.kind == "chat":
            return {"content": self.content, "refusal": None}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                "text_offset": self.offsets}


class Reply:
    """The reply objects of one request: ids, timestamps and the shapes of each endpoint."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model
        self.object = "chat.completion" if kind == "chat" else "text_completion"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def choice(self, index: int, text: str, finish: str, logprobs: dict | None,
               tool_calls: list | None = None) -> dict:
        out: dict = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text if text or not tool_calls else None,
                              "refusal": None}
            if tool_calls:
                out["message"]["tool_calls"] = tool_calls
        else:
            out["text"] = text
        return out

    def complete(self, choices: list[dict], used: dict) -> dict:
        out = self._head(self.object)
        out["choices"] = sorted(choices, key=lambda c: c["index"])
        out["usage"] = used
        return out

    def chunk(self, index: int = 0, *, text: str | None = None, role: bool = False, logprobs: dict | None = None,
              finish: str | None = None, with_usage: bool = False, tool_calls: list | None = None) -> dict:
        out = self._head(self.chunk_object)
        choice: dict = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.kind == "chat":
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        out["choices"] = [choice]
        if with_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, used: dict) -> dict:
        out = self._head(self.chunk_object)
        out["choices"] = []
        out["usage"] = used
        return out


def model_card(info) -> dict:
    return {"id": info.model_id, "object": "model", "created": int(time.time() - float(info.load_seconds or 0)),
            "owned_by": "orcd", "max_model_len": int(info.context_length)}
