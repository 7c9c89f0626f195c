#!/usr/bin/env bash
# Builds the TypeScript and Go clients and runs their tests against one live Python worker.
#
#   bash clients/ci.sh [all|ts|go]      (default: all)
#   bash clients/ci.sh install          only install the toolchains and npm packages
#
# Installs what it needs when missing: Debian packages for Go and protoc (as root, via apt-get),
# and the npm dependencies with `npm ci`. Set ORCD_CLIENTS_NO_INSTALL=1 to skip installing.
# The worker runs as `$ORCD_PYTHON -m orcd_grpc.cli serve` (ORCD_PYTHON defaults to python3,
# which must have the orcd package's dependencies) from the repository root, on the CPU backend
# with SmolLM2-135M ($ORCD_MODEL overrides). ORCD_ADDRESS=host:port uses a running worker instead.
set -euo pipefail

which_clients="${1:-all}"
case "$which_clients" in all|ts|go|install) ;; *) echo "usage: $0 [all|ts|go|install]" >&2; exit 2 ;; esac
want() { [[ "$which_clients" == all || "$which_clients" == install || "$which_clients" == "$1" ]]; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
python="${ORCD_PYTHON:-python3}"
export ORCD_REPO="$repo" ORCD_PYTHON="$python"
log() { printf '[clients/ci] %s\n' "$*" >&2; }

# --- install --------------------------------------------------------------------------------
# grpc-go 1.33 marshals through github.com/golang/protobuf; only its 1.5 line (a shim over
# google.golang.org/protobuf) handles the APIv2 messages protoc-gen-go makes. Debian defaults to
# 1.3, whose table marshaler crashes on oneofs, so the 1.5 package is named explicitly.
go_pkgs=(golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev
         golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev)
if [[ "${ORCD_CLIENTS_NO_INSTALL:-0}" != 1 ]]; then
  if want go; then
    missing=()
    for p in "${go_pkgs[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
      log "installing Debian packages: ${missing[*]}"
      sudo_=""; [[ $(id -u) == 0 ]] || sudo_="sudo"
      $sudo_ apt-get update -q
      DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
  fi
  if want ts; then
    log "npm ci (clients/ts)"
    (cd "$here/ts" && npm ci --no-audit --no-fund --loglevel=error)
  fi
fi

if [[ "$which_clients" == install ]]; then exit 0; fi

# --- generate and build ---------------------------------------------------------------------
export GO111MODULE=off GOPATH="$here/go:/usr/share/gocode" GOFLAGS=
export GOCACHE="${GOCACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/go-build}"
if want ts; then
  log "building the TypeScript client"
  (cd "$here/ts" && npm run --silent build)
fi
if want go; then
  log "building the Go client"
  "$here/go/generate.sh"
  (cd "$here/go" && go vet orcd/... && go build -o bin/orcd-example orcd/cmd/orcd-example)
fi

# --- one worker for both clients' tests -----------------------------------------------------
worker_pid=""
stop_worker() {
  [[ -n "$worker_pid" ]] || return 0
  if kill -0 "$worker_pid" 2>/dev/null; then
    kill -TERM "$worker_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$worker_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$worker_pid" 2>/dev/null || true
  fi
  wait "$worker_pid" 2>/dev/null || true
  worker_pid=""
}
trap stop_worker EXIT

if [[ -z "${ORCD_ADDRESS:-}" ]]; then
  model="${ORCD_MODEL:-$HOME/.cache/orcd/models/smollm2-135m-instruct.gguf}"
  [[ -e "$model" ]] || model="smollm2-135m-instruct"   # a name the worker resolves itself
  port="$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  worker_log="$(mktemp -t orcd-clients-worker.XXXXXX.log)"
  log "starting the worker on 127.0.0.1:$port (model $model, log $worker_log)"
  (cd "$repo" && exec "$python" -m orcd_grpc.cli serve --host 127.0.0.1 --port "$port" \
      --model "$model" --backend cpu) 2>"$worker_log" >/dev/null &
  worker_pid=$!
  export ORCD_ADDRESS="127.0.0.1:$port"
  # Wait for grpc.health.v1 SERVING (the model is loaded), failing fast if the worker dies.
  if ! "$python" - "$ORCD_ADDRESS" "$worker_pid" "${ORCD_START_TIMEOUT_S:-180}" <<'PY'
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

address, pid, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + timeout
last = "no answer"
with grpc.insecure_channel(address) as ch:
    stub = health_pb2_grpc.HealthStub(ch)
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(f"worker exited while starting (last health: {last})")
        try:
            st = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if st == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(st)
        except grpc.RpcError as e:
            last = e.code().name
        time.sleep(0.25)
sys.exit(f"worker not SERVING after {timeout:.0f} s (last health: {last})")
PY
  then
    log "worker log tail:"; tail -n 40 "$worker_log" >&2
    exit 1
  fi
  log "worker SERVING"
fi

# --- tests ----------------------------------------------------------------------------------
status=0
if want ts; then
  log "TypeScript: example, then node --test"
  (cd "$here/ts" && node dist/examples/stream.js "$ORCD_ADDRESS" "The capital of France is" 8) || status=1
  (cd "$here/ts" && npm test --silent) || status=1
fi
if want go; then
  log "Go: example, then go test"
  "$here/go/bin/orcd-example" -addr "$ORCD_ADDRESS" -max-tokens 8 || status=1
  (cd "$here/go" && go test -count=1 -v orcd/client) || status=1
fi
if ((status)) && [[ -n "${worker_log:-}" ]]; then
  log "worker log tail:"; tail -n 40 "$worker_log" >&2
fi
exit "$status"
