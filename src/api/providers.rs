//! `GET /api/providers`: the enabled providers, in `--providers` order, and
//! whether each one's CLI resolves on this node (for a client's provider picker).
//!
//! Availability is checked on every request (a few `stat`s), so a CLI installed
//! after the node started shows up without a restart.

use std::path::Path;

use axum::{extract::State, http::StatusCode, response::Response};
use serde_json::{Value, json};

use super::{ApiError, AppState, auth::User, error::ok};
use crate::{config::Config, runtime::sandbox::bwrap::resolve_program};

/// One enabled provider and the program its runtime starts (`None`: built in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderProgram {
    pub id: String,
    pub program: Option<String>,
}

/// The enabled providers of `config`, in `--providers` order, with their programs.
pub fn provider_programs(config: &Config) -> Vec<ProviderProgram> {
    config
        .providers
        .0
        .iter()
        .map(|id| {
            let program = match id.as_str() {
                "claude" => Some(&config.claude_bin),
                "codex" => Some(&config.codex_bin),
                "cursor" => Some(&config.cursor_bin),
                "gemini" => Some(&config.gemini_bin),
                "opencode" => Some(&config.opencode_bin),
                _ => None,
            };
            ProviderProgram { id: id.clone(), program: program.cloned() }
        })
        .collect()
}

/// Whether `program` resolves to an executable file: a path as given, else on `PATH`.
fn available(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    resolve_program(program).is_some_and(|path| {
        std::fs::metadata(Path::new(&path)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `GET /api/providers`
pub async fn list(State(state): State<AppState>, User(_user): User) -> Result<Response, ApiError> {
    let providers: Vec<Value> = state
        .settings
        .providers
        .iter()
        .map(|p| {
            let available = p.program.as_deref().is_none_or(available);
            json!({ "id": p.id, "available": available, "program": p.program })
        })
        .collect();
    Ok(ok(StatusCode::OK, json!({ "providers": providers })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_resolve_by_path_or_on_path() {
        assert!(available("sh"));
        assert!(available("/bin/sh"));
        assert!(!available("definitely-not-a-program-xyz"));
        assert!(!available("/nonexistent/dir/claude"));
        // A file that is not executable is not a program.
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("claude");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        assert!(!available(plain.to_str().unwrap()));
    }
}
