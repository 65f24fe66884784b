{{- define "memserve.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "memserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "memserve.authSecret" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecret }}{{- else -}}{{ include "memserve.fullname" . }}-auth{{- end -}}
{{- end -}}

{{- define "memserve.env" -}}
- name: MEMSERVE_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- if or .Values.auth.token .Values.auth.existingSecret }}
- name: MEMSERVE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "memserve.authSecret" . }}
      key: {{ .Values.auth.key }}
{{- end }}
{{- end -}}

{{/* How the kubelet asks a server whether it is up. gRPC health without TLS; over TLS the HTTP
API's /ready (the kubelet does not check the certificate); with mutual TLS the kubelet has no
client certificate, so only whether the gRPC port accepts connections. */}}
{{- define "memserve.probe" -}}
{{- if not .Values.tls.enabled -}}
grpc: {port: {{ .Values.server.port }}}
{{- else if not .Values.tls.mutual -}}
httpGet: {path: /ready, port: http, scheme: HTTPS}
{{- else -}}
tcpSocket: {port: grpc}
{{- end -}}
{{- end -}}
