"""The `orcd` command: run a worker, talk to one, manage the local model cache.

    orcd serve [--model NAME_OR_PATH] ...     run a worker (blocks until SIGTERM/SIGINT)
    orcd demo                                 start a worker, stream one completion, stop it
    orcd generate PROMPT [--address ...]      stream a completion from a running worker (--n N: N samples)
    orcd tokenize TEXT [--chat] [--offsets]   a worker's token ids for a text or chat prompt
    orcd score TEXT [--top-n K]               per-token log-probs and total log-likelihood of a text
    orcd load PATH                            make a worker load a GGUF file (with progress)
    orcd unload / orcd list                   unload / list a worker's models
    orcd info [--local]                       hardware and build of a worker (or of this machine)
    orcd models list | pull NAME              the local model cache

The client commands connect in plaintext, or with TLS given --tls / --tls-ca (and, for mutual
TLS, --tls-client-cert and --tls-client-key); see cli_client.py.

Failures print `error: <gRPC status code>: <message>` on stderr and exit with status 1; bad flags
(including `serve` security settings and client TLS settings that do not fit together, and a
`serve` port that cannot be bound) print `error: <message>` and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Sequence

import grpc

from . import __version__, cli_tokens, model_store, security
from .cli_client import add_client_flags, client_from_args
from .client_errors import ClientConfigError, from_grpc
from .backends.factory import BACKENDS
from .errors import InvalidArgument, OrcdError
from .progress import LoadProgress
from .cli_serve import _positive_int, add_server_flags, cmd_serve

DEMO_PROMPT = "The capital of France is"



# --- argument parser -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orcd", description="GPU inference worker for GGUF models, over gRPC.")
    parser.add_argument("--version", action="version", version=f"orcd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run a worker until SIGTERM/SIGINT")
    add_server_flags(serve)

    demo = sub.add_parser("demo", help="start a worker on a free port, stream one completion, stop")
    demo.add_argument("--model", default=model_store.DEFAULT_MODEL,
                      help="known model name or GGUF path (default: %(default)s)")
    demo.add_argument("--prompt", default=DEMO_PROMPT, help="prompt (default: %(default)r)")
    demo.add_argument("--max-tokens", type=_positive_int, default=24)
    demo.add_argument("--backend", choices=BACKENDS, default="auto")
    demo.add_argument("--startup-timeout", type=float, default=300.0,
                      help="seconds to wait for the worker to serve (default: %(default)s)")

    gen = sub.add_parser("generate", help="stream a completion from a running worker")
    gen.add_argument("prompt", help="prompt text (with --chat: the user message)")
    add_client_flags(gen)
    gen.add_argument("--model-id", default="", help="model to use (default: the loaded one)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a chat user message")
    gen.add_argument("--system", default=None, help="with --chat: a system message first")
    gen.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=None)
    gen.add_argument("--max-tokens", type=int, default=None, help="default: until EOS or context full")
    gen.add_argument("--stop", action="append", default=None, metavar="TEXT",
                     help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", default=None)
    gen.add_argument("--request-id", default="")
    gen.add_argument("--n", type=_positive_int, default=None, metavar="N",
                     help="N parallel samples of the prompt, each printed whole and labelled when it ends "
                          "(with --seed, sample k uses seed + k)")
    cli_tokens.add_parsers(sub)  # tokenize, score

    load = sub.add_parser("load", help="make a worker load a GGUF file, showing progress")
    load.add_argument("path", help="GGUF path on the worker's machine (relative: in its model dir)")
    add_client_flags(load)
    load.add_argument("--model-id", default="", help="id to serve it under (default: file name)")
    load.add_argument("--context-length", type=int, default=0, help="0: the model's own (capped)")

    unload = sub.add_parser("unload", help="unload a model from a worker")
    unload.add_argument("model_id", nargs="?", default="", help="default: the only loaded model")
    add_client_flags(unload)

    drain = sub.add_parser("drain", help="stop a worker admitting requests (a Kubernetes preStop hook)")
    add_client_flags(drain)
    drain.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                       help="also wait up to this long (at most 600) for running and queued requests to end")
    drain.add_argument("--resume", action="store_true", help="admit requests again (undo a drain)")

    lst = sub.add_parser("list", help="list a worker's loaded models")
    add_client_flags(lst)

    info = sub.add_parser("info", help="hardware, libraries and build of a worker")
    add_client_flags(info)
    info.add_argument("--local", action="store_true", help="describe this machine; no worker needed")
    info.add_argument("--json", action="store_true", help="print the HardwareInfoResponse as JSON")

    models = sub.add_parser("models", help="the local model cache ($ORCD_MODEL_DIR)")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="known models, and whether each is cached")
    pull = msub.add_parser("pull", help="fetch a known model into the cache")
    pull.add_argument("name", choices=sorted(model_store.MODELS))
    return parser


def stream_completion(client, request, out=None, err=None) -> int:
    """Writes the tokens of one request to `out` as they arrive and a summary line to `err`."""
    from .client import finish_reason_name

    out = out or sys.stdout
    err = err or sys.stderr
    wrote_newline = True
    finished = None
    for event in client.execute(request):
        kind = event.WhichOneof("event")
        if kind == "token" and event.token.text:
            out.write(event.token.text)
            out.flush()
            wrote_newline = event.token.text.endswith("\n")
        elif kind == "finished":
            finished = event.finished
    if not wrote_newline:
        out.write("\n")
        out.flush()
    if finished is None:
        raise OrcdError("the stream ended without a Finished event")
    u, t = finished.usage, finished.timings
    reason = finish_reason_name(finished.reason).lower()
    if finished.matched_stop:
        reason += f" {finished.matched_stop!r}"
    print(f"[{reason}; {u.prompt_tokens} prompt + {u.completion_tokens} generated tokens; "
          f"first token {t.time_to_first_token_ms:.0f} ms; {t.decode_tokens_per_second:.1f} tok/s]",
          file=err, flush=True)
    return 0


def generate_request(args):
    from .client import build_request

    params = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                  seed=args.seed, repetition_penalty=args.repetition_penalty, max_tokens=args.max_tokens,
                  stop=args.stop, ignore_eos=args.ignore_eos)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        return build_request(chat=messages, model_id=args.model_id, request_id=args.request_id, **params)
    if args.system:
        raise InvalidArgument("--system needs --chat", field="system")
    return build_request(args.prompt, model_id=args.model_id, request_id=args.request_id, **params)


def cmd_generate(args) -> int:
    request = generate_request(args)
    if args.n is not None:
        request.n = args.n
    with client_from_args(args) as client:
        if request.n > 1:
            return cli_tokens.stream_samples(client, request)
        return stream_completion(client, request)



def cmd_load(args) -> int:
    path = args.path
    # A file that exists here is sent as an absolute path: the worker resolves relative paths
    # in its own model directory, not in this shell's working directory.
    if os.path.isfile(path):
        path = os.path.abspath(path)
    bar = LoadProgress(sys.stderr)
    model = None
    with client_from_args(args) as client:
        try:
            for event in client.load_model(path, model_id=args.model_id, context_length=args.context_length):
                if event.WhichOneof("event") == "progress":
                    p = event.progress
                    bar.update(p.stage, p.bytes_done, p.bytes_total)
                else:
                    model = event.model
        finally:
            bar.finish()
    if model is None:
        raise OrcdError("the LoadModel stream ended without the loaded model")
    print(_describe_model(model))
    return 0


def _describe_model(m) -> str:
    from .hardware import format_bytes

    return (f"{m.model_id}: {m.architecture} {m.name or ''} ({m.parameters / 1e6:.0f}M parameters), "
            f"context {m.context_length}/{m.trained_context_length}, {m.backend}, "
            f"weights {format_bytes(m.weights_bytes)}, KV cache {format_bytes(m.kv_cache_bytes)}, "
            f"loaded in {m.load_seconds:.1f}s").replace("  ", " ")


def cmd_unload(args) -> int:
    with client_from_args(args) as client:
        client.unload_model(args.model_id)
    return 0


def cmd_drain(args) -> int:
    with client_from_args(args) as client:
        r = client.drain(wait_s=args.wait, resume=args.resume)
    state = "draining" if r.draining else "admitting"
    print(f"{state}: {r.running} running, {r.queued} queued; {'idle' if r.idle else 'busy'}"
          + (f" after {r.waited_ms / 1000:.1f}s" if args.wait is not None else ""))
    return 0 if r.idle or args.wait is None else 3


def cmd_list(args) -> int:
    with client_from_args(args) as client:
        for m in client.list_models():
            print(_describe_model(m))
    return 0


def cmd_info(args) -> int:
    from google.protobuf import json_format

    from . import hardware

    if args.local:
        gpu = hardware.detect_gpu()
        info = hardware.hardware_info("cuda" if gpu else "cpu", gpu)
    else:
        with client_from_args(args) as client:
            info = client.hardware_info()
    if args.json:
        print(json_format.MessageToJson(info, preserving_proto_field_name=True))
    else:
        print(hardware.format_hardware_info(info))
    return 0


def cmd_models(args) -> int:
    from .hardware import format_bytes

    if args.models_command == "pull":
        print(model_store.ensure_model(args.name, verbose=True))
        return 0
    print(f"model dir: {model_store.model_dir()}")
    for e in model_store.list_models():
        state = "cached" if e.cached else ("partial/corrupt" if e.size else "not cached")
        print(f"{e.spec.name:<24} {state:<16} {format_bytes(e.spec.size):>10}  {e.path}")
        print(f"{'':<24} {e.spec.description}")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The demo's client sends no token and speaks plaintext, so its worker must not ask for either.
_DEMO_UNSET_ENV = (security.ENV_TOKEN, security.ENV_TOKENS, security.ENV_CERT, security.ENV_KEY,
                   security.ENV_CLIENT_CA)


def cmd_demo(args) -> int:
    from .client import OrcdClient, build_request

    model = model_store.resolve_model(args.model, verbose=True)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    print(f"starting a worker on {address} with {model} ...", file=sys.stderr, flush=True)
    # A separate process, as in production: the demo then also shows startup and a clean
    # SIGTERM shutdown, and the worker's logs go to stderr apart from the completion on stdout.
    proc = subprocess.Popen([sys.executable, "-m", "orcd_grpc", "serve", "--model", str(model),
                             "--port", str(port), "--backend", args.backend, "--log-level", "warning"],
                            stdout=sys.stderr,
                            env={k: v for k, v in os.environ.items() if k not in _DEMO_UNSET_ENV})
    try:
        with OrcdClient(address) as client:
            _wait_for_worker(client, proc, args.startup_timeout)
            print(f"prompt: {args.prompt!r} (greedy, {args.max_tokens} tokens)", file=sys.stderr, flush=True)
            sys.stdout.write(args.prompt)
            request = build_request(args.prompt, temperature=0.0, max_tokens=args.max_tokens)
            return stream_completion(client, request)
    finally:
        _stop(proc)


def _wait_for_worker(client, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise OrcdError(f"the worker exited with status {proc.returncode} before serving")
        try:
            client.wait_ready(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except TimeoutError as exc:
            if time.monotonic() >= deadline:
                raise OrcdError(f"worker not ready: {exc}") from None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


COMMANDS = {"serve": cmd_serve, "demo": cmd_demo, "generate": cmd_generate, "load": cmd_load,
            "tokenize": cli_tokens.run_tokenize, "score": cli_tokens.run_score, "unload": cmd_unload, "drain": cmd_drain,
            "list": cmd_list, "info": cmd_info, "models": cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except grpc.RpcError as exc:
        err = from_grpc(exc)
        hint = f" (retry after {err.retry_after_ms} ms)" if err.retry_after_ms else ""
        print(f"error: {err.code().name}: {err.message}{hint}", file=sys.stderr)
    except ClientConfigError as exc:  # client TLS flags, or a token that would go out in plaintext
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OrcdError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
    except ValueError as exc:  # bad parameter combinations caught before any call
        print(f"error: {grpc.StatusCode.INVALID_ARGUMENT.name}: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `orcd generate ... | head`: the reader left; nothing more to say.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
