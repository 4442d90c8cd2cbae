"""Shared by the deploy checkers: one `ok`/`FAIL` line per check, and the failure count."""

FAILED = 0


def report(name, problems):
    global FAILED
    if problems:
        FAILED += 1
        print(f"FAIL {name}: " + "; ".join(problems).replace("\n", "\n    "))
    else:
        print(f"ok   {name}")


def failed():
    return FAILED


def kn(doc):
    """Kind/namespace/name of a manifest, for messages."""
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def operator_meta_problems(doc):
    """A Prometheus Operator resource needs its API version, a name and a namespace."""
    problems = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')} is not monitoring.coreos.com/v1")
    meta = doc.get("metadata") or {}
    for key in ("name", "namespace"):
        if not meta.get(key):
            problems.append(f"metadata.{key} missing")
    return problems
