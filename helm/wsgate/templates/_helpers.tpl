{{/* Chart name. */}}
{{- define "wsgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name (release-chart, at most 63 chars). */}}
{{- define "wsgate.fullname" -}}
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

{{- define "wsgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wsgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wsgate.labels" -}}
helm.sh/chart: {{ include "wsgate.chart" . }}
{{ include "wsgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsgate
{{- end -}}

{{- define "wsgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "wsgate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wsgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The chart's own Secret (API token and/or Redis URL). */}}
{{- define "wsgate.secretName" -}}
{{- include "wsgate.fullname" . -}}
{{- end -}}

{{- define "wsgate.redisFullname" -}}
{{- printf "%s-redis" (include "wsgate.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* True when the chart must create its Secret. */}}
{{- define "wsgate.createSecret" -}}
{{- if or (not .Values.apiToken.existingSecret) (and (not .Values.redis.enabled) .Values.redis.url (not .Values.redis.existingSecret)) -}}
true
{{- end -}}
{{- end -}}

{{/* True when the pods talk to Redis. */}}
{{- define "wsgate.redisConfigured" -}}
{{- if or .Values.redis.enabled .Values.redis.url .Values.redis.existingSecret -}}
true
{{- end -}}
{{- end -}}

{{/* True when a CA for Redis's TLS is mounted (redis.ca). */}}
{{- define "wsgate.redisCa" -}}
{{- if or .Values.redis.ca.existingSecret .Values.redis.ca.existingConfigMap -}}
true
{{- end -}}
{{- end -}}

{{/* Where the pods read the Redis CA (--redis-ca-file). */}}
{{- define "wsgate.redisCaFile" -}}
/etc/wsgate/redis-ca/ca.pem
{{- end -}}

{{/* terminationGracePeriodSeconds: explicit, or derived from the drain window. */}}
{{- define "wsgate.terminationGracePeriodSeconds" -}}
{{- $window := add (int .Values.drainTimeoutSeconds) (int .Values.preStop.sleepSeconds) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $window (int .Values.terminationGraceMarginSeconds) -}}
{{- else -}}
{{- $explicit := int .Values.terminationGracePeriodSeconds -}}
{{- if le $explicit $window -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than drainTimeoutSeconds + preStop.sleepSeconds (%d), or the kubelet kills pods in the middle of their drain" $explicit $window) -}}
{{- end -}}
{{- $explicit -}}
{{- end -}}
{{- end -}}

{{/* Configuration checks that the schema cannot express. */}}
{{- define "wsgate.validate" -}}
{{- $replicas := int .Values.replicaCount -}}
{{- if .Values.autoscaling.enabled -}}{{- $replicas = int .Values.autoscaling.maxReplicas -}}{{- end -}}
{{- if and (gt $replicas 1) (not (include "wsgate.redisConfigured" .)) -}}
{{- fail "more than one wsgate pod needs Redis so that messages reach users on every pod: set redis.enabled=true, redis.url or redis.existingSecret (or replicaCount=1 and autoscaling.enabled=false)" -}}
{{- end -}}
{{- if and .Values.redis.url .Values.redis.existingSecret -}}
{{- fail "set only one of redis.url and redis.existingSecret" -}}
{{- end -}}
{{- if and .Values.redis.enabled (or .Values.redis.url .Values.redis.existingSecret) -}}
{{- fail "redis.enabled deploys a Redis for wsgate: do not also set redis.url or redis.existingSecret" -}}
{{- end -}}
{{- if and (ne .Values.redis.mode "standalone") (or .Values.redis.enabled (not (or .Values.redis.url .Values.redis.existingSecret))) -}}
{{- fail "redis.mode sentinel or cluster needs your own Redis in redis.url or redis.existingSecret (the bundled Redis is standalone)" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "sentinel") (not .Values.redis.sentinelMaster) -}}
{{- fail "redis.mode sentinel needs redis.sentinelMaster (the master set the Sentinels watch)" -}}
{{- end -}}
{{- if and (ne .Values.redis.mode "sentinel") .Values.redis.sentinelMaster -}}
{{- fail "redis.sentinelMaster is only used with redis.mode sentinel" -}}
{{- end -}}
{{- if and .Values.redis.ca.existingSecret .Values.redis.ca.existingConfigMap -}}
{{- fail "set only one of redis.ca.existingSecret and redis.ca.existingConfigMap" -}}
{{- end -}}
{{- if include "wsgate.redisCa" . -}}
{{- if or .Values.redis.enabled (not (or .Values.redis.url .Values.redis.existingSecret)) -}}
{{- fail "redis.ca verifies your own rediss:// Redis in redis.url or redis.existingSecret (the bundled Redis is plain redis://)" -}}
{{- end -}}
{{- range $url := without (splitList "," .Values.redis.url) "" -}}
{{- if not (hasPrefix "rediss://" (trim $url)) -}}
{{- fail "redis.ca needs rediss:// URLs in redis.url (redis:// is plain TCP, with no certificate to verify)" -}}
{{- end -}}
{{- if contains "#insecure" $url -}}
{{- fail "redis.ca cannot verify a redis.url with #insecure, which turns verification off: drop #insecure" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.apiToken.value .Values.apiToken.existingSecret -}}
{{- fail "set only one of apiToken.value and apiToken.existingSecret" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) -}}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" -}}
{{- end -}}
{{- $_ := include "wsgate.terminationGracePeriodSeconds" . -}}
{{- end -}}

{{/* Labels of the bundled Redis (a different app name, so the gateway's selectors never match it). */}}
{{- define "wsgate.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgate.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wsgate.redisLabels" -}}
helm.sh/chart: {{ include "wsgate.chart" . }}
{{ include "wsgate.redisSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsgate
app.kubernetes.io/component: redis
{{- end -}}
