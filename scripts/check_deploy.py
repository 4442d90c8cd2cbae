#!/usr/bin/env python3
"""Checks rendered kustomize output (built-in Kubernetes kinds) without a cluster.

Usage: check_deploy.py [--k8s-version 1.33.0] RENDERED.yaml...

Each RENDERED file is the `kubectl kustomize` output of one kustomization. For every file:
  * schema: every document of a built-in kind validates strictly (unknown fields are errors)
    against the Kubernetes JSON schemas shipped in the kubernetes-validate package (offline);
    documents of the monitoring.coreos.com group are left to check_crds.py, any other kind
    without a schema fails;
  * hardening: every pod template runs non-root, read-only, without privilege escalation,
    with all capabilities dropped, RuntimeDefault seccomp, no host namespaces or paths,
    requests and a memory limit, a pinned image;
  * rbac: no wildcards, read-only verbs, no secrets; the kubenurse service account gets exactly
    what the agent needs in the discovery mode of the rendering (KUBENURSE_DISCOVERY):
    endpointslices in its namespace (the default) or pods in its namespace (pods), and nothing
    cluster-wide but listing and watching nodes, which it has unless
    KUBENURSE_ALLOW_UNSCHEDULABLE=true (then no cluster-wide binding at all);
  * wiring: service selectors, target ports, config maps and service accounts resolve within the
    same rendering; the Ingress exposes nothing but /alwayshappy (pathType Exact); the agent's
    DaemonSet runs everywhere with the downward-API identity, and finds its own pods: the
    Service KUBENURSE_NEIGHBOUR_SERVICE selects them (endpointslices mode, where
    KUBENURSE_NEIGHBOUR_FILTER must not be set) or KUBENURSE_NEIGHBOUR_FILTER does (pods mode);
  * liveness and priority: the agent's liveness probe is /livez (rounds still finish), and its
    priorityClassName is a PriorityClass of the rendering, not a system-* class, not the
    global default;
  * collector: every --config file of the collector is a key of its mounted ConfigMap, every
    ${env:VAR} of those files is set, and the merged configuration (maps merged, lists
    replaced, as the collector merges them) has a metrics pipeline;
  * one metrics path: at most one of pod-scrape annotations on the agents, a ServiceMonitor or
    PodMonitor of the agents, the collector remote-writing, and a scrape of the collector's
    prometheus exporter (annotations or a monitor), so no series is ingested twice;
  * network policy: a NetworkPolicy that selects the agents allows exactly their traffic
    (every rule names its ports and peers): ingress on 8080/8443 from the agents and other
    peers, egress to the agents (8080/8443), the collector pods (the port the agent's OTLP
    endpoint reaches), cluster DNS (53 UDP and TCP) and the apiserver (an ipBlock on 443/6443);
  * --dockerfile: the runtime stage is distroless, non-root with the DaemonSet's UID, runs
    /kubenurse and exposes 8080/8443; the build is `cargo build --release --locked`.

Prints `ok   <check>` or `FAIL <check>: <reason>` per check; exits 1 when any check failed.
"""

import argparse
import os
import re
import sys

import yaml

from deploy_report import failed, kn, report

try:
    import kubernetes_validate.utils as kv
except ImportError:  # pragma: no cover - validate-deploy.sh installs it
    sys.exit("kubernetes-validate is not installed: pip install 'kubernetes-validate==1.33.*'")

CRD_GROUPS = ("monitoring.coreos.com/",)
READ_VERBS = {"get", "list", "watch"}
DISCOVERY_MODES = ("endpointslices", "pods")
# (API group, resource) the agent reads its own pods from, per KUBENURSE_DISCOVERY.
AGENT_PODS = {"endpointslices": ("discovery.k8s.io", "endpointslices"), "pods": ("", "pods")}


def schema_problems(doc, version):
    try:
        kv.validate(doc, version, strict=True)
    except kv.SchemaNotFoundError as e:
        return [e.message]
    except kv.ValidationError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        return [f"{where}: {e.message}"]
    return []


def pod_spec(doc):
    if doc.get("kind") in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        return ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    if doc.get("kind") == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def template_labels(doc):
    return (((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def hardening_problems(doc):
    spec = pod_spec(doc)
    out = []
    psc = spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(f"{host} is set")
    for vol in spec.get("volumes") or []:
        if "hostPath" in vol:
            out.append(f"volume {vol.get('name')} is a hostPath")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        name = c.get("name")
        csc = c.get("securityContext") or {}

        def eff(key):
            return csc.get(key, psc.get(key))

        if eff("runAsNonRoot") is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if eff("runAsUser") in (None, 0):
            out.append(f"{name}: runAsUser is not a non-zero UID")
        if csc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if csc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem is not true")
        if csc.get("privileged"):
            out.append(f"{name}: privileged")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities.drop lacks ALL")
        if caps.get("add"):
            out.append(f"{name}: adds capabilities {caps['add']}")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        res = c.get("resources") or {}
        for key in ("cpu", "memory"):
            if key not in (res.get("requests") or {}):
                out.append(f"{name}: no {key} request")
        if "memory" not in (res.get("limits") or {}):
            out.append(f"{name}: no memory limit")
        image = c.get("image") or ""
        if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            out.append(f"{name}: image {image!r} is not pinned to a tag or digest")
    return out


def selector_matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def agent_env(container):
    return {e["name"]: e for e in container.get("env") or []}


def check_render(path, version):
    label = os.path.splitext(os.path.basename(path))[0]
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    report(f"{label}: rendering is not empty", [] if docs else ["no documents"])

    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append(doc)
        if str(doc.get("apiVersion", "")).startswith(CRD_GROUPS):
            continue  # check_crds.py
        report(f"{label}: schema {kn(doc)} (Kubernetes {version}, strict)", schema_problems(doc, version))

    workloads = [d for d in docs if pod_spec(d) is not None]
    for w in workloads:
        report(f"{label}: hardening {kn(w)}", hardening_problems(w))

    names = {(d.get("kind"), (d.get("metadata") or {}).get("namespace"), d["metadata"]["name"]) for d in docs}

    # References from pod templates resolve within the rendering (kustomize renames generated
    # ConfigMaps with a hash suffix; a reference it did not rewrite would dangle).
    for w in workloads:
        spec, ns, problems = pod_spec(w), w["metadata"].get("namespace"), []
        sa = spec.get("serviceAccountName")
        if sa and ("ServiceAccount", ns, sa) not in names:
            problems.append(f"service account {sa} not in the rendering")
        for vol in spec.get("volumes") or []:
            cm = (vol.get("configMap") or {}).get("name")
            if cm and ("ConfigMap", ns, cm) not in names:
                problems.append(f"config map {cm} not in the rendering")
        if not selector_matches((w["spec"].get("selector") or {}).get("matchLabels"), template_labels(w)):
            problems.append("selector does not match the pod template labels")
        report(f"{label}: references of {kn(w)}", problems)

    # Each Service selects exactly one workload and targets ports it has.
    for svc in by_kind.get("Service", []):
        problems = []
        ns = svc["metadata"].get("namespace")
        selected = [w for w in workloads if w["metadata"].get("namespace") == ns
                    and selector_matches(svc["spec"].get("selector"), template_labels(w))]
        if len(selected) != 1:
            problems.append(f"selects {len(selected)} workloads")
        else:
            ports = {}
            for c in pod_spec(selected[0]).get("containers") or []:
                for p in c.get("ports") or []:
                    ports[p.get("name")] = p["containerPort"]
                    ports[p["containerPort"]] = p["containerPort"]
            for p in svc["spec"].get("ports") or []:
                if p.get("targetPort", p["port"]) not in ports:
                    problems.append(f"port {p.get('name')}: target {p.get('targetPort')} is no container port")
        report(f"{label}: wiring {kn(svc)}", problems)

    # The Ingress exposes /alwayshappy and nothing else, on a Service of the rendering.
    for ing in by_kind.get("Ingress", []):
        problems = []
        spec = ing["spec"]
        if "defaultBackend" in spec:
            problems.append("has a defaultBackend (would expose every path)")
        for rule in spec.get("rules") or []:
            for p in (rule.get("http") or {}).get("paths") or []:
                if (p.get("path"), p.get("pathType")) != ("/alwayshappy", "Exact"):
                    problems.append(f"exposes {p.get('path')} ({p.get('pathType')})")
                svc = p["backend"].get("service", {}).get("name")
                if ("Service", ing["metadata"].get("namespace"), svc) not in names:
                    problems.append(f"backend service {svc} not in the rendering")
        report(f"{label}: ingress {kn(ing)} exposes only /alwayshappy (Exact)", problems)

    # RBAC: read-only, no wildcards, no secrets.
    for role in by_kind.get("Role", []) + by_kind.get("ClusterRole", []):
        problems = []
        for rule in role.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in (rule.get(field) or []):
                    problems.append(f"wildcard in {field}")
            if set(rule.get("verbs") or []) - READ_VERBS:
                problems.append(f"write verbs {sorted(set(rule['verbs']) - READ_VERBS)}")
            if "secrets" in (rule.get("resources") or []):
                problems.append("grants secrets")
            if rule.get("nonResourceURLs"):
                problems.append("grants nonResourceURLs")
        report(f"{label}: least privilege {kn(role)}", problems)

    collectors = collector_configs(docs, label)

    # The agent: everywhere, its identity from the downward API, and the permissions it needs.
    for ds in [d for d in by_kind.get("DaemonSet", []) if d["metadata"]["name"] == "kubenurse"]:
        spec, ns, problems = pod_spec(ds), ds["metadata"].get("namespace"), []
        effects = {t.get("effect") for t in spec.get("tolerations") or [] if t.get("operator") == "Exists" and not t.get("key")}
        for effect in ("NoSchedule", "NoExecute"):
            if effect not in effects:
                problems.append(f"no toleration of every {effect} taint")
        container = next(c for c in spec["containers"] if c["name"] == "kubenurse")
        env = agent_env(container)
        for var, field in (("KUBENURSE_POD_NAME", "metadata.name"), ("KUBENURSE_NODE_NAME", "spec.nodeName"),
                           ("KUBENURSE_NAMESPACE", "metadata.namespace")):
            got = ((env.get(var) or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            if got != field:
                problems.append(f"{var} is not the downward-API {field}")
        mode = (env.get("KUBENURSE_DISCOVERY") or {}).get("value") or "endpointslices"
        selector = (env.get("KUBENURSE_NEIGHBOUR_FILTER") or {}).get("value", "")
        if mode not in DISCOVERY_MODES:
            problems.append(f"KUBENURSE_DISCOVERY {mode!r} is none of {DISCOVERY_MODES}")
        elif mode == "pods":
            wanted = dict(kv_pair.split("=", 1) for kv_pair in selector.split(",") if "=" in kv_pair)
            if not selector_matches(wanted, template_labels(ds)):
                problems.append(f"KUBENURSE_NEIGHBOUR_FILTER {selector!r} does not select the agent's own pods")
        else:
            if selector:
                problems.append(f"KUBENURSE_NEIGHBOUR_FILTER {selector!r} is set but does not apply with "
                                "KUBENURSE_DISCOVERY=endpointslices")
            service = (env.get("KUBENURSE_NEIGHBOUR_SERVICE") or {}).get("value") or "kubenurse"
            svc = next((d for d in by_kind.get("Service", []) if d["metadata"]["name"] == service
                        and d["metadata"].get("namespace") == ns), None)
            if svc is None:
                problems.append(f"KUBENURSE_NEIGHBOUR_SERVICE {service!r}: no such Service in {ns}")
            elif not selector_matches(svc["spec"].get("selector"), template_labels(ds)):
                problems.append(f"Service {service} (KUBENURSE_NEIGHBOUR_SERVICE) does not select the agent's pods")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= 5 + 5 + 15:
            problems.append(f"terminationGracePeriodSeconds {grace} <= shutdown 5s + drain 5s + flush 15s")
        for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/livez"),
                            ("startupProbe", "/alwayshappy")):
            got = ((container.get(probe) or {}).get("httpGet") or {}).get("path")
            if got != path:
                problems.append(f"{probe} is {got!r}, not {path}")
        if spec.get("automountServiceAccountToken") is False:
            problems.append("automountServiceAccountToken is false (the agent needs its token)")
        report(f"{label}: agent {kn(ds)}", problems)
        report(f"{label}: priority of {kn(ds)}", priority_problems(spec, by_kind))

        # Permissions of the agent's service account, from the bindings of this rendering.
        sa, problems = spec.get("serviceAccountName", "default"), []
        allow_unschedulable = (env.get("KUBENURSE_ALLOW_UNSCHEDULABLE") or {}).get("value", "false") == "true"
        roles = {(r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r
                 for r in by_kind.get("Role", []) + by_kind.get("ClusterRole", [])}
        namespaced, cluster = set(), set()
        cluster_bound = False
        for b in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", []):
            if not any(s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == ns
                       for s in b.get("subjects") or []):
                continue
            ref = b["roleRef"]
            role = roles.get((ref["kind"], b["metadata"].get("namespace") if ref["kind"] == "Role" else None,
                              ref["name"]))
            if role is None:
                problems.append(f"{b['kind']} {b['metadata']['name']} refers to missing {ref['kind']} {ref['name']}")
                continue
            # A RoleBinding to a ClusterRole grants it in the binding's namespace only.
            target = cluster if b["kind"] == "ClusterRoleBinding" else namespaced
            cluster_bound |= b["kind"] == "ClusterRoleBinding"
            for rule in role.get("rules") or []:
                for group in rule.get("apiGroups") or []:
                    for res in rule.get("resources") or []:
                        for verb in rule.get("verbs") or []:
                            target.add((group, res, verb))
        needed = {AGENT_PODS.get(mode, AGENT_PODS["endpointslices"])}
        for group, res in needed:
            for verb in ("list", "watch"):
                if (group, res, verb) not in namespaced:
                    problems.append(f"cannot {verb} {res} in {ns} (KUBENURSE_DISCOVERY={mode})")
        for group, res, verb in sorted(namespaced):
            if (group, res) not in needed:
                problems.append(f"may {verb} {res} in {ns}, which KUBENURSE_DISCOVERY={mode} does not read")
        if allow_unschedulable:
            if cluster_bound:
                problems.append("cluster-wide binding although KUBENURSE_ALLOW_UNSCHEDULABLE=true needs none")
        else:
            for verb in ("list", "watch"):
                if ("", "nodes", verb) not in cluster:
                    problems.append(f"cannot {verb} nodes (needed unless KUBENURSE_ALLOW_UNSCHEDULABLE=true)")
        for group, res, verb in sorted(cluster - {("", "nodes", "list"), ("", "nodes", "watch")}):
            problems.append(f"may {verb} {res or ''}{'.' + group if group else ''} cluster-wide "
                            "(only listing and watching nodes is needed)")
        report(f"{label}: permissions of service account {ns}/{sa} ({mode} mode)", problems)

        report(f"{label}: one metrics path from {kn(ds)} into Prometheus", metric_path_problems(docs, ds, collectors))
        collector, collector_port = otlp_target(docs, ds)
        for pol in by_kind.get("NetworkPolicy", []):
            if pol["metadata"].get("namespace") == ns and selector_matches(
                    (pol["spec"].get("podSelector") or {}).get("matchLabels"), template_labels(ds)):
                report(f"{label}: {kn(pol)} allows exactly the agent's traffic",
                       network_policy_problems(pol, ds, collector_port, collector))


def priority_problems(spec, by_kind):
    """The agent ranks by a PriorityClass of its own: not system-*, not the global default."""
    name = spec.get("priorityClassName")
    if not name:
        return ["no priorityClassName"]
    if name.startswith("system-"):
        return [f"priorityClassName {name}: the system-* classes are for node- and cluster-critical components"]
    pc = next((d for d in by_kind.get("PriorityClass", []) if d["metadata"]["name"] == name), None)
    if pc is None:
        return [f"PriorityClass {name} is not in the rendering"]
    problems = []
    if pc.get("globalDefault"):
        problems.append(f"PriorityClass {name} is the global default")
    if not 0 < pc.get("value", 0) <= 1_000_000_000:
        problems.append(f"PriorityClass {name} value {pc.get('value')} is not above 0 and within the user range")
    return problems


def merge_config(base, over):
    """The collector's merge of two configuration files: maps merge, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge_config(base.get(k), v) if k in base else v
        return out
    return over


def env_refs(value, out):
    if isinstance(value, str):
        out.update(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", value))
    elif isinstance(value, dict):
        for v in value.values():
            env_refs(v, out)
    elif isinstance(value, list):
        for v in value:
            env_refs(v, out)
    return out


def collector_configs(docs, label):
    """Deployment name -> its merged collector configuration, for every workload started with
    --config files; reports the wiring of each."""
    config_maps = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d
                   for d in docs if d.get("kind") == "ConfigMap"}
    out = {}
    for w in [d for d in docs if d.get("kind") == "Deployment"]:
        spec, ns = pod_spec(w), w["metadata"].get("namespace")
        for c in spec.get("containers") or []:
            files = [a.split("=", 1)[1] for a in c.get("args") or [] if a.startswith("--config=")]
            if not files:
                continue
            problems, merged = [], {}
            volumes = {v["name"]: v for v in spec.get("volumes") or []}
            env = {e["name"] for e in c.get("env") or []}
            for path in files:
                path = path.removeprefix("file:")
                mount = next((m for m in c.get("volumeMounts") or []
                              if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
                cm_name = ((volumes.get(mount["name"]) or {}).get("configMap") or {}).get("name") if mount else None
                cm = config_maps.get((ns, cm_name))
                key = path[len(mount["mountPath"].rstrip("/")) + 1:] if mount else None
                if cm is None or key not in (cm.get("data") or {}):
                    problems.append(f"--config={path} is no key of a mounted ConfigMap")
                    continue
                part = yaml.safe_load(cm["data"][key]) or {}
                for var in sorted(env_refs(part, set()) - env):
                    problems.append(f"{key} reads ${{env:{var}}}, which the container does not set")
                merged = merge_config(merged, part)
            if not (((merged.get("service") or {}).get("pipelines") or {}).get("metrics")):
                problems.append("the merged configuration has no metrics pipeline")
            report(f"{label}: collector configuration of {kn(w)} ({', '.join(files)})", problems)
            out[w["metadata"]["name"]] = (w, merged)
    return out


def scraped_by(docs, workload):
    """How Prometheus is told to scrape `workload` in this rendering: annotations, monitors."""
    ways = []
    labels = template_labels(workload)
    ns = workload["metadata"].get("namespace")
    annotations = ((workload["spec"]["template"].get("metadata") or {}).get("annotations") or {})
    if str(annotations.get("prometheus.io/scrape")).lower() == "true":
        ways.append("prometheus.io/scrape annotations")
    services = [d for d in docs if d.get("kind") == "Service" and d["metadata"].get("namespace") == ns
                and selector_matches((d.get("spec") or {}).get("selector"), labels)]
    for m in docs:
        selector = ((m.get("spec") or {}).get("selector") or {}).get("matchLabels")
        if m.get("kind") == "PodMonitor" and selector_matches(selector, labels):
            ways.append(kn(m))
        if m.get("kind") == "ServiceMonitor" and any(
                selector_matches(selector, (s["metadata"].get("labels") or {})) for s in services):
            ways.append(kn(m))
    return ways


def metric_path_problems(docs, agent, collectors):
    paths = [f"agents: {way}" for way in scraped_by(docs, agent)]
    for name, (w, config) in collectors.items():
        exporters = ((((config.get("service") or {}).get("pipelines") or {}).get("metrics") or {})
                     .get("exporters") or [])
        types = {e.split("/")[0] for e in exporters}
        if "prometheusremotewrite" in types:
            paths.append(f"collector {name}: remote-write")
        if "prometheus" in types:
            paths += [f"collector {name} :8889: {way}" for way in scraped_by(docs, w)]
    if len(paths) > 1:
        return [f"{len(paths)} paths into Prometheus, every series would arrive twice: {paths}"]
    return []


def ports_of(rule):
    """(protocol, port) pairs of a NetworkPolicy rule."""
    return {((p.get("protocol") or "TCP"), p.get("port")) for p in rule.get("ports") or []}


def peer_selects(peer, ns, labels, own_ns):
    """Whether a NetworkPolicy peer selects pods with `labels` in namespace `ns`."""
    if "ipBlock" in peer:
        return False
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None and ns != own_ns:
        return False
    if ns_sel is not None and ns_sel != {} and (ns_sel.get("matchExpressions") or
                                                 ns_sel.get("matchLabels") != {"kubernetes.io/metadata.name": ns}):
        return False
    if pod_sel is None or pod_sel == {}:
        return True
    return not pod_sel.get("matchExpressions") and selector_matches(pod_sel.get("matchLabels"), labels)


def network_policy_problems(pol, agent, collector_port, collector):
    problems = []
    ns = pol["metadata"].get("namespace")
    spec = pol["spec"]
    labels = template_labels(agent)
    types = set(spec.get("policyTypes") or [])
    if types != {"Ingress", "Egress"}:
        problems.append(f"policyTypes {sorted(types)}, not Ingress and Egress")
    for direction, peers in (("ingress", "from"), ("egress", "to")):
        for i, rule in enumerate(spec.get(direction) or []):
            if not rule.get(peers):
                problems.append(f"{direction}[{i}] allows every peer (no `{peers}`)")
            if not rule.get("ports"):
                problems.append(f"{direction}[{i}] allows every port")
            for p in rule.get("ports") or []:
                if not isinstance(p.get("port"), int) or "endPort" in p:
                    problems.append(f"{direction}[{i}]: port {p.get('port')!r} is not one numeric port")
    agent_ports = {("TCP", 8080), ("TCP", 8443)}
    ingress = spec.get("ingress") or []
    for i, rule in enumerate(ingress):
        if not ports_of(rule) <= agent_ports:
            problems.append(f"ingress[{i}] opens {sorted(ports_of(rule) - agent_ports)}, not only 8080/8443")
    if not any(agent_ports <= ports_of(r) and any(peer_selects(p, ns, labels, ns) for p in r["from"] or [])
               for r in ingress if r.get("from")):
        problems.append("no ingress from the agents on 8080 and 8443")
    egress = spec.get("egress") or []

    def allows(to_labels, to_ns, wanted):
        return any(wanted <= ports_of(r) and any(peer_selects(p, to_ns, to_labels, ns) for p in r["to"] or [])
                   for r in egress if r.get("to"))

    if not allows(labels, ns, agent_ports):
        problems.append("no egress to the agents on 8080 and 8443")
    if collector is None:
        problems.append("no collector in the rendering for the agent's OTLP endpoint")
    elif not allows(template_labels(collector), collector["metadata"].get("namespace"), {("TCP", collector_port)}):
        problems.append(f"no egress to the collector pods on {collector_port} (the agent's OTLP endpoint)")
    if not any({("UDP", 53), ("TCP", 53)} <= ports_of(r) for r in egress if r.get("to")):
        problems.append("no egress to cluster DNS on 53 (UDP and TCP)")
    apiserver = [r for r in egress if any("ipBlock" in p for p in r.get("to") or [])]
    if not any(ports_of(r) & {("TCP", 443), ("TCP", 6443)} for r in apiserver):
        problems.append("no egress to the apiserver (an ipBlock on 443 or 6443)")
    for r in apiserver:
        for p in r.get("to") or []:
            cidr = (p.get("ipBlock") or {}).get("cidr", "")
            if cidr.endswith("/0"):
                problems.append(f"egress to {cidr}: every address")
    return problems


def otlp_target(docs, agent):
    """The collector Deployment and container port the agent's OTLP endpoint reaches."""
    container = next(c for c in pod_spec(agent)["containers"] if c["name"] == "kubenurse")
    endpoint = ((agent_env(container).get("OTEL_EXPORTER_OTLP_ENDPOINT") or {}).get("value") or "")
    m = re.match(r"^https?://([^.:/]+)\.([^.:/]+)[^:/]*:(\d+)", endpoint)
    if not m:
        return None, None
    name, ns, port = m.group(1), m.group(2), int(m.group(3))
    svc = next((d for d in docs if d.get("kind") == "Service" and d["metadata"]["name"] == name
                and d["metadata"].get("namespace") == ns), None)
    if svc is None:
        return None, None
    workload = next((w for w in docs if pod_spec(w) is not None and w["metadata"].get("namespace") == ns
                     and selector_matches(svc["spec"].get("selector"), template_labels(w))), None)
    svc_port = next((p for p in svc["spec"].get("ports") or [] if p["port"] == port), None)
    if workload is None or svc_port is None:
        return None, None
    target = svc_port.get("targetPort", port)
    for c in pod_spec(workload).get("containers") or []:
        for p in c.get("ports") or []:
            if target in (p.get("name"), p["containerPort"]):
                return workload, p["containerPort"]
    return None, None


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not current and (not stripped or stripped.startswith("#")):
                continue
            current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
            if not stripped.endswith("\\"):
                word, _, rest = current.partition(" ")
                out.append((word.upper(), rest.strip()))
                current = ""
    return out


def check_dockerfile(path, rendered):
    """The image runs what the manifests expect: the release binary as /kubenurse, non-root
    with the UID the DaemonSet uses, distroless runtime, locked build, port 8080."""
    problems = []
    instructions = dockerfile_instructions(path)
    stages = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    if len(stages) < 2:
        problems.append("not a multi-stage build")
    final = instructions[stages[-1]:] if stages else []
    base = final[0][1].split()[0] if final else ""
    if not base.startswith("gcr.io/distroless/cc-debian12") or not base.endswith(":nonroot"):
        problems.append(f"runtime image {base!r} is not gcr.io/distroless/cc-debian12:nonroot")
    user = [rest for word, rest in final if word == "USER"]
    uid = user[-1].split(":")[0] if user else None
    if uid in (None, "0", "root") or not str(uid).isdigit():
        problems.append(f"USER of the runtime stage is {uid!r}, not a numeric non-root UID")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if entry != ['["/kubenurse"]']:
        problems.append(f"ENTRYPOINT is {entry}, not [\"/kubenurse\"]")
    exposed = {p.split("/")[0] for word, rest in final if word == "EXPOSE" for p in rest.split()}
    if not {"8080", "8443"} <= exposed:
        problems.append(f"EXPOSE {sorted(exposed)} lacks 8080/8443")
    builds = [rest for word, rest in instructions if word == "RUN" and "cargo build" in rest]
    if not any("--release" in b and "--locked" in b for b in builds):
        problems.append("no `cargo build --release --locked`")
    stage_names = set()
    for word, rest in instructions:
        if word != "FROM":
            continue
        image, *alias = rest.split()
        if image not in stage_names and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"base image {image} is not pinned")
        if len(alias) == 2 and alias[0].upper() == "AS":
            stage_names.add(alias[1])
    # The manifests run this image as the same UID.
    for path_ in rendered:
        with open(path_) as f:
            for doc in yaml.safe_load_all(f):
                if doc and doc.get("kind") == "DaemonSet" and doc["metadata"]["name"] == "kubenurse":
                    spec = pod_spec(doc)
                    run_as = spec["containers"][0].get("securityContext", {}).get(
                        "runAsUser", (spec.get("securityContext") or {}).get("runAsUser"))
                    if uid is not None and str(run_as) != str(uid):
                        problems.append(f"{os.path.basename(path_)}: DaemonSet runAsUser {run_as} != image USER {uid}")
    report(f"image {path}: runtime stage and build", problems)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k8s-version", default="1.33.0")
    parser.add_argument("--dockerfile", help="also check this Dockerfile against the manifests")
    parser.add_argument("rendered", nargs="+")
    args = parser.parse_args()
    if args.dockerfile:
        check_dockerfile(args.dockerfile, args.rendered)
    if not re.match(r"^\d+\.\d+\.\d+$", args.k8s_version) or args.k8s_version not in kv.all_versions():
        sys.exit(f"kubernetes-validate has no schemas for Kubernetes {args.k8s_version} "
                 f"(it has {kv.all_versions()[0]} .. {kv.all_versions()[-1]})")
    for path in args.rendered:
        check_render(path, args.k8s_version)
    sys.exit(1 if failed() else 0)


if __name__ == "__main__":
    main()
