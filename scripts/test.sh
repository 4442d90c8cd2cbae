#!/usr/bin/env bash
# Runs the whole test suite. Installs promtool (Debian package `prometheus`) when it is
# missing, because one test checks a live /metrics scrape with it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is required: install the 'prometheus' package (apt-get install prometheus)" >&2
    exit 1
  fi
fi

./scripts/validate-deploy.sh   # deploy/, otel-collector/, dashboard, Dockerfile (no cluster needed)
cargo test --all-targets --locked "$@"
