//! Client images of a run (`options.images`), written where the CLI can read them.
//!
//! As upstream (`handleImages` in `server/claude-sdk.js` and `server/gemini-cli.js`),
//! each `{data: "data:<mime>;base64,<payload>"}` image is written to a per-run
//! directory `.tmp/images/<run>/image_<i>.<ext>` under the run's working
//! directory (inside the project), and the prompt gets a note listing the paths.
//! The directory is removed when the run ends ([`RunImages::cleanup`], or on drop).

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::Value;

use super::RunRequest;

/// Most images written for one run; the rest are ignored.
const MAX_IMAGES: usize = 16;

/// The images written for one run.
#[derive(Debug, Default)]
pub struct RunImages {
    dir: Option<PathBuf>,
    paths: Vec<PathBuf>,
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
        let dir = request.cwd.join(".tmp").join("images").join(uuid::Uuid::new_v4().simple().to_string());
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            tracing::warn!(dir = %dir.display(), error = %e, "could not create the run's image directory");
            return RunImages::default();
        }
        let mut written = RunImages { dir: Some(dir.clone()), paths: Vec::new() };
        for (index, (ext, bytes)) in decoded.into_iter().enumerate() {
            let path = dir.join(format!("image_{index}.{ext}"));
            match tokio::fs::write(&path, bytes).await {
                Ok(()) => written.paths.push(path),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not write an image"),
            }
        }
        written
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
            let _ = tokio::fs::remove_dir_all(&dir).await;
            remove_if_empty(dir.parent()).await;
        }
    }
}

/// Removes `.tmp/images` and `.tmp` when the run left them empty.
async fn remove_if_empty(images_dir: Option<&Path>) {
    if let Some(images_dir) = images_dir
        && tokio::fs::remove_dir(images_dir).await.is_ok()
        && let Some(tmp) = images_dir.parent()
    {
        let _ = tokio::fs::remove_dir(tmp).await;
    }
}

impl Drop for RunImages {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
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
}
