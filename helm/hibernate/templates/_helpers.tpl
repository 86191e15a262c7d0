{{/* Names, labels and the image, shared by every template. */}}

{{- define "hibernate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, plus the chart name unless it is in there. */}}
{{- define "hibernate.fullname" -}}
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

{{- define "hibernate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "agent"). */}}
{{- define "hibernate.labels" -}}
helm.sh/chart: {{ include "hibernate.chart" .ctx }}
{{ include "hibernate.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: hibernate
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of a component's pods; call with (dict "ctx" $ "component" "agent"). */}}
{{- define "hibernate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hibernate.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* The image reference: repository@digest, else repository:tag (default: appVersion). */}}
{{- define "hibernate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* A component's ServiceAccount name; call with (dict "ctx" $ "component" "agent"). */}}
{{- define "hibernate.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "hibernate.fullname" .ctx) .component) $sa.name }}
{{- else }}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $sa.name }}
{{- end }}
{{- end }}

{{/* A component's selector labels as the operator's flags take them: a=b,c=d. */}}
{{- define "hibernate.selectorLabelsFlag" -}}
{{- $parts := list }}
{{- range $k, $v := include "hibernate.selectorLabels" . | fromYaml }}
{{- $parts = append $parts (printf "%s=%s" $k $v) }}
{{- end }}
{{- join "," $parts }}
{{- end }}

{{/* The selector of the release namespace, as seen from an engine's NetworkPolicy. */}}
{{- define "hibernate.releaseNamespaceSelector" -}}
{{- if .Values.networkPolicy.releaseNamespaceSelector }}
{{- toYaml .Values.networkPolicy.releaseNamespaceSelector }}
{{- else -}}
matchLabels:
  kubernetes.io/metadata.name: {{ .Release.Namespace }}
{{- end }}
{{- end }}

{{/* Restricted security context of the operator, gateway and hook containers. */}}
{{- define "hibernate.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Restricted pod security context: the image's non-root user, RuntimeDefault seccomp. */}}
{{- define "hibernate.restrictedPodSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}
