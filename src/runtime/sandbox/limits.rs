//! Per-run resource bounds: rlimits on every CLI, and a cgroup per run where
//! the node can make one.
//!
//! rlimits work everywhere and are set between fork and exec: `RLIMIT_DATA`
//! (memory a process may map for data), `RLIMIT_FSIZE` (largest file),
//! `RLIMIT_CPU` (CPU seconds per process), `RLIMIT_NOFILE`, `RLIMIT_CORE` = 0
//! and `RLIMIT_NPROC`. The kernel counts `RLIMIT_NPROC` per user, not per run,
//! and not at all for root; so where a cgroup hierarchy with the `pids` (and
//! `memory`) controller is writable (cgroup v1 as root, or a delegated cgroup v2
//! subtree), each run also gets its own cgroup with `pids.max` and a memory
//! ceiling, which bound the run as a whole.

use std::{
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sys::resource::{Resource, setrlimit};

/// Open files one CLI process may hold.
const MAX_OPEN_FILES: u64 = 4096;

/// What one run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Bytes of memory (per process as `RLIMIT_DATA`, per run in a cgroup).
    pub memory: u64,
    /// Processes (per run in a cgroup, else per user as `RLIMIT_NPROC`).
    pub processes: u64,
    /// Largest file a process may write.
    pub file_size: u64,
    /// CPU time per process.
    pub cpu_time: Duration,
}

impl RunLimits {
    /// Applies the rlimits to the calling process. Runs between fork and
    /// exec: only system calls, no allocation.
    pub fn apply_rlimits(&self) -> io::Result<()> {
        let cpu = self.cpu_time.as_secs().max(1);
        for (resource, value) in [
            (Resource::RLIMIT_DATA, self.memory),
            (Resource::RLIMIT_FSIZE, self.file_size),
            (Resource::RLIMIT_CPU, cpu),
            (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES),
            (Resource::RLIMIT_NPROC, self.processes),
            (Resource::RLIMIT_CORE, 0),
        ] {
            setrlimit(resource, value, value).map_err(io::Error::from)?;
        }
        Ok(())
    }
}

/// Where per-run cgroups are made on this node.
#[derive(Debug, Clone)]
pub enum CgroupBase {
    /// cgroup v1: one directory per controller (`pids`, and `memory` when present).
    V1 { pids: PathBuf, memory: Option<PathBuf> },
    /// cgroup v2: a directory whose children get `pids` and `memory`.
    V2 { dir: PathBuf },
}

impl CgroupBase {
    /// Finds a writable hierarchy and makes this node's directory in it
    /// (`chatgate-<pid>`); `None` when none can be used.
    pub fn detect() -> Option<CgroupBase> {
        let name = format!("chatgate-{}", std::process::id());
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        // cgroup v1: the node's directory goes under its own cgroup of each
        // controller, so runs stay inside the container's accounting.
        if let Some(pids_parent) = v1_own_dir(&own, "pids") {
            clear_stale_node_dirs(&pids_parent);
            let pids = pids_parent.join(&name);
            if fs::create_dir_all(&pids).is_ok() {
                let memory = v1_own_dir(&own, "memory").map(|parent| {
                    clear_stale_node_dirs(&parent);
                    parent.join(&name)
                });
                let memory = memory.filter(|dir| fs::create_dir_all(dir).is_ok());
                return Some(CgroupBase::V1 { pids, memory });
            }
        }
        // cgroup v2 mounted at /sys/fs/cgroup with a writable root (a delegated
        // subtree or a privileged host): the root is exempt from the rule that a
        // cgroup with processes cannot hand controllers to its children.
        let v2 = Path::new("/sys/fs/cgroup");
        let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "pids") && own_cgroup_is_root() {
            let _ = fs::write(v2.join("cgroup.subtree_control"), "+pids +memory");
            let dir = v2.join(&name);
            if fs::create_dir_all(&dir).is_ok()
                && fs::write(dir.join("cgroup.subtree_control"), "+pids +memory").is_ok()
            {
                return Some(CgroupBase::V2 { dir });
            }
        }
        None
    }

    /// Makes the cgroup of one run with its bounds.
    pub fn create_run(&self, run: &str, limits: &RunLimits) -> io::Result<RunCgroup> {
        let name = run.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
        let mut dirs = Vec::new();
        let result = (|| {
            match self {
                CgroupBase::V1 { pids, memory } => {
                    let dir = pids.join(&name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir.clone());
                    fs::write(dir.join("pids.max"), limits.processes.to_string())?;
                    if let Some(memory) = memory {
                        let dir = memory.join(&name);
                        fs::create_dir(&dir)?;
                        dirs.push(dir.clone());
                        fs::write(dir.join("memory.limit_in_bytes"), limits.memory.to_string())?;
                    }
                }
                CgroupBase::V2 { dir } => {
                    let dir = dir.join(&name);
                    fs::create_dir(&dir)?;
                    dirs.push(dir.clone());
                    fs::write(dir.join("pids.max"), limits.processes.to_string())?;
                    // Without the memory controller the rlimit alone bounds memory.
                    let _ = fs::write(dir.join("memory.max"), limits.memory.to_string());
                    let _ = fs::write(dir.join("memory.swap.max"), "0");
                }
            }
            dirs.iter()
                .map(|dir| fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs")).map(OwnedFd::from))
                .collect::<io::Result<Vec<_>>>()
        })();
        match result {
            Ok(procs) => Ok(RunCgroup { dirs, procs }),
            Err(e) => {
                RunCgroup { dirs, procs: Vec::new() }.remove_now();
                Err(e)
            }
        }
    }

    /// Removes this node's directories (at exit; they are empty by then).
    pub fn remove(&self) {
        let dirs = match self {
            CgroupBase::V1 { pids, memory } => [Some(pids), memory.as_ref()],
            CgroupBase::V2 { dir } => [Some(dir), None],
        };
        for dir in dirs.into_iter().flatten() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// This process's own directory in the cgroup v1 hierarchy of `controller`
/// (from `/proc/self/cgroup` lines like `4:memory:/a/b` or `2:cpu,cpuacct:/`).
fn v1_own_dir(own: &str, controller: &str) -> Option<PathBuf> {
    let mount = Path::new("/sys/fs/cgroup").join(controller);
    if !mount.join("cgroup.procs").exists() {
        return None;
    }
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then_some(path)
    })?;
    let dir = mount.join(path.trim_start_matches('/'));
    dir.join("cgroup.procs").exists().then_some(dir)
}

/// Removes the directories of earlier nodes that died without cleaning up
/// (`chatgate-<pid>` whose process is gone), with their empty run cgroups.
fn clear_stale_node_dirs(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("chatgate-")) else { continue };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let dir = entry.path();
        if let Ok(runs) = fs::read_dir(&dir) {
            for run in runs.flatten().filter(|r| r.path().is_dir()) {
                let _ = fs::remove_dir(run.path());
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// Whether this process sits in the root of its cgroup v2 hierarchy.
fn own_cgroup_is_root() -> bool {
    fs::read_to_string("/proc/self/cgroup").is_ok_and(|text| text.lines().any(|line| line == "0::/"))
}

/// The cgroup of one run; removed when dropped (once its processes are gone).
#[derive(Debug)]
pub struct RunCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, open before the fork.
    procs: Vec<OwnedFd>,
}

impl RunCgroup {
    /// Moves the calling process into the run's cgroup. Runs between fork and
    /// exec: one `write` per controller, no allocation.
    pub fn enter(&self) -> io::Result<()> {
        for fd in &self.procs {
            // "0" names the writing process.
            nix::unistd::write(fd.as_fd(), b"0").map_err(io::Error::from)?;
        }
        Ok(())
    }

    fn remove_now(&self) -> bool {
        remove_dirs(&self.dirs)
    }
}

/// Removes empty cgroup directories, innermost last; true when none is left.
fn remove_dirs(dirs: &[PathBuf]) -> bool {
    dirs.iter().rev().all(|dir| fs::remove_dir(dir).is_ok() || !dir.exists())
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        if self.remove_now() {
            return;
        }
        // Processes of the run may still be dying: retry off the async threads.
        let dirs = std::mem::take(&mut self.dirs);
        std::thread::spawn(move || {
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(100));
                if remove_dirs(&dirs) {
                    return;
                }
            }
            tracing::warn!(?dirs, "could not remove a run's cgroup: processes are still in it");
        });
    }
}
