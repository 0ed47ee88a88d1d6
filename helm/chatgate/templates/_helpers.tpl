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
Where each secret variable comes from, as YAML: {name, key} of a Secret, plus `chart: true` when
that Secret is the chart's own (rendered from the values). Per-key references win, then
auth.existingSecret, then the chart's Secret. The JWT secret is in the chart's Secret only when
given (auth.jwtSecret) or generated (auth.generate); otherwise the pods read the Secret
<fullname>-jwt, made out of band: nothing random at render time.
*/}}
{{- define "chatgate.jwtSecretSource" -}}
{{- $a := .Values.auth }}
{{- if $a.jwtSecretRef.name }}
{{- dict "name" $a.jwtSecretRef.name "key" $a.jwtSecretRef.key | toYaml }}
{{- else if $a.existingSecret }}
{{- dict "name" $a.existingSecret "key" $a.jwtSecretKey | toYaml }}
{{- else if or $a.jwtSecret $a.generate }}
{{- dict "name" (include "chatgate.fullname" .) "key" $a.jwtSecretKey "chart" true | toYaml }}
{{- else }}
{{- dict "name" (include "chatgate.outOfBandJwtSecretName" .) "key" $a.jwtSecretKey | toYaml }}
{{- end }}
{{- end }}

{{- define "chatgate.outOfBandJwtSecretName" -}}
{{- printf "%s-jwt" (include "chatgate.fullname" .) }}
{{- end }}

{{- define "chatgate.databaseUrlSource" -}}
{{- $a := .Values.auth }}
{{- if $a.databaseUrlRef.name }}
{{- dict "name" $a.databaseUrlRef.name "key" $a.databaseUrlRef.key | toYaml }}
{{- else if $a.existingSecret }}
{{- dict "name" $a.existingSecret "key" $a.databaseUrlKey | toYaml }}
{{- else }}
{{- dict "name" (include "chatgate.fullname" .) "key" $a.databaseUrlKey "chart" true | toYaml }}
{{- end }}
{{- end }}

{{/* REDIS_URL's source; `composed: true` with auth.redisPasswordRef (a literal URL that expands
$(REDIS_PASSWORD), see chatgate.redisUrlWithPasswordRef). */}}
{{- define "chatgate.redisUrlSource" -}}
{{- $a := .Values.auth }}
{{- if $a.redisUrlRef.name }}
{{- dict "name" $a.redisUrlRef.name "key" $a.redisUrlRef.key | toYaml }}
{{- else if $a.redisPasswordRef.name }}
{{- dict "composed" true | toYaml }}
{{- else if $a.existingSecret }}
{{- dict "name" $a.existingSecret "key" $a.redisUrlKey | toYaml }}
{{- else }}
{{- dict "name" (include "chatgate.fullname" .) "key" $a.redisUrlKey "chart" true | toYaml }}
{{- end }}
{{- end }}

{{/* True when the chart renders its own Secret (some variable comes from it). */}}
{{- define "chatgate.chartSecretNeeded" -}}
{{- if or (include "chatgate.jwtSecretSource" . | fromYaml).chart (include "chatgate.databaseUrlSource" . | fromYaml).chart (include "chatgate.redisUrlSource" . | fromYaml).chart }}true{{ end }}
{{- end }}

{{/*
REDIS_URL with auth.redisPasswordRef: every URL of chatgate.redisUrl with `:$(REDIS_PASSWORD)`
as its password (after the user name, if any), for Kubernetes to expand from the env var
REDIS_PASSWORD (a secretKeyRef) set just before. A URL that already holds a password is refused.
*/}}
{{- define "chatgate.redisUrlWithPasswordRef" -}}
{{- $items := list }}
{{- range splitList "," (include "chatgate.redisUrl" .) }}
{{- $item := trim . }}
{{- if regexMatch "^rediss?://[^/@]*:[^/@]*@" $item }}
{{- fail (printf "auth.redisPasswordRef is set, but %s holds a password already: leave it out of the URL" (regexReplaceAll "//[^@/]*@" $item "//***@")) }}
{{- else if regexMatch "^rediss?://[^/@]+@" $item }}
{{- $items = append $items (regexReplaceAll "^(rediss?://)([^/@]+)@" $item "${1}${2}:$$(REDIS_PASSWORD)@") }}
{{- else }}
{{- $items = append $items (regexReplaceAll "^(rediss?://)" $item "${1}:$$(REDIS_PASSWORD)@") }}
{{- end }}
{{- end }}
{{- join "," $items }}
{{- end }}

{{/*
A value kept across upgrades: the given one, else (auth.generate only) the one already stored in
the named Secret, else a new random one. Without auth.generate a missing value fails the render
with `what` in the message: nothing random at render time (GitOps).
Call with (dict "ctx" $ "secret" NAME "key" KEY "given" VALUE "what" HINT).
*/}}
{{- define "chatgate.stableSecretValue" -}}
{{- if .given }}
{{- .given }}
{{- else if not .ctx.Values.auth.generate }}
{{- fail (printf "%s: set it, or auth.generate=true to generate it at install (helm install/upgrade only: under helm template or Argo CD every render would make a new one)" .what) }}
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
{{- $_ := set .Values.postgresql "generatedPassword" (include "chatgate.stableSecretValue" (dict "ctx" . "secret" (include "chatgate.postgresqlName" .) "key" "password" "given" .Values.postgresql.password "what" "postgresql.password is empty")) }}
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
{{- $url := required "externalDatabase.url is required (or postgresql.enabled=true, or auth.existingSecret)" .Values.externalDatabase.url }}
{{- with .Values.postgresTls }}
{{- if and (or .sslMode .existingConfigMap .existingSecret) (regexMatch "[?&](sslmode|ssl-mode|sslrootcert|ssl-root-cert|ssl-ca)=" $url) }}
{{- fail "postgresTls is set, but externalDatabase.url has its own sslmode or sslrootcert (which would win): keep them in postgresTls only" }}
{{- end }}
{{- end }}
{{- $url }}
{{- end }}
{{- end }}

{{/* Where postgresTls's CA bundle is mounted (read-only), and its file (PGSSLROOTCERT). */}}
{{- define "chatgate.postgresCaDir" -}}/etc/chatgate/postgres-ca{{- end }}
{{- define "chatgate.postgresCaFile" -}}{{ include "chatgate.postgresCaDir" . }}/ca.crt{{- end }}

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
{{- if and .Values.postgresql.enabled (include "chatgate.databaseUrlSource" . | fromYaml).chart }}true{{ end }}
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

{{/*
The proxies whose X-Forwarded-For is believed (comma list, or empty): config.trustedProxies, else
the cluster's private ranges when an Ingress or HTTPRoute fronts the pods and
config.trustClusterNetworksBehindIngress is on.
*/}}
{{- define "chatgate.trustedProxies" -}}
{{- if .Values.config.trustedProxies -}}
{{- join "," .Values.config.trustedProxies -}}
{{- else if and .Values.config.trustClusterNetworksBehindIngress (or .Values.ingress.enabled .Values.httpRoute.enabled) -}}
10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10
{{- end -}}
{{- end }}

{{/*
The container port serving /metrics, /healthz and /readyz: the internal one when internalPort is set.
*/}}
{{- define "chatgate.operationsPort" -}}
{{- if .Values.internalPort -}}internal{{- else -}}http{{- end -}}
{{- end }}

{{/* Where auth.mountAsFiles mounts the gateway's own secrets (read-only; no sandbox binds it). */}}
{{- define "chatgate.gatewaySecretsDir" -}}/var/run/secrets/chatgate{{- end }}

{{/*
auth.mountAsFiles: the gateway's secret files as YAML {files: [{var, file, name, key}]}: the *_FILE
variable, the file's name in chatgate.gatewaySecretsDir, and the Secret and key it is projected
from (the same sources as the variables: *Ref, existingSecret, the chart's Secret; redisTls). Fails
unless every provider CLI runs under bubblewrap (sandbox.mode bwrap): an unsandboxed CLI runs as
the gateway's uid and could read the files, whereas bubblewrap binds neither their directory nor
the gateway's /proc (src/runtime/sandbox/bwrap.rs). Fails too for what a file cannot hold (the
REDIS_URL that Kubernetes composes with auth.redisPasswordRef) and for a sandbox.roPaths entry
that would bind the directory into every sandbox.
*/}}
{{- define "chatgate.secretFiles" -}}
{{- $dir := include "chatgate.gatewaySecretsDir" . }}
{{- if ne .Values.sandbox.mode "bwrap" }}
{{- fail (printf "auth.mountAsFiles needs sandbox.mode=bwrap (it is %s): without bubblewrap a provider CLI runs as the gateway's uid and could read the secret files under %s; bubblewrap shows a CLI neither that directory nor the gateway's /proc. Set sandbox.mode=bwrap (with sandbox.podSettings or a runtime that allows it), or leave auth.mountAsFiles off (the secrets then stay environment variables of the non-dumpable gateway)" .Values.sandbox.mode $dir) }}
{{- end }}
{{- range .Values.sandbox.roPaths }}
{{- $path := trimSuffix "/" . }}
{{- range list $dir (trimPrefix "/var" $dir) }}
{{- if or (eq $path "") (eq $path .) (hasPrefix (printf "%s/" $path) .) (hasPrefix (printf "%s/" .) $path) }}
{{- fail (printf "auth.mountAsFiles: sandbox.roPaths entry %s would bind the secret files (%s) into every sandbox" $path .) }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq .name "CHATGATE_SANDBOX" }}
{{- fail "auth.mountAsFiles pins CHATGATE_SANDBOX=bwrap: leave CHATGATE_SANDBOX out of extraEnv (set sandbox.mode)" }}
{{- end }}
{{- end }}
{{- $jwt := include "chatgate.jwtSecretSource" . | fromYaml }}
{{- $redis := include "chatgate.redisUrlSource" . | fromYaml }}
{{- $db := include "chatgate.databaseUrlSource" . | fromYaml }}
{{- if $redis.composed }}
{{- fail "auth.mountAsFiles does not combine with auth.redisPasswordRef: Kubernetes composes that REDIS_URL from an environment variable, and a file holds a whole URL. Put the URL, password included, in a Secret (auth.redisUrlRef or auth.existingSecret)" }}
{{- end }}
{{- $files := list }}
{{- $files = append $files (dict "var" "CHATGATE_JWT_SECRET_FILE" "file" "jwt-secret" "name" $jwt.name "key" $jwt.key) }}
{{- $files = append $files (dict "var" "REDIS_URL_FILE" "file" "redis-url" "name" $redis.name "key" $redis.key) }}
{{- $files = append $files (dict "var" "DATABASE_URL_FILE" "file" "database-url" "name" $db.name "key" $db.key) }}
{{- with .Values.redisTls }}
{{- if .existingSecret }}
{{- range $file, $key := dict "redis-tls-ca" .caKey "redis-tls-cert" .certKey "redis-tls-key" .keyKey }}
{{- if $key }}
{{- $var := printf "CHATGATE_%s_FILE" ($file | upper | replace "-" "_") }}
{{- $files = append $files (dict "var" $var "file" $file "name" $.Values.redisTls.existingSecret "key" $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- dict "files" $files | toYaml }}
{{- end }}
