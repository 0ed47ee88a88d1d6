//! Agent containment (issue 13 item 6): attack tests against the real binary.
//!
//! A hostile provider CLI (`tests/fixtures/hostile-cli/hostile`, run as `--codex-bin`)
//! is started by user A's `chat.send` on a node that holds every secret (the JWT
//! secret, the database URL, the Redis URL in cluster mode) and serves user B too.
//! It tries to read the secrets (its environment, `/proc`, the SQLite file, the
//! secret file), B's workspace and home, to write outside its project, to fork past
//! `--run-processes`, to allocate past `--run-memory` and to write past
//! `--run-file-size`, and reports what it got. Every attempt must fail, no secret may
//! reach the stream or the history, and B's concurrent run and the node must not
//! notice. The secrets may also be files mounted like a Kubernetes Secret volume (the
//! chart's `auth.mountAsFiles`): under bubblewrap the CLI must not reach them by any
//! path, and without a sandbox it does (why the manifests require bwrap for them).
//! Also: per-user workspace roots (`--workspace-layout per-user`), start refusals, and
//! `--max-runs` (`NODE_BUSY`).

mod common;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use common::{NodeProcess, Ws, assert_protocol_error, pg_url, redis_url, rest, user};
use serde_json::{Value, json};

/// The hostile CLI fixture.
const HOSTILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hostile-cli/hostile");
/// `--run-processes` of the attacked node.
const RUN_PROCESSES: u64 = 64;
/// `--run-memory` of the attacked node.
const RUN_MEMORY: u64 = 1 << 30;
/// `--run-file-size` of the attacked node.
const RUN_FILE_SIZE: u64 = 1 << 20;
/// Memory each of 3 processes of the hostile run touches at once: under
/// `--run-memory` per process, past it together.
const MEMORY_TOTAL_EACH: u64 = 800 << 20;
/// How long a hostile run may take, end to end.
const RUN_WAIT: Duration = Duration::from_secs(120);

/// One hostile run at a time in this binary: when containment is broken, a run
/// forks 2000 processes and touches gigabytes.
static HOSTILE_RUNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------- the node under attack

/// `enc(U)` of docs/operations.md §14 (per-user workspaces): every byte outside `[A-Za-z0-9-]` as `_xx`.
fn enc(user: &str) -> String {
    user.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("_{b:02x}") })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecretIn {
    /// `CHATGATE_JWT_SECRET` in the node's environment.
    Env,
    /// `--jwt-secret-file`, the file next to the CLI program (a directory the sandbox binds).
    FileNextToCli,
    /// `--jwt-secret-file`, the file in a directory of its own.
    File,
    /// Every secret a file of a directory laid out like a Kubernetes Secret volume
    /// ([`SecretMount`]) outside the workspaces, named in the node's environment by
    /// `CHATGATE_JWT_SECRET_FILE`, `DATABASE_URL_FILE` and (cluster mode) `REDIS_URL_FILE`,
    /// with none of the secret variables set: the chart's `auth.mountAsFiles`.
    MountedFiles,
}

/// A directory shaped like the kubelet's Secret volumes: the files live in a timestamped
/// directory, `..data` links to it, and each name links through `..data` (the kubelet
/// swaps `..data` to update them). Readable by anyone (0444): only the sandbox's view of
/// the filesystem may keep a CLI from them.
#[derive(Debug, Clone)]
struct SecretMount {
    /// The mount point (like `/var/run/secrets/chatgate`).
    dir: PathBuf,
    /// The timestamped directory `..data` points at.
    data_dir: PathBuf,
    /// The file names in it.
    files: Vec<String>,
}

impl SecretMount {
    fn make(dir: PathBuf, files: &[(&str, &str)]) -> SecretMount {
        let data_dir = dir.join("..2025_01_01_00_00_00.000000001");
        std::fs::create_dir_all(&data_dir).unwrap();
        for (name, value) in files {
            let path = data_dir.join(name);
            std::fs::write(&path, value).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
            std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        std::os::unix::fs::symlink(data_dir.file_name().unwrap(), dir.join("..data")).unwrap();
        SecretMount { dir, data_dir, files: files.iter().map(|(name, _)| name.to_string()).collect() }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Every way a CLI might name each file: by its path, through `..data`, in the
    /// timestamped directory, and through the `/proc/<pid>/root` of the sandbox's init, its
    /// own and the gateway's (whose host pid it is told).
    fn reads(&self, gateway_pid: u32) -> BTreeMap<String, PathBuf> {
        let mut reads = BTreeMap::new();
        for file in &self.files {
            let key = file.replace('-', "_");
            let path = self.path(file);
            let relative = path.strip_prefix("/").unwrap();
            reads.insert(format!("mounted_{key}"), path.clone());
            reads.insert(format!("mounted_data_{key}"), self.dir.join("..data").join(file));
            reads.insert(format!("mounted_timestamped_{key}"), self.data_dir.join(file));
            reads.insert(format!("via_proc_1_root_{key}"), Path::new("/proc/1/root").join(relative));
            reads.insert(format!("via_proc_self_root_{key}"), Path::new("/proc/self/root").join(relative));
            reads.insert(
                format!("via_gateway_root_{key}"),
                Path::new(&format!("/proc/{gateway_pid}/root")).join(relative),
            );
        }
        reads
    }
}

#[derive(Debug, Clone, Copy)]
struct Variant {
    sandbox: &'static str,
    db: Db,
    secret: SecretIn,
    cluster: bool,
    max_runs: Option<u32>,
}

impl Variant {
    fn bwrap(db: Db, secret: SecretIn) -> Variant {
        Variant { sandbox: "bwrap", db, secret, cluster: false, max_runs: None }
    }
}

/// A real `chatgate` process with every secret set, and what the tests know about it.
struct Gateway {
    node: NodeProcess,
    variant: Variant,
    /// Canonical temp dir holding everything (under `target/tmp`, not `/tmp`).
    root: PathBuf,
    workspaces: PathBuf,
    homes: PathBuf,
    /// Directory of the CLI program (bound read-only into the sandbox).
    cli_dir: PathBuf,
    sqlite: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    /// With [`SecretIn::MountedFiles`]: the directory of every secret file.
    secret_mount: Option<SecretMount>,
    jwt_secret: String,
    /// name -> value that must never reach a provider CLI, the stream or history.
    secrets: BTreeMap<String, String>,
    /// `--provider-env` variable the CLI must get.
    provider_env: (String, String),
    /// `--provider-env-file` variable the CLI must get.
    provider_env_file: (String, String),
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

impl Gateway {
    async fn start(variant: Variant) -> Gateway {
        let dir = tempfile::Builder::new().prefix("containment-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let workspaces = root.join("workspaces");
        let homes = root.join("homes");
        std::fs::create_dir_all(&workspaces).unwrap();
        std::fs::create_dir_all(&homes).unwrap();
        let nonce = uuid::Uuid::new_v4().simple().to_string();

        // The CLI: the fixture itself, or a copy in a directory that also holds the secret file.
        let (cli, cli_dir) = if variant.secret == SecretIn::FileNextToCli {
            let bin = root.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::copy(HOSTILE, bin.join("hostile")).unwrap();
            (bin.join("hostile"), bin)
        } else {
            let cli = std::fs::canonicalize(HOSTILE).unwrap();
            let dir = cli.parent().unwrap().to_path_buf();
            (cli, dir)
        };

        let jwt_secret = format!("jwt-secret-{nonce}");
        let mut secrets = BTreeMap::new();
        secrets.insert("jwt_secret".to_string(), jwt_secret.clone());
        let mut env: Vec<(String, String)> = Vec::new();
        let mut args: Vec<OsString> = vec![
            os("--sandbox"),
            os(variant.sandbox),
            os("--workspace-layout"),
            os("per-user"),
            os("--workspaces-root"),
            os(&workspaces),
            os("--homes-root"),
            os(&homes),
            os("--run-processes"),
            os(RUN_PROCESSES.to_string()),
            os("--run-memory"),
            os("1GiB"),
            os("--run-file-size"),
            os("1MiB"),
            os("--codex-bin"),
            os(&cli),
            os("--providers"),
            os("codex,script"),
            os("--drain-grace"),
            os("1s"),
        ];
        if let Some(max) = variant.max_runs {
            args.extend([os("--max-runs"), os(max.to_string())]);
        }

        let secret_file = match variant.secret {
            SecretIn::Env => {
                env.push(("CHATGATE_JWT_SECRET".into(), jwt_secret.clone()));
                None
            }
            SecretIn::MountedFiles => None,
            SecretIn::FileNextToCli | SecretIn::File => {
                let path = if variant.secret == SecretIn::File {
                    std::fs::create_dir_all(root.join("secrets")).unwrap();
                    root.join("secrets").join("jwt-secret")
                } else {
                    cli_dir.join("jwt-secret")
                };
                std::fs::write(&path, format!("{jwt_secret}\n")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                args.extend([os("--jwt-secret-file"), os(&path)]);
                Some(path)
            }
        };

        let sqlite = (variant.db == Db::Sqlite).then(|| {
            // The database directory is also bound read-only into the sandbox: its
            // files must be masked even so.
            let data = root.join("data");
            std::fs::create_dir_all(&data).unwrap();
            if variant.sandbox == "bwrap" {
                args.extend([os("--sandbox-ro-paths"), os(&data)]);
            }
            data.join("chatgate.db")
        });
        let database_url = match &sqlite {
            Some(path) => format!("sqlite://{}?mode=rwc", path.display()),
            None => pg_url(),
        };
        secrets.insert("database_url".into(), database_url.clone());
        let redis = variant.cluster.then(redis_url);
        if let Some(redis) = &redis {
            secrets.insert("redis_url".into(), redis.clone());
            args.extend([os("--node-id"), os(format!("containment-{}", &nonce[..8]))]);
        }
        let (secret_file, secret_mount) = if variant.secret == SecretIn::MountedFiles {
            // Only paths in the environment; the values live in the files (a trailing
            // newline, as `kubectl create secret --from-file` often leaves one).
            let mut files =
                vec![("jwt-secret", format!("{jwt_secret}\n")), ("database-url", format!("{database_url}\n"))];
            if let Some(redis) = &redis {
                files.push(("redis-url", format!("{redis}\n")));
            }
            let files: Vec<(&str, &str)> = files.iter().map(|(name, value)| (*name, value.as_str())).collect();
            let mount = SecretMount::make(root.join("secret-mount"), &files);
            env.push(("CHATGATE_JWT_SECRET_FILE".into(), mount.path("jwt-secret").display().to_string()));
            env.push(("DATABASE_URL_FILE".into(), mount.path("database-url").display().to_string()));
            if redis.is_some() {
                env.push(("REDIS_URL_FILE".into(), mount.path("redis-url").display().to_string()));
            }
            (Some(mount.path("jwt-secret")), Some(mount))
        } else {
            env.push(("DATABASE_URL".into(), database_url));
            if let Some(redis) = redis {
                env.push(("REDIS_URL".into(), redis));
            }
            (secret_file, None)
        };

        // An unrelated variable of the node's environment (must not be inherited),
        // and the two ways an operator hands a variable to the CLIs (must arrive).
        let canary = format!("inherited-canary-{nonce}");
        secrets.insert("inherited_canary".into(), canary.clone());
        env.push(("HOSTILE_INHERITED_CANARY".into(), canary));
        let provider_env = ("CONTAINMENT_PROVIDER_KEY".to_string(), format!("provider-key-{nonce}"));
        env.push(provider_env.clone());
        args.extend([os("--provider-env"), os(&provider_env.0)]);
        let provider_env_file = ("CONTAINMENT_PROVIDER_FILE_KEY".to_string(), format!("provider-file-key-{nonce}"));
        let key_file = root.join("provider-file-key");
        std::fs::write(&key_file, format!("{}\n", provider_env_file.1)).unwrap();
        args.extend([os("--provider-env-file"), os(format!("{}={}", provider_env_file.0, key_file.display()))]);
        env.push(("LANG".into(), "C.UTF-8".into()));
        env.push(("TZ".into(), "UTC".into()));

        let node = common::spawn_node_env(&args, &env, &root);
        node.wait_ready().await.expect("node ready");
        Gateway {
            node,
            variant,
            root,
            workspaces,
            homes,
            cli_dir,
            sqlite,
            secret_file,
            secret_mount,
            jwt_secret,
            secrets,
            provider_env,
            provider_env_file,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    fn token(&self, user: &str) -> String {
        chatgate::auth::Auth::new(self.jwt_secret.as_bytes()).mint(user, Duration::from_secs(3600)).unwrap()
    }

    async fn request(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> (u16, Value) {
        rest(&self.http, &self.node.base, method, path, token, body).await
    }

    /// Creates a session; the REST answer.
    async fn try_create(&self, token: &str, provider: &str, project: &str, summary: Option<&str>) -> (u16, Value) {
        let mut body = json!({ "provider": provider, "projectPath": project });
        if let Some(summary) = summary {
            body["summary"] = json!(summary);
        }
        self.request("POST", "/api/providers/sessions", token, Some(body)).await
    }

    /// Creates a session (201 expected): its id and stored projectPath.
    async fn create(&self, token: &str, provider: &str, project: &str, summary: Option<&str>) -> (String, String) {
        let (status, body) = self.try_create(token, provider, project, summary).await;
        assert_eq!(status, 201, "creating a {provider} session at {project:?}: {body}");
        (
            body["data"]["sessionId"].as_str().unwrap().to_string(),
            body["data"]["projectPath"].as_str().unwrap().to_string(),
        )
    }

    async fn history(&self, token: &str, session: &str) -> Value {
        let (status, body) =
            self.request("GET", &format!("/api/providers/sessions/{session}/messages?kinds=all"), token, None).await;
        assert_eq!(status, 200, "{body}");
        body["data"].clone()
    }

    /// History once it ends with the run's `complete` (written off the hot path).
    async fn history_complete(&self, token: &str, session: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let data = self.history(token, session).await;
            if data["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m["kind"] == "complete") {
                return data;
            }
            assert!(tokio::time::Instant::now() < deadline, "history never got its complete: {data:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = self.http.get(format!("{}{path}", self.node.base)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Asserts the node process still runs and answers `/healthz`.
    async fn assert_alive(&mut self) {
        assert!(self.node.is_running(), "the node died during the attack; stderr:\n{}", self.node.stderr());
        let (status, body) = self.get("/healthz").await;
        assert_eq!(status, 200, "/healthz after the attack: {body}");
    }
}

/// Every frame on `ws` until the `complete` of `session` (inclusive); panics after `wait`.
async fn frames_until_complete(ws: &mut Ws, session: &str, wait: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.try_recv(left).await {
            Some(Ok(frame)) => {
                let done = frame["kind"] == "complete" && frame["sessionId"] == session;
                frames.push(frame);
                if done {
                    return frames;
                }
            }
            Some(Err(close)) => panic!("socket closed ({close:?}) before {session} completed; frames: {frames:#?}"),
            None => panic!("no complete of {session} within {wait:?}; frames: {frames:#?}"),
        }
    }
}

/// The first frame that is not a `session_upserted` notice, within `wait`.
async fn next_reply(ws: &mut Ws, wait: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.try_recv(left).await {
            Some(Ok(frame)) if frame["kind"] == "session_upserted" => continue,
            Some(Ok(frame)) => return frame,
            Some(Err(close)) => panic!("socket closed: {close:?}"),
            None => panic!("no frame within {wait:?}"),
        }
    }
}

fn complete_of<'a>(frames: &'a [Value], session: &str) -> &'a Value {
    frames.iter().rev().find(|f| f["kind"] == "complete" && f["sessionId"] == session).expect("complete frame")
}

/// A script run of `events` stream deltas `interval_ms` apart.
fn paced(events: u64, interval_ms: u64) -> String {
    json!({ "events": events, "intervalMs": interval_ms }).to_string()
}

/// Creates `path` and its missing parents with mode 0700.
fn mkdir_private(path: &Path) {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).unwrap();
}

fn mode_of(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777)
}

/// Collects failed checks, so one run reports every broken defence at once.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.0.push(what.into());
        }
    }

    /// Panics listing every failed check; `CHATGATE_TEST_SHOW_REPORT=1` prints `context`
    /// (the hostile's report) even when all passed.
    #[track_caller]
    fn finish(self, context: &str) {
        if std::env::var_os("CHATGATE_TEST_SHOW_REPORT").is_some() {
            eprintln!("{context}");
        }
        assert!(
            self.0.is_empty(),
            "{} containment check(s) failed:\n  - {}\n\n{context}",
            self.0.len(),
            self.0.join("\n  - ")
        );
    }
}

fn str_list(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The report for a failure message: the hostile's report without the long /proc listing.
fn report_summary(report: &Value) -> String {
    let mut short = report.clone();
    if let Some(map) = short.as_object_mut() {
        if let Some(pids) = map.get("proc_pids").and_then(Value::as_array) {
            let count = pids.len();
            map.insert("proc_pids".into(), json!(format!("{count} pids")));
        }
        if let Some(procs) = map.get("proc_processes").and_then(Value::as_object) {
            let first: serde_json::Map<String, Value> =
                procs.iter().take(15).map(|(k, v)| (k.clone(), v.clone())).collect();
            map.insert("proc_processes".into(), json!({ "first 15": first, "count": procs.len() }));
        }
    }
    serde_json::to_string_pretty(&short).unwrap()
}

// ---------------------------------------------------------------- the hostile run

/// What one hostile run left behind.
struct Attack {
    report: Value,
    /// Every frame user A's socket received.
    a_frames: Vec<Value>,
    a_history: Value,
    a_root: PathBuf,
    a_home: PathBuf,
    a_project: PathBuf,
    /// Mode of A's workspace root right after the session was created (None: not there yet).
    a_root_mode_after_create: Option<u32>,
    b_root: PathBuf,
    /// Every secret value of the attack: the node's and B's.
    secrets: BTreeMap<String, String>,
    /// Host paths the hostile tried to create.
    writes: BTreeMap<String, PathBuf>,
    /// B's runs: frames of the concurrent paced run and of the run after the attack.
    b_during: Vec<Value>,
    b_after: Vec<Value>,
    b_session: String,
}

/// Runs the hostile CLI as user A (attacks `attacks`, all when None) while user B
/// streams a paced script run on its own socket; then B runs once more. Under bwrap the
/// CLI puts what it read into its report (so into A's stream).
async fn attack(gw: &Gateway, attacks: Option<&[&str]>) -> Attack {
    attack_exfiltrating(gw, attacks, gw.variant.sandbox == "bwrap").await
}

/// [`attack`], the CLI putting what it read into A's stream when `exfiltrate`.
async fn attack_exfiltrating(gw: &Gateway, attacks: Option<&[&str]>, exfiltrate: bool) -> Attack {
    let _one_at_a_time = HOSTILE_RUNS.lock().await;
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let (a, b) = (user(), user());
    let (token_a, token_b) = (gw.token(&a), gw.token(&b));

    // B: a session (its summary is a secret held in the database), a private file in
    // its workspace and one in its provider home.
    let b_summary = format!("b-summary-{nonce}");
    let (b_session, b_project) = gw.create(&token_b, "script", "proj", Some(&b_summary)).await;
    let b_root = gw.workspaces.join(enc(&b));
    assert_eq!(Path::new(&b_project), b_root.join("proj"), "B's project must be in B's own root");
    let b_home = gw.homes.join(enc(&b));
    mkdir_private(&b_root.join("proj"));
    mkdir_private(&b_home.join(".codex"));
    let b_file = b_root.join("proj").join("notes.txt");
    let b_home_file = b_home.join(".codex").join("auth.json");
    let b_file_value = format!("b-workspace-secret-{nonce}");
    let b_home_value = format!("b-home-secret-{nonce}");
    std::fs::write(&b_file, &b_file_value).unwrap();
    std::fs::write(&b_home_file, json!({ "OPENAI_API_KEY": b_home_value }).to_string()).unwrap();

    // A: a codex session in "proj" of its own root.
    let (a_session, a_project) = gw.create(&token_a, "codex", "proj", None).await;
    let a_root = gw.workspaces.join(enc(&a));
    let a_home = gw.homes.join(enc(&a));
    assert_eq!(Path::new(&a_project), a_root.join("proj"), "A's project must be in A's own root");
    let a_root_mode_after_create = mode_of(&a_root);
    if a_root_mode_after_create.is_none() {
        mkdir_private(&a_root);
    }
    let a_project = PathBuf::from(a_project);
    mkdir_private(&a_project);

    let mut secrets = gw.secrets.clone();
    secrets.insert("b_summary".into(), b_summary);
    secrets.insert("b_workspace_file".into(), b_file_value);
    secrets.insert("b_home_file".into(), b_home_value);

    let mut reads = BTreeMap::new();
    if let Some(db) = &gw.sqlite {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let name = format!("sqlite_db{}", suffix.replace('-', "_"));
            reads.insert(name, PathBuf::from(format!("{}{suffix}", db.display())));
        }
    }
    if let Some(file) = &gw.secret_file {
        reads.insert("jwt_secret_file".into(), file.clone());
    }
    if let Some(mount) = &gw.secret_mount {
        reads.extend(mount.reads(gw.node.pid().expect("gateway runs")));
    }
    reads.insert("b_workspace_file".into(), b_file.clone());
    reads.insert("b_home_file".into(), b_home_file.clone());
    let mut lists: BTreeMap<&str, &Path> = [
        ("workspaces_root", gw.workspaces.as_path()),
        ("homes_root", gw.homes.as_path()),
        ("b_root", b_root.as_path()),
        ("b_home", b_home.as_path()),
    ]
    .into();
    if let Some(mount) = &gw.secret_mount {
        lists.insert("secret_mount", mount.dir.as_path());
    }
    let file = format!("hostile-{nonce}");
    let writes: BTreeMap<String, PathBuf> = [
        ("workspaces_root", gw.workspaces.join(&file)),
        ("a_root", a_root.join(&file)),
        ("b_root", b_root.join(&file)),
        ("b_project", b_root.join("proj").join(&file)),
        ("homes_root", gw.homes.join(&file)),
        ("b_home", b_home.join(&file)),
        ("cli_dir", gw.cli_dir.join(&file)),
        ("host_tmp", PathBuf::from("/tmp").join(&file)),
        ("test_root", gw.root.join(&file)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let default_attacks = ["env", "proc", "read", "list", "write", "file_size", "memory", "memory_total", "fork"];
    let params = json!({
        "nonce": nonce,
        "gateway_pid": gw.node.pid().expect("gateway runs"),
        "gateway_exe": env!("CARGO_BIN_EXE_chatgate"),
        "secrets": &secrets,
        "reads": reads,
        "lists": lists,
        "writes": writes,
        "exfiltrate": exfiltrate,
        "attacks": attacks.unwrap_or(&default_attacks),
        "memory_bytes": 6u64 << 30,
        "memory_touch": RUN_MEMORY + (RUN_MEMORY >> 2),
        "memory_total_children": 3,
        "memory_total_each": MEMORY_TOTAL_EACH,
        "fork_count": 2000,
        "file_size_bytes": 2 * RUN_FILE_SIZE,
    });
    std::fs::write(a_project.join(".hostile.json"), serde_json::to_vec_pretty(&params).unwrap()).unwrap();

    let mut ws_a = gw.node.connect(&token_a).await;
    let mut ws_b = gw.node.connect(&token_b).await;
    ws_a.send_chat(&a_session, "run the tests").await;
    ws_b.send_chat(&b_session, &paced(50, 100)).await;
    let (a_frames, b_during) = tokio::join!(
        frames_until_complete(&mut ws_a, &a_session, RUN_WAIT),
        frames_until_complete(&mut ws_b, &b_session, RUN_WAIT)
    );
    ws_b.send_chat(&b_session, "still served after the attack").await;
    let b_after = frames_until_complete(&mut ws_b, &b_session, Duration::from_secs(20)).await;

    let report = a_frames
        .iter()
        .filter(|f| f["kind"] == "tool_use" && f["sessionId"] == a_session.as_str())
        .find_map(|f| f["output"].as_str().and_then(|o| serde_json::from_str::<Value>(o).ok()))
        .filter(|r| r["hostile"] == true)
        .unwrap_or_else(|| {
            panic!(
                "no report from the hostile CLI in A's stream; node stderr:\n{}\nframes: {a_frames:#?}",
                gw.node.stderr()
            )
        });
    let a_history = gw.history_complete(&token_a, &a_session).await;
    Attack {
        report,
        a_frames,
        a_history,
        a_root,
        a_home,
        a_project,
        a_root_mode_after_create,
        b_root,
        secrets,
        writes,
        b_during,
        b_after,
        b_session,
    }
}

/// The CLI's environment: only the allow-list, no secret, the operator's provider
/// variables, HOME the user's provider home, the run in the user's project.
fn check_environment(c: &mut Checks, gw: &Gateway, at: &Attack, tmpdir: &Path) {
    let r = &at.report;
    let env = r["env"].as_object().cloned().unwrap_or_default();
    c.check(r["params_error"].is_null(), format!("the CLI could not read its .hostile.json: {}", r["params_error"]));
    c.check(!env.is_empty(), "the report has no environment");
    c.check(
        str_list(&r["env_forbidden_names"]).is_empty(),
        format!("forbidden variables in the CLI's environment: {}", r["env_forbidden_names"]),
    );
    c.check(
        str_list(&r["env_secrets"]).is_empty(),
        format!("secret values in the CLI's environment: {}", r["env_secrets"]),
    );
    let allowed_fixed = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "TZ",
        "TMPDIR",
        "TERM",
        &gw.provider_env.0,
        &gw.provider_env_file.0,
    ];
    // bubblewrap's `--chdir` sets PWD (to the project directory): harmless.
    let project = at.a_project.to_string_lossy().into_owned();
    let pwd_is_cwd = |k: &str| k == "PWD" && env.get(k).and_then(Value::as_str) == Some(project.as_str());
    let extra: Vec<&String> = env
        .keys()
        .filter(|k| !allowed_fixed.contains(&k.as_str()) && !k.starts_with("LC_") && !pwd_is_cwd(k))
        .collect();
    c.check(extra.is_empty(), format!("variables outside the allow-list in the CLI's environment: {extra:?}"));
    let var = |name: &str| env.get(name).and_then(Value::as_str).map(str::to_string);
    c.check(
        var(&gw.provider_env.0).as_deref() == Some(gw.provider_env.1.as_str()),
        format!("--provider-env {} did not reach the CLI: {:?}", gw.provider_env.0, var(&gw.provider_env.0)),
    );
    c.check(
        var(&gw.provider_env_file.0).as_deref() == Some(gw.provider_env_file.1.as_str()),
        format!(
            "--provider-env-file {} did not reach the CLI (trailing newline trimmed): {:?}",
            gw.provider_env_file.0,
            var(&gw.provider_env_file.0)
        ),
    );
    let home = at.a_home.to_string_lossy().into_owned();
    c.check(var("HOME").as_deref() == Some(home.as_str()), format!("HOME is {:?}, want {home}", var("HOME")));
    c.check(var("USER").as_deref() == Some("chatgate"), format!("USER is {:?}", var("USER")));
    c.check(var("LOGNAME").as_deref() == Some("chatgate"), format!("LOGNAME is {:?}", var("LOGNAME")));
    c.check(var("TERM").as_deref() == Some("dumb"), format!("TERM is {:?}", var("TERM")));
    c.check(var("LANG").as_deref() == Some("C.UTF-8"), format!("LANG is {:?} (passes through)", var("LANG")));
    c.check(var("TZ").as_deref() == Some("UTC"), format!("TZ is {:?} (passes through)", var("TZ")));
    c.check(var("PATH") == std::env::var("PATH").ok(), format!("PATH is {:?}, want the gateway's", var("PATH")));
    let tmp = tmpdir.to_string_lossy().into_owned();
    c.check(var("TMPDIR").as_deref() == Some(tmp.as_str()), format!("TMPDIR is {:?}, want {tmp}", var("TMPDIR")));
    c.check(r["cwd"] == project.as_str(), format!("the CLI ran in {}, want {project}", r["cwd"]));
    c.check(
        at.a_root_mode_after_create.is_none_or(|m| m == 0o700),
        format!("A's workspace root has mode {:o}, want 0700", at.a_root_mode_after_create.unwrap_or(0)),
    );
    c.check(
        mode_of(&at.a_root) == Some(0o700),
        format!("A's workspace root has mode {:?}, want 0700", mode_of(&at.a_root).map(|m| format!("{m:o}"))),
    );
    c.check(at.a_home.is_dir(), format!("A's provider home {} was not created", at.a_home.display()));
    c.check(!at.a_home.starts_with(&gw.workspaces), "A's provider home lies inside the workspaces root");
}

/// No secret value in anything user A got (its frames and its history), and none in
/// what the CLI managed to read.
fn check_nothing_leaked(c: &mut Checks, at: &Attack) {
    check_nothing_leaked_in_stream(c, at);
    for (name, found) in at.report["reads"].as_object().into_iter().flatten() {
        let leaked = str_list(&found["secrets"]);
        c.check(leaked.is_empty(), format!("reading {name} ({}) gave the CLI secrets {leaked:?}", found["path"]));
    }
}

/// No secret value in user A's frames and history.
fn check_nothing_leaked_in_stream(c: &mut Checks, at: &Attack) {
    let frames = serde_json::to_string(&at.a_frames).unwrap();
    let history = serde_json::to_string(&at.a_history).unwrap();
    for (name, value) in &at.secrets {
        c.check(!frames.contains(value.as_str()), format!("secret {name} reached user A's stream"));
        c.check(!history.contains(value.as_str()), format!("secret {name} reached user A's history"));
    }
}

/// Everything the sandbox must stop (`--sandbox bwrap`).
fn check_contained(c: &mut Checks, gw: &Gateway, at: &Attack) {
    let r = &at.report;
    // Identity and privileges.
    c.check(r["uid"] == 1000, format!("the CLI runs as uid {}, want 1000 (in its user namespace)", r["uid"]));
    let cap_eff = r["status"]["CapEff"].as_str().unwrap_or("?");
    c.check(cap_eff.trim_start_matches('0').is_empty(), format!("the CLI has capabilities: CapEff {cap_eff}"));

    // /proc: its own PID namespace.
    c.check(r["proc_list_error"].is_null(), format!("/proc could not be listed: {}", r["proc_list_error"]));
    c.check(r["gateway_visible"] == false, "the gateway process is visible in the CLI's /proc");
    let gateway_pid = gw.node.pid().expect("gateway runs");
    let procs = r["proc_processes"].as_object().cloned().unwrap_or_default();
    let gateway_exe = env!("CARGO_BIN_EXE_chatgate");
    let visible_gateway: Vec<&String> = procs
        .iter()
        .filter(|(_, argv)| argv.as_array().and_then(|a| a.first()).is_some_and(|a0| a0 == gateway_exe))
        .map(|(pid, _)| pid)
        .collect();
    c.check(visible_gateway.is_empty(), format!("gateway processes visible in /proc: pids {visible_gateway:?}"));
    c.check(
        procs.len() < 20,
        format!(
            "the CLI sees {} processes in /proc (want only its own few): {:?}",
            procs.len(),
            procs.keys().take(30).collect::<Vec<_>>()
        ),
    );
    for name in ["gateway_environ", "gateway_cmdline"] {
        let read = &r["reads"][name];
        c.check(
            !(read["ok"] == true && read["is_gateway"] == true),
            format!("the CLI read the gateway's {name} (pid {gateway_pid}): {read}"),
        );
    }
    for name in ["proc_1_environ", "ppid_environ", "gateway_environ"] {
        c.check(
            str_list(&r["reads"][name]["secrets"]).is_empty(),
            format!("{name} holds secrets: {}", r["reads"][name]),
        );
    }
    let leaks = r["proc_environ_leaks"].as_object().cloned().unwrap_or_default();
    c.check(leaks.is_empty(), format!("processes whose environ holds secrets, readable by the CLI: {leaks:?}"));

    // Files: the database, the secret file, B's workspace and home.
    for (name, read) in r["reads"].as_object().into_iter().flatten() {
        if name.starts_with("proc_") || name.starts_with("ppid_") || name.starts_with("gateway_") {
            continue;
        }
        let unreadable = read["ok"] == false || read["bytes"] == 0;
        c.check(unreadable, format!("the CLI read {name} ({}): {} bytes", read["path"], read["bytes"]));
    }
    let b_name = enc_name(&at.b_root);
    for (name, listing) in r["lists"].as_object().into_iter().flatten() {
        let entries = str_list(&listing["entries"]);
        if name == "workspaces_root" || name == "homes_root" {
            c.check(
                !entries.contains(&b_name),
                format!("the CLI lists B's directory {b_name} in {name} ({}): {entries:?}", listing["path"]),
            );
        } else {
            c.check(
                listing["ok"] == false || entries.is_empty(),
                format!("the CLI lists {name} ({}): {entries:?}", listing["path"]),
            );
        }
    }

    // Writes outside its project and home reach nothing on the host.
    for (name, path) in &at.writes {
        let exists = path.exists();
        c.check(
            !exists,
            format!("the CLI created {name} {} on the host (its answer: {})", path.display(), r["writes"][name]),
        );
        if exists {
            let _ = std::fs::remove_file(path);
        }
    }

    // Resource limits.
    let forked = r["fork"]["ok"].as_u64();
    c.check(
        forked.is_some_and(|n| n <= RUN_PROCESSES),
        format!("the CLI started {forked:?} of 2000 processes; --run-processes is {RUN_PROCESSES}: {}", r["fork"]),
    );
    c.check(r["fork"]["error"].is_string(), format!("fork never failed: {}", r["fork"]));
    let memory = r["memory"]["result"].as_str().unwrap_or("");
    c.check(
        memory == "MemoryError" || memory.starts_with("killed:"),
        format!(
            "allocating 6 GiB and touching {} MiB with --run-memory 1GiB: {memory:?} (want MemoryError or killed): {}",
            (RUN_MEMORY + (RUN_MEMORY >> 2)) >> 20,
            r["memory"]
        ),
    );
    // Together, where a memory cgroup can be made on this node (README's `--run-memory`: "where one
    // can be made"; this test probes the host the same way).
    let total = &r["memory_total"];
    if memory_cgroup_possible() {
        c.check(
            total["children"] == 3 && total["touched"].as_u64().is_some_and(|t| t < 3),
            format!(
                "3 processes touched {} MiB each with --run-memory 1GiB and a memory cgroup possible here: {total}",
                MEMORY_TOTAL_EACH >> 20
            ),
        );
    }
    let written = r["file_size"]["written"].as_u64();
    c.check(
        forked.is_some() && written.is_some_and(|w| w <= RUN_FILE_SIZE) && r["file_size"]["error"].is_string(),
        format!("writing 2 MiB with --run-file-size 1MiB: {}", r["file_size"]),
    );
}

/// Whether this host lets root make a cgroup with the memory controller (v1, or a
/// v2 root that hands `memory` to its children).
fn memory_cgroup_possible() -> bool {
    let probe = |dir: PathBuf| std::fs::create_dir(&dir).is_ok() && std::fs::remove_dir(&dir).is_ok();
    let name = format!("chatgate-probe-{}", uuid::Uuid::new_v4().simple());
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("cgroup.procs").exists() {
        return probe(v1.join(name));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    controllers.split_whitespace().any(|c| c == "memory") && probe(v2.join(name))
}

/// The last path component (a user's encoded directory name).
fn enc_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// B's runs went on as if nothing happened, and so did the node.
async fn check_bystander_and_node(c: &mut Checks, gw: &mut Gateway, at: &Attack) {
    let b = &at.b_session;
    let deltas = at.b_during.iter().filter(|f| f["kind"] == "stream_delta" && f["sessionId"] == b.as_str()).count();
    c.check(deltas == 50, format!("B's paced run during the attack streamed {deltas} of 50 deltas"));
    let done = complete_of(&at.b_during, b);
    c.check(done["exitCode"] == 0, format!("B's run during the attack ended {done}"));
    let after = complete_of(&at.b_after, b);
    c.check(after["exitCode"] == 0, format!("B's run after the attack ended {after}"));
    gw.assert_alive().await;
    let stderr = gw.node.stderr();
    c.check(!stderr.contains("panicked"), format!("the node panicked:\n{stderr}"));
}

/// `/readyz` names the sandbox, `/metrics` has `chatgate_sandbox_active`.
async fn check_readyz(c: &mut Checks, gw: &Gateway, sandbox: &str) {
    let (status, body) = gw.get("/readyz").await;
    let value: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    c.check(status == 200 && value["sandbox"] == sandbox, format!("/readyz {status} {body}: want sandbox {sandbox}"));
    let (_, metrics) = gw.get("/metrics").await;
    let want = if sandbox == "bwrap" { 1.0 } else { 0.0 };
    let active = metric(&metrics, "chatgate_sandbox_active");
    c.check(active == Some(want), format!("/metrics chatgate_sandbox_active is {active:?}, want {want}"));
}

/// The value of the sample `name` (with its labels, if any) in a Prometheus text page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// With the secrets as files, the gateway's own environment names the files and holds no
/// secret value (read as the test's root, past the gateway's non-dumpable flag).
fn check_gateway_environment(c: &mut Checks, gw: &Gateway) {
    let Some(mount) = &gw.secret_mount else { return };
    let pid = gw.node.pid().expect("gateway runs");
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(environ) => {
            let environ = String::from_utf8_lossy(&environ);
            // The gateway's own secrets (the canary is in its environment on purpose).
            for name in ["jwt_secret", "database_url", "redis_url"] {
                let Some(value) = gw.secrets.get(name) else { continue };
                c.check(!environ.contains(value.as_str()), format!("the gateway's environment holds {name}"));
            }
            let jwt_file = format!("CHATGATE_JWT_SECRET_FILE={}", mount.path("jwt-secret").display());
            c.check(environ.contains(&jwt_file), format!("the gateway's environment lacks {jwt_file}"));
        }
        // Not root (no CAP_SYS_PTRACE): the CLI's side of the attack still counts.
        Err(e) => eprintln!("the gateway's environment is unreadable here ({e}); not checked"),
    }
}

/// The full attack under bubblewrap, every check.
async fn hostile_run_is_contained(variant: Variant) {
    let mut gw = Gateway::start(variant).await;
    let at = attack(&gw, None).await;
    let mut c = Checks::default();
    check_environment(&mut c, &gw, &at, Path::new("/tmp"));
    check_nothing_leaked(&mut c, &at);
    check_contained(&mut c, &gw, &at);
    check_gateway_environment(&mut c, &gw);
    let complete = complete_of(&at.a_frames, at.a_frames.last().unwrap()["sessionId"].as_str().unwrap());
    c.check(complete["exitCode"] == 0, format!("the hostile run ended {complete}"));
    check_bystander_and_node(&mut c, &mut gw, &at).await;
    check_readyz(&mut c, &gw, "bwrap").await;
    c.finish(&format!("hostile report: {}", report_summary(&at.report)));
}

// ---------------------------------------------------------------- the tests

/// SQLite, `CHATGATE_JWT_SECRET` and `DATABASE_URL` in the node's environment; the
/// database's directory is bound read-only into the sandbox (`--sandbox-ro-paths`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwrap_contains_a_hostile_cli_sqlite_secret_in_env() {
    hostile_run_is_contained(Variant::bwrap(Db::Sqlite, SecretIn::Env)).await;
}

/// SQLite, `--jwt-secret-file` lying next to the CLI program (whose directory the
/// sandbox binds read-only: the file must be masked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwrap_contains_a_hostile_cli_sqlite_secret_file_next_to_the_cli() {
    hostile_run_is_contained(Variant::bwrap(Db::Sqlite, SecretIn::FileNextToCli)).await;
}

/// PostgreSQL (`DATABASE_URL` in the environment), `--jwt-secret-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwrap_contains_a_hostile_cli_postgres_secret_file() {
    hostile_run_is_contained(Variant::bwrap(Db::Postgres, SecretIn::File)).await;
}

/// Cluster mode: `REDIS_URL` (the shared Redis), PostgreSQL, `CHATGATE_JWT_SECRET`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwrap_contains_a_hostile_cli_cluster_mode() {
    hostile_run_is_contained(Variant { cluster: true, ..Variant::bwrap(Db::Postgres, SecretIn::Env) }).await;
}

/// The secrets as files mounted like a Kubernetes Secret volume outside the workspaces
/// (the chart's `auth.mountAsFiles`, kustomize's `components/secret-files`), cluster mode,
/// PostgreSQL: the CLI reads each file by its path, through `..data`, in the timestamped
/// directory and through `/proc/1/root`, `/proc/self/root` and `/proc/<gateway>/root`,
/// lists the directory and searches every `/proc/*/environ`; it gets nothing, no secret
/// byte reaches A's stream or history, and the gateway's environment holds none either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bwrap_contains_a_hostile_cli_secrets_mounted_as_files() {
    hostile_run_is_contained(Variant { cluster: true, ..Variant::bwrap(Db::Postgres, SecretIn::MountedFiles) }).await;
}

/// Why the manifests accept secret files only with `CHATGATE_SANDBOX=bwrap`: without a
/// sandbox the same CLI (root without capabilities here; in a pod, the gateway's uid)
/// simply reads the mounted files, and the secrets reach A's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_sandbox_mounted_secret_files_reach_the_stream() {
    let variant = Variant { sandbox: "none", cluster: true, ..Variant::bwrap(Db::Postgres, SecretIn::MountedFiles) };
    let gw = Gateway::start(variant).await;
    let at = attack_exfiltrating(&gw, Some(&["read"]), true).await;
    let mut c = Checks::default();
    check_nothing_leaked(&mut c, &at);
    let found = c.0.join("\n");
    for want in [
        "reading jwt_secret_file",
        "reading mounted_database_url",
        "reading mounted_redis_url",
        "secret jwt_secret reached user A's stream",
        "secret database_url reached user A's stream",
        "secret redis_url reached user A's stream",
    ] {
        assert!(found.contains(want), "{want:?} did not happen without a sandbox; what did:\n{found}");
    }
}

/// `--sandbox none` (the CLI runs as root here, so it can read what root can): the
/// environment is still clean, the gateway's command line holds no secret, and the
/// run is in the user's own root with the user's own provider home.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sandbox_still_gives_a_clean_environment_and_per_user_roots() {
    let variant = Variant { sandbox: "none", ..Variant::bwrap(Db::Sqlite, SecretIn::Env) };
    let mut gw = Gateway::start(variant).await;
    let at = attack(&gw, Some(&["env", "proc"])).await;
    let mut c = Checks::default();
    check_environment(&mut c, &gw, &at, &at.a_home.join(".tmp"));
    let r = &at.report;
    let gateway_pid = gw.node.pid().expect("gateway runs");
    c.check(r["ppid"] == gateway_pid, format!("the CLI's parent is {}, want the gateway {gateway_pid}", r["ppid"]));
    for name in ["gateway_cmdline", "ppid_cmdline"] {
        let read = &r["reads"][name];
        c.check(read["ok"] == true, format!("{name} unreadable as root without a sandbox? {read}"));
        c.check(str_list(&read["secrets"]).is_empty(), format!("the gateway's command line holds secrets: {read}"));
    }
    // Even started by root, the CLI has no capability (no CAP_SYS_PTRACE), so the
    // non-dumpable gateway's environment stays closed to it.
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        let caps = r["status"][key].as_str().unwrap_or("?");
        c.check(caps.trim_start_matches('0').is_empty(), format!("the CLI has capabilities: {key} {caps}"));
    }
    for name in ["gateway_environ", "ppid_environ"] {
        let read = &r["reads"][name];
        c.check(read["ok"] != true, format!("the CLI read the gateway's {name} without a sandbox: {read}"));
    }
    check_nothing_leaked_in_stream(&mut c, &at);
    check_bystander_and_node(&mut c, &mut gw, &at).await;
    check_readyz(&mut c, &gw, "none").await;
    c.finish(&format!("hostile report: {}", report_summary(&at.report)));
}

/// The checks are not vacuous: the same attack without a sandbox (the CLI runs as
/// root here) is seen getting through: the gateway in `/proc`, the database, B's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_see_through_an_unsandboxed_cli() {
    let variant = Variant { sandbox: "none", ..Variant::bwrap(Db::Sqlite, SecretIn::FileNextToCli) };
    let gw = Gateway::start(variant).await;
    let at = attack(&gw, Some(&["env", "proc", "read", "list", "write"])).await;
    let mut c = Checks::default();
    check_contained(&mut c, &gw, &at);
    let found = c.0.join("\n");
    for want in [
        "the gateway process is visible",
        "the CLI read sqlite_db",
        "the CLI read jwt_secret_file",
        "the CLI read b_workspace_file",
        "the CLI read b_home_file",
        "the CLI created b_root",
        "the CLI created host_tmp",
    ] {
        assert!(found.contains(want), "check {want:?} did not fire without a sandbox; fired:\n{found}");
    }
}

/// The gateway writes a run's `options.images` into the project (`.tmp/images/…`),
/// on the host, outside the sandbox. The CLI may write its project, so it plants
/// `.tmp` -> another user's root in one run; the next run's images must not land
/// there (the gateway must not follow a symlink out of the project).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_images_do_not_follow_a_symlink_the_cli_planted() {
    let gw = Gateway::start(Variant::bwrap(Db::Sqlite, SecretIn::Env)).await;
    let (a, b) = (user(), user());
    let (token_a, token_b) = (gw.token(&a), gw.token(&b));
    let (_, b_project) = gw.create(&token_b, "script", "proj", None).await;
    let b_root = gw.workspaces.join(enc(&b));
    assert_eq!(Path::new(&b_project), b_root.join("proj"));
    let (session, a_project) = gw.create(&token_a, "codex", "proj", None).await;
    mkdir_private(Path::new(&a_project));
    let mut ws = gw.node.connect(&token_a).await;

    ws.send_chat(&session, &format!("symlink {} .tmp", b_root.display())).await;
    let frames = frames_until_complete(&mut ws, &session, Duration::from_secs(30)).await;
    let planted = Path::new(&a_project).join(".tmp");
    assert!(
        std::fs::symlink_metadata(&planted).is_ok_and(|m| m.file_type().is_symlink()),
        "the CLI could not plant its symlink: {frames:#?}"
    );

    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let payload = format!("planted-by-{nonce}");
    let data =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(payload.as_bytes()));
    ws.send(json!({
        "type": "chat.send",
        "sessionId": session,
        "content": "sleep 2",
        "options": { "images": [{ "data": data }] },
    }))
    .await;
    let escaped = b_root.join("images");
    let mut seen = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if seen.is_none() && escaped.exists() {
            seen = Some(walk(&escaped));
        }
        match ws.try_recv(Duration::from_millis(20)).await {
            Some(Ok(f)) if f["kind"] == "complete" && f["sessionId"] == session.as_str() => break,
            Some(Err(close)) => panic!("socket closed: {close:?}"),
            _ => assert!(tokio::time::Instant::now() < deadline, "the run never completed"),
        }
    }
    assert!(
        seen.is_none(),
        "the gateway followed the CLI's symlink {} -> {} and wrote the run's images into B's root: {:?}",
        planted.display(),
        b_root.display(),
        seen.unwrap_or_default()
    );
}

/// Every file under `dir` (for a failure message).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Per-user layout: A cannot make a session in B's root, by absolute path, `..`
/// or a symlink; A's relative paths land in A's root; user ids are encoded so one
/// cannot name another's directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cannot_point_into_another_users_root() {
    let gw = Gateway::start(Variant { sandbox: "none", ..Variant::bwrap(Db::Sqlite, SecretIn::Env) }).await;
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let a = format!("alice.b@{}", &hex[..12]);
    let b = user();
    let (token_a, token_b) = (gw.token(&a), gw.token(&b));
    let a_root = gw.workspaces.join(enc(&a));
    let b_root = gw.workspaces.join(enc(&b));
    assert_eq!(enc(&a), format!("alice_2eb_40{}", &hex[..12]));

    let (_, b_project) = gw.create(&token_b, "script", "proj", None).await;
    assert_eq!(Path::new(&b_project), b_root.join("proj"));
    mkdir_private(&b_root.join("proj"));
    let (_, a_project) = gw.create(&token_a, "script", "proj", None).await;
    assert_eq!(Path::new(&a_project), a_root.join("proj"), "a relative projectPath is taken from the user's root");
    mkdir_private(&a_root.join("proj"));
    let (_, a_abs) = gw.create(&token_a, "script", &a_root.join("proj").to_string_lossy(), None).await;
    assert_eq!(Path::new(&a_abs), a_root.join("proj"), "an absolute path inside the user's root is fine");
    std::os::unix::fs::symlink(&b_root, a_root.join("to-b")).unwrap();

    let b_name = enc(&b);
    let refused = [
        b_root.join("proj").to_string_lossy().into_owned(),
        b_root.to_string_lossy().into_owned(),
        gw.workspaces.to_string_lossy().into_owned(),
        gw.homes.join(enc(&a)).to_string_lossy().into_owned(),
        format!("{}/../{b_name}/proj", a_root.display()),
        format!("../{b_name}/proj"),
        format!("../{b_name}"),
        "..".to_string(),
        "to-b".to_string(),
        "to-b/proj".to_string(),
        "/".to_string(),
    ];
    for path in &refused {
        let (status, body) = gw.try_create(&token_a, "codex", path, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("PROJECT_PATH_OUTSIDE_WORKSPACES")),
            "A's projectPath {path:?} must be refused: {body}"
        );
    }

    // A user whose id spells a path is still one directory of the root.
    let evil = format!("../{b}");
    let (_, evil_project) = gw.create(&gw.token(&evil), "script", "proj", None).await;
    let evil_root = gw.workspaces.join(enc(&evil));
    assert_eq!(Path::new(&evil_project), evil_root.join("proj"));
    assert_eq!(evil_root.parent(), Some(gw.workspaces.as_path()));
    assert_ne!(evil_root, b_root);
}

/// `--max-runs 1`: a second concurrent `chat.send` gets `NODE_BUSY`, nothing starts;
/// once the first run ended, a send works again. `/readyz` and `/metrics` say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_runs_refuses_a_second_run_with_node_busy() {
    let variant = Variant { sandbox: "none", max_runs: Some(1), ..Variant::bwrap(Db::Sqlite, SecretIn::Env) };
    let gw = Gateway::start(variant).await;
    let (a, b) = (user(), user());
    let (token_a, token_b) = (gw.token(&a), gw.token(&b));
    let (first, _) = gw.create(&token_a, "script", "proj", None).await;
    let (second, _) = gw.create(&token_b, "script", "proj", None).await;
    let mut ws_a = gw.node.connect(&token_a).await;
    let mut ws_b = gw.node.connect(&token_b).await;

    ws_a.send_chat(&first, &paced(30, 100)).await;
    ws_a.recv_until(|f| f["kind"] == "stream_delta" && f["sessionId"] == first.as_str()).await;
    let (_, ready) = gw.get("/readyz").await;
    let ready: Value = serde_json::from_str(&ready).unwrap_or(Value::Null);
    assert_eq!((ready["runs"]["running"].as_u64(), ready["runs"]["max"].as_u64()), (Some(1), Some(1)), "{ready}");

    ws_b.send_chat(&second, "one too many").await;
    let refusal = next_reply(&mut ws_b, Duration::from_secs(10)).await;
    assert_protocol_error(&refusal, "NODE_BUSY");
    assert_eq!(refusal["sessionId"], second.as_str(), "{refusal}");
    ws_b.expect_silence(Duration::from_millis(300)).await;
    let (_, history) = gw.request("GET", &format!("/api/providers/sessions/{second}/messages"), &token_b, None).await;
    assert_eq!(history["data"]["messages"], json!([]), "a refused send leaves no history: {history}");

    let first_frames = frames_until_complete(&mut ws_a, &first, Duration::from_secs(30)).await;
    assert_eq!(complete_of(&first_frames, &first)["exitCode"], 0);

    // The slot is free once the run ended (allow the owner a moment to release it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        ws_b.send_chat(&second, "now there is room").await;
        let reply = next_reply(&mut ws_b, Duration::from_secs(10)).await;
        if reply["kind"] == "protocol_error" && reply["code"] == "NODE_BUSY" && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_ne!(reply["kind"], "protocol_error", "{reply}");
        let rest = frames_until_complete(&mut ws_b, &second, Duration::from_secs(20)).await;
        assert_eq!(complete_of(&rest, &second)["exitCode"], 0);
        break;
    }

    let (_, metrics) = gw.get("/metrics").await;
    let value = |name: &str| metric(&metrics, name);
    assert!(
        value("chatgate_limit_refusals_total{limit=\"max_runs\"}").is_some_and(|v| v >= 1.0),
        "no max_runs refusal counted:\n{metrics}"
    );
    assert_eq!(value("chatgate_runs_max"), Some(1.0), "chatgate_runs_max:\n{metrics}");
    assert_eq!(value("chatgate_sandbox_active"), Some(0.0), "chatgate_sandbox_active with --sandbox none:\n{metrics}");
}

/// Waits for a node that must refuse to start; its exit status and stderr.
async fn refused_start(
    args: &[OsString],
    env: &[(String, String)],
    log_dir: &Path,
) -> (std::process::ExitStatus, String) {
    let node = common::spawn_node_env(args, env, log_dir);
    let status = node.exited(Duration::from_secs(15)).await.unwrap();
    (status, node.stderr())
}

/// The flags a minimal per-user node needs (SQLite in `dir`), and its environment.
fn minimal(dir: &Path) -> (Vec<OsString>, Vec<(String, String)>) {
    let args = vec![
        os("--workspace-layout"),
        os("per-user"),
        os("--workspaces-root"),
        os(dir.join("workspaces")),
        os("--providers"),
        os("script"),
    ];
    let env = vec![
        ("CHATGATE_JWT_SECRET".to_string(), "a-secret".to_string()),
        ("DATABASE_URL".to_string(), format!("sqlite://{}?mode=rwc", dir.join("chatgate.db").display())),
    ];
    (args, env)
}

/// A homes root inside the workspaces root is refused at start (one line naming the
/// flag); the same node with the homes root beside it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_homes_root_inside_the_workspaces_root_is_refused_at_start() {
    let dir = tempfile::Builder::new().prefix("containment-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::create_dir_all(dir.path().join("workspaces")).unwrap();
    let (args, env) = minimal(dir.path());

    let good = [&args[..], &[os("--homes-root"), os(dir.path().join("homes"))]].concat();
    let node = common::spawn_node_env(&good, &env, dir.path());
    node.wait_ready().await.expect("node ready");
    drop(node);

    let inside = [&args[..], &[os("--homes-root"), os(dir.path().join("workspaces").join("homes"))]].concat();
    let (status, stderr) = refused_start(&inside, &env, dir.path()).await;
    assert!(!status.success(), "a homes root inside the workspaces root was accepted");
    assert!(stderr.contains("homes-root"), "the refusal must name --homes-root: {stderr}");
}

/// `--sandbox bwrap` starts where bubblewrap works, and refuses to start when the
/// configured `--bwrap-bin` cannot run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_bwrap_refuses_to_start_when_bwrap_cannot_run() {
    let dir = tempfile::Builder::new().prefix("containment-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::create_dir_all(dir.path().join("workspaces")).unwrap();
    let (args, env) = minimal(dir.path());
    let base = [&args[..], &[os("--homes-root"), os(dir.path().join("homes")), os("--sandbox"), os("bwrap")]].concat();

    let node = common::spawn_node_env(&base, &env, dir.path());
    node.wait_ready().await.expect("node ready");
    let ready: Value = reqwest::get(format!("{}/readyz", node.base)).await.unwrap().json().await.unwrap();
    assert_eq!(ready["sandbox"], "bwrap", "{ready}");
    drop(node);

    for bad in ["/bin/false", "/nonexistent/bwrap"] {
        let args = [&base[..], &[os("--bwrap-bin"), os(bad)]].concat();
        let (status, stderr) = refused_start(&args, &env, dir.path()).await;
        assert!(!status.success(), "--sandbox bwrap --bwrap-bin {bad} started");
        assert!(stderr.contains("bwrap"), "the refusal must say bwrap cannot run: {stderr}");
    }
}
