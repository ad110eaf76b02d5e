{{/* Names and labels. */}}
{{- define "flotilla.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "inventory") */}}
{{- define "flotilla.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flotilla.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
"true" when this release's services reach NATS through the member's own
leaf node server (leaf.enabled on a member), else empty.
*/}}
{{- define "flotilla.viaLeaf" -}}
{{- if .Values.leaf.enabled -}}
{{- if .Values.hub.enabled -}}
{{- fail "leaf.enabled is for a member cluster: set hub.enabled=false (the hub's services connect to the hub's NATS itself)" -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
The bus settings every service takes (crates/kit BusArgs), for one NATS
user: (dict "root" $ "user" "inventory"). Through a member's leaf node
server there are no credentials and no TLS (the leaf holds them), but
replies must come to the leaf user's inboxes (`Role::inbox_prefix` in
crates/nats-auth: `_INBOX.<user>`), the only ones the hub sends over the
leaf connection.
*/}}
{{- define "flotilla.natsEnv" -}}
{{- $v := .root.Values.nats -}}
{{- if include "flotilla.viaLeaf" .root -}}
- name: FLOTILLA_NATS_URL
  value: {{ printf "nats://%s-leaf:4222" (include "flotilla.fullname" .root) | quote }}
- name: FLOTILLA_NATS_INBOX_PREFIX
  value: {{ printf "_INBOX.%s" .user | quote }}
- name: FLOTILLA_SUBJECT_PREFIX
  value: {{ $v.subjectPrefix | quote }}
- name: FLOTILLA_STREAM_REPLICAS
  value: {{ $v.streamReplicas | quote }}
- name: FLOTILLA_LOG_FORMAT
  value: {{ .root.Values.logFormat | quote }}
{{- else -}}
- name: FLOTILLA_NATS_URL
  value: {{ $v.url | quote }}
- name: FLOTILLA_SUBJECT_PREFIX
  value: {{ $v.subjectPrefix | quote }}
- name: FLOTILLA_STREAM_REPLICAS
  value: {{ $v.streamReplicas | quote }}
- name: FLOTILLA_LOG_FORMAT
  value: {{ .root.Values.logFormat | quote }}
{{- if $v.credentialsSecret }}
- name: FLOTILLA_NATS_USER
  value: {{ .user | quote }}
- name: FLOTILLA_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.credentialsSecret }}
      key: {{ .user }}
{{- end }}
{{- if $v.tls.enabled }}
- name: FLOTILLA_NATS_REQUIRE_TLS
  value: "true"
- name: FLOTILLA_NATS_TLS_CA
  value: /etc/flotilla/nats-tls/ca.crt
{{- if $v.tls.clientCertificate }}
- name: FLOTILLA_NATS_TLS_CERT
  value: /etc/flotilla/nats-tls/tls.crt
- name: FLOTILLA_NATS_TLS_KEY
  value: /etc/flotilla/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The client TLS files of a service that connects to the hub's NATS itself. */}}
{{- define "flotilla.natsTlsVolume" -}}
{{- if and .Values.nats.tls.enabled (not (include "flotilla.viaLeaf" .)) }}
- name: nats-tls
  secret:
    secretName: {{ required "nats.tls.secretName is required with nats.tls.enabled" .Values.nats.tls.secretName }}
{{- end }}
{{- end -}}

{{- define "flotilla.natsTlsMount" -}}
{{- if and .Values.nats.tls.enabled (not (include "flotilla.viaLeaf" .)) }}
- name: nats-tls
  mountPath: /etc/flotilla/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod-level settings shared by every workload. */}}
{{- define "flotilla.podCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
edge.url, checked: the executor reports it and the hub's global gateway
connects to it over mutual TLS, so it is required and https.
*/}}
{{- define "flotilla.edgeUrl" -}}
{{- $url := .Values.edge.url -}}
{{- if not $url -}}
{{- fail "edge.url is required with edge.enabled: the URL the hub's global gateway reaches this cluster's edge at, such as https://edge.eu-1.example:8443" -}}
{{- end -}}
{{- if not (hasPrefix "https://" $url) -}}
{{- fail (printf "edge.url %q must start with https://: the edge serves the hub over mutual TLS" $url) -}}
{{- end -}}
{{- $url -}}
{{- end -}}
