//! The bubblewrap command line of a sandboxed CLI.
//!
//! bubblewrap (`bwrap`, the sandbox Claude Code itself uses on Linux) starts
//! the CLI in new mount, PID, IPC, UTS, cgroup and user namespaces; the
//! network is shared (the CLI must reach its model API). The CLI sees an
//! empty root with: system directories read-only (`/usr` and its links,
//! `/etc`, `/opt`), the directory holding its program read-only, the
//! operator's `--sandbox-ro-paths`, a private `/tmp`, a fresh `/proc` (only
//! its own processes) and `/dev`, then its project directory and its user's
//! provider home read-write. Protected paths (the SQLite files, secret files,
//! the homes root) are masked wherever they fall under something bound. It
//! runs as uid 1000 with no capabilities; bwrap's own init reaps its orphans
//! and everything in the sandbox dies with it.

use std::{
    ffi::OsString,
    path::{Component, Path, PathBuf},
    process::Stdio,
    time::Duration,
};

/// The uid and gid the CLI has inside its sandbox.
const SANDBOX_ID: &str = "1000";

/// How long the start-up probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read-only system directories (bound when they exist; merged-/usr links kept as links).
const SYSTEM_DIRS: [&str; 9] = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt"];

/// The node's bubblewrap setup.
#[derive(Debug)]
pub struct Bwrap {
    program: PathBuf,
    ro_paths: Vec<PathBuf>,
    protected: Vec<PathBuf>,
    /// The run-independent start of every command line ([`fixed_args`]), made
    /// once: it binds generated `/etc/passwd` and `/etc/group` naming the sandbox user.
    fixed_args: Vec<OsString>,
    /// The system directories `fixed_args` binds read-only.
    system_read_only: Vec<PathBuf>,
    /// Keeps the directory of the passwd files for the node's lifetime.
    _files: FilesDir,
}

/// The directory of the sandbox user's passwd files (`mkdtemp`), removed when the node's
/// bubblewrap setup is dropped.
#[derive(Debug)]
struct FilesDir(PathBuf);

impl FilesDir {
    fn make() -> std::io::Result<FilesDir> {
        let template = std::env::temp_dir().join("chatgate-sandbox-XXXXXX");
        nix::unistd::mkdtemp(&template).map(FilesDir).map_err(std::io::Error::from)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for FilesDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Bwrap {
    /// Finds `bwrap`, writes the sandbox user's passwd entries and proves a
    /// sandbox can start here; the error says why not.
    pub async fn prepare(program: &str, ro_paths: &[PathBuf], protected: Vec<PathBuf>) -> Result<Bwrap, String> {
        let program = resolve_program(program).ok_or_else(|| format!("`{program}` not found"))?;
        let files = FilesDir::make().map_err(|e| format!("cannot make its passwd files: {e}"))?;
        let passwd = files.path().join("passwd");
        let group = files.path().join("group");
        std::fs::write(
            &passwd,
            format!(
                "root:x:0:0:root:/root:/bin/sh\nchatgate:x:{SANDBOX_ID}:{SANDBOX_ID}:chatgate:/home/chatgate:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        )
        .and_then(|()| std::fs::write(&group, format!("root:x:0:\nchatgate:x:{SANDBOX_ID}:\nnogroup:x:65534:\n")))
        .map_err(|e| format!("cannot write its passwd files: {e}"))?;
        let ro_paths = ro_paths.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
        let (fixed_args, system_read_only) = fixed_args(&passwd, &group);
        let bwrap = Bwrap { program, ro_paths, protected, fixed_args, system_read_only, _files: files };
        bwrap.probe().await?;
        Ok(bwrap)
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Starts `true` in a sandbox shaped like a run's.
    async fn probe(&self) -> Result<(), String> {
        let dir = std::env::temp_dir();
        let truth = resolve_program("true").unwrap_or_else(|| PathBuf::from("/bin/true"));
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(self.args(&truth, &dir, &dir, &dir))
            .arg("--")
            .arg(&truth)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(PROBE_TIMEOUT, command.output())
            .await
            .map_err(|_| "a probe sandbox did not exit in time".to_string())?
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!("a probe sandbox failed: {}", stderr.trim()))
    }

    /// bwrap's arguments (before `--`) for running `program` in `cwd`.
    pub fn args(&self, program: &Path, project: &Path, home: &Path, cwd: &Path) -> Vec<OsString> {
        let mut args = Args(self.fixed_args.clone());
        let mut read_only = self.system_read_only.clone();
        for dir in program_dirs(program).into_iter().chain(self.ro_paths.iter().cloned()) {
            if !read_only.iter().any(|bound| dir.starts_with(bound)) {
                args.triple("--ro-bind", &dir, &dir);
                read_only.push(dir);
            }
        }
        self.mask_under(&mut args, &read_only);
        let writable = [project.to_path_buf(), home.to_path_buf()];
        for dir in &writable {
            args.triple("--bind", dir, dir);
        }
        self.mask_under(&mut args, &writable);
        args.pair("--chdir", cwd);
        args.0
    }

    /// Hides every protected path that lies under one of `bound`.
    fn mask_under(&self, args: &mut Args, bound: &[PathBuf]) {
        for path in &self.protected {
            if !bound.iter().any(|dir| path.starts_with(dir)) {
                continue;
            }
            match std::fs::metadata(path) {
                Ok(meta) if meta.is_dir() => args.pair("--tmpfs", path),
                Ok(_) => args.triple("--ro-bind", "/dev/null", path),
                Err(_) => {}
            }
        }
    }
}

/// The part of every sandbox's command line that does not depend on the run:
/// namespaces, identity, system directories, passwd files, `/proc`, `/dev`,
/// `/tmp`. Returns the arguments and the system directories bound read-only.
fn fixed_args(passwd: &Path, group: &Path) -> (Vec<OsString>, Vec<PathBuf>) {
    let mut args = Args::default();
    args.flag("--die-with-parent");
    args.flag("--unshare-all");
    args.flag("--share-net");
    args.flag("--unshare-user");
    args.pair("--uid", SANDBOX_ID);
    args.pair("--gid", SANDBOX_ID);
    args.pair("--hostname", "sandbox");
    if nix::unistd::geteuid().is_root() {
        // bwrap started by root keeps capabilities unless told otherwise.
        args.pair("--cap-drop", "ALL");
    }
    let mut read_only: Vec<PathBuf> = Vec::new();
    for dir in SYSTEM_DIRS.map(Path::new) {
        match std::fs::read_link(dir) {
            Ok(target) => args.triple("--symlink", target, dir),
            Err(_) if dir.is_dir() => {
                args.triple("--ro-bind", dir, dir);
                read_only.push(dir.to_path_buf());
            }
            Err(_) => {}
        }
    }
    args.triple("--ro-bind", passwd, "/etc/passwd");
    args.triple("--ro-bind", group, "/etc/group");
    args.pair("--proc", "/proc");
    args.pair("--dev", "/dev");
    args.pair("--tmpfs", "/tmp");
    (args.0, read_only)
}

/// A bwrap argument list.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flag(&mut self, flag: &str) {
        self.0.push(flag.into());
    }

    fn pair(&mut self, flag: &str, value: impl AsRef<std::ffi::OsStr>) {
        self.0.push(flag.into());
        self.0.push(value.as_ref().into());
    }

    fn triple(&mut self, flag: &str, a: impl AsRef<std::ffi::OsStr>, b: impl AsRef<std::ffi::OsStr>) {
        self.0.push(flag.into());
        self.0.push(a.as_ref().into());
        self.0.push(b.as_ref().into());
    }
}

/// The absolute path of `program`: as given when it names a path, else the
/// first executable match on `PATH`.
pub fn resolve_program(program: &str) -> Option<PathBuf> {
    let path = Path::new(program);
    if program.contains('/') {
        return std::path::absolute(path).ok().filter(|p| p.is_file());
    }
    let search = std::env::var_os("PATH")?;
    std::env::split_paths(&search).map(|dir| dir.join(program)).find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The directories a program needs to run from inside the sandbox: the one
/// naming it, and the one of its real file; for a program inside a
/// `node_modules` tree, that whole tree (its package's dependencies live there).
fn program_dirs(program: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let real = std::fs::canonicalize(program).ok();
    for path in [Some(program.to_path_buf()), real].into_iter().flatten() {
        let dir = node_modules_root(&path).or_else(|| path.parent().map(Path::to_path_buf));
        if let Some(dir) = dir
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    }
    dirs
}

/// The outermost `node_modules` directory `path` lies in.
fn node_modules_root(path: &Path) -> Option<PathBuf> {
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        if component == Component::Normal("node_modules".as_ref()) {
            return Some(prefix);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_dirs_cover_node_modules_trees() {
        assert_eq!(
            node_modules_root(Path::new("/srv/cli/node_modules/@a/b/cli.js")),
            Some(PathBuf::from("/srv/cli/node_modules"))
        );
        assert_eq!(node_modules_root(Path::new("/usr/bin/python3")), None);
        assert_eq!(program_dirs(Path::new("/nonexistent/dir/tool")), vec![PathBuf::from("/nonexistent/dir")]);
    }

    #[test]
    fn resolve_program_searches_path() {
        assert!(resolve_program("sh").is_some_and(|p| p.is_absolute()));
        assert!(resolve_program("definitely-not-a-program-xyz").is_none());
    }
}
