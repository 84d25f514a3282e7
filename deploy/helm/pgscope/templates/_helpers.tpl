{{/* Names and labels. */}}
{{- define "pgscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgscope.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pgscope.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pgscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pgscope.labels" -}}
helm.sh/chart: {{ include "pgscope.chart" . }}
{{ include "pgscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pgscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pgscope.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pgscope.secretName" -}}
{{- default (include "pgscope.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{- define "pgscope.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Whether the container gets the upstream password from the Secret. */}}
{{- define "pgscope.hasUpstreamPassword" -}}
{{- if .Values.secret.existingSecret -}}
{{- if .Values.secret.upstreamPasswordKey }}true{{ end -}}
{{- else if .Values.upstream.password }}true{{ end -}}
{{- end -}}

{{- define "pgscope.upstreamPasswordKey" -}}
{{- if .Values.secret.existingSecret }}{{ .Values.secret.upstreamPasswordKey }}{{ else }}upstream-password{{ end -}}
{{- end -}}

{{/* Whether the container gets an HTTP bearer token from the Secret. */}}
{{- define "pgscope.hasHttpToken" -}}
{{- if .Values.secret.existingSecret -}}
{{- if .Values.secret.httpTokenKey }}true{{ end -}}
{{- else }}true{{ end -}}
{{- end -}}

{{- define "pgscope.httpTokenKey" -}}
{{- if .Values.secret.existingSecret }}{{ .Values.secret.httpTokenKey }}{{ else }}http-token{{ end -}}
{{- end -}}

{{/* The chart's Secret's http-token: .Values.httpToken, else the one an earlier release stored
     (so upgrades keep it), else a new random one. */}}
{{- define "pgscope.httpToken" -}}
{{- if .Values.httpToken -}}
{{- .Values.httpToken -}}
{{- else -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "pgscope.fullname" .) -}}
{{- if and $old $old.data (index $old.data "http-token") -}}
{{- index $old.data "http-token" | b64dec -}}
{{- else -}}
{{- randAlphaNum 40 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pgscope.authFileKey" -}}
{{- if .Values.secret.existingSecret }}{{ .Values.secret.authFileKey }}{{ else }}auth.txt{{ end -}}
{{- end -}}

{{/* HOST:PORT for pgscope's listen keys; an IPv6 host gets brackets. Argument: (list host port). */}}
{{- define "pgscope.hostport" -}}
{{- $host := index . 0 -}}
{{- if contains ":" $host -}}
{{- printf "[%s]:%d" $host (int (index . 1)) -}}
{{- else -}}
{{- printf "%s:%d" $host (int (index . 1)) -}}
{{- end -}}
{{- end -}}

{{/* The upstream URL without its password (the container adds it from the Secret). */}}
{{- define "pgscope.upstreamURL" -}}
{{- with .Values.upstream -}}
{{- printf "postgresql://%s@%s:%d/%s" (urlquery .user) .host (int .port) (urlquery .database) -}}
{{- end -}}
{{- end -}}

{{/* One TOML value. Helm reads numbers in values files as float64: whole numbers are written as
     TOML integers (pgscope's float keys take integers too, its integer keys only integers). */}}
{{- define "pgscope.tomlValue" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if kindIs "float64" . -}}
{{- if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}
{{- . -}}
{{- else -}}
{{- fail (printf "pgscope config: cannot write %v (%s) as a TOML value" . (kindOf .)) -}}
{{- end -}}
{{- end -}}

{{/* pgscope.toml: .Values.config plus the keys the chart owns (listen, metrics_listen, upstream,
     auth_file). Top-level keys first, then each section ([inspect], [advisor]). */}}
{{- define "pgscope.configToml" -}}
{{- $cfg := deepCopy (default (dict) .Values.config) -}}
{{- $_ := set $cfg "listen" (include "pgscope.hostport" (list .Values.listenHost .Values.containerPorts.postgresql)) -}}
{{- $_ := set $cfg "metrics_listen" (include "pgscope.hostport" (list .Values.listenHost .Values.containerPorts.metrics)) -}}
{{- $_ := set $cfg "upstream" (include "pgscope.upstreamURL" .) -}}
{{- $_ := set $cfg "auth_file" "/etc/pgscope/secret/auth.txt" -}}
{{- if .Values.auth.hba }}
{{- $_ := set $cfg "auth_type" "hba" -}}
{{- $_ := set $cfg "auth_hba_file" "/etc/pgscope/config/hba.conf" -}}
{{- end }}
# pgscope configuration, rendered by the pgscope Helm chart from .Values.config
# (every key: docs/configuration.md). The upstream password comes from the environment.
{{- range $key, $value := $cfg }}
{{- if not (or (kindIs "map" $value) (kindIs "invalid" $value)) }}
{{ $key }} = {{ include "pgscope.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $section, $keys := $cfg }}
{{- if kindIs "map" $keys }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "pgscope.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* auth.txt in PgBouncer's userlist format: "user" "secret", a double quote doubled. */}}
{{- define "pgscope.authFile" -}}
# pgscope auth_file (PgBouncer userlist format), rendered from .Values.auth.users
{{- range $user, $secret := .Values.auth.users }}
"{{ replace "\"" "\"\"" (toString $user) }}" "{{ replace "\"" "\"\"" (toString $secret) }}"
{{- end }}
{{ end -}}
