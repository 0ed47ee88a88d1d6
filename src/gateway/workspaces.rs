//! Where each user's projects and provider home live.
//!
//! Under the `per-user` layout (the default) user U's root is
//! `<workspaces-root>/<enc(U)>`, made on first use with mode 0700, and a
//! session's `projectPath` must resolve inside it: no user can point an agent
//! at another user's project. Under `shared` every user's projects resolve
//! inside the one root (a single-user or trusted-team gateway). In both, user
//! U's provider home, the `HOME` of the CLIs run for U (their logins and
//! configs, e.g. `~/.claude.json`), is `<homes-root>/<enc(U)>`; the homes root
//! lies outside the workspaces root, so no `projectPath` reaches it.
//!
//! `enc(U)` keeps `[A-Za-z0-9-]` and writes every other byte as `_xx` (hex):
//! one directory per user id, never `.`, `..` or a path separator; a very long
//! id is shortened with its SHA-256.

use std::{
    fmt::Write as _,
    io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::options::{PathRefusal, resolve_project_path};

/// `--workspace-layout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkspaceLayout {
    PerUser,
    Shared,
}

impl WorkspaceLayout {
    pub fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim() {
            "per-user" => Ok(WorkspaceLayout::PerUser),
            "shared" => Ok(WorkspaceLayout::Shared),
            other => Err(format!("expected per-user or shared, got \"{other}\"")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceLayout::PerUser => "per-user",
            WorkspaceLayout::Shared => "shared",
        }
    }
}

/// The node's workspace and home layout (roots are canonical).
#[derive(Debug, Clone)]
pub struct Workspaces {
    pub layout: WorkspaceLayout,
    pub root: PathBuf,
    pub homes_root: PathBuf,
}

/// Longest directory name made from a user id (file systems allow 255 bytes).
const MAX_DIR_NAME: usize = 200;

/// A user id as one directory name. A name that would be longer than
/// [`MAX_DIR_NAME`] keeps its first 120 bytes and gets `__` and the SHA-256 of
/// the whole id (hex) instead of the rest: still one name per user id.
pub fn user_dir_name(user_id: &str) -> String {
    let mut name = String::with_capacity(user_id.len());
    for byte in user_id.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            name.push(char::from(byte));
        } else {
            let _ = write!(name, "_{byte:02x}");
        }
    }
    if name.len() > MAX_DIR_NAME {
        name.truncate(120);
        name.push_str("__");
        for byte in Sha256::digest(user_id.as_bytes()) {
            let _ = write!(name, "{byte:02x}");
        }
    }
    name
}

fn make_private_dir(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

impl Workspaces {
    /// The directory `user_id`'s project paths must resolve inside.
    pub fn user_root(&self, user_id: &str) -> PathBuf {
        match self.layout {
            WorkspaceLayout::PerUser => self.root.join(user_dir_name(user_id)),
            WorkspaceLayout::Shared => self.root.clone(),
        }
    }

    /// `user_id`'s provider home.
    pub fn user_home(&self, user_id: &str) -> PathBuf {
        self.homes_root.join(user_dir_name(user_id))
    }

    /// Resolves a new session's `projectPath` for `user_id` (relative paths
    /// start at the user's root). Under `per-user` the user's root and the
    /// project directory are made when missing.
    pub fn resolve_new_project(&self, user_id: &str, raw: &str) -> Result<PathBuf, PathRefusal> {
        let root = self.user_root(user_id);
        if self.layout == WorkspaceLayout::PerUser && make_private_dir(&root).is_err() {
            return Err(PathRefusal::Outside);
        }
        let path = resolve_project_path(&root, raw)?;
        if self.layout == WorkspaceLayout::PerUser && !path.exists() {
            std::fs::create_dir_all(&path).map_err(|_| PathRefusal::Outside)?;
        }
        Ok(path)
    }

    /// Checks a stored project path again at a run (it may have been swapped
    /// for a symlink out, or the layout changed since).
    pub fn resolve_existing_project(&self, user_id: &str, stored: &str) -> Result<PathBuf, PathRefusal> {
        resolve_project_path(&self.user_root(user_id), stored)
    }

    /// Makes sure `user_id`'s provider home exists (mode 0700) and returns it.
    pub fn ensure_home(&self, user_id: &str) -> io::Result<PathBuf> {
        let home = self.user_home(user_id);
        make_private_dir(&home)?;
        Ok(home)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_dir_names_are_one_safe_component() {
        assert_eq!(user_dir_name("u-1"), "u-1");
        assert_eq!(user_dir_name("alice.b"), "alice_2eb");
        assert_eq!(user_dir_name(".."), "_2e_2e");
        assert_eq!(user_dir_name("a/b"), "a_2fb");
        assert_eq!(user_dir_name("a_b"), "a_5fb");
        assert_ne!(user_dir_name("a_2eb"), user_dir_name("a.b"));
        let long = "x".repeat(2000);
        let (a, b) = (user_dir_name(&long), user_dir_name(&format!("{long}y")));
        assert!(a.len() <= 255 && b.len() <= 255 && a != b, "{a} {b}");
        // An encoded name never holds "__" (every '_' is written as "_5f"), so no short id meets a long one.
        assert!(!user_dir_name("a__b").contains("__"));
    }

    #[test]
    fn per_user_roots_keep_users_apart() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let workspaces =
            Workspaces { layout: WorkspaceLayout::PerUser, root: root.join("ws"), homes_root: root.join("homes") };
        std::fs::create_dir_all(root.join("ws")).unwrap();
        let a = workspaces.resolve_new_project("alice", "proj").unwrap();
        assert_eq!(a, root.join("ws/alice/proj"));
        assert!(a.is_dir());
        std::fs::create_dir_all(root.join("ws/bob/secret")).unwrap();
        for raw in ["../bob/secret", root.join("ws/bob/secret").to_str().unwrap(), "/etc"] {
            assert_eq!(workspaces.resolve_new_project("alice", raw), Err(PathRefusal::Outside), "{raw}");
        }
        assert!(workspaces.resolve_existing_project("alice", a.to_str().unwrap()).is_ok());
        assert!(workspaces.resolve_existing_project("bob", a.to_str().unwrap()).is_err());
        assert_eq!(workspaces.ensure_home("alice").unwrap(), root.join("homes/alice"));
    }
}
