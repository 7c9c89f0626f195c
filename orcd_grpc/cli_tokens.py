"""The CLI's commands over the model's tokens: `orcd tokenize`, `orcd score`, and the printing of
`orcd generate --n N` (parallel samples). cli.py builds the parsers and dispatches here.

    orcd tokenize TEXT [--offsets]          the ids Execute would run (and each token's byte span)
    orcd tokenize --chat MESSAGE|JSON       the ids of a chat prompt, rendered by the model's template
    orcd score TEXT [--top-n K]             per-token log-probs of TEXT and its total log-likelihood
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from .cli_client import add_client_flags, client_from_args
from .errors import InvalidArgument, OrcdError

MAX_TOP_N = 20  # as PromptLogprobsOptions.top_n's cap on the worker


def add_parsers(sub) -> None:
    tok = sub.add_parser("tokenize", help="a worker's token ids for a text or chat prompt")
    add_input_flags(tok, "tokenize")
    add_client_flags(tok)
    tok.add_argument("--offsets", action="store_true",
                     help="one line per token: its byte span in TEXT, and those bytes (text input only)")

    score = sub.add_parser("score", help="per-token log-probs and total log-likelihood of a text (nothing generated)")
    add_input_flags(score, "score")
    add_client_flags(score)
    score.add_argument("--top-n", type=int, default=0, metavar="K",
                       help=f"also show the K most likely tokens at each position (0..{MAX_TOP_N})")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")


def run_tokenize(args) -> int:
    with client_from_args(args) as client:
        return cmd_tokenize(args, client)


def run_score(args) -> int:
    with client_from_args(args) as client:
        return cmd_score(args, client)


def add_input_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("input", metavar="TEXT", help=f"text to {what} (with --chat: a user message, or a JSON "
                                                 "array of {\"role\", \"content\"} messages)")
    p.add_argument("--chat", action="store_true", help="render TEXT with the model's chat template first")
    p.add_argument("--system", default=None, help="with --chat and a plain message: a system message first")
    p.add_argument("--model-id", default="", help="model whose tokenizer to use (default: the loaded one)")
    bos = p.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="add_bos", action="store_true", default=None,
                     help="add the BOS token (default: as the model's metadata says)")
    bos.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not add the BOS token")


def chat_messages(args) -> list[dict] | None:
    """The chat messages of --chat (None without it): a JSON array, or TEXT as one user message."""
    if not args.chat:
        if args.system:
            raise InvalidArgument("--system needs --chat", field="system")
        return None
    if args.input.lstrip().startswith("["):
        try:
            messages = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"not a JSON array of messages: {exc}", field="chat") from None
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
            raise InvalidArgument('want a non-empty JSON array of {"role", "content"} objects', field="chat")
        if args.system:
            messages = [{"role": "system", "content": args.system}, *messages]
        return messages
    return ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.input}]


def _piece(data: bytes, start: int, end: int) -> str:
    return repr(data[start:end].decode("utf-8", errors="replace"))


def cmd_tokenize(args, client, out=None) -> int:
    out = out or sys.stdout
    messages = chat_messages(args)
    resp = client.tokenize(messages if messages is not None else args.input, add_bos=args.add_bos,
                           return_offsets=args.offsets, model_id=args.model_id)
    if not args.offsets:
        print(" ".join(map(str, resp.ids)), file=out)
    else:
        data = args.input.encode()  # offsets index the text's UTF-8 bytes (the worker refuses them with chat)
        print(f"{'pos':>5} {'id':>7}  {'bytes':<11} text", file=out)
        for i, (tid, off) in enumerate(zip(resp.ids, resp.offsets)):
            print(f"{i:>5} {tid:>7}  {f'{off.start}-{off.end}':<11} {_piece(data, off.start, off.end)}", file=out)
    print(f"[{len(resp.ids)} tokens]", file=sys.stderr, flush=True)
    return 0


def cmd_score(args, client, out=None) -> int:
    """Teacher-forced log-probs of the prompt (Execute with prompt_logprobs and max_tokens 0)."""
    out = out or sys.stdout
    if not 0 <= args.top_n <= MAX_TOP_N:
        raise InvalidArgument(f"--top-n: must be 0..{MAX_TOP_N}, got {args.top_n}", field="prompt_logprobs.top_n")
    messages = chat_messages(args)
    done = client.score(args.input if messages is None else None, chat=messages, top_n=args.top_n,
                        add_bos=args.add_bos, model_id=args.model_id)
    entries = list(done.prompt_logprobs)
    if args.json:
        print(json.dumps({"tokens": [{"position": i + 1, "token_id": e.token_id, "text": e.text,
                                      "logprob": e.logprob,
                                      "top": [{"token_id": t.token_id, "text": t.text, "logprob": t.logprob}
                                              for t in e.top_logprobs]} for i, e in enumerate(entries)],
                          "total_logprob": sum(e.logprob for e in entries),
                          "prompt_tokens": done.usage.prompt_tokens}, indent=1), file=out)
        return 0
    print(f"{'pos':>5} {'id':>7} {'logprob':>10}  text", file=out)
    # Position 0 has nothing before it to predict it from, so scoring starts at 1.
    for i, e in enumerate(entries, start=1):
        alts = "  | " + ", ".join(f"{t.text!r} {t.logprob:.3f}" for t in e.top_logprobs) if e.top_logprobs else ""
        print(f"{i:>5} {e.token_id:>7} {e.logprob:>10.4f}  {e.text!r}{alts}", file=out)
    total = sum(e.logprob for e in entries)
    if entries:
        mean = total / len(entries)
        print(f"total log-likelihood {total:.4f} over {len(entries)} tokens (mean {mean:.4f}, "
              f"perplexity {math.exp(-mean):.3f})", file=out)
    else:
        print(f"total log-likelihood 0 ({done.usage.prompt_tokens}-token prompt: nothing to score)", file=out)
    return 0


def stream_samples(client, request, out=None, err=None) -> int:
    """Prints each of a request's n samples, labelled, as it finishes (tokens of parallel samples
    interleave on the stream, so none is printed before it is whole)."""
    from .client import SamplesBuilder

    out = out or sys.stdout
    err = err or sys.stderr
    done = SamplesBuilder()
    printed = set()
    for event in client.execute(request):
        done.add(event)
        if event.WhichOneof("event") != "finished":
            continue
        i = event.finished.sample_index
        c = done.samples[i].result()
        reason = c.finish_reason.lower() + (f" {c.matched_stop!r}" if c.matched_stop else "")
        out.write(f"--- sample {i} ---\n{c.text}{'' if c.text.endswith(chr(10)) else chr(10)}")
        out.flush()
        print(f"[sample {i}: {reason}; {c.usage.completion_tokens} generated tokens]", file=err, flush=True)
        printed.add(i)
    if len(printed) != request.n:
        raise OrcdError(f"the stream ended after {len(printed)} of {request.n} samples finished")
    return 0
