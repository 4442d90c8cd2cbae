#!/usr/bin/env python3
"""Writes deploy/overlays/prometheus-operator/prometheusrule.yaml from the plain rules file
deploy/prometheus/kubenurse-rules.yaml: the same groups, comments included, under the
PrometheusRule's `spec:`. The plain file is the one to edit.

Usage: gen_prometheusrule.py [--check]

  --check   write nothing; exit 1 (with a `FAIL` line) when the PrometheusRule is not what this
            script would write, else print an `ok` line.
"""

import argparse
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PLAIN = "deploy/prometheus/kubenurse-rules.yaml"
OPERATOR = "deploy/overlays/prometheus-operator/prometheusrule.yaml"

HEADER = f"""\
# GENERATED from {PLAIN} by scripts/gen_prometheusrule.py: edit that file, then run the script.
# The recording rules and alerts of kubenurse for the Prometheus Operator. Written for the
# ServiceMonitor path (labels job, namespace, pod, node from the scrape); they work unchanged on
# metrics that came through the OpenTelemetry Collector, whose config copies k8s.pod.name /
# k8s.node.name / k8s.namespace.name to pod / node / namespace (except KubenurseAgentDown,
# which needs `up`). The comments next to the rules are in the plain file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: kubenurse
  namespace: kubenurse
  labels:
    app.kubernetes.io/name: kubenurse
spec:
"""


def render(plain_text):
    lines = plain_text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() == "groups:")
    except StopIteration:
        raise SystemExit(f"FAIL {PLAIN}: no top-level `groups:` line")
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with open(os.path.join(ROOT, PLAIN)) as f:
        wanted = render(f.read())
    target = os.path.join(ROOT, OPERATOR)
    if args.check:
        try:
            with open(target) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != wanted:
            print(f"FAIL {OPERATOR} is not generated from {PLAIN}: run scripts/gen_prometheusrule.py")
            sys.exit(1)
        print(f"ok   {OPERATOR} is generated from {PLAIN}")
        return
    with open(target, "w") as f:
        f.write(wanted)


if __name__ == "__main__":
    main()
