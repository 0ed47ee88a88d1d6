//! Client images of a run (`options.images`), written where the CLI can read them.
//!
//! As upstream (`handleImages` in `server/claude-sdk.js` and `server/gemini-cli.js`),
//! each `{data: "data:<mime>;base64,<payload>"}` image is written to a per-run
//! directory `.tmp/images/<run>/image_<i>.<ext>` under the run's working
//! directory (inside the project), and the prompt gets a note listing the paths.
//! The directory is removed when the run ends ([`RunImages::cleanup`], or on drop).
//! [`RunFiles`] writes other per-run files the same way (`.tmp/<kind>/<run>/<name>`, e.g.
//! Gemini's policy file).
//!
//! The project is writable by the agent, which may have planted a symlink at
//! `.tmp` or `.tmp/images` in an earlier run; the gateway writes outside any
//! sandbox, so every step goes through directory descriptors opened with
//! `O_NOFOLLOW` (`mkdirat`, `openat`, `unlinkat`): a symlink anywhere below the
//! working directory makes the images be skipped, never followed.

use std::{
    io::{self, Write},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use base64::Engine;
use nix::{
    errno::Errno,
    fcntl::{OFlag, open, openat},
    sys::stat::{Mode, mkdirat},
    unistd::{UnlinkatFlags, unlinkat},
};
use serde_json::Value;

use super::RunRequest;

/// Most images written for one run; the rest are ignored.
const MAX_IMAGES: usize = 16;

/// The images written for one run.
#[derive(Debug, Default)]
pub struct RunImages {
    dir: Option<ImageDir>,
    paths: Vec<PathBuf>,
}

/// The run's directory `.tmp/<kind>/<run>`, held by descriptors (never re-resolved by path).
#[derive(Debug)]
struct ImageDir {
    /// The working directory, `.tmp` and `.tmp/<kind>` (`kind_dir`).
    cwd: OwnedFd,
    tmp: OwnedFd,
    kind_dir: OwnedFd,
    /// `kind`: `images` for images.
    kind: &'static str,
    /// `.tmp/<kind>/<run>` and its name in `kind_dir`.
    run: OwnedFd,
    run_name: String,
    /// File names written into `run`.
    files: Vec<String>,
}

/// Splits `data:<mime>;base64,<payload>` into the file extension and the bytes.
fn decode_data_url(data: &str) -> Option<(String, Vec<u8>)> {
    let rest = data.strip_prefix("data:")?;
    let (mime, payload) = rest.split_once(";base64,")?;
    let subtype = mime.split('/').nth(1).unwrap_or("png");
    let ext: String = subtype.chars().take_while(|c| c.is_ascii_alphanumeric()).take(10).collect();
    let ext = if ext.is_empty() { "png".to_string() } else { ext.to_ascii_lowercase() };
    let bytes = base64::engine::general_purpose::STANDARD.decode(payload.trim()).ok()?;
    Some((ext, bytes))
}

const DIR_FLAGS: OFlag = OFlag::O_DIRECTORY.union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Opens the directory `name` in `parent`, making it first when missing; a
/// symlink is refused (`ELOOP` / `ENOTDIR`).
fn open_or_make_dir(parent: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e),
    }
    openat(parent, name, DIR_FLAGS, Mode::empty())
}

impl ImageDir {
    /// Makes `<cwd>/.tmp/<kind>/<run>` without following any symlink below `cwd`.
    fn create(cwd: &Path, kind: &'static str, run_name: String) -> nix::Result<ImageDir> {
        let cwd = open(cwd, OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        let tmp = open_or_make_dir(&cwd, ".tmp")?;
        let kind_dir = open_or_make_dir(&tmp, kind)?;
        mkdirat(&kind_dir, run_name.as_str(), Mode::from_bits_truncate(0o755))?;
        let run = openat(&kind_dir, run_name.as_str(), DIR_FLAGS, Mode::empty())?;
        Ok(ImageDir { cwd, tmp, kind_dir, kind, run, run_name, files: Vec::new() })
    }

    /// Writes a new file (never an existing one, never through a symlink).
    fn write(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.run, name, flags, Mode::from_bits_truncate(0o644))?;
        self.files.push(name.to_string());
        std::fs::File::from(fd).write_all(bytes)
    }

    /// Removes what was written, then the directories the run left empty.
    fn remove(self) {
        for name in &self.files {
            let _ = unlinkat(&self.run, name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        drop(self.run);
        if unlinkat(&self.kind_dir, self.run_name.as_str(), UnlinkatFlags::RemoveDir).is_ok()
            && unlinkat(&self.tmp, self.kind, UnlinkatFlags::RemoveDir).is_ok()
        {
            let _ = unlinkat(&self.cwd, ".tmp", UnlinkatFlags::RemoveDir);
        }
    }
}

impl RunImages {
    /// Writes the request's images; a malformed image is skipped (as upstream).
    pub async fn write(request: &RunRequest) -> RunImages {
        let Some(Value::Array(images)) = request.options.extra.get("images") else {
            return RunImages::default();
        };
        let decoded: Vec<(String, Vec<u8>)> = images
            .iter()
            .filter_map(|image| image.get("data").and_then(Value::as_str))
            .filter_map(decode_data_url)
            .take(MAX_IMAGES)
            .collect();
        if decoded.is_empty() {
            return RunImages::default();
        }
        let cwd = request.cwd.clone();
        let written = tokio::task::spawn_blocking(move || Self::write_blocking(&cwd, decoded)).await;
        written.unwrap_or_default()
    }

    fn write_blocking(cwd: &Path, decoded: Vec<(String, Vec<u8>)>) -> RunImages {
        let files = decoded
            .into_iter()
            .enumerate()
            .map(|(index, (ext, bytes))| (format!("image_{index}.{ext}"), bytes))
            .collect();
        let mut written = RunFiles::write_blocking(cwd, "images", files);
        RunImages { dir: written.dir.take(), paths: std::mem::take(&mut written.paths) }
    }

    /// The written files.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// `content` with upstream's note listing the image paths (unchanged without images).
    pub fn prompt(&self, content: &str) -> String {
        if self.paths.is_empty() || content.trim().is_empty() {
            return content.to_string();
        }
        let list: Vec<String> =
            self.paths.iter().enumerate().map(|(i, p)| format!("{}. {}", i + 1, p.display())).collect();
        format!("{content}\n\n[Images provided at the following paths:]\n{}", list.join("\n"))
    }

    /// Removes the run's image directory.
    pub async fn cleanup(mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = tokio::task::spawn_blocking(move || dir.remove()).await;
        }
    }
}

impl Drop for RunImages {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            dir.remove();
        }
    }
}

/// Other files of one run, written as images are: a new directory `.tmp/<kind>/<run>` under
/// the working directory, no symlink followed, removed when the run ends.
#[derive(Debug, Default)]
pub struct RunFiles {
    dir: Option<ImageDir>,
    paths: Vec<PathBuf>,
}

impl RunFiles {
    /// Writes `files` (name, bytes) into `<cwd>/.tmp/<kind>/<run>/`; a file that cannot be
    /// written is left out of [`RunFiles::paths`] (and logged).
    pub async fn write(cwd: &Path, kind: &'static str, files: Vec<(String, Vec<u8>)>) -> RunFiles {
        if files.is_empty() {
            return RunFiles::default();
        }
        let cwd = cwd.to_path_buf();
        let written = tokio::task::spawn_blocking(move || Self::write_blocking(&cwd, kind, files)).await;
        written.unwrap_or_default()
    }

    fn write_blocking(cwd: &Path, kind: &'static str, files: Vec<(String, Vec<u8>)>) -> RunFiles {
        let run_name = uuid::Uuid::new_v4().simple().to_string();
        let base = cwd.join(".tmp").join(kind).join(&run_name);
        let mut dir = match ImageDir::create(cwd, kind, run_name) {
            Ok(dir) => dir,
            Err(e) => {
                tracing::warn!(dir = %base.display(), error = %e,
                    "could not create the run's directory (a symlink below the working directory is refused)");
                return RunFiles::default();
            }
        };
        let mut paths = Vec::new();
        for (name, bytes) in files {
            match dir.write(&name, &bytes) {
                Ok(()) => paths.push(base.join(&name)),
                Err(e) => tracing::warn!(path = %base.join(&name).display(), error = %e, "could not write a run file"),
            }
        }
        RunFiles { dir: Some(dir), paths }
    }

    /// The written files.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Removes the run's directory.
    pub async fn cleanup(mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = tokio::task::spawn_blocking(move || dir.remove()).await;
        }
    }
}

impl Drop for RunFiles {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            dir.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_with_a_safe_extension() {
        let (ext, bytes) = decode_data_url("data:image/jpeg;base64,aGVsbG8=").unwrap_or_default();
        assert_eq!((ext.as_str(), bytes.as_slice()), ("jpeg", &b"hello"[..]));
        let (ext, _) = decode_data_url("data:image/svg+xml;base64,aGk=").unwrap_or_default();
        assert_eq!(ext, "svg");
        assert!(decode_data_url("not a data url").is_none());
        assert!(decode_data_url("data:image/png;base64,!!!").is_none());
    }

    #[test]
    fn images_never_follow_a_planted_symlink() {
        let project = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(victim.path(), project.path().join(".tmp")).unwrap();
        let images = RunImages::write_blocking(project.path(), vec![("png".into(), b"x".to_vec())]);
        assert!(images.paths().is_empty());
        assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0, "nothing written through the link");

        std::fs::remove_file(project.path().join(".tmp")).unwrap();
        std::fs::create_dir(project.path().join(".tmp")).unwrap();
        std::os::unix::fs::symlink(victim.path(), project.path().join(".tmp/images")).unwrap();
        assert!(RunImages::write_blocking(project.path(), vec![("png".into(), b"x".to_vec())]).paths().is_empty());
        assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0);

        std::fs::remove_file(project.path().join(".tmp/images")).unwrap();
        let images = RunImages::write_blocking(project.path(), vec![("png".into(), b"x".to_vec())]);
        assert_eq!(images.paths().len(), 1);
        assert_eq!(std::fs::read(&images.paths()[0]).unwrap(), b"x");
        drop(images);
        assert!(!project.path().join(".tmp").exists(), "the run's directories are removed");
    }
}
