#!/usr/bin/env bash
# Runs the whole test suite. Installs the Debian package `prometheus` when promtool or the
# prometheus server is missing: one test checks a live /metrics scrape with promtool, another
# runs the shipped alerts and dashboard against a live Prometheus (tests/prometheus_e2e.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool and prometheus (Debian package prometheus)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool and prometheus are required: install the 'prometheus' package (apt-get install prometheus)" >&2
    exit 1
  fi
fi

./scripts/validate-deploy.sh   # deploy/, otel-collector/, dashboard, Dockerfile (no cluster needed)
# Benchmarks run last, as smoke tests; the totals of every test binary close the run.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --all-targets --locked "$@" 2>&1 | tee "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "rust tests: %d passed, %d failed\n", p, f }' "$log"
