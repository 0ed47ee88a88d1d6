#!/usr/bin/env python3
"""Offline checks of chatgate's deployment files that schema validation cannot make.

kubernetes-validate checks each resource against the Kubernetes schemas; this script checks
what ties them together and to the gateway's contract (README.md "Configuration" and docs/protocol.md "REST"):

  manifests FILE...   rendered manifests (helm template / kustomize build output): selectors
                      match pods, references resolve, probes, drain timing, env names,
                      restricted security context (or exactly the bubblewrap opt-in), each
                      secret exactly once as an env var from a secretKeyRef (never a literal
                      or an argument, and a file only with every CLI in bubblewrap; the Redis
                      TLS PEM variables likewise), a known Redis mode with URLs that fit it
                      (and rediss:// with TLS), PostgreSQL's PGSSLMODE and PGSSLROOTCERT (a CA
                      file on a read-only volume), the image's entrypoint kept, WebSocket-safe
                      ingress timeouts; HTTPRoute
                      backends and timeouts, PrometheusRule alerts, NetworkPolicy selectors
                      and rules, the restricted `helm test` pod
  dockerfile DOCKERFILE DOCKERIGNORE
                      the image's contract: non-root user, tini entrypoint, bubblewrap
                      installed, the per-user layout, no HEALTHCHECK, the WITH_PROVIDERS build
                      argument and the four provider packages, a build context that keeps the
                      sources and leaves target/ and .git out
  readme VALUES README
                      every value in the chart's values.yaml is documented in its README
  alerts DOCS RENDERED
                      the rendered PrometheusRule has exactly the alerts of the docs' table

Exit status 0 when every check passes, 1 otherwise (each failure printed on its own line).
"""

import base64
import fnmatch
import json
import pathlib
import re
import sys

import yaml

# Environment variables of the contract's core flags (README.md "Configuration").
CONTRACT_ENV = {
    "CHATGATE_LISTEN", "DATABASE_URL", "REDIS_URL", "CHATGATE_JWT_SECRET", "CHATGATE_NODE_ID",
    "CHATGATE_PROVIDERS", "CHATGATE_WORKSPACES_ROOT", "CHATGATE_RUN_LEASE",
    "CHATGATE_REPLAY_RETENTION", "CHATGATE_REPLAY_MAX_EVENTS", "CHATGATE_ALLOWED_ORIGINS",
    "CHATGATE_MAX_FRAME_BYTES", "CHATGATE_SEND_QUEUE_BYTES", "CHATGATE_DRAIN_GRACE",
    "CHATGATE_LOG_FORMAT",
}
# Every variable the binary reads: the contract's and chatgate's own (limits, provider binaries, ...),
# taken from the flag definitions so that this list cannot fall behind src/config.rs.
CONFIG_RS = pathlib.Path(__file__).resolve().parents[2] / "src" / "config.rs"
KNOWN_ENV = CONTRACT_ENV | set(re.findall(r'env = "(CHATGATE_[A-Z0-9_]+)"', CONFIG_RS.read_text()))
# Containment (issue 13): listed here too, so the deployment files may name them before
# src/config.rs does.
CONTAINMENT_ENV = {
    "CHATGATE_SANDBOX", "CHATGATE_SANDBOX_RO_PATHS", "CHATGATE_BWRAP_BIN", "CHATGATE_WORKSPACE_LAYOUT",
    "CHATGATE_HOMES_ROOT", "CHATGATE_PROVIDER_ENV", "CHATGATE_PROVIDER_ENV_FILE", "CHATGATE_MAX_RUNS",
    "CHATGATE_RUN_MEMORY", "CHATGATE_RUN_PROCESSES", "CHATGATE_RUN_FILE_SIZE", "CHATGATE_RUN_CPU_TIME",
    "CHATGATE_JWT_SECRET_FILE",
}
KNOWN_ENV |= CONTAINMENT_ENV
# Redis topologies and TLS (issue 17): listed here too, so the deployment files may name them
# before src/config.rs does.
REDIS_MODE_ENV = "CHATGATE_REDIS_MODE"
REDIS_SENTINEL_MASTER_ENV = "CHATGATE_REDIS_SENTINEL_MASTER"
REDIS_MODES = {"standalone", "cluster", "sentinel"}
# PEM contents for rediss:// (a private CA; a client certificate and its key for mutual TLS),
# each with the env form of its file flag (--redis-tls-ca-file, ...), which is for local use only.
REDIS_TLS_VARS = (
    ("CHATGATE_REDIS_TLS_CA", "CHATGATE_REDIS_TLS_CA_FILE"),
    ("CHATGATE_REDIS_TLS_CERT", "CHATGATE_REDIS_TLS_CERT_FILE"),
    ("CHATGATE_REDIS_TLS_KEY", "CHATGATE_REDIS_TLS_KEY_FILE"),
)
KNOWN_ENV |= {REDIS_MODE_ENV, REDIS_SENTINEL_MASTER_ENV} | {v for pair in REDIS_TLS_VARS for v in pair}
# PostgreSQL over TLS (issue 19): libpq's variables, read by the gateway's database driver.
# PGSSLROOTCERT names the CA bundle, a file (public, not a secret) on a read-only ConfigMap or
# Secret volume; PGSSLMODE is one of libpq's modes, verify-ca or verify-full with a CA (the other
# modes ignore it).
PG_SSL_MODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
KNOWN_ENV |= {"PGSSLMODE", "PGSSLROOTCERT"}
# The gateway's secrets: (the variable, its *_FILE form). The manifests set the variable from a
# secretKeyRef: the gateway is non-dumpable, so an unsandboxed CLI of the same uid cannot read
# its environment, whereas it could read a mounted secret file. The *_FILE form is accepted only
# where no CLI runs unsandboxed (CHATGATE_SANDBOX=bwrap, pinned as a literal env entry or in the
# output's ConfigMaps) and the file lies in a read-only Secret volume mount that no sandbox binds
# (SANDBOX_BOUND_DIRS, the workspaces and homes roots, CHATGATE_SANDBOX_RO_PATHS), never beside
# the variable (the helm value auth.mountAsFiles, the kustomize component secret-files).
SECRET_VARS = (
    ("CHATGATE_JWT_SECRET", "CHATGATE_JWT_SECRET_FILE"),
    ("REDIS_URL", "REDIS_URL_FILE"),
    ("DATABASE_URL", "DATABASE_URL_FILE"),
)
# What every bubblewrap sandbox binds from the gateway's filesystem besides the project, the
# user's home and the operator's CHATGATE_SANDBOX_RO_PATHS (src/runtime/sandbox/bwrap.rs
# SYSTEM_DIRS; /tmp, /proc and /dev are the sandbox's own): a secret file must lie outside them.
SANDBOX_BOUND_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt")
# Flags that take a secret's value (their *-file forms are fine).
SECRET_FLAGS = ("--jwt-secret", "--redis-url", "--database-url", "--redis-tls-key", "--redis-tls-cert", "--redis-tls-ca")
# A URL with a password in it: scheme://user:password@host
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@", re.IGNORECASE)
# The same, with the password only a Kubernetes expansion of another variable: $(VAR).
URL_WITH_PASSWORD_VAR = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]*:\$\(([A-Za-z_][A-Za-z0-9_]*)\)@", re.IGNORECASE)
# The chart's auth.redisPasswordRef: REDIS_URL as a literal whose passwords are $(REDIS_PASSWORD),
# REDIS_PASSWORD from a secretKeyRef.
REDIS_PASSWORD_VAR = "REDIS_PASSWORD"
# PEM material (a certificate or a key) written out in a manifest.
PEM_BLOCK = re.compile(r"-----BEGIN [A-Z0-9 ]+-----")
REDIS_URL_ITEM = re.compile(r"rediss?://[^\s,]+")
SANDBOX_MODES = {"auto", "bwrap", "none"}
# The server pings every 30 s and drops a socket after two missed pongs.
MIN_PROXY_TIMEOUT_SECONDS = 75
# Room after the drain grace to end the remaining runs and exit.
MIN_SHUTDOWN_MARGIN_SECONDS = 10
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
NGINX_TIMEOUT_ANNOTATIONS = (
    "nginx.ingress.kubernetes.io/proxy-read-timeout",
    "nginx.ingress.kubernetes.io/proxy-send-timeout",
)


class Report:
    """Collects failures; prints them as they come."""

    def __init__(self, label):
        self.label = label
        self.failures = 0
        self.checks = 0

    def check(self, ok, message):
        self.checks += 1
        if not ok:
            self.failures += 1
            print(f"FAIL {self.label}: {message}")
        return ok


def parse_duration_seconds(text):
    """Seconds of an interface duration (`ms`, `s`, `m`, `h`), None if unparsable."""
    match = re.fullmatch(r"([0-9]+)(ms|s|m|h)", str(text).strip())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    return {"ms": value / 1000, "s": value, "m": value * 60, "h": value * 3600}[unit]


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def selector_matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_spec(doc):
    return doc.get("spec", {}).get("template", {}).get("spec", {})


def pod_labels(doc):
    return doc.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def container_ports(doc):
    return {
        port.get("name"): port.get("containerPort")
        for container in pod_spec(doc).get("containers", [])
        for port in container.get("ports", []) or []
    }


def gateway_container(doc):
    for container in pod_spec(doc).get("containers", []):
        if container.get("name") == "chatgate":
            return container
    return None


def secret_mounts(container, spec):
    """mountPath -> volume, for the container's read-only mounts of Secret volumes."""
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    mounts = {}
    for mount in container.get("volumeMounts", []) or []:
        volume = volumes.get(mount.get("name"), {})
        if "secret" in volume or any("secret" in s for s in (volume.get("projected", {}) or {}).get("sources", []) or []):
            mounts[mount["mountPath"].rstrip("/")] = (volume, mount.get("readOnly") is True, mount.get("subPath"))
    return mounts


def secret_sources(volume):
    """(Secret name, items or None for every key) of a Secret volume, or of each Secret source of
    a projected volume."""
    if "secret" in volume:
        source = volume.get("secret") or {}
        return [(source.get("secretName"), source.get("items"))]
    sources = (volume.get("projected", {}) or {}).get("sources", []) or []
    return [((s.get("secret") or {}).get("name"), (s.get("secret") or {}).get("items")) for s in sources if "secret" in s]


def secret_item(volume, relative):
    """{name, key} of the Secret a volume's file `relative` comes from (None when no Secret
    source projects that path; key None when a source mounts a whole Secret and may hold it)."""
    whole = None
    for secret_name, items in secret_sources(volume):
        if items is None:
            whole = whole or {"name": secret_name, "key": relative if "/" not in relative else None}
            continue
        for item in items:
            if item.get("path") == relative:
                return {"name": secret_name, "key": item.get("key")}
    return whole


def secret_file_problem(path, container, spec):
    """Why `path` is not a file of a read-only Secret volume mount (None when it is)."""
    if not path or not path.startswith("/"):
        return f"{path!r} is not an absolute path"
    for mount_path, (volume, read_only, sub_path) in secret_mounts(container, spec).items():
        if path.startswith(mount_path + "/") and not sub_path:
            if not read_only:
                return f"{path} is in the Secret volume {volume.get('name')}, mounted without readOnly: true"
            relative = path[len(mount_path) + 1:]
            if secret_item(volume, relative) is None:
                return f"{path}: the Secret volume {volume.get('name')} has no item with path {relative}"
            return None
    return f"{path} is not inside a read-only Secret volume mount"


def secret_file_ref(path, container, spec):
    """{name, key} of the Secret behind a file of a Secret volume mount, None when unknown."""
    for mount_path, (volume, _, sub_path) in secret_mounts(container, spec).items():
        if path and path.startswith(mount_path + "/") and not sub_path:
            return secret_item(volume, path[len(mount_path) + 1:])
    return None


def effective_env_value(var, env, container, configmaps):
    """The value Kubernetes gives `var` in the container: a literal `env` entry (the last of that
    name) wins over every envFrom source, a later source over an earlier one. None when the
    output cannot tell: a valueFrom entry, or an envFrom source that is not a ConfigMap of the
    output and could hold it."""
    if var in env:
        return env[var].get("value")
    value = None
    for source in container.get("envFrom", []) or []:
        ref = (source.get("configMapRef", {}) or {}).get("name")
        if ref not in configmaps:
            return None
        data = configmaps[ref].get("data", {}) or {}
        prefix = source.get("prefix", "")
        if var.startswith(prefix) and var[len(prefix):] in data:
            value = data[var[len(prefix):]]
    return value


def secret_file_refusal(plain_var, file_var, entry, sandbox, bound, container, spec):
    """Why the secret file `file_var` is refused, None when it is acceptable: only when every CLI
    runs in bubblewrap (`sandbox` is bwrap), as a literal path inside a read-only Secret volume
    mount, and off every directory a sandbox binds (`bound`)."""
    if sandbox != "bwrap":
        return (f"{file_var} is set: a secret file is readable by an unsandboxed CLI of the gateway's uid;"
                f" set {plain_var} from a secretKeyRef (the gateway is non-dumpable), or require the sandbox:"
                f" CHATGATE_SANDBOX=bwrap, here {sandbox or 'unknown'}")
    path = entry.get("value")
    if not isinstance(path, str) or "valueFrom" in entry:
        return f"{file_var} must be a literal path"
    problem = secret_file_problem(path, container, spec)
    if problem is not None:
        return f"{file_var}: {problem}"

    def norm(p):  # /var/run is a link to /run in the image
        p = p.rstrip("/")
        return p[len("/var"):] if p == "/var/run" or p.startswith("/var/run/") else p

    directory = norm(path.rsplit("/", 1)[0])
    for dir_ in bound:
        b = norm(dir_)
        if b == "" or directory == b or directory.startswith(b + "/") or b.startswith(directory + "/"):
            return f"{file_var}: {path} is where every sandbox binds {dir_}: the CLIs would see it"
    return None


def mounted_file_problem(path, container, spec):
    """Why `path` is not a file of a read-only ConfigMap or Secret volume mount (None when it is)."""
    if not path or not path.startswith("/"):
        return f"{path!r} is not an absolute path"
    volumes = {v.get("name"): v for v in spec.get("volumes", []) or []}
    for mount in container.get("volumeMounts", []) or []:
        mount_path = str(mount.get("mountPath", "")).rstrip("/")
        if mount.get("subPath") or not path.startswith(mount_path + "/"):
            continue
        volume = volumes.get(mount.get("name"), {})
        source = volume.get("configMap") or volume.get("secret")
        if source is None:
            return f"{path} is on the volume {mount.get('name')}, not a ConfigMap or Secret"
        if mount.get("readOnly") is not True:
            return f"{path} is on the volume {mount.get('name')}, mounted without readOnly: true"
        relative = path[len(mount_path) + 1:]
        items = source.get("items")
        if items is not None and relative not in {i.get("path") for i in items}:
            return f"{path}: the volume {mount.get('name')} has no item with path {relative}"
        return None
    return f"{path} is not inside a read-only ConfigMap or Secret volume mount"


def check_postgres_tls(report, name, env, config_env, container, spec):
    """PGSSLMODE a libpq mode; PGSSLROOTCERT a CA file on a read-only volume, with a verifying mode."""
    def value(var):
        return env[var].get("value") if var in env else config_env.get(var)

    mode = value("PGSSLMODE")
    if "PGSSLMODE" in env or "PGSSLMODE" in config_env:
        report.check(mode in PG_SSL_MODES, f"{name}: PGSSLMODE {mode!r} is not one of libpq's sslmode values")
    if "PGSSLROOTCERT" in env or "PGSSLROOTCERT" in config_env:
        problem = mounted_file_problem(value("PGSSLROOTCERT"), container, spec)
        report.check(problem is None, f"{name}: PGSSLROOTCERT (the PostgreSQL CA file): {problem}")
        report.check(mode in ("verify-ca", "verify-full"),
                     f"{name}: PGSSLROOTCERT is only used with PGSSLMODE verify-ca or verify-full, got {mode!r}")


def secret_value(secrets, ref):
    """The decoded value a secretKeyRef points at, when that Secret is in the output (else None)."""
    secret = secrets.get((ref or {}).get("name"))
    if secret is None:
        return None
    key = ref.get("key")
    if key in (secret.get("stringData", {}) or {}):
        return str(secret["stringData"][key])
    try:
        return base64.b64decode((secret.get("data", {}) or {}).get(key, "")).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


def check_secret_placement(report, name, plain_var, file_var, config_env, env_list, file_refusal):
    """A secret is an env var of the Deployment, never in the ConfigMap; a file (readable by an
    unsandboxed CLI of the gateway's uid) only where `file_refusal` finds nothing against it, and
    never beside the variable. Returns the env entries that set the variable and the file's."""
    report.check(plain_var not in config_env and file_var not in config_env,
                 f"{name}: {plain_var}/{file_var} belong to the Deployment's secretKeyRef env, not the ConfigMap")
    entries = [e for e in env_list if e.get("name") == plain_var]
    files = [e for e in env_list if e.get("name") == file_var]
    if files:
        problem = file_refusal(plain_var, file_var, files[-1])
        report.check(problem is None, f"{name}: {problem}")
        report.check(len(files) == 1, f"{name}: {file_var} must be set at most once, found {len(files)}")
        report.check(not entries, f"{name}: {file_var} and {plain_var} are both set (the file wins): set one")
    return entries, files


def check_from_secret_key_ref(report, name, plain_var, entry, env_list=()):
    """The env entry of a secret comes from a secretKeyRef, not a literal or another source. The
    one exception: REDIS_URL as a literal whose every password is $(REDIS_PASSWORD), set before it
    from a secretKeyRef (the chart's auth.redisPasswordRef): the URL then holds no secret."""
    if plain_var == "REDIS_URL" and "value" in entry:
        before = {e["name"]: e for e in env_list[: env_list.index(entry)]} if entry in env_list else {}
        password_ref = "secretKeyRef" in (before.get(REDIS_PASSWORD_VAR, {}).get("valueFrom", {}) or {})
        items = [u.strip() for u in str(entry["value"]).split(",")]
        expanded = [URL_WITH_PASSWORD_VAR.match(u) for u in items]
        report.check(password_ref and all(m and m.group(1) == REDIS_PASSWORD_VAR for m in expanded),
                     f"{name}: REDIS_URL must come from a secretKeyRef, not a literal or another source"
                     f" (or be a literal whose every password is $({REDIS_PASSWORD_VAR}), set before it from a secretKeyRef)")
        return
    report.check("value" not in entry and "secretKeyRef" in (entry.get("valueFrom", {}) or {}),
                 f"{name}: {plain_var} must come from a secretKeyRef, not a literal or another source")


def check_redis(report, name, env, env_list, config_env, secrets, file_refusal, container, spec):
    """Redis topology and TLS settings: a known mode, the sentinel master only in sentinel mode,
    the TLS PEM variables only from a secretKeyRef (never a literal or the ConfigMap; a file as
    `file_refusal` allows), a client certificate together with its key, and, when the REDIS_URL
    Secret is in the output, URLs that fit the mode and the TLS setting."""

    def plain(var):
        return config_env.get(var, env.get(var, {}).get("value"))

    mode = plain(REDIS_MODE_ENV)
    report.check(mode is None or mode in REDIS_MODES,
                 f"{name}: {REDIS_MODE_ENV} must be one of {sorted(REDIS_MODES)}, got {mode!r}")
    mode = mode or "standalone"
    master = plain(REDIS_SENTINEL_MASTER_ENV)
    if mode == "sentinel":
        report.check(master is None or re.fullmatch(r"[A-Za-z0-9._-]+", master) is not None,
                     f"{name}: {REDIS_SENTINEL_MASTER_ENV} must be a master name, got {master!r}")
    else:
        report.check(master is None, f"{name}: {REDIS_SENTINEL_MASTER_ENV} is set, but {REDIS_MODE_ENV} is {mode}, not sentinel")

    tls_set = set()
    for plain_var, file_var in REDIS_TLS_VARS:
        entries, files = check_secret_placement(report, name, plain_var, file_var, config_env, env_list, file_refusal)
        if files:
            tls_set.add(plain_var)
        if not entries:
            continue
        tls_set.add(plain_var)
        if report.check(len(entries) == 1, f"{name}: {plain_var} must be set at most once, found {len(entries)}"):
            check_from_secret_key_ref(report, name, plain_var, entries[0])
    report.check(("CHATGATE_REDIS_TLS_CERT" in tls_set) == ("CHATGATE_REDIS_TLS_KEY" in tls_set),
                 f"{name}: CHATGATE_REDIS_TLS_CERT and CHATGATE_REDIS_TLS_KEY go together (a client certificate and its key)")

    ref = (env.get("REDIS_URL", {}).get("valueFrom", {}) or {}).get("secretKeyRef")
    if "REDIS_URL" not in env and "REDIS_URL_FILE" in env:
        ref = secret_file_ref(env["REDIS_URL_FILE"].get("value"), container, spec)
    url = secret_value(secrets, ref) if ref else env.get("REDIS_URL", {}).get("value")
    if url is None:
        return  # an existing Secret made out of band: nothing to check here
    items = [u.strip() for u in url.split(",")]
    report.check(all(REDIS_URL_ITEM.fullmatch(u) for u in items),
                 f"{name}: REDIS_URL must be redis:// or rediss:// URLs separated by commas")
    if mode == "standalone":
        report.check(len(items) == 1, f"{name}: REDIS_URL holds {len(items)} URLs; standalone mode takes one"
                                      f" (a comma list needs {REDIS_MODE_ENV} cluster or sentinel)")
    if tls_set:
        report.check(all(u.startswith("rediss://") for u in items),
                     f"{name}: {', '.join(sorted(tls_set))} set, but REDIS_URL is not rediss:// (TLS) throughout")


def check_gateway(report, doc, configmaps, secret_values=(), secrets=None):
    """Contract checks of the chatgate Deployment."""
    name = name_of(doc)
    container = gateway_container(doc)
    spec = pod_spec(doc)
    env_list = container.get("env", []) or []
    env = {e["name"]: e for e in env_list}

    # The first envFrom is the chart's (or the base's) own ConfigMap, which must be in the output;
    # more sources (values `envFrom`) may name ConfigMaps and Secrets made out of band.
    config_env = {}
    sources = container.get("envFrom", []) or []
    first = (sources[0].get("configMapRef", {}) or {}).get("name") if sources else None
    report.check(first in configmaps, f"{name}: the first envFrom must be the ConfigMap of the output, got {first}")
    for source in sources:
        ref = (source.get("configMapRef", {}) or {}).get("name")
        if ref in configmaps:
            config_env.update({source.get("prefix", "") + k: v for k, v in (configmaps[ref].get("data", {}) or {}).items()})

    for var in list(env) + list(config_env):
        if var.startswith("CHATGATE_"):
            report.check(var in KNOWN_ENV, f"{name}: {var} is not a chatgate variable (typo?)")

    node_id = env.get("CHATGATE_NODE_ID", {})
    report.check(
        node_id.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
        f"{name}: CHATGATE_NODE_ID must be the pod name (downward API metadata.name)",
    )
    # Secrets: each exactly once, as an env var from a secretKeyRef; never a literal, the ConfigMap
    # or an argument, and a file (readable by an unsandboxed CLI of the gateway's uid) only with
    # every CLI in bubblewrap, from a read-only Secret volume that no sandbox binds.
    sandbox = effective_env_value("CHATGATE_SANDBOX", env, container, configmaps)
    if any(str(w).split("=", 1)[0] in ("--sandbox", "--sandbox-ro-paths") for w in (container.get("args") or [])):
        sandbox = None  # an argument wins over the environment: set them in CHATGATE_SANDBOX*
    ro_paths = effective_env_value("CHATGATE_SANDBOX_RO_PATHS", env, container, configmaps) or ""
    bound = list(SANDBOX_BOUND_DIRS) + [p for p in ro_paths.split(",") if p.strip()] + [
        config_env.get(v) or "/data" for v in ("CHATGATE_WORKSPACES_ROOT", "CHATGATE_HOMES_ROOT")]

    def file_refusal(plain_var, file_var, entry):
        return secret_file_refusal(plain_var, file_var, entry, sandbox, bound, container, spec)

    for plain_var, file_var in SECRET_VARS:
        entries, files = check_secret_placement(report, name, plain_var, file_var, config_env, env_list, file_refusal)
        if files:
            continue
        if report.check(len(entries) == 1, f"{name}: {plain_var} must be set exactly once, found {len(entries)}"):
            check_from_secret_key_ref(report, name, plain_var, entries[0], env_list)
    if REDIS_PASSWORD_VAR in env:
        check_from_secret_key_ref(report, name, REDIS_PASSWORD_VAR, env[REDIS_PASSWORD_VAR])
    provider_files = env.get("CHATGATE_PROVIDER_ENV_FILE", {}).get("value") or config_env.get("CHATGATE_PROVIDER_ENV_FILE")
    for pair in filter(None, (provider_files or "").split(",")):
        var, _, path = pair.partition("=")
        if report.check(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var) is not None and path,
                        f"{name}: CHATGATE_PROVIDER_ENV_FILE entry {pair!r} is not NAME=/path"):
            problem = secret_file_problem(path, container, spec)
            report.check(problem is None, f"{name}: CHATGATE_PROVIDER_ENV_FILE {var}: {problem}")
    passed_on = (env.get("CHATGATE_PROVIDER_ENV", {}).get("value") or config_env.get("CHATGATE_PROVIDER_ENV") or "").split(",")
    for var in filter(None, passed_on):
        report.check(not var.startswith("CHATGATE_") and var not in ("DATABASE_URL", "REDIS_URL", REDIS_PASSWORD_VAR),
                     f"{name}: CHATGATE_PROVIDER_ENV would hand the gateway's {var} to the CLIs")
    for var, entry in env.items():
        if "value" in entry:
            literal = URL_WITH_PASSWORD_VAR.sub("", str(entry["value"])) if var == "REDIS_URL" else str(entry["value"])
            report.check(URL_WITH_PASSWORD.search(literal) is None, f"{name}: {var} holds a URL with a literal password")
            report.check(PEM_BLOCK.search(str(entry["value"])) is None, f"{name}: {var} holds a literal PEM certificate or key")
    for var, value in config_env.items():
        report.check(URL_WITH_PASSWORD.search(str(value)) is None, f"{name}: ConfigMap {var} holds a URL with a literal password")
        report.check(PEM_BLOCK.search(str(value)) is None, f"{name}: ConfigMap {var} holds a PEM certificate or key")
    check_redis(report, name, env, env_list, config_env, secrets or {}, file_refusal, container, spec)
    check_postgres_tls(report, name, env, config_env, container, spec)

    # The command line: `args` only (the image's entrypoint is tini, PID 1), and no secret in it.
    report.check("command" not in container, f"{name}: the chatgate container must not set `command` (it would replace the tini entrypoint)")
    secret_env = {v for v, e in env.items() if "secretKeyRef" in (e.get("valueFrom", {}) or {})}
    for c in spec.get("containers", []) + (spec.get("initContainers") or []):
        words = [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]
        cname = f"{name} container {c.get('name')}"
        for word in words:
            flag = word.split("=", 1)[0]
            report.check(flag not in SECRET_FLAGS, f"{cname}: secret on the command line ({flag}); use the *-file flag's env var")
            report.check(URL_WITH_PASSWORD.search(word) is None, f"{cname}: an argument holds a URL with a password")
            report.check(not any(f"$({v})" in word for v in secret_env), f"{cname}: an argument expands a secret variable")
            report.check(not any(len(v) >= 8 and v in word for v in secret_values), f"{cname}: an argument holds a Secret's value")

    listen = config_env.get("CHATGATE_LISTEN") or env.get("CHATGATE_LISTEN", {}).get("value")
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", []) or []}
    report.check(listen is not None and listen.startswith("0.0.0.0:"), f"{name}: CHATGATE_LISTEN must be 0.0.0.0:<port>, got {listen}")
    if listen:
        report.check(str(ports.get("http")) == listen.rsplit(":", 1)[-1], f"{name}: containerPort http {ports.get('http')} differs from CHATGATE_LISTEN {listen}")
    report.check(config_env.get("CHATGATE_LOG_FORMAT") == "json", f"{name}: CHATGATE_LOG_FORMAT should be json in a cluster")
    report.check(config_env.get("CHATGATE_WORKSPACE_LAYOUT") == "per-user", f"{name}: CHATGATE_WORKSPACE_LAYOUT should be per-user")
    report.check(config_env.get("CHATGATE_WORKSPACES_ROOT") == "/data/workspaces", f"{name}: CHATGATE_WORKSPACES_ROOT should be /data/workspaces")
    report.check(config_env.get("CHATGATE_HOMES_ROOT") == "/data/homes", f"{name}: CHATGATE_HOMES_ROOT should be /data/homes (each user's provider home)")
    home = env.get("HOME", {}).get("value")
    report.check(home is not None and not home.startswith("/data"),
                 f"{name}: HOME (the gateway's own) must be set and off the data volume, got {home} (CLIs get /data/homes/<user>)")
    report.check(config_env.get("CHATGATE_SANDBOX", "auto") in SANDBOX_MODES, f"{name}: CHATGATE_SANDBOX must be one of {sorted(SANDBOX_MODES)}")
    made = {w for c in spec.get("initContainers") or [] for w in (c.get("command") or []) + (c.get("args") or [])}
    report.check({"/data/workspaces", "/data/homes"} <= made, f"{name}: an init container must create /data/workspaces and /data/homes")

    def probe_path(probe):
        return (container.get(probe) or {}).get("httpGet", {}).get("path")

    report.check(probe_path("readinessProbe") == "/readyz", f"{name}: readiness probe must GET /readyz")
    report.check(probe_path("livenessProbe") == "/healthz", f"{name}: liveness probe must GET /healthz")
    report.check(probe_path("startupProbe") is not None, f"{name}: startup probe missing")
    internal = config_env.get("CHATGATE_INTERNAL_LISTEN")
    if internal:
        # /healthz and /readyz live on the internal port only: the probes must go there.
        report.check(str(ports.get("internal")) == internal.rsplit(":", 1)[-1],
                     f"{name}: containerPort internal {ports.get('internal')} differs from CHATGATE_INTERNAL_LISTEN {internal}")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = (container.get(probe) or {}).get("httpGet", {}).get("port")
            report.check(port in ("internal", ports.get("internal")), f"{name}: {probe} must use the internal port, got {port}")

    grace = parse_duration_seconds(config_env.get("CHATGATE_DRAIN_GRACE", "25s"))
    report.check(grace is not None, f"{name}: CHATGATE_DRAIN_GRACE unparsable")
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep = 0
    if "exec" in pre_stop:
        command = pre_stop["exec"].get("command", [])
        if report.check(command[:1] == ["sleep"] and len(command) == 2, f"{name}: preStop should be `sleep N`"):
            sleep = float(command[1])
    elif "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"].get("seconds", 0))
    report.check(sleep > 0, f"{name}: preStop sleep missing (endpoints need time to drop the pod)")
    termination = spec.get("terminationGracePeriodSeconds", 30)
    if grace is not None:
        need = sleep + grace + MIN_SHUTDOWN_MARGIN_SECONDS
        report.check(termination >= need, f"{name}: terminationGracePeriodSeconds {termination} < preStop {sleep} + drain grace {grace} + {MIN_SHUTDOWN_MARGIN_SECONDS}")

    # Pod Security `restricted`, except exactly what bubblewrap needs when the pod opts in with a
    # user namespace of its own (hostUsers: false): procMount Unmasked and the gateway
    # container's seccomp/AppArmor profile. Never a capability, never privileged.
    pod_sc = spec.get("securityContext", {}) or {}
    userns = spec.get("hostUsers") is False
    report.check(pod_sc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot must be true")
    report.check(pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccompProfile RuntimeDefault missing")
    for flag in ("hostPID", "hostIPC", "hostNetwork"):
        report.check(not spec.get(flag), f"{name}: {flag} must not be set")
    for c in spec.get("containers", []) + (spec.get("initContainers") or []):
        sc = c.get("securityContext", {}) or {}
        cname = f"{name} container {c.get('name')}"
        sandbox_opt_in = userns and c.get("name") == "chatgate"
        report.check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation must be false")
        report.check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem must be true")
        report.check(not sc.get("privileged"), f"{cname}: must not be privileged")
        report.check("ALL" in (sc.get("capabilities", {}) or {}).get("drop", []), f"{cname}: capabilities must drop ALL")
        report.check(not (sc.get("capabilities", {}) or {}).get("add"), f"{cname}: no capability may be added (bubblewrap needs none)")
        if sc.get("procMount", "Default") != "Default":
            report.check(sandbox_opt_in, f"{cname}: procMount {sc['procMount']} only for the chatgate container of a pod with hostUsers: false")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp not in (None, "RuntimeDefault", "Localhost"):
            report.check(sandbox_opt_in, f"{cname}: seccompProfile {seccomp} only for the chatgate container of a pod with hostUsers: false")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            report.check(sandbox_opt_in, f"{cname}: appArmorProfile {apparmor} only for the chatgate container of a pod with hostUsers: false")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", []) or []}
    report.check("/data" in mounts and "/tmp" in mounts, f"{name}: /data and /tmp must be volumes (read-only root fs)")
    report.check(spec.get("enableServiceLinks") is False, f"{name}: enableServiceLinks must be false (a Service named chatgate injects CHATGATE_* vars)")
    report.check("resources" in container and container["resources"].get("requests"), f"{name}: resource requests missing")
    affinity = spec.get("affinity", {}) or {}
    report.check(bool(affinity) or bool(spec.get("topologySpreadConstraints")), f"{name}: no anti-affinity or spread")


def check_manifests(path):
    report = Report(path)
    with open(path, encoding="utf-8") as handle:
        docs = [d for d in yaml.safe_load_all(handle) if d]
    report.check(bool(docs), "no resources rendered")
    by_kind = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), {})[doc.get("metadata", {}).get("name")] = doc
    names = [name_of(d) for d in docs]
    for dup in {n for n in names if names.count(n) > 1}:
        report.check(False, f"{dup} rendered twice")

    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    services = by_kind.get("Service", {})
    configmaps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    claims = by_kind.get("PersistentVolumeClaim", {})
    secret_values = set()
    for secret in secrets.values():
        for value in (secret.get("data", {}) or {}).values():
            try:
                secret_values.add(base64.b64decode(value).decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                pass
        secret_values.update(str(v) for v in (secret.get("stringData", {}) or {}).values())

    for doc in workloads:
        name = name_of(doc)
        selector = doc.get("spec", {}).get("selector", {}).get("matchLabels", {})
        report.check(selector_matches(selector, pod_labels(doc)), f"{name}: selector does not match its pod labels")
        spec = pod_spec(doc)
        for container in spec.get("containers", []) + (spec.get("initContainers") or []):
            for entry in container.get("env", []) or []:
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in secrets:
                    data = secrets[ref["name"]].get("data", {}) or {}
                    report.check(ref["key"] in data, f"{name}: Secret {ref['name']} has no key {ref['key']}")
        for volume in spec.get("volumes", []) or []:
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim and claims:
                report.check(claim in claims, f"{name}: claim {claim} is not in the output")
            for secret_name, items in secret_sources(volume):
                if secret_name in secrets:
                    data = secrets[secret_name].get("data", {}) or {}
                    for item in items or []:
                        report.check(item.get("key") in data, f"{name}: Secret {secret_name} has no key {item.get('key')}")
        if gateway_container(doc) is not None:
            check_gateway(report, doc, configmaps, secret_values, secrets)

    for svc in services.values():
        selector = svc.get("spec", {}).get("selector", {})
        targets = [w for w in workloads if selector_matches(selector, pod_labels(w))]
        if report.check(bool(targets), f"{name_of(svc)}: selector matches no workload"):
            for port in svc["spec"].get("ports", []):
                target = port.get("targetPort")
                if isinstance(target, str):
                    report.check(all(target in container_ports(w) for w in targets), f"{name_of(svc)}: targetPort {target} is not a container port")
        report.check(svc.get("spec", {}).get("sessionAffinity") in (None, "None"), f"{name_of(svc)}: no session affinity expected")

    for pdb in by_kind.get("PodDisruptionBudget", {}).values():
        selector = pdb.get("spec", {}).get("selector", {}).get("matchLabels", {})
        report.check(any(selector_matches(selector, pod_labels(w)) for w in workloads), f"{name_of(pdb)}: selector matches no workload")

    for hpa in by_kind.get("HorizontalPodAutoscaler", {}).values():
        target = hpa.get("spec", {}).get("scaleTargetRef", {})
        report.check(target.get("name") in by_kind.get(target.get("kind"), {}), f"{name_of(hpa)}: scale target {target} is not in the output")

    for monitor in by_kind.get("ServiceMonitor", {}).values():
        selector = monitor.get("spec", {}).get("selector", {}).get("matchLabels", {})
        matched = [s for s in services.values() if selector_matches(selector, s.get("metadata", {}).get("labels", {}) or {})]
        report.check(len(matched) == 1, f"{name_of(monitor)}: selects {len(matched)} Services, expected 1")
        for endpoint in monitor.get("spec", {}).get("endpoints", []):
            port_names = {p.get("name") for s in matched for p in s["spec"].get("ports", [])}
            report.check(endpoint.get("port") in port_names, f"{name_of(monitor)}: port {endpoint.get('port')} is not a Service port")
            report.check(endpoint.get("path") == "/metrics", f"{name_of(monitor)}: path must be /metrics")

    for ingress in by_kind.get("Ingress", {}).values():
        annotations = ingress.get("metadata", {}).get("annotations", {}) or {}
        if ingress.get("spec", {}).get("ingressClassName") == "nginx":
            for key in NGINX_TIMEOUT_ANNOTATIONS:
                value = annotations.get(key)
                report.check(value is not None and value.isdigit() and int(value) >= MIN_PROXY_TIMEOUT_SECONDS,
                             f"{name_of(ingress)}: {key} must be >= {MIN_PROXY_TIMEOUT_SECONDS} (WebSocket idle), got {value}")
            report.check("nginx.ingress.kubernetes.io/affinity" not in annotations, f"{name_of(ingress)}: no sticky sessions expected")
        for rule in ingress.get("spec", {}).get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path.get("backend", {}).get("service", {})
                svc = services.get(backend.get("name"))
                if report.check(svc is not None, f"{name_of(ingress)}: backend Service {backend.get('name')} is not in the output"):
                    port = backend.get("port", {})
                    known = {p.get("name") for p in svc["spec"]["ports"]} | {p.get("port") for p in svc["spec"]["ports"]}
                    report.check(port.get("name", port.get("number")) in known, f"{name_of(ingress)}: backend port {port} is not a Service port")

    for route in by_kind.get("HTTPRoute", {}).values():
        spec = route.get("spec", {}) or {}
        report.check(bool(spec.get("parentRefs")), f"{name_of(route)}: no parentRefs (the route attaches to no Gateway)")
        for rule in spec.get("rules", []) or []:
            for backend in rule.get("backendRefs", []) or []:
                svc = services.get(backend.get("name"))
                if report.check(svc is not None, f"{name_of(route)}: backend Service {backend.get('name')} is not in the output"):
                    known = {p.get("port") for p in svc["spec"]["ports"]}
                    report.check(backend.get("port") in known, f"{name_of(route)}: backend port {backend.get('port')} is not a Service port")
            request = (rule.get("timeouts") or {}).get("request")
            if request is not None:
                seconds = parse_gateway_duration(request)
                report.check(seconds is not None and (seconds == 0 or seconds >= 3600),
                             f"{name_of(route)}: timeouts.request {request} would end every WebSocket after it (0s turns it off)")

    for rule_doc in by_kind.get("PrometheusRule", {}).values():
        names = []
        for group in (rule_doc.get("spec", {}) or {}).get("groups", []) or []:
            for rule in group.get("rules", []) or []:
                label = f"{name_of(rule_doc)} alert {rule.get('alert')}"
                names.append(rule.get("alert"))
                expr = str(rule.get("expr", ""))
                report.check(bool(rule.get("alert")) and expr.strip() != "", f"{label}: alert name and expr required")
                report.check("{{" not in expr and "<" + "capacity>" not in expr, f"{label}: unrendered placeholder in expr")
                report.check(expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), f"{label}: unbalanced brackets in expr")
                report.check("for" not in rule or parse_gateway_duration(rule["for"]) is not None, f"{label}: bad `for` {rule.get('for')}")
                report.check((rule.get("labels") or {}).get("severity") in ("critical", "warning", "info"), f"{label}: severity label missing")
        report.check(len(names) == len(set(names)), f"{name_of(rule_doc)}: an alert is defined twice")

    for policy in by_kind.get("NetworkPolicy", {}).values():
        spec = policy.get("spec", {}) or {}
        selector = (spec.get("podSelector") or {}).get("matchLabels", {})
        selected = [w for w in workloads if selector_matches(selector, pod_labels(w))]
        report.check(bool(selected), f"{name_of(policy)}: podSelector matches no workload")
        report.check({"Ingress", "Egress"} <= set(spec.get("policyTypes", [])), f"{name_of(policy)}: policyTypes must be Ingress and Egress")
        for rule in spec.get("ingress", []) or []:
            report.check(bool(rule.get("from")), f"{name_of(policy)}: an ingress rule without `from` admits every source")
            for port in rule.get("ports", []) or []:
                if isinstance(port.get("port"), str):
                    report.check(all(port["port"] in container_ports(w) for w in selected), f"{name_of(policy)}: port {port['port']} is not a container port")
        for rule in spec.get("egress", []) or []:
            report.check(bool(rule.get("to")), f"{name_of(policy)}: an egress rule without `to` allows every destination")
        report.check(any(p.get("port") == 53 for r in spec.get("egress", []) or [] for p in r.get("ports", []) or []),
                     f"{name_of(policy)}: no egress to DNS (port 53)")

    for pod in by_kind.get("Pod", {}).values():
        if "test" not in ((pod.get("metadata", {}) or {}).get("annotations", {}) or {}).get("helm.sh/hook", ""):
            continue
        spec = pod.get("spec", {}) or {}
        pod_sc = spec.get("securityContext", {}) or {}
        report.check(pod_sc.get("runAsNonRoot") is True, f"{name_of(pod)}: runAsNonRoot must be true")
        report.check((pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{name_of(pod)}: seccompProfile must be RuntimeDefault")
        report.check(spec.get("restartPolicy") == "Never", f"{name_of(pod)}: a test pod must not restart")
        for c in spec.get("containers", []):
            sc = c.get("securityContext", {}) or {}
            report.check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
                         and "ALL" in (sc.get("capabilities", {}) or {}).get("drop", []) and not sc.get("privileged"),
                         f"{name_of(pod)} container {c.get('name')}: restricted securityContext required")
            script = " ".join(str(w) for w in (c.get("command") or []) + (c.get("args") or []))
            report.check("/readyz" in script and any(f"http://{n}." in script for n in services),
                         f"{name_of(pod)}: the test must GET /readyz through a Service of the output")

    report.check(any(gateway_container(w) is not None for w in workloads), "no chatgate Deployment rendered")
    return report


def parse_gateway_duration(text):
    """Seconds of a Gateway API / Prometheus duration (e.g. 1h30m, 0s, 500ms), None if unparsable."""
    parts = re.findall(r"([0-9]+)(ms|s|m|h|d)", str(text))
    if not parts or "".join(a + b for a, b in parts) != str(text):
        return None
    return sum(int(v) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[u] for v, u in parts)


def check_alerts(docs_path, rendered_path):
    """The rendered PrometheusRule holds every alert of docs/operations.md's "Suggested alerts"."""
    report = Report(rendered_path)
    with open(docs_path, encoding="utf-8") as handle:
        docs = handle.read()
    table = docs[docs.index("Suggested alerts"):]
    documented = re.findall(r"^\|\s*(Chatgate[A-Za-z]+)\s*\|", table, re.MULTILINE)
    report.check(len(documented) >= 5, f"found only {len(documented)} alerts in {docs_path}'s table")
    with open(rendered_path, encoding="utf-8") as handle:
        docs_rendered = [d for d in yaml.safe_load_all(handle) if d]
    rendered = {r.get("alert") for d in docs_rendered if d.get("kind") == "PrometheusRule"
                for g in d["spec"].get("groups", []) for r in g.get("rules", [])}
    for name in documented:
        report.check(name in rendered, f"alert {name} of the docs is not in the PrometheusRule")
    for name in rendered - set(documented):
        report.check(False, f"alert {name} is rendered but not documented in {docs_path}")
    return report


def dockerignore_excludes(patterns, path):
    """Whether the build context leaves `path` out (last matching pattern wins, `!` re-includes)."""
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        candidates = [pattern, pattern.replace("**/", "")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, c) for prefix in prefixes for c in candidates):
            excluded = not negate
    return excluded


def check_dockerfile(dockerfile, dockerignore):
    report = Report(dockerfile)
    with open(dockerfile, encoding="utf-8") as handle:
        text = handle.read()
    lines = [l.strip() for l in re.sub(r"\\\n", " ", text).splitlines() if l.strip() and not l.strip().startswith("#")]
    instructions = [(l.split(None, 1)[0].upper(), l.split(None, 1)[1] if " " in l else "") for l in lines]
    froms = [args for op, args in instructions if op == "FROM"]
    report.check(len(froms) >= 3, "expected a multi-stage build (builder, providers, runtime)")
    report.check(any("rust:" in f for f in froms), "no Rust builder stage")
    report.check(any("debian:" in f and "slim" in f for f in froms), "runtime must be Debian slim")
    final = len(instructions) - 1 - [op for op, _ in instructions][::-1].index("FROM")
    final_stage = instructions[final:]
    final_ops = dict((op, args) for op, args in final_stage)
    report.check(not any(op == "HEALTHCHECK" for op, _ in instructions), "no HEALTHCHECK expected (Kubernetes probes)")
    user = final_ops.get("USER", "")
    report.check(re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user) is not None, f"final USER must be a numeric non-root uid, got {user!r}")
    entrypoint = json.loads(final_ops.get("ENTRYPOINT", "null")) or []
    report.check(len(entrypoint) == 3 and entrypoint[0].rsplit("/", 1)[-1] == "tini" and entrypoint[1:] == ["--", "chatgate"],
                 f"ENTRYPOINT must be [\"/usr/bin/tini\", \"--\", \"chatgate\"] (tini reaps orphaned CLI processes), got {entrypoint}")
    installs = " ".join(a for op, a in instructions if op == "RUN" and "apt-get install" in a)
    for package in ("tini", "bubblewrap"):
        report.check(re.search(rf"apt-get install[^&;|]*\s{package}(\s|$)", installs) is not None, f"Debian package {package} is not installed")
    report.check(json.loads(final_ops.get("CMD", "null")) == ["serve"], "CMD must be [\"serve\"]")
    report.check("EXPOSE" in final_ops and "3001" in final_ops["EXPOSE"], "EXPOSE 3001 missing")
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else None for op, a in instructions if op == "ARG"}
    report.check(args.get("WITH_PROVIDERS") == "false", "ARG WITH_PROVIDERS=false missing")
    for package in ("@anthropic-ai/claude-code", "@openai/codex", "@google/gemini-cli", "opencode-ai"):
        report.check(package in text, f"provider package {package} is not installed")
    env_text = " ".join(a for op, a in instructions if op == "ENV")
    for expected in ("CHATGATE_LISTEN=0.0.0.0:3001", "CHATGATE_WORKSPACE_LAYOUT=per-user", "CHATGATE_WORKSPACES_ROOT=/data/workspaces",
                     "CHATGATE_HOMES_ROOT=/data/homes"):
        report.check(expected in env_text, f"ENV {expected} missing")
    home = re.search(r"(?:^|\s)HOME=(\S+)", env_text)
    report.check(home is not None and not home.group(1).startswith("/data"), "ENV HOME (the gateway's own) must be set and off /data")
    report.check(re.search(r"mkdir -p[^&;]*/data/homes", text) is not None, "the image must create /data/homes")
    report.check("cargo build --release --locked" in text, "the builder must build with --locked")
    report.check("cargo chef cook" in text, "dependency build is not cached in its own layer")

    with open(dockerignore, encoding="utf-8") as handle:
        patterns = [l.strip() for l in handle if l.strip() and not l.startswith("#")]
    for path in ("target", "target/release/chatgate", ".git", ".state/local/pids", "node_modules", "chatgate.db"):
        report.check(dockerignore_excludes(patterns, path), f".dockerignore keeps {path} in the build context")
    for path in ("Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs", "migrations/0001_init.sql"):
        report.check(not dockerignore_excludes(patterns, path), f".dockerignore leaves {path} out of the build context")
    return report


def leaf_paths(value, prefix=""):
    """Dotted paths of a values tree; lists and empty maps count as leaves."""
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from leaf_paths(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix


def check_readme(values_path, readme_path):
    report = Report(readme_path)
    with open(values_path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    with open(readme_path, encoding="utf-8") as handle:
        readme = handle.read()
    documented = set(re.findall(r"^\|\s*`([^`]+)`\s*\|", readme, re.MULTILINE))
    free_form = {"probes.startup", "probes.readiness", "probes.liveness", "autoscaling.behavior", "resources", "podSecurityContext", "securityContext",
                 "redis.resources", "postgresql.resources", "sandbox.seccompProfile", "ingress.classAnnotations",
                 "networkPolicy.ingress.controller", "networkPolicy.ingress.prometheus", "networkPolicy.egress.dns.to"}
    for path in leaf_paths(values):
        covered = path in documented or any(path == f or path.startswith(f + ".") for f in free_form if f in documented)
        report.check(covered, f"value {path} is not documented in the README's table")
    for path in documented:
        node = values
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) and part in node else KeyError
            if node is KeyError:
                break
        report.check(node is not KeyError, f"README documents {path}, which values.yaml does not have")
    return report


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    mode, rest = argv[1], argv[2:]
    if mode == "manifests" and rest:
        reports = [check_manifests(p) for p in rest]
    elif mode == "dockerfile" and len(rest) == 2:
        reports = [check_dockerfile(*rest)]
    elif mode == "readme" and len(rest) == 2:
        reports = [check_readme(*rest)]
    elif mode == "alerts" and len(rest) == 2:
        reports = [check_alerts(*rest)]
    else:
        print(__doc__)
        return 2
    failed = sum(r.failures for r in reports)
    for r in reports:
        print(f"{'ok  ' if not r.failures else 'FAIL'} {r.label}: {r.checks - r.failures}/{r.checks} checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
