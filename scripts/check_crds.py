#!/usr/bin/env python3
"""Checks the monitoring artifacts that Kubernetes schemas cannot: Prometheus Operator
resources in rendered kustomize output, and the Grafana dashboard.

Usage: check_crds.py [--rules FILE] [--rules-test FILE] [--dashboard FILE] RENDERED.yaml...

  * ServiceMonitor / PodMonitor: apiVersion monitoring.coreos.com/v1, required fields, known
    field names (a typo would be silently ignored by the operator), and the selector finds a
    Service (or pods) of the same rendering with the named port;
  * --rules: the plain rules file (groups for a Prometheus without the operator): every
    alert has expr, for, labels.severity, annotations.summary and .description, every
    recording rule a `level:metric:operations` name; expressions use only the metric names
    kubenurse exports (plus `up`) and the names the file records; `promtool check rules`, and
    `promtool test rules` runs the unit tests in --rules-test against it;
  * PrometheusRule: its groups are exactly those of --rules (without --rules: the checks above);
  * --dashboard: Grafana JSON with a prometheus `datasource` variable used by every panel,
    `type`/`node`/`pod` variables, expressions that use only kubenurse metric names (and the
    names --rules records) and that promtool parses (Grafana variables replaced by sample values); a ConfigMap in a rendering
    that carries the dashboard must carry this exact file and the sidecar label.

Prints `ok   <check>` or `FAIL <check>: <reason>` per check; exits 1 when any check failed.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

from deploy_report import failed, kn, operator_meta_problems, report

# The Prometheus names kubenurse exports (README, metrics table).
HISTOGRAMS = {
    "kubenurse_httpclient_request_duration_seconds",
    "kubenurse_httpclient_trace_request_duration_seconds",
    "kubenurse_round_lateness_seconds",
    "kubenurse_zone_request_duration_seconds",
}
COUNTERS = {
    "kubenurse_httpclient_requests_total", "kubenurse_errors_total", "kubenurse_metric_overflow_total",
    "kubenurse_zone_requests_total", "kubenurse_zone_errors_total",
}
GAUGES = {"kubenurse_neighbourhood_incoming_checks", "kubenurse_build_info"}
FAMILIES = HISTOGRAMS | COUNTERS | GAUGES
SERIES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
# Alerts may also use Prometheus' own scrape health series.
RULE_EXTRA = {"up"}

SEVERITIES = {"critical", "warning", "info"}

SERVICEMONITOR_SPEC = {
    "attachMetadata", "bodySizeLimit", "convertClassicHistogramsToNHCB", "endpoints", "fallbackScrapeProtocol",
    "jobLabel", "keepDroppedTargets", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit",
    "namespaceSelector", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "podTargetLabels",
    "sampleLimit", "scrapeClass", "scrapeClassicHistograms", "scrapeProtocols", "selector", "selectorMechanism",
    "serviceDiscoveryRole", "targetLabels", "targetLimit",
}
PODMONITOR_SPEC = (SERVICEMONITOR_SPEC - {"endpoints", "targetLabels", "serviceDiscoveryRole"}) | {"podMetricsEndpoints"}
ENDPOINT = {
    "authorization", "basicAuth", "bearerTokenFile", "bearerTokenSecret", "enableHttp2", "filterRunning",
    "followRedirects", "honorLabels", "honorTimestamps", "interval", "metricRelabelings", "noProxy", "oauth2",
    "params", "path", "port", "portNumber", "proxyConnectHeader", "proxyFromEnvironment", "proxyUrl",
    "relabelings", "scheme", "scrapeTimeout", "targetPort", "tlsConfig", "trackTimestampsStaleness",
}
RELABEL = {"action", "modulus", "regex", "replacement", "separator", "sourceLabels", "targetLabel"}
RELABEL_ACTIONS = {"replace", "keep", "drop", "keepequal", "dropequal", "hashmod", "labelmap", "labeldrop",
                   "labelkeep", "lowercase", "uppercase"}
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
RECORD_KEYS = {"record", "expr", "labels"}
RECORD_NAME = re.compile(r"^[a-zA-Z_]\w*:[a-zA-Z_][\w:]*$")


# ---------------------------------------------------------------------------------- PromQL

PROMQL_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "atan2", "inf", "nan", "start", "end",
}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}


def metric_names(expr):
    """The metric names a PromQL expression selects (identifiers that are not functions,
    keywords, label names, strings or durations)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # ranges and subqueries
    names, i = set(), 0
    ident = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*")
    while True:
        m = ident.search(s, i)
        if not m:
            break
        word, i = m.group(0), m.end()
        rest = s[i:].lstrip()
        if word in GROUPING and rest.startswith("("):
            i = s.index(")", i) + 1  # skip the label list
            continue
        if word in PROMQL_KEYWORDS or word in AGGREGATIONS or rest.startswith("("):
            continue  # keyword, aggregation (also `sum by (..) (..)`) or function
        names.add(word)
    return names


def name_problems(expr, allowed):
    names = metric_names(expr)
    problems = [f"unknown metric {n}" for n in sorted(names - allowed)]
    if not names:
        problems.append("selects no metric")
    return problems


def promtool(*args):
    exe = shutil.which("promtool")
    if not exe:
        return 127, "promtool not found (Debian package prometheus)"
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


# ------------------------------------------------------------------------ Prometheus Operator

def check_monitor(label, doc, docs):
    problems = operator_meta_problems(doc)
    kind = doc["kind"]
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    allowed = SERVICEMONITOR_SPEC if kind == "ServiceMonitor" else PODMONITOR_SPEC
    problems += [f"unknown field spec.{k}" for k in sorted(set(spec) - allowed)]
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector and not (spec.get("selector") or {}).get("matchExpressions"):
        problems.append("spec.selector selects nothing")
    ns_sel = spec.get("namespaceSelector") or {}
    namespaces = set(ns_sel.get("matchNames") or [meta.get("namespace")])
    endpoints = spec.get("endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints") or []
    if not endpoints:
        problems.append("no endpoints")

    # What the selector finds in this rendering, and the port names it offers.
    if kind == "ServiceMonitor":
        targets = [d for d in docs if d.get("kind") == "Service"
                   and (ns_sel.get("any") or (d["metadata"].get("namespace") in namespaces))
                   and all((d["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
        ports = {p.get("name") for t in targets for p in t["spec"].get("ports") or []}
    else:
        targets = [d for d in docs if d.get("kind") in ("DaemonSet", "Deployment", "StatefulSet")
                   and all((d["spec"]["template"]["metadata"].get("labels") or {}).get(k) == v
                           for k, v in selector.items())]
        ports = {p.get("name") for t in targets for c in t["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports") or []}
    if selector and not targets:
        problems.append(f"selector {selector} matches nothing in the rendering")

    for n, ep in enumerate(endpoints):
        problems += [f"endpoint {n}: unknown field {k}" for k in sorted(set(ep) - ENDPOINT)]
        if not (ep.get("port") or ep.get("targetPort") or ep.get("portNumber")):
            problems.append(f"endpoint {n}: no port")
        elif ep.get("port") and targets and ep["port"] not in ports:
            problems.append(f"endpoint {n}: port {ep['port']} is not a port of the selected targets")
        if ep.get("path", "/metrics") != "/metrics":
            problems.append(f"endpoint {n}: path {ep['path']} (kubenurse serves /metrics)")
        for kind_ in ("relabelings", "metricRelabelings"):
            for r in ep.get(kind_) or []:
                problems += [f"endpoint {n}: {kind_}: unknown field {k}" for k in sorted(set(r) - RELABEL)]
                if r.get("action", "replace").lower() not in RELABEL_ACTIONS:
                    problems.append(f"endpoint {n}: {kind_}: unknown action {r.get('action')}")
                if r.get("action", "replace").lower() == "replace" and not r.get("targetLabel"):
                    problems.append(f"endpoint {n}: {kind_}: replace without targetLabel")
    report(f"{label}: {kn(doc)} structure and selector", problems)


def recorded_names(groups):
    return {r["record"] for g in groups or [] for r in g.get("rules") or [] if isinstance(r.get("record"), str)}


def check_groups(label, groups, rules_test, tmp):
    """Structure, metric names, `promtool check rules` and the unit tests of rule groups."""
    group_names = [g.get("name") for g in groups]
    problems = [] if groups else ["no groups"]
    if len(set(group_names)) != len(group_names) or None in group_names:
        problems.append(f"group names missing or repeated: {group_names}")
    report(f"{label}: groups", problems)

    alerts, records = set(), set()
    allowed = SERIES | RULE_EXTRA | recorded_names(groups)
    for g in groups:
        if not g.get("rules"):
            report(f"{label}: group {g.get('name')}", ["no rules"])
        for rule in g.get("rules") or []:
            problems = [f"unknown field {k}" for k in sorted(set(rule) - RULE_KEYS)]
            if "record" in rule:
                name = str(rule.get("record"))
                problems += [f"field {k} on a recording rule" for k in sorted(set(rule) - RECORD_KEYS)]
                if not RECORD_NAME.match(name):
                    problems.append("name is not level:metric:operations")
                if name in records:
                    problems.append("recorded twice")
                records.add(name)
            elif "alert" in rule:
                name = str(rule.get("alert"))
                if name in alerts:
                    problems.append("alert name repeated")
                alerts.add(name)
                if not rule.get("for"):
                    problems.append("no for")
                severity = (rule.get("labels") or {}).get("severity")
                if severity not in SEVERITIES:
                    problems.append(f"labels.severity is {severity!r}, not one of {sorted(SEVERITIES)}")
                annotations = rule.get("annotations") or {}
                for key in ("summary", "description"):
                    if not annotations.get(key):
                        problems.append(f"no annotations.{key}")
            else:
                name = "?"
                problems.append("neither alert nor record")
            if not rule.get("expr"):
                problems.append("no expr")
            problems += name_problems(str(rule.get("expr", "")), allowed)
            kind = "record" if "record" in rule else "alert"
            report(f"{label}: {kind} {name}", problems)

    stem = re.sub(r"[^\w.-]+", "_", label)
    rules_file = os.path.join(tmp, f"{stem}-rules.yaml")
    with open(rules_file, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    code, out = promtool("check", "rules", rules_file)
    report(f"{label}: promtool check rules", [] if code == 0 else [out])

    if rules_test:
        with open(rules_test) as f:
            test = yaml.safe_load(f)
        test["rule_files"] = [rules_file]
        test_file = os.path.join(tmp, f"{stem}-rules.test.yaml")
        with open(test_file, "w") as f:
            yaml.safe_dump(test, f, sort_keys=False)
        code, out = promtool("test", "rules", test_file)
        tested = {t.get("alertname") for c in test.get("tests") or [] for t in c.get("alert_rule_test") or []}
        untested = sorted(alerts - tested)
        problems = ([] if code == 0 else [out]) + [f"no test for {a}" for a in untested]
        report(f"{label}: promtool test rules {os.path.relpath(rules_test)} "
               f"({len(test.get('tests') or [])} scenarios)", problems)


def check_rule(label, doc, plain_groups, rules_test, tmp):
    groups = (doc.get("spec") or {}).get("groups") or []
    problems = operator_meta_problems(doc)
    if plain_groups is not None and groups != plain_groups:
        problems.append("its groups differ from the plain rules file: run scripts/gen_prometheusrule.py")
    if plain_groups is None:
        report(f"{label}: {kn(doc)} structure", problems)
        check_groups(f"{label}: {kn(doc)}", groups, rules_test, tmp)
    else:  # the groups were checked as the plain rules file
        report(f"{label}: {kn(doc)} structure, same groups as the plain rules file", problems)


# ----------------------------------------------------------------------------------- Grafana

def all_panels(panels):
    for p in panels or []:
        yield p
        yield from all_panels(p.get("panels"))


def grafana_sample(expr):
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_dashboard(path, recorded, tmp):
    with open(path) as f:
        raw = f.read()
    try:
        dash = json.loads(raw)
    except json.JSONDecodeError as e:
        report(f"dashboard {path}: JSON", [str(e)])
        return raw
    problems = []
    if not 36 <= int(dash.get("schemaVersion", 0)) <= 41:
        problems.append(f"schemaVersion {dash.get('schemaVersion')} (expected ~39)")
    for key in ("title", "uid"):
        if not dash.get(key):
            problems.append(f"no {key}")
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = variables.get("datasource") or {}
    if (ds.get("type"), ds.get("query")) != ("datasource", "prometheus"):
        problems.append("no `datasource` variable of type datasource/prometheus")
    for name in ("type", "node", "pod"):
        if name not in variables:
            problems.append(f"no `{name}` variable")
    report(f"dashboard {path}: schema, variables", problems)

    # Every panel and query on ${datasource}; ids unique; layout inside the 24-column grid.
    problems, ids, exprs = [], set(), []
    for p in all_panels(dash.get("panels")):
        if p.get("id") in ids:
            problems.append(f"panel id {p.get('id')} repeated")
        ids.add(p.get("id"))
        g = p.get("gridPos") or {}
        if g.get("x", 0) + g.get("w", 0) > 24 or not g.get("h"):
            problems.append(f"panel {p.get('title')}: gridPos {g}")
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${datasource}":
            problems.append(f"panel {p.get('title')}: datasource is not ${{datasource}}")
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')}: no queries")
        for t in p.get("targets") or []:
            if (t.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"panel {p.get('title')} {t.get('refId')}: datasource is not ${{datasource}}")
            if not t.get("expr"):
                problems.append(f"panel {p.get('title')} {t.get('refId')}: no expr")
            else:
                exprs.append((f"{p.get('title')} {t.get('refId')}", t["expr"]))
    for name, v in variables.items():
        if v.get("type") == "query":
            if (v.get("datasource") or {}).get("uid") != "${datasource}":
                problems.append(f"variable {name}: datasource is not ${{datasource}}")
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.match(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", q or "", re.S)
            if not m:
                problems.append(f"variable {name}: query {q!r} is not label_values(<selector>, <label>)")
            else:
                exprs.append((f"variable {name}", m.group(1)))
    report(f"dashboard {path}: panels on ${{datasource}} ({len(exprs)} queries)", problems)

    problems = []
    for where, expr in exprs:
        problems += [f"{where}: {p}" for p in name_problems(expr, SERIES | recorded)]
    report(f"dashboard {path}: queries use only kubenurse metric names and recorded names", problems)

    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": grafana_sample(expr)} for n, (_, expr) in enumerate(exprs)]}]}
    rules_file = os.path.join(tmp, "dashboard-queries.yaml")
    with open(rules_file, "w") as f:
        yaml.safe_dump(rules, f, sort_keys=False)
    code, out = promtool("check", "rules", rules_file)
    report(f"dashboard {path}: queries parse (promtool)", [] if code == 0 else [out])
    return raw


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", help="plain Prometheus rules file (the groups of the PrometheusRule)")
    parser.add_argument("--rules-test", help="promtool unit-test file for the rule groups")
    parser.add_argument("--dashboard", help="Grafana dashboard JSON")
    parser.add_argument("rendered", nargs="*")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="check-crds-")
    try:
        plain_groups = None
        if args.rules:
            with open(args.rules) as f:
                plain = yaml.safe_load(f) or {}
            if set(plain) != {"groups"}:
                report(f"rules {args.rules}: top level", [f"keys {sorted(plain)}, expected only groups"])
            plain_groups = plain.get("groups") or []
            check_groups(f"rules {os.path.relpath(args.rules)}", plain_groups, args.rules_test, tmp)
        recorded = recorded_names(plain_groups)
        dashboard = check_dashboard(args.dashboard, recorded, tmp) if args.dashboard else None
        seen_rule = False
        for path in args.rendered:
            label = os.path.splitext(os.path.basename(path))[0]
            with open(path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d]
            for doc in docs:
                api = str(doc.get("apiVersion", ""))
                if doc.get("kind") in ("ServiceMonitor", "PodMonitor"):
                    check_monitor(label, doc, docs)
                elif doc.get("kind") == "PrometheusRule":
                    check_rule(label, doc, plain_groups, args.rules_test, tmp)
                    seen_rule = True
                elif api.startswith("monitoring.coreos.com/"):
                    report(f"{label}: {kn(doc)}", [f"no check for kind {doc.get('kind')}"])
                elif doc.get("kind") == "ConfigMap" and dashboard is not None and \
                        os.path.basename(args.dashboard) in (doc.get("data") or {}):
                    problems = []
                    if doc["data"][os.path.basename(args.dashboard)] != dashboard:
                        problems.append("carries a different dashboard than the file")
                    if (doc["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
                        problems.append('no label grafana_dashboard: "1"')
                    report(f"{label}: dashboard {kn(doc)} for the Grafana sidecar", problems)
        if args.rules_test and not seen_rule:
            report("PrometheusRule present", ["--rules-test given but no rendering has a PrometheusRule"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed() else 0)


if __name__ == "__main__":
    main()
