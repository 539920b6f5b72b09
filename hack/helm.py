#!/usr/bin/env python3
"""Lint and render the agent-secrets Helm chart with real Helm, and keep manifests/ in sync.

Helm here is Helm v4's own Go library (chart loader, template engine with Sprig, lint rules,
values-schema validation), called through the helm-python-sdk package from PyPI; no helm binary
and no cluster are needed (the upgrade check of `lint` answers Helm's `lookup` from a small fake
API server on 127.0.0.1). Install it with hack/install-helm.sh.

    python3 hack/helm.py lint     # helm lint --strict of every values scenario, plus render checks
    python3 hack/helm.py render   # write manifests/ from the chart
    python3 hack/helm.py check    # fail if manifests/ or the chart's CRD copy is out of date

Exit status: 0 when everything passed, 1 on any finding, 2 when Helm is not installed.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

try:
    import helm_python as helm
    import yaml
except ImportError as error:  # depends on the machine
    print(f"error: {error.name} is not installed: run `bash hack/install-helm.sh`", file=sys.stderr)
    sys.exit(2)

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "agent-secrets"
CRD = REPO / "crds" / "agentsecrets.yaml"
CHART_CRD = CHART / "crds" / "agentsecrets.yaml"
MANIFESTS = REPO / "manifests"

RELEASE = "agent-secrets"
NAMESPACE = "agent-secrets"
# The oldest Kubernetes the chart supports (the CRD's CEL rules need 1.30).
KUBE_VERSION = "v1.30.0"
KEYRING_SECRET = "agent-secrets-keyring"

# Values the static manifests are rendered with: no private key and no key material in a file
# that is checked in and applied verbatim.
MANIFEST_VALUES: dict[str, Any] = {
    "certManager": {"enabled": True},
    "keyring": {"existingSecret": KEYRING_SECRET},
}

# Helm's install order (pkg/release/v1/util/kind_sorter.go); other kinds follow, by name.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]

CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "PriorityClass",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
}

# The three admission policies (and a binding of each) every install ships.
POLICIES = ("pod-secret-references", "pod-scoped-secrets", "agentsecret-owners")
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


@dataclass
class Scenario:
    """A set of values every template branch is linted and rendered with."""

    name: str
    values: dict[str, Any]
    expect_kinds: set[str] = field(default_factory=set)
    forbid_kinds: set[str] = field(default_factory=set)


SCENARIOS = [
    Scenario(
        "defaults (generated certificate and keyring)",
        {},
        expect_kinds={"Deployment", "Service", "ServiceAccount", "Secret", "ClusterRole",
                      "ClusterRoleBinding", "Role", "RoleBinding", "PodDisruptionBudget",
                      "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
                      "ValidatingAdmissionPolicyBinding"},
        forbid_kinds={"Certificate", "Issuer", "ServiceMonitor", "NetworkPolicy", "ConfigMap"},
    ),
    Scenario(
        "manifests (cert-manager, existing keyring)",
        MANIFEST_VALUES,
        expect_kinds={"Certificate", "Issuer", "MutatingWebhookConfiguration"},
        forbid_kinds={"Secret"},
    ),
    Scenario(
        "development webhook URL, one replica, everything optional on",
        {
            "webhook": {"url": "https://192.0.2.10:8443/", "caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
            "replicaCount": 1,
            "allowedPrincipals": ["system:serviceaccount:sandboxes:orchestrator", "group:sandbox-orchestrators"],
            "reservedEnvNames": ["NODE_OPTIONS"],
            "excludedNamespaces": ["monitoring", "kube-system"],
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "networkPolicy": {"enabled": True, "adminFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
            "image": {"digest": "sha256:" + "0" * 64},
            "priorityClassName": "system-cluster-critical",
            "podAnnotations": {"example.com/a": "b"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
        },
        expect_kinds={"ServiceMonitor", "NetworkPolicy", "Secret"},
        forbid_kinds={"PodDisruptionBudget", "Certificate"},
    ),
    Scenario(
        "cert-manager with a development URL, no RBAC, existing service account",
        {
            "certManager": {"enabled": True},
            "webhook": {"url": "https://webhook.dev.example:8443"},
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "custom"},
            "affinity": {"nodeAffinity": {}},
        },
        expect_kinds={"Certificate"},
        forbid_kinds={"ClusterRole", "ServiceAccount"},
    ),
    Scenario(
        "sandbox namespaces: Secret and Pod rights only there",
        {"sandboxNamespaces": ["sandboxes", "team-b"], "excludedNamespaces": ["monitoring"]},
        expect_kinds={"ClusterRole", "RoleBinding", "ValidatingAdmissionPolicy"},
    ),
    Scenario(
        "mutual TLS: the API server's client CA",
        {"webhook": {"clientCA": PEM}},
        expect_kinds={"ConfigMap"},
    ),
    Scenario(
        "owner binding: prefixes and secret administrators",
        {"ownerBinding": {"usernamePrefix": "oidc:", "groupPrefix": "tenant:",
                          "administrators": ["system:serviceaccount:platform:secrets-api",
                                             "group:platform-admins", "carol@example.com"]},
         "maxUnadoptedPodSecrets": 250},
        expect_kinds={"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"},
    ),
    Scenario(
        "Secrets page behind an oauth2-proxy sidecar, a namespace per user",
        {
            "ui": {
                "enabled": True,
                "namespaceTemplate": "user-{user}",
                "trustedProxyCIDRs": ["127.0.0.1/32"],
                "listenAddress": "127.0.0.1",
                "ownerUsernamePrefix": "oidc:",
                "impersonableGroups": ["research", "platform-users"],
                "service": {"port": 80, "targetPort": "proxy"},
                "extraContainers": [{
                    "name": "oauth2-proxy",
                    "image": "quay.io/oauth2-proxy/oauth2-proxy:v7.7.1",
                    "args": ["--upstream=http://127.0.0.1:8080/", "--http-address=0.0.0.0:4180",
                             "--pass-user-headers=true"],
                    "ports": [{"name": "proxy", "containerPort": 4180}],
                    "readinessProbe": {"httpGet": {"path": "/ping", "port": "proxy"}},
                }],
            },
            "reservedEnvNames": ["NODE_OPTIONS"],
        },
        expect_kinds={"Deployment", "Service", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Secret"},
    ),
    Scenario(
        "Secrets page over TLS, proxy client certificate and CIDR, one namespace",
        {
            "ui": {
                "enabled": True,
                "namespace": "sandboxes",
                "trustedProxyCIDRs": ["10.42.0.0/16"],
                "proxyClientCA": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                "tls": {"secretName": "agent-secrets-ui-tls"},
                "replicaCount": 2,
            },
        },
        expect_kinds={"Deployment", "ConfigMap", "Secret"},
    ),
]

# Values the schema must refuse, each with why.
BAD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("an unknown top-level key", {"replicas": 2}),
    ("a string where an integer belongs", {"replicaCount": "two"}),
    ("a string where a list belongs", {"allowedPrincipals": "alice"}),
    ("a principal containing a comma", {"allowedPrincipals": ["alice,bob"]}),
    ("a lower-case reserved env name", {"reservedEnvNames": ["path"]}),
    ("an unknown log format", {"logging": {"format": "xml"}}),
    ("a webhook timeout over 30 s", {"webhook": {"timeoutSeconds": 60}}),
    ("a plain-http webhook URL", {"webhook": {"url": "http://example.com"}}),
    ("an unknown nested key", {"certManager": {"enable": True}}),
    ("a duration without a unit", {"podSecretGrace": "300"}),
    ("a string where a boolean belongs", {"serviceMonitor": {"enabled": "yes"}}),
    # Administrators and prefixes are rendered into CEL string literals and comma-separated flags.
    ("an administrator containing a double quote", {"ownerBinding": {"administrators": ['alice" || true || "']}}),
    ("an administrator containing a single quote", {"ownerBinding": {"administrators": ["o'brien"]}}),
    ("an administrator containing a backslash", {"ownerBinding": {"administrators": ["dom\\alice"]}}),
    ("an administrator containing a comma", {"ownerBinding": {"administrators": ["alice,bob"]}}),
    ("an administrator containing a newline", {"ownerBinding": {"administrators": ["alice\nbob"]}}),
    ("a group administrator without a name", {"ownerBinding": {"administrators": ["group:"]}}),
    ("a username prefix containing a quote", {"ownerBinding": {"usernamePrefix": 'oidc"'}}),
    ("a group prefix containing a backslash", {"ownerBinding": {"groupPrefix": "owner\\"}}),
    ("an empty group prefix", {"ownerBinding": {"groupPrefix": ""}}),
    ("an unknown ownerBinding key", {"ownerBinding": {"admins": ["alice"]}}),
    ("no unadopted pod-scoped Secret allowed at all", {"maxUnadoptedPodSecrets": 0}),
    ("an invalid sandbox namespace", {"sandboxNamespaces": ["Sandboxes"]}),
    ("a client CA that is not a PEM certificate", {"webhook": {"clientCA": "not a certificate"}}),
    ("a namespace template without {user}", {"ui": {"namespaceTemplate": "users"}}),
    ("a trusted proxy CIDR that is a hostname", {"ui": {"trustedProxyCIDRs": ["proxy.example"]}}),
    ("an unknown key in the Secrets page settings", {"ui": {"enable": True}}),
]


class Findings:
    """Collects failures so that one run reports all of them."""

    def __init__(self) -> None:
        self.count = 0

    def fail(self, message: str) -> None:
        self.count += 1
        print(f"  FAIL {message}")

    def ok(self, message: str) -> None:
        print(f"  ok   {message}")


def load_chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    """Render like `helm template` (offline: `lookup` finds nothing), keyed by template path."""
    chart.validate_schema(values)
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(template path, document text, parsed object) for every non-empty rendered document."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        chunks, current = [], []
        for line in rendered[path].splitlines():
            if line.rstrip() == "---":
                chunks.append("\n".join(current))
                current = []
            else:
                current.append(line)
        chunks.append("\n".join(current))
        for chunk in chunks:
            parsed = yaml.safe_load(chunk)
            if parsed is None:
                continue
            out.append((path, chunk.strip("\n") + "\n", parsed))
    return out


def install_order(doc: tuple[str, str, dict[str, Any]]) -> tuple[int, str, str]:
    _, _, obj = doc
    kind = obj.get("kind", "")
    rank = INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)
    return (rank, kind, obj.get("metadata", {}).get("name", ""))


def check_objects(scenario: Scenario, rendered: dict[str, str], findings: Findings) -> None:
    """Every object is well-formed and where it belongs; the branches produced what they should."""
    docs = documents(rendered)
    kinds = {obj.get("kind") for _, _, obj in docs}
    values = merged_values(scenario.values)
    for path, _, obj in docs:
        where = f"{path}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if not isinstance(obj, dict):
            findings.fail(f"{path}: a document is not a mapping")
            continue
        for key in ("apiVersion", "kind"):
            if not obj.get(key):
                findings.fail(f"{where}: no {key}")
        if not (obj.get("metadata") or {}).get("name"):
            findings.fail(f"{where}: no metadata.name")
        ns = (obj.get("metadata") or {}).get("namespace")
        if obj.get("kind") in CLUSTER_SCOPED and ns:
            findings.fail(f"{where}: cluster-scoped object has a namespace")
        # The only objects outside the release namespace: the RoleBindings granting Secret and
        # Pod rights in each sandbox namespace.
        allowed = {NAMESPACE, *values["sandboxNamespaces"]} if obj.get("kind") == "RoleBinding" else {NAMESPACE}
        if obj.get("kind") not in CLUSTER_SCOPED and ns not in allowed:
            findings.fail(f"{where}: namespace {ns!r}, expected one of {sorted(allowed)}")
    for kind in sorted(scenario.expect_kinds - kinds):
        findings.fail(f"no {kind} rendered")
    for kind in sorted(scenario.forbid_kinds & kinds):
        findings.fail(f"unexpected {kind} rendered")

    by_kind: dict[str, list[dict[str, Any]]] = {}
    for _, _, obj in docs:
        by_kind.setdefault(obj["kind"], []).append(obj)
    check_webhooks(values, by_kind, findings)
    check_deployment(values, by_kind, findings)
    check_policies(values, by_kind, findings)
    check_rbac(values, by_kind, findings)
    check_ui(values, by_kind, findings)
    findings.ok(f"{len(docs)} objects well-formed: {', '.join(sorted(k for k in kinds if k))}")


def merged_values(overrides: dict[str, Any]) -> dict[str, Any]:
    with load_chart() as chart:
        return chart.merge_values(overrides)


class _Any:
    """Equal to anything (a wildcard in an expected structure)."""

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()


def check_webhooks(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    configs = by_kind.get("MutatingWebhookConfiguration", [])
    if len(configs) != 1:
        findings.fail(f"expected one MutatingWebhookConfiguration, got {len(configs)}")
        return
    config = configs[0]
    webhooks = {w["name"]: w for w in config.get("webhooks", [])}
    if set(webhooks) != {"agentsecrets.agentsecrets.io", "pods.agentsecrets.io"}:
        findings.fail(f"unexpected webhooks {sorted(webhooks)}")
        return
    want_excluded = {"kube-system", NAMESPACE, *values["excludedNamespaces"]}
    want_selector = [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ANY}]
    if values["sandboxNamespaces"]:
        want_selector.append({"key": "kubernetes.io/metadata.name", "operator": "In",
                              "values": values["sandboxNamespaces"]})
    for name, hook in webhooks.items():
        expressions = hook["namespaceSelector"]["matchExpressions"]
        if [{**e, "values": ANY} if e["operator"] == "NotIn" else e for e in expressions] != want_selector:
            findings.fail(f"webhook {name}: namespaceSelector {expressions}, expected {want_selector}")
        elif set(expressions[0]["values"]) != want_excluded:
            findings.fail(f"webhook {name}: namespaceSelector excludes {sorted(expressions[0]['values'])}, "
                          f"expected {sorted(want_excluded)}")
    if webhooks["agentsecrets.agentsecrets.io"]["rules"][0]["operations"] != ["CREATE", "UPDATE", "DELETE"]:
        findings.fail("the AgentSecret webhook must see CREATE, UPDATE and DELETE (owner binding)")
    pods = webhooks["pods.agentsecrets.io"]
    if pods["rules"][0]["operations"] != ["CREATE"]:
        findings.fail("the pod webhook must be CREATE only")
    if pods.get("objectSelector", {}).get("matchExpressions") != [
        {"key": "agentsecrets.io/owner", "operator": "Exists"}
    ]:
        findings.fail("the pod webhook must select only pods labelled agentsecrets.io/owner")
    annotations = (config["metadata"].get("annotations") or {})
    url = values["webhook"]["url"]
    cert_manager = values["certManager"]["enabled"]
    for name, hook in webhooks.items():
        for key, want in (("failurePolicy", "Fail"), ("sideEffects", "NoneOnDryRun"),
                          ("matchPolicy", "Equivalent"), ("reinvocationPolicy", "IfNeeded"),
                          ("admissionReviewVersions", ["v1"]),
                          ("timeoutSeconds", values["webhook"]["timeoutSeconds"])):
            if hook.get(key) != want:
                findings.fail(f"webhook {name}: {key} is {hook.get(key)!r}, expected {want!r}")
        client = hook["clientConfig"]
        if url:
            if "service" in client or not client.get("url", "").startswith(url.rstrip("/") + "/mutate/"):
                findings.fail(f"webhook {name}: expected clientConfig.url under {url}, got {client}")
            want_bundle = base64.b64encode(values["webhook"]["caBundle"].encode()).decode()
            if client.get("caBundle", "") != want_bundle:
                findings.fail(f"webhook {name}: caBundle is not webhook.caBundle")
        else:
            if "url" in client or client.get("service", {}).get("namespace") != NAMESPACE:
                findings.fail(f"webhook {name}: expected the in-cluster service, got {client}")
            if cert_manager:
                if "caBundle" in client:
                    findings.fail(f"webhook {name}: caBundle must be left to cert-manager's cainjector")
            else:
                secret = next((s for s in by_kind.get("Secret", []) if s["metadata"]["name"].endswith("-tls")), None)
                if secret is None or client.get("caBundle") != secret["data"]["ca.crt"]:
                    findings.fail(f"webhook {name}: caBundle is not the generated CA")
    inject = "cert-manager.io/inject-ca-from" in annotations
    if inject != (cert_manager and not url):
        findings.fail(f"cert-manager.io/inject-ca-from present={inject}, expected {cert_manager and not url}")


def container_command(deployment: dict[str, Any]) -> str:
    """The subcommand a Deployment runs: `run` (the operator) or `ui` (the Secrets page)."""
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"][0]


def check_deployment(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    deployments = [d for d in by_kind.get("Deployment", []) if container_command(d) != "ui"]
    if len(deployments) != 1:
        findings.fail(f"expected one operator Deployment, got {len(deployments)}")
        return
    pod = deployments[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    if args[0] != "run":
        findings.fail(f"container args must start with `run`, got {args[:1]}")
    flags = dict(a[2:].split("=", 1) for a in args[1:])
    want = {
        "webhook-addr": f"0.0.0.0:{values['webhook']['port']}",
        "admin-addr": f"0.0.0.0:{values['admin']['port']}",
        "tls-cert": "/etc/agentsecrets/tls/tls.crt",
        "tls-key": "/etc/agentsecrets/tls/tls.key",
        "keyring": "/etc/agentsecrets/keyring/keyring.yaml",
        "pod-secret-grace": values["podSecretGrace"],
        "rotation-rate": str(values["rotationRate"]),
        "lease-name": values["leaderElection"]["leaseName"],
        "lease-namespace": NAMESPACE,
        "lease-duration": values["leaderElection"]["leaseDuration"],
        "log-format": values["logging"]["format"],
    }
    if values["allowedPrincipals"]:
        want["allowed-principals"] = ",".join(values["allowedPrincipals"])
    if values["reservedEnvNames"]:
        want["reserved-env-names"] = ",".join(values["reservedEnvNames"])
    owner_binding = values["ownerBinding"]
    want["owner-username-prefix"] = owner_binding["usernamePrefix"]
    want["owner-group-prefix"] = owner_binding["groupPrefix"]
    if owner_binding["administrators"]:
        want["secret-administrators"] = ",".join(owner_binding["administrators"])
    want["max-unadopted-pod-secrets"] = str(values["maxUnadoptedPodSecrets"])
    if values["sandboxNamespaces"]:
        want["sandbox-namespaces"] = ",".join(values["sandboxNamespaces"])
    if values["webhook"]["clientCA"]:
        want["client-ca"] = "/etc/agentsecrets/client-ca/ca.crt"
    for flag, value in want.items():
        if flags.get(flag) != value:
            findings.fail(f"--{flag} is {flags.get(flag)!r}, expected {value!r}")
    excluded = set(flags.get("excluded-namespaces", "").split(","))
    if excluded != {"kube-system", NAMESPACE, *values["excludedNamespaces"]}:
        findings.fail(f"--excluded-namespaces is {sorted(excluded)}")
    unknown = set(flags) - set(want) - {"excluded-namespaces"}
    if unknown:
        findings.fail(f"unexpected flags {sorted(unknown)}")
    security = container["securityContext"]
    for key, expected in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False),
                          ("runAsNonRoot", True), ("runAsUser", 65532)):
        if security.get(key) != expected:
            findings.fail(f"container securityContext.{key} is {security.get(key)!r}")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        findings.fail("container must drop ALL capabilities")
    if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        findings.fail("pod seccompProfile must be RuntimeDefault")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    paths = ["/etc/agentsecrets/tls", "/etc/agentsecrets/keyring"]
    if values["webhook"]["clientCA"]:
        paths.append("/etc/agentsecrets/client-ca")
    for path in paths:
        if not mounts.get(path, {}).get("readOnly"):
            findings.fail(f"{path} must be mounted read-only")
    if values["webhook"]["clientCA"]:
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_map = volumes.get(mounts.get("/etc/agentsecrets/client-ca", {}).get("name"), {}).get("configMap", {})
        maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
        data = maps.get(config_map.get("name"), {}).get("data", {})
        if data.get("ca.crt", "").strip() != values["webhook"]["clientCA"].strip():
            findings.fail("the client CA ConfigMap mounted at /etc/agentsecrets/client-ca does not hold webhook.clientCA")
    env = {e["name"]: e for e in container["env"]}
    if env.get("POD_SERVICE_ACCOUNT", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.serviceAccountName":
        findings.fail("env POD_SERVICE_ACCOUNT must come from the downward API (spec.serviceAccountName)")


def check_policies(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    """The three admission policies are there, bound with Deny, fail closed, and carry the
    operator's username and the owner-binding values exactly (the CEL literals parse back)."""
    policies = {p["metadata"]["name"]: p for p in by_kind.get("ValidatingAdmissionPolicy", [])}
    bindings = {b["metadata"]["name"]: b for b in by_kind.get("ValidatingAdmissionPolicyBinding", [])}
    fullname = RELEASE
    want = {f"{fullname}-{p}" for p in POLICIES}
    if set(policies) != want or set(bindings) != want:
        findings.fail(f"expected policies and bindings {sorted(want)}, got {sorted(policies)} and {sorted(bindings)}")
        return
    for name, binding in bindings.items():
        spec = binding["spec"]
        if spec.get("policyName") != name or spec.get("validationActions") != ["Deny"]:
            findings.fail(f"binding {name} must bind {name} with validationActions [Deny], got {spec}")
        if "paramRef" in spec or "matchResources" in spec:
            findings.fail(f"binding {name} must apply cluster-wide, without params")
    account = values["serviceAccount"]["name"] or fullname
    operator = f"system:serviceaccount:{NAMESPACE}:{account}"
    admin_users = [a for a in values["ownerBinding"]["administrators"] if not a.startswith("group:")]
    admin_groups = [a[len("group:"):] for a in values["ownerBinding"]["administrators"] if a.startswith("group:")]
    for name, policy in policies.items():
        if policy["spec"].get("failurePolicy") != "Fail":
            findings.fail(f"policy {name}: failurePolicy must be Fail")
        variables = {v["name"]: v["expression"] for v in policy["spec"].get("variables", [])}
        literals = {"operator": operator}
        if name.endswith("agentsecret-owners"):
            literals.update(usernamePrefix=values["ownerBinding"]["usernamePrefix"],
                            groupPrefix=values["ownerBinding"]["groupPrefix"],
                            administratorUsernames=admin_users, administratorGroups=admin_groups)
        elif name.endswith("pod-secret-references"):
            literals = {}
        for variable, expected in literals.items():
            try:
                # A CEL string or list-of-strings literal written as JSON reads back as JSON.
                got = json.loads(variables.get(variable, "null"))
            except json.JSONDecodeError as error:
                findings.fail(f"policy {name}: variables.{variable} is not a plain literal: {error}")
                continue
            if got != expected:
                findings.fail(f"policy {name}: variables.{variable} is {got!r}, expected {expected!r}")


def check_rbac(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    """With sandboxNamespaces, Secret and Pod rights exist only through RoleBindings in those
    namespaces; without, through the ClusterRoleBinding."""
    if not values["rbac"]["create"]:
        return
    roles = {r["metadata"]["name"]: r for r in by_kind.get("ClusterRole", [])}
    cluster_bound = {b["roleRef"]["name"] for b in by_kind.get("ClusterRoleBinding", [])}

    def sandbox_rights(role: dict[str, Any]) -> bool:
        return any(rule.get("apiGroups") == [""] and {"secrets", "pods"} & set(rule.get("resources", []))
                   for rule in role.get("rules", []))

    cluster_wide = any(sandbox_rights(roles[name]) for name in cluster_bound if name in roles)
    sandboxes = values["sandboxNamespaces"]
    if sandboxes and cluster_wide:
        findings.fail("sandboxNamespaces is set but a ClusterRoleBinding grants Secret or Pod rights")
    if not sandboxes and not cluster_wide:
        findings.fail("no Secret and Pod rights: the ClusterRoleBinding must grant them")
    bound_in = {b["metadata"]["namespace"] for b in by_kind.get("RoleBinding", [])
                if b["roleRef"]["kind"] == "ClusterRole" and sandbox_rights(roles.get(b["roleRef"]["name"], {}))}
    if bound_in != set(sandboxes):
        findings.fail(f"Secret and Pod rights are bound in namespaces {sorted(bound_in)}, expected {sorted(sandboxes)}")


def check_ui(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    """The Secrets page: only when enabled; may only impersonate; never selected as the operator."""
    ui = values["ui"]
    pages = [d for d in by_kind.get("Deployment", []) if container_command(d) == "ui"]
    if not ui["enabled"]:
        if pages:
            findings.fail("a Secrets page Deployment is rendered while ui.enabled is false")
        return
    if len(pages) != 1:
        findings.fail(f"expected one Secrets page Deployment, got {len(pages)}")
        return
    page = pages[0]
    pod = page["spec"]["template"]["spec"]
    container = pod["containers"][0]
    flags = dict(a[2:].split("=", 1) for a in container["args"][1:])
    want = {
        "addr": f"{ui['listenAddress']}:{ui['port']}",
        "user-header": ui["userHeader"],
        "groups-header": ui["groupsHeader"],
        "csrf-key-file": "/etc/agentsecrets/ui-csrf/key",
        "log-format": values["logging"]["format"],
    }
    if ui["namespace"]:
        want["namespace"] = ui["namespace"]
    else:
        want["namespace-template"] = ui["namespaceTemplate"]
    if ui["trustedProxyCIDRs"]:
        want["trusted-proxy-cidrs"] = ",".join(ui["trustedProxyCIDRs"])
    if ui["ownerUsernamePrefix"]:
        want["owner-username-prefix"] = ui["ownerUsernamePrefix"]
    if values["reservedEnvNames"]:
        want["reserved-env-names"] = ",".join(values["reservedEnvNames"])
    if ui["tls"]["secretName"]:
        want["tls-cert"] = "/etc/agentsecrets/ui-tls/tls.crt"
        want["tls-key"] = "/etc/agentsecrets/ui-tls/tls.key"
    if ui["proxyClientCA"]:
        want["proxy-client-ca"] = "/etc/agentsecrets/ui-proxy-ca/ca.crt"
    if flags != want:
        findings.fail(f"Secrets page flags {flags}, expected {want}")
    security = container["securityContext"]
    if not (security.get("readOnlyRootFilesystem") and security.get("runAsNonRoot")
            and security.get("allowPrivilegeEscalation") is False
            and security.get("capabilities", {}).get("drop") == ["ALL"]):
        findings.fail("the Secrets page container must be non-root, read-only, without capabilities")
    probed = "readinessProbe" in container
    if probed != (ui["listenAddress"] in ("0.0.0.0", "::")):
        findings.fail(f"readiness probe {probed} for a page bound to {ui['listenAddress']}")
    name = page["metadata"]["name"]
    if pod["serviceAccountName"] != name:
        findings.fail("the Secrets page must run as its own service account")
    roles = [r for r in by_kind.get("ClusterRole", []) if r["metadata"]["name"] == name]
    if len(roles) != 1:
        findings.fail("expected one ClusterRole for the Secrets page")
    else:
        rules = roles[0]["rules"]
        verbs = {v for r in rules for v in r["verbs"]}
        resources = {res for r in rules for res in r["resources"]}
        if verbs != {"impersonate"} or resources != {"users", "groups"}:
            findings.fail(f"the Secrets page may only impersonate users and groups, got {rules}")
        groups_rule = next(r for r in rules if "groups" in r["resources"])
        if ui["impersonableGroups"] and groups_rule.get("resourceNames") != ui["impersonableGroups"]:
            findings.fail("impersonable groups are not limited to ui.impersonableGroups")
    # The operator's Service (webhook) must never send admission reviews to the page's pods.
    pod_labels = page["spec"]["template"]["metadata"]["labels"]
    for service in by_kind.get("Service", []):
        selector = service["spec"]["selector"]
        selects_page = all(pod_labels.get(k) == v for k, v in selector.items())
        if selects_page != (service["metadata"]["name"] == name):
            findings.fail(f"Service {service['metadata']['name']} selects the page's pods: {selects_page}")
    findings.ok("Secrets page: flags, impersonate-only RBAC, own selector labels")


def cmd_lint(_: argparse.Namespace) -> int:
    findings = Findings()
    print(f"Helm {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), chart {CHART.relative_to(REPO)}")
    with load_chart() as chart:
        for scenario in SCENARIOS:
            print(f"\n[{scenario.name}]")
            report = helm.lint(str(CHART), scenario.values, strict=True, namespace=NAMESPACE,
                               kube_version=KUBE_VERSION)
            for message in report.get("messages") or []:
                severity = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}.get(message["severity"], "?")
                line = f"helm lint {severity}: {message['path']}: {message['error']}"
                if message["severity"] >= 2:
                    findings.fail(line)
                else:
                    print(f"  info {line}")
            reported = {m["error"] for m in report.get("messages") or []}
            for error in report.get("errors") or []:
                if error not in reported and not any(error in r for r in reported):
                    findings.fail(f"helm lint: {error}")
            if not report.get("errors") and all(m["severity"] < 2 for m in report.get("messages") or []):
                findings.ok("helm lint --strict")
            try:
                rendered = render(chart, scenario.values)
            except helm.HelmError as error:
                findings.fail(f"render: {error}")
                continue
            check_objects(scenario, rendered, findings)

        print("\n[values.schema.json refuses wrong values]")
        for why, values in BAD_VALUES:
            try:
                chart.validate_schema(values)
            except helm.HelmValuesError:
                findings.ok(f"refuses {why}: {values}")
            else:
                findings.fail(f"accepts {why}: {values}")

    print("\n[an upgrade keeps the existing keyring and certificate (lookup)]")
    check_upgrade_keeps_secrets(findings)

    print("\n[values.yaml documents every value]")
    check_values_comments(findings)
    return summary(findings, "lint")


class FakeSecretsAPI(BaseHTTPRequestHandler):
    """Just enough of a Kubernetes API server, on the loopback address, for Helm's `lookup` of
    Secrets in the release namespace: discovery of v1 and GET of the Secrets in `secrets`."""

    secrets: dict[str, dict[str, str]] = {}

    def log_message(self, *args: Any) -> None:  # keep the output to the findings
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets/"
        name = path[len(prefix):] if path.startswith(prefix) else None
        if path == "/api/v1":
            status, body = 200, {
                "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                "resources": [{"name": "secrets", "singularName": "secret", "namespaced": True,
                               "kind": "Secret", "verbs": ["get", "list"]}],
            }
        elif name in self.secrets:
            status, body = 200, {
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name, "namespace": NAMESPACE}, "data": self.secrets[name],
            }
        else:
            status, body = 404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                 "reason": "NotFound", "code": 404}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def check_upgrade_keeps_secrets(findings: Findings) -> None:
    """Render an upgrade against a cluster that already holds the chart's keyring and TLS
    Secrets: both must be reused as they are (a new keyring would make every sealed value
    unreadable), and the webhook's caBundle must be the existing CA."""
    fullname = RELEASE
    keyring = base64.b64encode(b"primary: kek-2\nkeys:\n- id: kek-2\n  key: existing\n").decode()
    tls = {"tls.crt": "ZXhpc3RpbmctY3J0", "tls.key": "ZXhpc3Rpbmcta2V5", "ca.crt": "ZXhpc3RpbmctY2E="}
    FakeSecretsAPI.secrets = {f"{fullname}-keyring": {"keyring.yaml": keyring}, f"{fullname}-tls": tls}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSecretsAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = helm.Config(kube_apiserver=f"http://127.0.0.1:{server.server_address[1]}",
                             kube_token="fake", namespace=NAMESPACE)
        with config, load_chart() as chart:
            rendered = config.render(chart, {}, name=RELEASE, namespace=NAMESPACE,
                                     is_upgrade=True, revision=2)
    except helm.HelmError as error:
        findings.fail(f"render against the fake API server: {error}")
        return
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    objects = {(o["kind"], o["metadata"]["name"]): o for _, _, o in documents(rendered)}
    kept_keyring = objects.get(("Secret", f"{fullname}-keyring"), {}).get("data")
    if kept_keyring == {"keyring.yaml": keyring}:
        findings.ok("the keyring Secret is reused, not regenerated")
    else:
        findings.fail("an upgrade would replace the existing keyring")
    if objects.get(("Secret", f"{fullname}-tls"), {}).get("data") == tls:
        findings.ok("the TLS Secret is reused")
    else:
        findings.fail("an upgrade would replace the existing serving certificate")
    webhook = objects.get(("MutatingWebhookConfiguration", fullname), {})
    bundles = {w["clientConfig"].get("caBundle") for w in webhook.get("webhooks", [])}
    if bundles == {tls["ca.crt"]}:
        findings.ok("the webhooks' caBundle is the existing CA")
    else:
        findings.fail(f"the webhooks' caBundle is not the existing CA: {bundles}")


def check_values_comments(findings: Findings) -> None:
    """Every leaf key in values.yaml has a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        key, _, rest = stripped.partition(":")
        if rest.strip() == "" and index + 1 < len(lines) and lines[index + 1].startswith(line[: len(line) - len(line.lstrip())] + "  "):
            continue  # a mapping whose children carry the comments
        previous = lines[index - 1].strip() if index else ""
        if not previous.startswith("#"):
            missing.append(key)
    if missing:
        findings.fail(f"values without a comment: {', '.join(missing)}")
    else:
        findings.ok("every value has a comment")


def manifest_files() -> dict[str, str]:
    """The contents of manifests/, rendered from the chart."""
    with load_chart() as chart:
        rendered = render(chart, MANIFEST_VALUES)
        version = chart.version
    docs = sorted(documents(rendered), key=install_order)
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n"
        "    app.kubernetes.io/part-of: agent-secrets\n"
    ).format(ns=NAMESPACE)
    header = f"""\
# agent-secrets {version}: the Helm chart charts/agent-secrets rendered for `kubectl apply`.
# GENERATED by `python3 hack/helm.py render`; do not edit (`python3 hack/helm.py check` fails
# when this file is out of date). See manifests/README.md.
#
# Rendered with release name {RELEASE}, namespace {NAMESPACE} and the chart's defaults, except:
# - certManager.enabled=true: the webhook's serving certificate comes from cert-manager (which
#   must be installed first), because a static file must not embed a private key;
# - keyring.existingSecret={KEYRING_SECRET}: the keyring is not in this file (a static file must
#   not carry key material). Create it once, and keep a backup:
#     agentsecrets keys generate --secret {KEYRING_SECRET} -n {NAMESPACE} | kubectl create -f -
#   (create, not client-side apply, which would copy the key into an annotation)
# Install: kubectl apply -f manifests/crds.yaml -f manifests/agent-secrets.yaml
"""
    body = [header, "---\n", namespace]
    for path, text, _ in docs:
        body.append("---\n")
        body.append(f"# Source: {path}\n")
        body.append(text)
    crd_header = f"""\
# agent-secrets {version}: the AgentSecret CustomResourceDefinition (a copy of crds/agentsecrets.yaml,
# which `agentsecrets crd` generates from the Rust types).
# GENERATED by `python3 hack/helm.py render`; do not edit.
"""
    return {
        "agent-secrets.yaml": "".join(body),
        "crds.yaml": crd_header + CRD.read_text(),
    }


def cmd_render(_: argparse.Namespace) -> int:
    problems = crd_copy_problems()
    if problems:
        for problem in problems:
            print(f"error: {problem}")
        return 1
    MANIFESTS.mkdir(exist_ok=True)
    for name, text in manifest_files().items():
        (MANIFESTS / name).write_text(text)
        print(f"wrote {(MANIFESTS / name).relative_to(REPO)}")
    return 0


def crd_copy_problems() -> list[str]:
    if not CHART_CRD.exists() or CHART_CRD.read_text() != CRD.read_text():
        return [
            f"{CHART_CRD.relative_to(REPO)} differs from {CRD.relative_to(REPO)}; "
            f"run: cp {CRD.relative_to(REPO)} {CHART_CRD.relative_to(REPO)}"
        ]
    return []


def cmd_check(_: argparse.Namespace) -> int:
    findings = Findings()
    print("[the chart's CRD is crds/agentsecrets.yaml]")
    problems = crd_copy_problems()
    for problem in problems:
        findings.fail(problem)
    if not problems:
        findings.ok(f"{CHART_CRD.relative_to(REPO)} is up to date")

    print("\n[manifests/ is the chart rendered]")
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in manifest_files().items():
            fresh = Path(scratch) / name
            fresh.write_text(text)
            target = MANIFESTS / name
            current = target.read_text() if target.exists() else ""
            if current == text:
                findings.ok(f"{target.relative_to(REPO)} is up to date")
                continue
            diff = difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"{target.relative_to(REPO)} (checked in)",
                tofile=f"{target.relative_to(REPO)} (rendered)",
            )
            sys.stdout.writelines(diff)
            findings.fail(f"{target.relative_to(REPO)} is out of date: run `python3 hack/helm.py render`")
    print("\n[manifests/ carries no key material and every object is well-formed]")
    for name, text in manifest_files().items():
        if "PRIVATE KEY" in text or "keyring.yaml:" in text:
            findings.fail(f"manifests/{name} embeds a private key or a keyring")
        objects = [o for o in yaml.safe_load_all(text) if o is not None]
        broken = [o for o in objects if not (isinstance(o, dict) and o.get("apiVersion")
                                              and o.get("kind") and (o.get("metadata") or {}).get("name"))]
        if broken:
            findings.fail(f"manifests/{name}: {len(broken)} object(s) without apiVersion, kind or metadata.name")
        else:
            findings.ok(f"manifests/{name}: {len(objects)} objects, no key material")
    return summary(findings, "check")


def summary(findings: Findings, what: str) -> int:
    if findings.count:
        print(f"\nhelm {what}: {findings.count} problem(s)")
        return 1
    print(f"\nhelm {what}: all passed")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("lint", help="lint and render the chart with every values scenario").set_defaults(run=cmd_lint)
    sub.add_parser("render", help="write manifests/ from the chart").set_defaults(run=cmd_render)
    sub.add_parser("check", help="fail when manifests/ or the chart's CRD copy is out of date").set_defaults(run=cmd_check)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
