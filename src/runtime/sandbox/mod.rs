//! Containment of provider CLIs: what an agent's commands can reach.
//!
//! A CLI runs commands a model chose, so whatever it can read, its user can
//! read. [`Containment`] is the node's policy (set once from the flags);
//! [`Launch`] applies it to one run and builds the command that starts the CLI:
//!
//! - an environment from an allow-list ([`env`]), never the gateway's own;
//! - resource bounds ([`limits`]): rlimits on every process, a cgroup per run
//!   where the node can make one;
//! - with `--sandbox bwrap`, a bubblewrap sandbox ([`bwrap`]): its own mount,
//!   PID, IPC and user namespaces, the project and the user's provider home
//!   read-write, system directories read-only, a private `/tmp`, a `/proc` with
//!   only its own processes, no capabilities, and nothing of the gateway's
//!   database, secret files or other users' directories.

pub mod bwrap;
pub mod env;
pub mod limits;

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::process::Command;

pub use env::EnvPolicy;
pub use limits::{CgroupBase, RunCgroup, RunLimits};

/// `--sandbox` as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxSetting {
    /// bubblewrap when it works on this node, else none (with a warning).
    Auto,
    /// bubblewrap, required: a node where it cannot run refuses to start.
    Bwrap,
    /// No sandbox: only the clean environment and the resource bounds.
    None,
}

impl SandboxSetting {
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "auto" => Ok(SandboxSetting::Auto),
            "bwrap" => Ok(SandboxSetting::Bwrap),
            "none" => Ok(SandboxSetting::None),
            other => Err(format!("expected auto, bwrap or none, got \"{other}\"")),
        }
    }
}

/// The sandbox in effect on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    Bwrap,
    None,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Bwrap => "bwrap",
            SandboxMode::None => "none",
        }
    }
}

/// Why the node cannot contain its CLIs as configured.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "--sandbox bwrap: bubblewrap cannot run on this node ({0}); install it (Debian: bubblewrap), allow user namespaces, or choose --sandbox none"
    )]
    BwrapUnavailable(String),
    #[error("cannot prepare the sandbox: {0}")]
    Setup(#[from] io::Error),
}

/// The node's containment policy for every CLI it starts.
#[derive(Debug)]
pub struct Containment {
    mode: SandboxMode,
    bwrap: Option<bwrap::Bwrap>,
    env: EnvPolicy,
    limits: Option<RunLimits>,
    cgroups: Option<CgroupBase>,
    /// Without bwrap (which drops them itself) a CLI started by root would keep
    /// every capability, CAP_SYS_PTRACE among them: enough to read the
    /// non-dumpable gateway's memory and environment. `Some(last capability)`
    /// when the CLIs' bounding set must be emptied; decided once at start.
    drop_caps_to: Option<u32>,
}

/// What a node's containment is built from (the flags).
#[derive(Debug, Clone)]
pub struct ContainmentOptions {
    pub sandbox: SandboxSetting,
    pub bwrap_bin: String,
    /// Extra host paths the sandbox sees read-only.
    pub ro_paths: Vec<PathBuf>,
    /// Paths no CLI may see even when they lie under a directory it gets
    /// (the SQLite files, secret files, the homes root).
    pub protected: Vec<PathBuf>,
    pub env: EnvPolicy,
    pub limits: RunLimits,
}

impl Containment {
    /// Sets up the node's policy: probes bubblewrap (for `auto` and `bwrap`)
    /// and finds a cgroup hierarchy for per-run bounds.
    pub async fn new(options: ContainmentOptions) -> Result<Containment, SandboxError> {
        let mut protected = options.protected.clone();
        protected.extend(options.env.secret_files().map(Path::to_path_buf));
        let bwrap = match options.sandbox {
            SandboxSetting::None => None,
            SandboxSetting::Auto | SandboxSetting::Bwrap => {
                match bwrap::Bwrap::prepare(&options.bwrap_bin, &options.ro_paths, protected).await {
                    Ok(bwrap) => Some(bwrap),
                    Err(reason) if options.sandbox == SandboxSetting::Bwrap => {
                        return Err(SandboxError::BwrapUnavailable(reason));
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "--sandbox auto: bubblewrap cannot run here; provider CLIs run \
                            WITHOUT a sandbox (they can read whatever this process's user can)");
                        None
                    }
                }
            }
        };
        let mode = if bwrap.is_some() { SandboxMode::Bwrap } else { SandboxMode::None };
        let cgroups = tokio::task::spawn_blocking(CgroupBase::detect).await.ok().flatten();
        tracing::info!(sandbox = mode.as_str(), run_cgroups = cgroups.is_some(), "provider CLI containment");
        let drop_caps_to = (bwrap.is_none() && nix::unistd::geteuid().is_root()).then(last_capability);
        Ok(Containment { mode, bwrap, env: options.env, limits: Some(options.limits), cgroups, drop_caps_to })
    }

    /// No sandbox, no bounds, the allow-listed environment with the gateway's
    /// own `HOME`: for runtimes driven outside a node (tests, tools).
    pub fn unconfined() -> Containment {
        Containment {
            mode: SandboxMode::None,
            bwrap: None,
            env: EnvPolicy::default(),
            limits: None,
            cgroups: None,
            drop_caps_to: None,
        }
    }

    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    /// Removes the node's cgroup directories (at exit).
    pub fn shut_down(&self) {
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove();
        }
    }
}

/// The containment of one run: its user's home and its project directory.
#[derive(Debug, Clone)]
pub struct Launch {
    containment: Arc<Containment>,
    /// The user's provider home (the CLI's `HOME`), or `None` for the gateway's.
    home: Option<PathBuf>,
    /// The session's project directory (read-write in the sandbox).
    project: Option<PathBuf>,
    run_id: String,
}

/// A CLI command ready to spawn, with the run's cgroup (kept until the run ends).
#[derive(Debug)]
pub struct Prepared {
    pub command: Command,
    pub cgroup: Option<Arc<RunCgroup>>,
}

impl Launch {
    pub fn new(containment: Arc<Containment>, home: PathBuf, project: PathBuf, run_id: &str) -> Launch {
        Launch { containment, home: Some(home), project: Some(project), run_id: run_id.to_string() }
    }

    /// No containment at all ([`Containment::unconfined`]).
    pub fn unconfined() -> Launch {
        Launch { containment: Arc::new(Containment::unconfined()), home: None, project: None, run_id: String::new() }
    }

    /// The command that runs `program args` in `cwd` under this run's containment.
    pub fn command(&self, program: &str, args: &[String], cwd: &Path) -> io::Result<Prepared> {
        let containment = &self.containment;
        let gateway_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        let home = self.home.clone().unwrap_or(gateway_home);
        let (mut command, tmp) = match (&containment.bwrap, &self.project) {
            (Some(bwrap), Some(project)) => {
                let resolved = bwrap::resolve_program(program)
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{program}: not found")))?;
                let mut command = Command::new(bwrap.program());
                command.args(bwrap.args(&resolved, project, &home, cwd)).arg("--").arg(&resolved).args(args);
                (command, PathBuf::from("/tmp"))
            }
            _ => {
                let tmp = match self.home {
                    Some(_) => home.join(".tmp"),
                    None => std::env::temp_dir(),
                };
                std::fs::create_dir_all(&tmp)?;
                let mut command = Command::new(program);
                command.args(args);
                (command, tmp)
            }
        };
        command.current_dir(cwd).env_clear().envs(containment.env.build(&home, &tmp));
        let cgroup = match (&containment.cgroups, &containment.limits) {
            (Some(base), Some(limits)) => match base.create_run(&self.run_id, limits) {
                Ok(cgroup) => Some(Arc::new(cgroup)),
                Err(e) => {
                    tracing::warn!(error = %e, "could not make the run's cgroup; its rlimits still apply");
                    None
                }
            },
            _ => None,
        };
        if let Some(limits) = containment.limits {
            let cgroup = cgroup.clone();
            let drop_caps_to = containment.drop_caps_to;
            // SAFETY: the closure runs between fork and exec and only makes
            // system calls (setrlimit, write on descriptors opened before the
            // fork, prctl).
            unsafe {
                command.pre_exec(move || {
                    if let Some(cgroup) = &cgroup {
                        cgroup.enter()?;
                    }
                    limits.apply_rlimits()?;
                    match drop_caps_to {
                        Some(last) => drop_bounding_capabilities(last),
                        None => Ok(()),
                    }
                });
            }
        }
        Ok(Prepared { command, cgroup })
    }
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(63)
}

/// Empties the capability bounding set: after `exec` a root process then holds
/// no capability at all. Runs between fork and exec: system calls only.
fn drop_bounding_capabilities(last: u32) -> io::Result<()> {
    for cap in 0..=last {
        // SAFETY: prctl with integer arguments; no memory is passed.
        let result = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        // EINVAL: a number this kernel does not know (cap_last_cap unreadable).
        if result != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
