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
Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt).
*/}}
{{- define "agent-secrets.tlsSecretName" -}}
{{- printf "%s-tls" (include "agent-secrets.fullname" .) }}
{{- end }}

{{/*
Secret holding the keyring (key keyring.yaml): the user's or the one the chart generates.
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
