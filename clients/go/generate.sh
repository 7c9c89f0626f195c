#!/usr/bin/env bash
# Generates the Go stubs for orcd.v1.Worker into this GOPATH tree (src/orcd/gen/orcdv1), from
# the repository's proto. Needs protoc, protoc-gen-go and protoc-gen-go-grpc (Debian:
# protobuf-compiler protoc-gen-go protoc-gen-go-grpc). The output is git-ignored.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
protos="$(cd "$here/../../protos" && pwd)"
out="$here/src"
rm -rf "$out/orcd/gen"
mkdir -p "$out"
# go_package in the proto is "orcd/gen/orcdv1", so with the default paths=import the files land
# in src/orcd/gen/orcdv1 and import as "orcd/gen/orcdv1" in GOPATH mode.
protoc -I "$protos" \
  --go_out="$out" \
  --go-grpc_out="$out" \
  orcd/v1/worker.proto
echo "generated: $(cd "$out" && ls orcd/gen/orcdv1/*.go | tr '\n' ' ')"
