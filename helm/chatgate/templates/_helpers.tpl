{{/* Chart name, truncated to 63 chars (DNS label). */}}
{{- define "chatgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-based full name; the bundled services add suffixes, so keep room for them. */}}
{{- define "chatgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on everything the chart makes, except instance and the selector labels. */}}
{{- define "chatgate.metaLabels" -}}
helm.sh/chart: {{ include "chatgate.chart" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatgate
{{- end }}

{{/* Labels of the bundled services' resources (they add name and component). */}}
{{- define "chatgate.commonLabels" -}}
{{ include "chatgate.metaLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the gateway's resources. */}}
{{- define "chatgate.labels" -}}
{{ include "chatgate.metaLabels" . }}
{{ include "chatgate.selectorLabels" . }}
{{- end }}

{{/* Selector of the gateway pods. */}}
{{- define "chatgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "chatgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway image: repository@digest when image.digest is set (it wins over the tag), else
repository:tag (the chart's appVersion when the tag is empty). */}}
{{- define "chatgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding jwt-secret, redis-url and database-url. */}}
{{- define "chatgate.secretName" -}}
{{- default (include "chatgate.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
A value kept across upgrades: the given one, else the one already stored in the named Secret,
else a new random one. Call with (dict "ctx" $ "secret" NAME "key" KEY "given" VALUE).
*/}}
{{- define "chatgate.stableSecretValue" -}}
{{- if .given }}
{{- .given }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chatgate.redisName" -}}
{{- printf "%s-redis" (include "chatgate.fullname" .) }}
{{- end }}

{{- define "chatgate.postgresqlName" -}}
{{- printf "%s-postgresql" (include "chatgate.fullname" .) }}
{{- end }}

{{/*
The bundled PostgreSQL's password. Both the PostgreSQL Secret and the gateway's database URL
(in the gateway's Secret) hold it, so a generated one is made once per render and remembered.
*/}}
{{- define "chatgate.postgresqlPassword" -}}
{{- if not (hasKey .Values.postgresql "generatedPassword") }}
{{- $_ := set .Values.postgresql "generatedPassword" (include "chatgate.stableSecretValue" (dict "ctx" . "secret" (include "chatgate.postgresqlName" .) "key" "password" "given" .Values.postgresql.password)) }}
{{- end }}
{{- .Values.postgresql.generatedPassword }}
{{- end }}

{{/*
The REDIS_URL the chart puts in its Secret: the bundled Redis's, the external seeds (cluster
nodes or sentinels) joined with commas, or externalRedis.url. With redisTls every URL must be
rediss://: the CA and client certificate are of no use to a plain connection.
*/}}
{{- define "chatgate.redisUrl" -}}
{{- $url := "" }}
{{- if .Values.redis.enabled }}
{{- $url = printf "redis://%s:6379" (include "chatgate.redisName" .) }}
{{- else if .Values.externalRedis.seeds }}
{{- if eq .Values.config.redisMode "standalone" }}
{{- fail "externalRedis.seeds needs config.redisMode cluster or sentinel (standalone takes one externalRedis.url)" }}
{{- end }}
{{- $url = join "," .Values.externalRedis.seeds }}
{{- else }}
{{- $url = required "externalRedis.url is required (or externalRedis.seeds, redis.enabled=true, or auth.existingSecret)" .Values.externalRedis.url }}
{{- end }}
{{- if .Values.redisTls.existingSecret }}
{{- range splitList "," $url }}
{{- if not (hasPrefix "rediss://" (trim .)) }}
{{- fail (printf "redisTls is set, but REDIS_URL holds %s: use rediss:// URLs (TLS)" (regexReplaceAll "//[^@/]*@" (trim .) "//***@")) }}
{{- end }}
{{- end }}
{{- end }}
{{- $url }}
{{- end }}

{{/* The database URL the chart puts in its Secret: the bundled PostgreSQL's or the external one. */}}
{{- define "chatgate.databaseUrl" -}}
{{- if include "chatgate.useBundledPostgresql" . }}
{{- printf "postgres://%s:%s@%s:5432/%s" .Values.postgresql.database (include "chatgate.postgresqlPassword" . | urlquery) (include "chatgate.postgresqlName" .) .Values.postgresql.database }}
{{- else }}
{{- required "externalDatabase.url is required (or postgresql.enabled=true, or auth.existingSecret)" .Values.externalDatabase.url }}
{{- end }}
{{- end }}

{{/* Where the provider API keys are mounted (read-only). */}}
{{- define "chatgate.providerSecretsDir" -}}/var/run/secrets/chatgate-providers{{- end }}

{{/* CHATGATE_PROVIDER_ENV_FILE: NAME=/var/run/secrets/chatgate-providers/NAME,... */}}
{{- define "chatgate.providerEnvFile" -}}
{{- $dir := include "chatgate.providerSecretsDir" . }}
{{- $pairs := list }}
{{- range .Values.providerCredentials.keys }}
{{- $pairs = append $pairs (printf "%s=%s/%s" . $dir .) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* True when DATABASE_URL points at the bundled PostgreSQL. */}}
{{- define "chatgate.useBundledPostgresql" -}}
{{- if and .Values.postgresql.enabled (not .Values.auth.existingSecret) }}true{{ end }}
{{- end }}

{{/* Name of the claim behind /data when persistence is on. */}}
{{- define "chatgate.dataClaimName" -}}
{{- default (printf "%s-data" (include "chatgate.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Labels of the `helm test` pod (the NetworkPolicy lets it reach the gateway). */}}
{{- define "chatgate.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "chatgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/*
An extra (init) container as a list item: as given, with the chart's `securityContext` when it
has none (Pod Security `restricted`). Call with (dict "ctx" $ "container" C).
*/}}
{{- define "chatgate.extraContainer" -}}
{{- $container := deepCopy .container }}
{{- if and (not (hasKey $container "securityContext")) .ctx.Values.securityContext }}
{{- $_ := set $container "securityContext" .ctx.Values.securityContext }}
{{- end }}
{{- list $container | toYaml }}
{{- end }}
