#!/usr/bin/env python3
"""Lint and render the agent-secrets Helm chart with real Helm, and keep manifests/ in sync.

Helm here is Helm v4's own Go library (chart loader, template engine with Sprig, lint rules,
values-schema validation, `--set` parser), called through the helm-python-sdk package from PyPI;
no helm binary and no cluster are needed. Install it with hack/install-helm.sh.

    python3 hack/helm.py lint     # helm lint --strict of every values scenario, plus render checks,
                                  # and the README quick start's helm command rendered as written
    python3 hack/helm.py render   # write manifests/ from the chart, and the policies rendered
                                  # with a narrowed webhook selector to tests/rendered/
    python3 hack/helm.py check    # fail if those files or the chart's CRD copy are out of date, or
                                  # if a render carries key material or differs from a second one

Exit status: 0 when everything passed, 1 on any finding, 2 when Helm is not installed.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
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
TLS_SECRET = "agent-secrets-tls"

# The static manifests are the chart's defaults: the operator creates the keyring and the
# webhook's certificate at run time, so nothing secret is rendered and nothing (such as
# cert-manager) must be installed first.
MANIFEST_VALUES: dict[str, Any] = {}
# The admission policies as rendered with a narrowed webhook.objectSelector (every operator), for
# tests/policies.rs, which evaluates them as it does manifests/, and tests/cluster/policies.rs.
NARROWED_POLICIES = REPO / "tests" / "rendered" / "narrowed-webhook-policies.yaml"
NARROWED_VALUES: dict[str, Any] = {
    "webhook": {
        "objectSelector": {
            "matchLabels": {"sandbox.example.com/runtime": "gvisor"},
            "matchExpressions": [
                {"key": "sandbox.example.com/tier", "operator": "In", "values": ["agents", "batch"]},
                {"key": "sandbox.example.com/legacy", "operator": "NotIn", "values": ["true"]},
                {"key": "sandbox.example.com/pool", "operator": "Exists"},
                {"key": "sandbox.example.com/excluded", "operator": "DoesNotExist"},
            ],
        }
    }
}

# What key material looks like in a rendered object: PEM private keys, and data keys of a
# keyring or TLS Secret (the chart renders neither Secret any more).
KEY_MATERIAL = [
    (re.compile(r"PRIVATE KEY"), "a PEM private key"),
    (re.compile(r"^\s*keyring\.yaml:\s*\S", re.M), "keyring data"),
    (re.compile(r"^\s*(tls\.key|ca\.key):\s*\S", re.M), "a TLS private key in Secret data"),
]

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
        "defaults = manifests/ (the operator creates its keyring and certificate)",
        MANIFEST_VALUES,
        expect_kinds={"Deployment", "Service", "ServiceAccount", "ClusterRole",
                      "ClusterRoleBinding", "Role", "RoleBinding", "PodDisruptionBudget",
                      "MutatingWebhookConfiguration", "ValidatingAdmissionPolicy",
                      "ValidatingAdmissionPolicyBinding", "Pod"},
        forbid_kinds={"Certificate", "Issuer", "ServiceMonitor", "NetworkPolicy", "ConfigMap", "Secret"},
    ),
    Scenario(
        "cert-manager with the chart's private CA, existing keyring",
        {"certManager": {"enabled": True}, "keyring": {"existingSecret": KEYRING_SECRET}},
        expect_kinds={"Certificate", "Issuer", "MutatingWebhookConfiguration"},
        forbid_kinds={"Secret"},
    ),
    Scenario(
        "cert-manager with an existing ClusterIssuer",
        {"certManager": {"enabled": True, "issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}}},
        expect_kinds={"Certificate", "Role"},
        forbid_kinds={"Issuer", "Secret"},
    ),
    Scenario(
        "OpenShift restricted SCC, host network, spread, extra args and env, narrower webhooks",
        {
            "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
            "securityContext": {"runAsUser": None, "runAsGroup": None},
            "hostNetwork": True,
            "webhook": {"port": 9443,
                        "namespaceSelector": {"matchLabels": {"sandboxes.example.com/enabled": "true"},
                                              "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["system"]}]},
                        "objectSelector": {"matchExpressions": [{"key": "runtime.example.com/class", "operator": "Exists"}]}},
            "admin": {"port": 9080},
            "topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
            "extraArgs": ["--reload-interval=30s"],
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"}],
        },
        expect_kinds={"Deployment", "Pod"},
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
            "secretless": {"namespaces": ["*"], "unscoped": "env", "proxyImage": "registry.example/proxy:1"},
        },
        expect_kinds={"ServiceMonitor", "NetworkPolicy"},
        forbid_kinds={"PodDisruptionBudget", "Certificate", "Secret", "Pod"},
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
        "secretless value feed off",
        {"feed": {"enabled": False}},
        expect_kinds={"ClusterRole", "Service"},
    ),
    Scenario(
        "mutual TLS: the API server's client CA",
        {"webhook": {"clientCA": PEM}},
        expect_kinds={"ConfigMap", "Pod"},
    ),
    Scenario(
        "owner binding: prefixes and secret administrators",
        {"ownerBinding": {"usernamePrefix": "oidc:", "groupPrefix": "tenant:",
                          "administrators": ["system:serviceaccount:platform:secrets-api",
                                             "group:platform-admins", "carol@example.com"]},
         "maxPodSecretsPerWindow": 250},
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
                "csrfKeySecret": "ui-csrf-key",
            },
        },
        expect_kinds={"Deployment", "ConfigMap"},
        forbid_kinds={"Secret"},
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
    ("a duration without a unit", {"podSecretReuseWindow": "300"}),
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
    ("no pod-scoped Secret allowed at all", {"maxPodSecretsPerWindow": 0}),
    ("an invalid sandbox namespace", {"sandboxNamespaces": ["Sandboxes"]}),
    ("a client CA that is not a PEM certificate", {"webhook": {"clientCA": "not a certificate"}}),
    ("a namespace template without {user}", {"ui": {"namespaceTemplate": "users"}}),
    ("a trusted proxy CIDR that is a hostname", {"ui": {"trustedProxyCIDRs": ["proxy.example"]}}),
    ("an unknown key in the Secrets page settings", {"ui": {"enable": True}}),
    ("a CSRF key Secret name that is not a DNS name", {"ui": {"csrfKeySecret": "UI key"}}),
    # The settings the operator-owned keys and chart conventions added.
    ("the removed chart-generated certificate's validity", {"certs": {"validityDays": 365}}),
    ("an issuerRef without a kind", {"certManager": {"issuerRef": {"name": "ca", "kind": ""}}}),
    ("an issuerRef with an unknown key", {"certManager": {"issuerRef": {"name": "ca", "namespace": "x"}}}),
    ("an issuer name that is not a DNS name", {"certManager": {"issuerRef": {"name": "Internal CA"}}}),
    ("an extra arg that is not a flag", {"extraArgs": ["30s"]}),
    ("a string where the extra args list belongs", {"extraArgs": "--reload-interval=30s"}),
    ("an extra env entry without a name", {"extraEnv": [{"value": "x"}]}),
    ("a spread constraint without a topologyKey", {"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]}),
    ("a negative runAsUser", {"podSecurityContext": {"runAsUser": -1}}),
    ("a string where hostNetwork's boolean belongs", {"hostNetwork": "true"}),
    ("an unknown selector operator", {"webhook": {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]}}}),
    ("an In requirement without values", {"webhook": {"objectSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}}),
    ("an Exists requirement with values", {"webhook": {"objectSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}}}),
    ("a selector replacing the chart's", {"webhook": {"namespaceSelector": {"matchNames": ["x"]}}}),
    ("a test pod without an image", {"test": {"image": ""}}),
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
    check_test_pod(values, by_kind, findings)
    notes = next((text for path, text in rendered.items() if path.endswith("NOTES.txt")), "")
    # A value typed into a heredoc stays in the shell's history; the NOTES show the CLI instead.
    if re.search(r"<<-?\s*['\"]?\w", notes):
        findings.fail("NOTES.txt shows a heredoc: a value typed into it lands in shell history")
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
    # The user's terms come after the chart's, in the same selector: Kubernetes ANDs them, so
    # they narrow it and can never bring back an excluded namespace or an unlabelled pod.
    extra_ns = values["webhook"]["namespaceSelector"]
    want_selector += extra_ns["matchExpressions"]
    for name, hook in webhooks.items():
        selector = hook["namespaceSelector"]
        expressions = selector["matchExpressions"]
        if [{**e, "values": ANY} if e is expressions[0] else e for e in expressions] != want_selector:
            findings.fail(f"webhook {name}: namespaceSelector {expressions}, expected {want_selector}")
        elif set(expressions[0]["values"]) != want_excluded:
            findings.fail(f"webhook {name}: namespaceSelector excludes {sorted(expressions[0]['values'])}, "
                          f"expected {sorted(want_excluded)}")
        if selector.get("matchLabels", {}) != extra_ns["matchLabels"]:
            findings.fail(f"webhook {name}: namespaceSelector.matchLabels {selector.get('matchLabels')}, "
                          f"expected {extra_ns['matchLabels']}")
    if "objectSelector" in webhooks["agentsecrets.agentsecrets.io"]:
        findings.fail("the AgentSecret webhook must see every AgentSecret (no objectSelector)")
    if webhooks["agentsecrets.agentsecrets.io"]["rules"][0]["operations"] != ["CREATE", "UPDATE", "DELETE"]:
        findings.fail("the AgentSecret webhook must see CREATE, UPDATE and DELETE (owner binding)")
    pods = webhooks["pods.agentsecrets.io"]
    if pods["rules"][0]["operations"] != ["CREATE"]:
        findings.fail("the pod webhook must be CREATE only")
    extra_obj = values["webhook"]["objectSelector"]
    want_objects = [{"key": "agentsecrets.io/owner", "operator": "Exists"}, *extra_obj["matchExpressions"]]
    if pods.get("objectSelector", {}).get("matchExpressions") != want_objects:
        findings.fail("the pod webhook must select only pods labelled agentsecrets.io/owner "
                      f"(then webhook.objectSelector): {pods.get('objectSelector')}")
    if pods.get("objectSelector", {}).get("matchLabels", {}) != extra_obj["matchLabels"]:
        findings.fail("the pod webhook's objectSelector.matchLabels is not webhook.objectSelector.matchLabels")
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
            # Filled in the cluster (the operator, or cert-manager's cainjector); a rendered one
            # would be written over the live CA by every re-render.
            if "caBundle" in client:
                findings.fail(f"webhook {name}: a caBundle is rendered; it must be left to "
                              f"{'cainjector' if cert_manager else 'the operator'}")
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
    want = {
        "webhook-addr": f"0.0.0.0:{values['webhook']['port']}",
        "admin-addr": f"0.0.0.0:{values['admin']['port']}",
        "tls-cert": "/etc/agentsecrets/tls/tls.crt",
        "tls-key": "/etc/agentsecrets/tls/tls.key",
        "keyring": "/etc/agentsecrets/keyring/keyring.yaml",
        "pod-secret-reuse-window": values["podSecretReuseWindow"],
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
    want["max-pod-secrets-per-window"] = str(values["maxPodSecretsPerWindow"])
    if values["sandboxNamespaces"]:
        want["sandbox-namespaces"] = ",".join(values["sandboxNamespaces"])
    if values["webhook"]["clientCA"]:
        want["client-ca"] = "/etc/agentsecrets/client-ca/ca.crt"
    feed = values["feed"]
    want["feed-listen"] = f"0.0.0.0:{feed['port']}" if feed["enabled"] else "off"
    fullname = RELEASE
    secretless = values["secretless"]
    want["proxy-image"] = secretless["proxyImage"] or container["image"]
    want["feed-service-host"] = f"{fullname}.{NAMESPACE}.svc"
    if secretless["namespaces"]:
        want["secretless-namespaces"] = ",".join(secretless["namespaces"])
    want["secretless-unscoped"] = secretless["unscoped"]
    operator_tls = not values["certManager"]["enabled"]
    if operator_tls:
        want["tls-secret"] = f"{fullname}-tls"
        want["webhook-service"] = fullname
        if not values["webhook"]["url"]:
            want["webhook-configuration"] = fullname
    keyring_secret = values["keyring"]["existingSecret"] or f"{fullname}-keyring"
    if not values["keyring"]["existingSecret"]:
        want["keyring-secret"] = keyring_secret
        want["initial-key-id"] = values["keyring"]["initialKeyId"]
    extra = values["extraArgs"]
    if extra and args[len(args) - len(extra):] != extra:
        findings.fail(f"extraArgs {extra} are not appended to the container args: {args}")
    args = args[: len(args) - len(extra)] if extra else args
    flags = dict(a[2:].split("=", 1) for a in args[1:])
    for flag, value in want.items():
        if flags.get(flag) != value:
            findings.fail(f"--{flag} is {flags.get(flag)!r}, expected {value!r}")
    excluded = set(flags.get("excluded-namespaces", "").split(","))
    if excluded != {"kube-system", NAMESPACE, *values["excludedNamespaces"]}:
        findings.fail(f"--excluded-namespaces is {sorted(excluded)}")
    unknown = set(flags) - set(want) - {"excluded-namespaces"}
    if unknown:
        findings.fail(f"unexpected flags {sorted(unknown)}")
    # The security contexts are the values, whole (a null in the values removes a default, as
    # OpenShift's restricted SCC needs); whatever the IDs, the rest stays locked down.
    security = container.get("securityContext", {})
    if security != values["securityContext"] or pod.get("securityContext", {}) != values["podSecurityContext"]:
        findings.fail("the security contexts are not podSecurityContext and securityContext")
    for key, expected in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False),
                          ("runAsNonRoot", True)):
        if security.get(key) != expected:
            findings.fail(f"container securityContext.{key} is {security.get(key)!r}")
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        findings.fail("container must drop ALL capabilities")
    if pod.get("securityContext", {}).get("seccompProfile", {}).get("type") != "RuntimeDefault":
        findings.fail("pod seccompProfile must be RuntimeDefault")
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        if key in pod.get("securityContext", {}) and pod["securityContext"][key] != values["podSecurityContext"].get(key):
            findings.fail(f"pod securityContext.{key} is not the value's")
    host = values["hostNetwork"]
    if bool(pod.get("hostNetwork")) != host or (pod.get("dnsPolicy") == "ClusterFirstWithHostNet") != host:
        findings.fail(f"hostNetwork {pod.get('hostNetwork')} / dnsPolicy {pod.get('dnsPolicy')} for hostNetwork={host}")
    spread = pod.get("topologySpreadConstraints", [])
    if len(spread) != len(values["topologySpreadConstraints"]):
        findings.fail("topologySpreadConstraints are not the values'")
    selector = deployments[0]["spec"]["selector"]["matchLabels"]
    for constraint, given in zip(spread, values["topologySpreadConstraints"]):
        want_selector = given.get("labelSelector", {"matchLabels": selector})
        if constraint.get("labelSelector") != want_selector or any(constraint.get(k) != v for k, v in given.items()):
            findings.fail(f"topology spread constraint {constraint} is not {given} over the operator's pods")
    secrets = {v.get("secret", {}).get("secretName"): v["secret"] for v in pod["volumes"] if "secret" in v}
    # Both Secrets may be written after the pod starts; the operator waits for the files.
    tls_volume = secrets.get(f"{fullname}-tls", {})
    # ca.crt: the feed's CA, which the webhook hands to secretless pods; never ca.key.
    if not tls_volume.get("optional") or [i["key"] for i in tls_volume.get("items", [])] != ["tls.crt", "tls.key", "ca.crt"]:
        findings.fail(f"the TLS Secret must be mounted optional, tls.crt, tls.key and ca.crt only: {tls_volume}")
    keyring_volume = secrets.get(keyring_secret, {})
    if bool(keyring_volume.get("optional")) != (not values["keyring"]["existingSecret"]):
        findings.fail(f"the keyring Secret {keyring_secret} must be optional exactly when the operator creates it")
    env_names = [e["name"] for e in container["env"]]
    for entry in values["extraEnv"]:
        if entry not in container["env"]:
            findings.fail(f"extraEnv {entry['name']} is not in the container's env")
    if len(env_names) != len(set(env_names)):
        findings.fail(f"duplicate env names: {env_names}")
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
    check_bootstrap_rbac(values, by_kind, findings)


def check_bootstrap_rbac(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    """The operator's own keyring and TLS Secrets and its webhook configuration: exactly the
    rights the bootstrap calls need (src/bootstrap.rs), limited by name wherever RBAC can."""
    fullname = RELEASE
    keyring = not values["keyring"]["existingSecret"]
    tls = not values["certManager"]["enabled"]
    patches_ca = tls and not values["webhook"]["url"]
    want_rules = []
    if tls or keyring:
        want_rules.append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]})
        names = ([f"{fullname}-keyring"] if keyring else []) + ([f"{fullname}-tls"] if tls else [])
        want_rules.append({"apiGroups": [""], "resources": ["secrets"], "resourceNames": names, "verbs": ["get"]})
    if tls:
        want_rules.append({"apiGroups": [""], "resources": ["secrets"], "resourceNames": [f"{fullname}-tls"],
                           "verbs": ["update"]})
    roles = {r["metadata"]["name"]: r for r in by_kind.get("Role", [])}
    bootstrap = roles.get(f"{fullname}-bootstrap")
    if (bootstrap or {}).get("rules", []) != want_rules:
        findings.fail(f"bootstrap Role rules {(bootstrap or {}).get('rules')}, expected {want_rules}")
    bound = any(b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{fullname}-bootstrap"}
                and b["metadata"]["namespace"] == NAMESPACE for b in by_kind.get("RoleBinding", []))
    if bool(want_rules) != bound:
        findings.fail(f"bootstrap RoleBinding present={bound}, expected {bool(want_rules)}")
    cluster_role = next((r for r in by_kind.get("ClusterRole", []) if r["metadata"]["name"] == fullname), {})
    webhook_rules = [r for r in cluster_role.get("rules", []) if "admissionregistration.k8s.io" in r.get("apiGroups", [])]
    want_webhook = [{"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
                     "resourceNames": [fullname], "verbs": ["get", "patch"]}] if patches_ca else []
    if webhook_rules != want_webhook:
        findings.fail(f"webhook configuration rights {webhook_rules}, expected {want_webhook}")


def check_test_pod(values: dict[str, Any], by_kind: dict[str, list[dict[str, Any]]], findings: Findings) -> None:
    """The `helm test` pod: a test hook, unprivileged, reading only ca.crt, calling the Service."""
    pods = by_kind.get("Pod", [])
    if values["webhook"]["url"]:
        if pods:
            findings.fail("a helm test pod is rendered for an out-of-cluster webhook")
        return
    if len(pods) != 1:
        findings.fail(f"expected one helm test pod, got {len(pods)}")
        return
    pod = pods[0]
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("helm.sh/hook") != "test":
        findings.fail("the test pod is not a helm.sh/hook: test")
    spec = pod["spec"]
    if spec.get("automountServiceAccountToken") is not False:
        findings.fail("the test pod must not get an API token")
    items = [i["key"] for v in spec["volumes"] for i in v.get("secret", {}).get("items", [])]
    if items != ["ca.crt"]:
        findings.fail(f"the test pod may mount ca.crt only, got {items}")
    script = spec["containers"][0]["args"][0]
    host = f"https://{RELEASE}.{NAMESPACE}.svc:{values['service']['port']}/mutate/pods"
    if host not in script:
        findings.fail(f"the test pod does not call {host}")
    labels = pod["metadata"].get("labels", {})
    for service in by_kind.get("Service", []):
        if all(labels.get(k) == v for k, v in service["spec"]["selector"].items()):
            findings.fail(f"Service {service['metadata']['name']} selects the test pod")
    review = json.loads((CHART / "files" / "helm-test-review.json").read_text())
    if review["request"].get("dryRun") is not True or "agentsecrets.io/owner" in json.dumps(review):
        findings.fail("the test review must be a dry run of an unlabelled pod (no side effects)")
    if f"'{json.dumps(review, separators=(',', ':'))}'" not in script:
        findings.fail("the test pod does not post files/helm-test-review.json as written")


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
    csrf = next(v for v in pod["volumes"] if v["name"] == "csrf")["secret"]["secretName"]
    if csrf != (ui["csrfKeySecret"] or f"{RELEASE}-ui-csrf"):
        findings.fail(f"the CSRF key is mounted from {csrf}, not ui.csrfKeySecret or the generated one")
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

    print("\n[README quick start: its helm command, as written]")
    check_readme_quickstart(findings)

    print("\n[values.yaml documents every value]")
    check_values_comments(findings)
    return summary(findings, "lint")


README = REPO / "README.md"
# What `kubectl auth whoami` prints for kind's (kubeadm's) admin kubeconfig: the quick start's
# command substitution, resolved offline.
SAMPLE_ADMIN = "kubernetes-admin"


def quickstart_commands() -> list[list[str]]:
    """The shell commands of the README's "Quick start on a cluster", as argv lists: fenced sh
    blocks, continuation lines joined, comments dropped, `$(kubectl auth whoami ...)` resolved
    to a sample username."""
    text = README.read_text()
    section = text.split("\n## Quick start on a cluster\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\$\(kubectl auth whoami [^)]*\)", SAMPLE_ADMIN, line)
            commands.append(shlex.split(line))
    return commands


def option(argv: list[str], *names: str) -> list[str]:
    """Every value of an option given as `NAME VALUE` or `NAME=VALUE`."""
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg[len(name) + 1:])
    return values


def deep_merge(into: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def check_readme_quickstart(findings: Findings) -> None:
    """Follow the README's quick start offline: the helm command renders and lints with the
    exact --set flags it gives, the names used afterwards are the ones it installs, the image
    it builds is the chart's, every file it applies exists and parses, and the principals it
    uses are the ones the install allows."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = None

    commands = quickstart_commands()
    if not commands:
        findings.fail("README.md: no shell commands under \"Quick start on a cluster\"")
        return
    with load_chart() as chart:
        defaults = chart.merge_values({})
        app_version = chart.app_version if hasattr(chart, "app_version") else None
    if app_version is None:
        app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = f"{defaults['image']['repository']}:{app_version}"
    release = namespace = None
    values: dict[str, Any] = {}
    created_namespaces: set[str] = set()
    pod_creators: dict[str, set[str]] = {}  # namespace -> principals granted create on pods
    for argv in commands:
        where = " ".join(argv)[:90]
        tool, rest = argv[0], argv[1:]
        if tool == "cargo" and rest[:1] == ["install"]:
            manifest = (REPO / "Cargo.toml").read_text()
            if tomllib is not None:
                bins = [b["name"] for b in tomllib.loads(manifest).get("bin", [])]
            else:
                bins = re.findall(r'^\[\[bin\]\]\s*\nname\s*=\s*"([^"]+)"', manifest, re.M)
            if option(argv, "--path") != ["."] or "agentsecrets" not in bins:
                findings.fail(f"{where}: does not install the agentsecrets binary from this repository")
            else:
                findings.ok(f"{where}: installs the `agentsecrets` binary")
        elif tool == "docker" and rest[:1] == ["build"]:
            tags = option(argv, "-t", "--tag")
            if tags != [image] or argv[-1] != "." or not (REPO / "Dockerfile").exists():
                findings.fail(f"{where}: builds {tags}, expected the chart's image {image} from ./Dockerfile")
            else:
                findings.ok(f"{where}: builds the chart's image {image}")
        elif tool == "kind" and rest[:2] == ["load", "docker-image"]:
            if rest[2] != image:
                findings.fail(f"{where}: loads {rest[2]}, expected the chart's image {image}")
            else:
                findings.ok(f"{where}: loads the chart's image")
        elif tool == "helm" and rest[:1] == ["install"]:
            release, chart_path = rest[1], rest[2]
            namespace = option(argv, "-n", "--namespace")[0]
            if (REPO / chart_path).resolve() != CHART:
                findings.fail(f"{where}: installs {chart_path}, not {CHART.relative_to(REPO)}")
            values = {}
            for expression in option(argv, "--set"):
                deep_merge(values, helm.parse_set_string(expression))
            if (release, namespace) != (RELEASE, NAMESPACE):
                findings.fail(f"{where}: release {release} in {namespace}; the README's later commands "
                              f"and manifests/ use {RELEASE} in {NAMESPACE}")
            with load_chart() as chart:
                try:
                    rendered = render(chart, values)
                except helm.HelmError as error:
                    findings.fail(f"{where}: does not render: {error}")
                    continue
            report = helm.lint(str(CHART), values, strict=True, namespace=namespace, kube_version=KUBE_VERSION)
            problems = [m for m in report.get("messages") or [] if m["severity"] >= 2] + (report.get("errors") or [])
            if problems:
                findings.fail(f"{where}: helm lint --strict: {problems}")
            else:
                findings.ok(f"helm install with the README's --set {values}: renders and lints")
            check_objects(Scenario("README quick start", values, expect_kinds={"Pod"}), rendered, findings)
        elif tool == "helm" and rest[:1] == ["test"]:
            if rest[1] != release or option(argv, "-n", "--namespace") != [namespace]:
                findings.fail(f"{where}: not the installed release {release} in {namespace}")
        elif tool == "kubectl":
            ns = (option(argv, "-n", "--namespace") or [None])[0]
            as_user = (option(argv, "--as") or [None])[0]
            verb = [a for a in rest if not a.startswith("-") and a not in (ns, as_user)][:3]
            if verb[:2] == ["rollout", "status"]:
                if verb[2] != f"deployment/{RELEASE}" or ns != namespace:
                    findings.fail(f"{where}: waits for {verb[2]} in {ns}, not the chart's Deployment")
            elif verb[:2] == ["create", "namespace"]:
                created_namespaces.add(verb[2])
            elif verb[:2] == ["create", "rolebinding"]:
                for account in option(argv, "--serviceaccount"):
                    sa_ns, sa_name = account.split(":", 1)
                    role = option(argv, "--role")[0]
                    pod_creators.setdefault(ns, set()).add((f"system:serviceaccount:{sa_ns}:{sa_name}", role))
            elif verb[:2] == ["create", "role"]:
                if "create" in ",".join(option(argv, "--verb")).split(",") and "pods" in ",".join(option(argv, "--resource")).split(","):
                    pod_creators.setdefault(ns, set()).add(("role", verb[2]))
            for path in option(argv, "-f", "--filename"):
                file = REPO / path
                if not file.exists():
                    findings.fail(f"{where}: {path} does not exist")
                    continue
                objects = [o for o in yaml.safe_load_all(file.read_text()) if o]
                for obj in objects:
                    obj_ns = obj["metadata"].get("namespace")
                    if obj_ns not in created_namespaces:
                        findings.fail(f"{where}: {path} uses namespace {obj_ns}, not created before")
                kinds = {o["kind"] for o in objects}
                if "AgentSecret" in kinds and as_user is None:
                    # Written as yourself: only a secret administrator may write others' secrets.
                    admins = values.get("ownerBinding", {}).get("administrators", [])
                    if SAMPLE_ADMIN not in admins:
                        findings.fail(f"{where}: you write other owners' AgentSecrets, but the install does "
                                      f"not make you a secret administrator ({admins})")
                if "Pod" in kinds:
                    pod_ns = next(o["metadata"]["namespace"] for o in objects if o["kind"] == "Pod")
                    allowed = values.get("allowedPrincipals", [])
                    roles = {r for kind, r in pod_creators.get(pod_ns, set()) if kind == "role"}
                    granted = {p for p, r in pod_creators.get(pod_ns, set()) if p != "role" and r in roles}
                    if as_user not in allowed:
                        findings.fail(f"{where}: the pod is created as {as_user or 'yourself'}, who is not in "
                                      f"allowedPrincipals {allowed}: the webhook denies it")
                    elif as_user not in granted:
                        findings.fail(f"{where}: {as_user} is never granted create on pods in {pod_ns}")
                    else:
                        findings.ok(f"{where}: created by {as_user}, allowed and granted")
                findings.ok(f"{path}: exists, {len(objects)} objects parse")
    if release is None:
        findings.fail("README.md: the quick start has no `helm install`")
    # One image name everywhere people copy it from.
    for doc in (README, REPO / "Dockerfile", CHART / "README.md"):
        for named in re.findall(r"docker (?:build -t|run --rm) (\S+)", doc.read_text()):
            if named != image:
                findings.fail(f"{doc.relative_to(REPO) if doc.is_relative_to(REPO) else doc}: image {named}, expected the chart's {image}")


def check_values_comments(findings: Findings) -> None:
    """Every leaf key in values.yaml has a comment line right above it (or belongs to an object
    documented as a whole by a `# --` comment above its key, such as a securityContext)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    documented_indent: int | None = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if documented_indent is not None and stripped and not stripped.startswith("#"):
            if indent > documented_indent:
                continue
            documented_indent = None
        if not stripped or stripped.startswith("#") or stripped.startswith("-") or ":" not in stripped:
            continue
        key, _, rest = stripped.partition(":")
        previous = lines[index - 1].strip() if index else ""
        if rest.strip() == "" and index + 1 < len(lines) and lines[index + 1].startswith(line[: len(line) - len(line.lstrip())] + "  "):
            first = index - 1
            while first > 0 and lines[first - 1].strip().startswith("#"):
                first -= 1
            if index and lines[first].strip().startswith("# --"):
                documented_indent = indent  # the object is documented whole
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
    # Not the `helm test` pod: `kubectl apply` would run it as part of the install.
    docs = sorted((d for d in documents(rendered) if not is_hook(d[2])), key=install_order)
    namespace = (
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n"
        "    app.kubernetes.io/part-of: agent-secrets\n"
    ).format(ns=NAMESPACE)
    header = f"""\
# agent-secrets {version}: the Helm chart charts/agent-secrets rendered for `kubectl apply`.
# GENERATED by `python3 hack/helm.py render`; do not edit (`python3 hack/helm.py check` fails
# when this file is out of date). See manifests/README.md.
#
# Rendered with release name {RELEASE}, namespace {NAMESPACE} and the chart's defaults (without
# the `helm test` pod). No key material: at its first start the operator creates the keyring
# Secret {KEYRING_SECRET} and the webhook's certificate Secret {TLS_SECRET}, and writes its CA
# into the MutatingWebhookConfiguration's caBundle; nothing (such as cert-manager) is needed first.
# Back the keyring Secret up once it exists. Re-applying this file never changes either Secret,
# nor the caBundle (this file sets no caBundle, so apply leaves the operator's alone).
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


def generated_files() -> dict[Path, str]:
    """Every file `render` writes: manifests/, and the narrowed policies the tests evaluate."""
    files = {MANIFESTS / name: text for name, text in manifest_files().items()}
    with load_chart() as chart:
        rendered = render(chart, NARROWED_VALUES)
    policies = [(p, t) for p, t, o in sorted(documents(rendered), key=install_order)
                if o.get("kind") in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")]
    header = f"""\
# The ValidatingAdmissionPolicies of charts/agent-secrets and their bindings, rendered with this
# webhook.objectSelector (tests/policies.rs evaluates them, tests/cluster/policies.rs applies
# them): {json.dumps(NARROWED_VALUES["webhook"]["objectSelector"])}
# GENERATED by `python3 hack/helm.py render`; do not edit (`python3 hack/helm.py check` fails
# when this file is out of date).
"""
    files[NARROWED_POLICIES] = header + "".join(f"---\n# Source: {p}\n{t}" for p, t in policies)
    return files


def is_hook(obj: dict[str, Any]) -> bool:
    return "helm.sh/hook" in ((obj.get("metadata") or {}).get("annotations") or {})


def key_material(text: str) -> list[str]:
    return [what for pattern, what in KEY_MATERIAL if pattern.search(text)]


# The one object allowed to differ between two renders: the Secrets page's CSRF key, made by
# Helm at install (and kept by `lookup`). It signs form tokens only; a new one merely expires
# open forms, unlike a key-encryption key or a CA.
def is_ui_csrf_secret(obj: dict[str, Any]) -> bool:
    return obj.get("kind") == "Secret" and obj["metadata"]["name"] == f"{RELEASE}-ui-csrf"


def check_renders_are_stable(findings: Findings) -> None:
    """Every scenario rendered twice, as `helm template`, Argo CD or helm-diff would: the same
    objects both times (so a re-render can never replace a key), and no key material."""
    with load_chart() as chart:
        for scenario in SCENARIOS:
            first, second = (
                [(p, t) for p, t, o in documents(render(chart, scenario.values)) if not is_ui_csrf_secret(o)]
                for _ in range(2)
            )
            if first != second:
                changed = sorted({p for (p, t), (_, u) in zip(first, second) if t != u})
                findings.fail(f"[{scenario.name}] a second render differs: {changed or 'object count'}")
            else:
                findings.ok(f"[{scenario.name}] two renders are identical")
            for path, text in first:
                found = key_material(text)
                if found:
                    findings.fail(f"[{scenario.name}] {path} renders {', '.join(found)}")
            secrets = [o["metadata"]["name"] for _, _, o in documents(render(chart, scenario.values))
                       if o.get("kind") == "Secret" and not is_ui_csrf_secret(o)]
            if secrets:
                findings.fail(f"[{scenario.name}] the chart renders Secrets {secrets}")


def cmd_render(_: argparse.Namespace) -> int:
    problems = crd_copy_problems()
    if problems:
        for problem in problems:
            print(f"error: {problem}")
        return 1
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
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

    print("\n[manifests/ and the tests' narrowed policies are the chart rendered]")
    for target, text in generated_files().items():
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
        found = key_material(text)
        if found:
            findings.fail(f"manifests/{name} embeds {', '.join(found)}")
        objects = [o for o in yaml.safe_load_all(text) if o is not None]
        broken = [o for o in objects if not (isinstance(o, dict) and o.get("apiVersion")
                                              and o.get("kind") and (o.get("metadata") or {}).get("name"))]
        if broken:
            findings.fail(f"manifests/{name}: {len(broken)} object(s) without apiVersion, kind or metadata.name")
        else:
            findings.ok(f"manifests/{name}: {len(objects)} objects, no key material")
    print("\n[helm template twice: no diff, no key material, no Secret]")
    check_renders_are_stable(findings)
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
    sub.add_parser("render", help="write manifests/ (and tests/rendered/) from the chart").set_defaults(run=cmd_render)
    sub.add_parser("check", help="fail when manifests/, tests/rendered/ or the chart's CRD copy is out of date").set_defaults(run=cmd_check)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
