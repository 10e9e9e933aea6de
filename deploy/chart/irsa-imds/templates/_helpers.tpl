{{/* Labels every object carries (Kubernetes recommended labels). */}}
{{- define "irsa-imds.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "irsa-imds.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: irsa-imds
{{- end }}

{{/* What the DaemonSet selects its pods by: fixed for a release's life. */}}
{{- define "irsa-imds.selectorLabels" -}}
app.kubernetes.io/name: irsa-imds
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "irsa-imds.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
