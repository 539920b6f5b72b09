{{/*
Chart name, truncated to 63 characters (the longest label value).
*/}}
{{- define "agent-secrets.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name used as the prefix of every object. Truncated to 63 characters because
some Kubernetes name fields are limited to a DNS label.
*/}}
{{- define "agent-secrets.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "agent-secrets.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "agent-secrets.labels" -}}
helm.sh/chart: {{ include "agent-secrets.chart" . }}
{{ include "agent-secrets.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: agent-secrets
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the operator pods (immutable in a Deployment: never add to them).
*/}}
{{- define "agent-secrets.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-secrets.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
ServiceAccount the operator runs as.
*/}}
{{- define "agent-secrets.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agent-secrets.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt; and ca.key when the
operator generates it), written by the operator or by cert-manager, never by Helm.
*/}}
{{- define "agent-secrets.tlsSecretName" -}}
{{- printf "%s-tls" (include "agent-secrets.fullname" .) }}
{{- end }}

{{/*
Secret holding the keyring (key keyring.yaml): the user's, or the one the operator creates.
*/}}
{{- define "agent-secrets.keyringSecretName" -}}
{{- default (printf "%s-keyring" (include "agent-secrets.fullname" .)) .Values.keyring.existingSecret }}
{{- end }}

{{/*
Service name; also the first DNS name of the serving certificate.
*/}}
{{- define "agent-secrets.serviceName" -}}
{{- include "agent-secrets.fullname" . }}
{{- end }}

{{/*
DNS names the webhook's serving certificate must cover: every form the Service is reached by.
*/}}
{{- define "agent-secrets.webhookDNSNames" -}}
{{- $svc := include "agent-secrets.serviceName" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/*
Namespaces never touched, as a JSON list: kube-system, the release namespace (the operator must
never depend on its own webhook to start) and the user's list, without duplicates.
*/}}
{{- define "agent-secrets.excludedNamespaces" -}}
{{- concat (list "kube-system" .Release.Namespace) .Values.excludedNamespaces | uniq | toJson }}
{{- end }}

{{/*
Container image reference: the digest wins over the tag; the tag defaults to appVersion.
*/}}
{{- define "agent-secrets.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the cert-manager Certificate for the serving certificate (for cert-manager.io/inject-ca-from).
*/}}
{{- define "agent-secrets.certificateName" -}}
{{- printf "%s-webhook" (include "agent-secrets.fullname" .) }}
{{- end }}

{{/*
clientConfig of a webhook: the in-cluster Service, or webhook.url in development.
Called with (list $ path caBundle); caBundle is base64 PEM, omitted when empty (cert-manager
injects it, or the API server's system roots are used).
*/}}
{{- define "agent-secrets.webhookClientConfig" -}}
{{- $root := index . 0 }}
{{- $path := index . 1 }}
{{- $caBundle := index . 2 }}
{{- if $root.Values.webhook.url }}
# Development: an out-of-cluster webhook reached by URL.
url: {{ printf "%s%s" (trimSuffix "/" $root.Values.webhook.url) $path | quote }}
{{- else }}
service:
  name: {{ include "agent-secrets.serviceName" $root }}
  namespace: {{ $root.Release.Namespace }}
  path: {{ $path | quote }}
  port: {{ $root.Values.service.port }}
{{- end }}
{{- if $caBundle }}
caBundle: {{ $caBundle }}
{{- end }}
{{- end }}

{{/*
Username the operator's ServiceAccount authenticates as; the admission policies let it (and
only it) write pod-scoped Secrets.
*/}}
{{- define "agent-secrets.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "agent-secrets.serviceAccountName" .) }}
{{- end }}

{{/*
Reserved name prefix of pod-scoped Secrets (agent_secrets::api::POD_SECRET_NAME_PREFIX).
*/}}
{{- define "agent-secrets.podSecretPrefix" -}}
asec-pod-
{{- end }}

{{/*
CEL: true when the Secret reference `field` of the CEL object `object` (called with
(list object field)) names a pod-scoped Secret other than the one the pod is annotated with.
The has() guard comes first: a reference without a name is no reference to such a Secret.
*/}}
{{- define "agent-secrets.cel.foreignPodSecret" -}}
{{- $object := index . 0 }}
{{- $field := index . 1 }}
{{- $prefix := include "agent-secrets.podSecretPrefix" nil }}
{{- printf "(has(%s.%s) && %s.%s.startsWith('%s') && %s.%s != variables.secretName)" $object $field $object $field $prefix $object $field }}
{{- end }}

{{/*
CEL: true when container `c` uses a foreign pod-scoped Secret (env secretKeyRef, envFrom).
*/}}
{{- define "agent-secrets.cel.containerUsesForeign" -}}
(has(c.env) && c.env.exists(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef) && {{ include "agent-secrets.cel.foreignPodSecret" (list "e.valueFrom.secretKeyRef" "name") }}))
|| (has(c.envFrom) && c.envFrom.exists(f, has(f.secretRef) && {{ include "agent-secrets.cel.foreignPodSecret" (list "f.secretRef" "name") }}))
{{- end }}

{{/*
CEL: the foreign pod-scoped Secret names container `c` uses, as a list of strings (messages).
*/}}
{{- define "agent-secrets.cel.containerForeignNames" -}}
((has(c.env) ? c.env.filter(e, has(e.valueFrom) && has(e.valueFrom.secretKeyRef) && {{ include "agent-secrets.cel.foreignPodSecret" (list "e.valueFrom.secretKeyRef" "name") }}).map(e, e.valueFrom.secretKeyRef.name) : [])
 + (has(c.envFrom) ? c.envFrom.filter(f, has(f.secretRef) && {{ include "agent-secrets.cel.foreignPodSecret" (list "f.secretRef" "name") }}).map(f, f.secretRef.name) : []))
{{- end }}

{{/*
One validation refusing a list of containers (called with (list CEL-list-expression "kind of
container" optional)) when any of them uses a foreign pod-scoped Secret.
*/}}
{{- define "agent-secrets.cel.containersValidation" -}}
{{- $list := index . 0 }}
{{- $what := index . 1 }}
{{- $optional := index . 2 -}}
- expression: >-
    {{ if $optional }}!has({{ $list }}) || {{ end }}!{{ $list }}.exists(c,
    {{- include "agent-secrets.cel.containerUsesForeign" . | nindent 4 }})
  messageExpression: >-
    {{ $list }}.filter(c,
    {{- include "agent-secrets.cel.containerUsesForeign" . | nindent 4 }}
    ).map(c, '{{ $what }} "' + c.name + '" uses Secret ' + {{ include "agent-secrets.cel.containerForeignNames" . | nindent 4 }}.join(', ')
    ).join('; ') + '. ' + variables.rule
  reason: Forbidden
{{- end }}

{{/*
CEL: true when the object `o` (a Secret, or null) is pod-scoped: by label, or by name or
generateName in the reserved prefix.
*/}}
{{- define "agent-secrets.cel.podScoped" -}}
({{ . }} != null && ((has({{ . }}.metadata.labels) && 'agentsecrets.io/pod-scoped' in {{ . }}.metadata.labels)
  || (has({{ . }}.metadata.name) && {{ . }}.metadata.name.startsWith('{{ include "agent-secrets.podSecretPrefix" nil }}'))
  || (has({{ . }}.metadata.generateName) && {{ . }}.metadata.generateName.startsWith('{{ include "agent-secrets.podSecretPrefix" nil }}'))))
{{- end }}

{{/*
CEL: the value of a pod's agentsecrets.io/secret-name annotation, '' when absent (called with
"object" or "oldObject").
*/}}
{{/*
CEL: the owner label of a pod (`object` or `oldObject`), '' when absent.
*/}}
{{- define "agent-secrets.cel.ownerLabel" -}}
({{ . }} != null && has({{ . }}.metadata.labels) && 'agentsecrets.io/owner' in {{ . }}.metadata.labels ? {{ . }}.metadata.labels['agentsecrets.io/owner'] : '')
{{- end }}

{{/*
CEL: whether a pod has the secretless proxy sidecar (an init container named agentsecrets-proxy).
*/}}
{{- define "agent-secrets.cel.hasProxySidecar" -}}
({{ . }} != null && has({{ . }}.spec.initContainers) && {{ . }}.spec.initContainers.exists(c, c.name == 'agentsecrets-proxy'))
{{- end }}

{{/*
CEL: whether a container (`c`) mounts the secretless proxy's feed token.
*/}}
{{- define "agent-secrets.cel.mountsFeedToken" -}}
(has(c.volumeMounts) && c.volumeMounts.exists(m, m.name == 'agentsecrets-feed-token'))
{{- end }}

{{/*
CEL: whether a pod (`object` or `oldObject`: list of the root context and that name) matches
webhook.objectSelector (the requirements it adds to the chart's own owner-label selector), i.e.
whether the pod webhook is called for it once labelled; `true` when it adds none. Label selector
semantics, a pod without labels included: NotIn and DoesNotExist match a pod without the key.
Keys and values are written as JSON strings, which CEL reads as the same strings.
*/}}
{{- define "agent-secrets.cel.webhookCallsPod" -}}
{{- $root := index . 0 }}
{{- $pod := index . 1 }}
{{- $terms := list }}
{{- $selector := $root.Values.webhook.objectSelector }}
{{- range $key, $value := ($selector.matchLabels | default dict) }}
{{- $terms = append $terms (printf "(has(%s.metadata.labels) && %s in %s.metadata.labels && %s.metadata.labels[%s] == %s)" $pod (toJson $key) $pod $pod (toJson $key) (toJson (toString $value))) }}
{{- end }}
{{- range ($selector.matchExpressions | default list) }}
{{- $has := printf "(has(%s.metadata.labels) && %s in %s.metadata.labels)" $pod (toJson .key) $pod }}
{{- $label := printf "%s.metadata.labels[%s]" $pod (toJson .key) }}
{{- if eq .operator "In" }}
{{- $terms = append $terms (printf "(%s && %s in %s)" $has $label (toJson .values)) }}
{{- else if eq .operator "NotIn" }}
{{- $terms = append $terms (printf "(!%s || !(%s in %s))" $has $label (toJson .values)) }}
{{- else if eq .operator "Exists" }}
{{- $terms = append $terms $has }}
{{- else if eq .operator "DoesNotExist" }}
{{- $terms = append $terms (printf "!%s" $has) }}
{{- else }}
{{- fail (printf "webhook.objectSelector: unknown operator %q" .operator) }}
{{- end }}
{{- end }}
{{- if $terms }}({{ $pod }} != null && {{ join " && " $terms }}){{ else }}true{{ end }}
{{- end }}

{{- define "agent-secrets.cel.secretNameAnnotation" -}}
({{ . }} != null && has({{ . }}.metadata.annotations) && 'agentsecrets.io/secret-name' in {{ . }}.metadata.annotations ? {{ . }}.metadata.annotations['agentsecrets.io/secret-name'] : '')
{{- end }}

{{/*
CEL: true when volume `v` mounts a foreign pod-scoped Secret (secret, projected secret source).
*/}}
{{- define "agent-secrets.cel.volumeUsesForeign" -}}
(has(v.secret) && {{ include "agent-secrets.cel.foreignPodSecret" (list "v.secret" "secretName") }})
|| (has(v.projected) && has(v.projected.sources) && v.projected.sources.exists(s, has(s.secret) && {{ include "agent-secrets.cel.foreignPodSecret" (list "s.secret" "name") }}))
{{- end }}

{{/*
CEL: the foreign pod-scoped Secret names volume `v` mounts, as a list of strings (messages).
*/}}
{{- define "agent-secrets.cel.volumeForeignNames" -}}
(((has(v.secret) && {{ include "agent-secrets.cel.foreignPodSecret" (list "v.secret" "secretName") }}) ? [v.secret.secretName] : [])
 + (has(v.projected) && has(v.projected.sources) ? v.projected.sources.filter(s, has(s.secret) && {{ include "agent-secrets.cel.foreignPodSecret" (list "s.secret" "name") }}).map(s, s.secret.name) : []))
{{- end }}

{{/*
RBAC rules on Secrets and Pods: cluster-wide in the ClusterRole, or, with sandboxNamespaces, in
a ClusterRole bound in each sandbox namespace only.
*/}}
{{- define "agent-secrets.sandboxRules" -}}
# Secrets: the webhook creates one immutable pod-scoped Secret per owner, set of secrets and
# reuse window (create), and when that name is taken, reads its metadata to see whether it is
# the same one (get); the webhook and the controller watch their metadata through a label
# selector (list, watch); the controller deletes those no pod names once their window has
# ended (delete). RBAC cannot restrict by label or name prefix, so this covers every Secret in
# scope (confine it with sandboxNamespaces). No update or patch: the Secrets are immutable.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Pods: the controller watches sandbox pods' metadata (label agentsecrets.io/owner) to know
# which pod-scoped Secrets a live pod names (list, watch). Read-only: a pod is changed only by
# the admission response.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- if .Values.feed.enabled }}
# Pods: the value feed reads the pod a proxy's token is bound to, to check it is a secretless
# sandbox and whose (get).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
{{- end }}
{{- end }}

{{/*
Namespaces the webhooks are called for when sandboxNamespaces is set; refuses to render when one
of them is also excluded (it would silently get no injection).
*/}}
{{- define "agent-secrets.sandboxNamespaces" -}}
{{- $excluded := include "agent-secrets.excludedNamespaces" . | fromJsonArray }}
{{- range .Values.sandboxNamespaces }}
{{- if has . $excluded }}
{{- fail (printf "sandboxNamespaces: %s is also excluded (kube-system, the release namespace and excludedNamespaces never get injection)" .) }}
{{- end }}
{{- end }}
{{- .Values.sandboxNamespaces | toJson }}
{{- end }}

{{/*
"true" when the operator generates and renews the webhook's certificate itself (no cert-manager).
*/}}
{{- define "agent-secrets.operatorManagesTLS" -}}
{{- if not .Values.certManager.enabled }}true{{ end }}
{{- end }}

{{/*
"true" when the operator patches the caBundle of the chart's webhook configuration: it
generates the certificate and the API server calls the in-cluster Service (with webhook.url
the caBundle is the user's webhook.caBundle).
*/}}
{{- define "agent-secrets.operatorPatchesCABundle" -}}
{{- if and (include "agent-secrets.operatorManagesTLS" .) (not .Values.webhook.url) }}true{{ end }}
{{- end }}

{{/*
A label selector: the chart's own matchExpressions (called with (list requirements extra)),
then the user's extra matchExpressions and matchLabels. Kubernetes ANDs every term of a
selector, so the user's terms can narrow the chart's but never widen them.
*/}}
{{- define "agent-secrets.selector" -}}
{{- $own := index . 0 }}
{{- $extra := index . 1 -}}
matchExpressions:
  {{- toYaml (concat $own (default list $extra.matchExpressions)) | nindent 2 }}
{{- with $extra.matchLabels }}
matchLabels:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
namespaceSelector of both webhooks: never kube-system, the release namespace or
excludedNamespaces; with sandboxNamespaces, only those; then webhook.namespaceSelector.
*/}}
{{- define "agent-secrets.webhookNamespaceSelector" -}}
{{- $own := list (dict "key" "kubernetes.io/metadata.name" "operator" "NotIn" "values" (include "agent-secrets.excludedNamespaces" . | fromJsonArray)) }}
{{- if .Values.sandboxNamespaces }}
{{- $own = append $own (dict "key" "kubernetes.io/metadata.name" "operator" "In" "values" (include "agent-secrets.sandboxNamespaces" . | fromJsonArray)) }}
{{- end }}
{{- include "agent-secrets.selector" (list $own .Values.webhook.namespaceSelector) }}
{{- end }}

{{/*
objectSelector of the pod webhook: only pods labelled with an owner; then webhook.objectSelector.
*/}}
{{- define "agent-secrets.podObjectSelector" -}}
{{- $own := list (dict "key" "agentsecrets.io/owner" "operator" "Exists") }}
{{- include "agent-secrets.selector" (list $own .Values.webhook.objectSelector) }}
{{- end }}
