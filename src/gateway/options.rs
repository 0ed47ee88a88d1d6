//! Validation of client-controlled paths and `chat.send` options.
//!
//! The project path always comes from the database; a client `options.cwd`
//! is honoured only inside it. Option types are checked so that a bad one is
//! answered with `INVALID_OPTIONS` instead of reaching a provider CLI.

use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::{
    protocol::{ErrorCode, ProtocolError},
    runtime::RunOptions,
};

/// Permission modes a client may ask for: those upstream's composer sends
/// (`auto` is Claude's classifier mode; docs/providers.md has each provider's mapping).
const PERMISSION_MODES: [&str; 5] = ["default", "acceptEdits", "bypassPermissions", "plan", "auto"];

/// Why a project path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRefusal {
    Required,
    Outside,
}

/// Resolves a `projectPath` for a new session inside `root` (already canonical).
/// Relative paths are taken from the root; `..` is refused outright; an existing
/// path is canonicalised so a symlink cannot lead outside, and a symlink that
/// cannot be resolved (dangling or a loop) is refused: it could lead outside later.
pub fn resolve_project_path(root: &Path, raw: &str) -> Result<PathBuf, PathRefusal> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(PathRefusal::Required);
    }
    let path = Path::new(raw);
    if path.components().any(|c| matches!(c, Component::ParentDir)) || raw.contains('\0') {
        return Err(PathRefusal::Outside);
    }
    let joined = if path.is_absolute() { path.to_path_buf() } else { root.join(path) };
    let normal: PathBuf = joined.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    match resolve_existing_prefix(&normal) {
        Some(resolved) if resolved.starts_with(root) => Ok(resolved),
        _ => Err(PathRefusal::Outside),
    }
}

/// Canonicalises the longest existing ancestor of `path` (following its
/// symlinks) and appends the components that do not exist yet. `None` when a
/// component is a symlink that does not resolve (dangling or a loop).
fn resolve_existing_prefix(path: &Path) -> Option<PathBuf> {
    let mut existing = path;
    let mut missing = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(existing) {
            return Some(missing.iter().rev().fold(real, |acc: PathBuf, part| acc.join(part)));
        }
        if std::fs::symlink_metadata(existing).is_ok_and(|m| m.file_type().is_symlink()) {
            return None;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            _ => return Some(path.to_path_buf()),
        }
    }
}

/// Checks `chat.send` options and resolves the working directory.
pub fn validate_options(
    session_id: &str,
    project_path: &Path,
    options: &Map<String, Value>,
    allow_bypass: bool,
) -> Result<(RunOptions, PathBuf), ProtocolError> {
    let invalid = |message: String| ProtocolError::new(ErrorCode::InvalidOptions, message).with_session(session_id);
    let string = |key: &str| -> Result<Option<String>, ProtocolError> {
        match options.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!("options.{key} must be a string."))),
        }
    };
    let permission_mode = string("permissionMode")?;
    if let Some(mode) = &permission_mode
        && !PERMISSION_MODES.contains(&mode.as_str())
    {
        return Err(invalid(format!("options.permissionMode must be one of {}.", PERMISSION_MODES.join(", "))));
    }
    let tools = match options.get("toolsSettings") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(o)) => o.clone(),
        Some(_) => return Err(invalid("options.toolsSettings must be an object.".into())),
    };
    let list = |key: &str| -> Result<Vec<String>, ProtocolError> {
        match tools.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid(format!("options.toolsSettings.{key} must be a list of strings."))),
            Some(_) => Err(invalid(format!("options.toolsSettings.{key} must be a list of strings."))),
        }
    };
    let flag = |value: Option<&Value>, name: &str| -> Result<bool, ProtocolError> {
        match value {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(invalid(format!("{name} must be a boolean."))),
        }
    };
    let skip_permissions = flag(options.get("skipPermissions"), "options.skipPermissions")?
        || flag(tools.get("skipPermissions"), "options.toolsSettings.skipPermissions")?;
    if !allow_bypass && (skip_permissions || permission_mode.as_deref() == Some("bypassPermissions")) {
        return Err(invalid(
            "bypassPermissions / skipPermissions are not allowed on this gateway (--allow-bypass-permissions).".into(),
        ));
    }
    if let Some(images) = options.get("images")
        && !images.is_array()
        && !images.is_null()
    {
        return Err(invalid("options.images must be a list.".into()));
    }
    let cwd = match string("cwd")? {
        None => project_path.to_path_buf(),
        Some(raw) => resolve_cwd(project_path, &raw).ok_or_else(|| {
            invalid(format!("options.cwd must be an existing directory inside the session's project path ({raw})."))
        })?,
    };
    let known = ["model", "effort", "permissionMode", "toolsSettings", "skipPermissions", "cwd", "projectPath"];
    let extra =
        options.iter().filter(|(k, _)| !known.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    let run_options = RunOptions {
        model: string("model")?,
        effort: string("effort")?,
        permission_mode,
        allowed_tools: list("allowedTools")?,
        disallowed_tools: list("disallowedTools")?,
        skip_permissions,
        extra,
    };
    Ok((run_options, cwd))
}

/// `cwd` (relative to the project, or absolute) if it is a directory inside the project.
fn resolve_cwd(project: &Path, raw: &str) -> Option<PathBuf> {
    let candidate = if Path::new(raw).is_absolute() { PathBuf::from(raw) } else { project.join(raw) };
    let resolved = std::fs::canonicalize(candidate).ok()?;
    let project = std::fs::canonicalize(project).ok()?;
    (resolved.starts_with(&project) && resolved.is_dir()).then_some(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn project_paths_stay_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        assert_eq!(resolve_project_path(&root, "proj").unwrap(), root.join("proj"));
        assert_eq!(resolve_project_path(&root, root.join("a/./b").to_str().unwrap()).unwrap(), root.join("a/b"));
        assert_eq!(resolve_project_path(&root, "  "), Err(PathRefusal::Required));
        assert_eq!(resolve_project_path(&root, "../x"), Err(PathRefusal::Outside));
        assert_eq!(resolve_project_path(&root, "a/../../x"), Err(PathRefusal::Outside));
        assert_eq!(resolve_project_path(&root, "/etc"), Err(PathRefusal::Outside));
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert_eq!(resolve_project_path(&root, "link"), Err(PathRefusal::Outside));
        assert_eq!(resolve_project_path(&root, "link/not/yet"), Err(PathRefusal::Outside));
        assert_eq!(resolve_project_path(&root, "new/dir").unwrap(), root.join("new/dir"));
        std::os::unix::fs::symlink(root.join("gone"), root.join("dangling")).unwrap();
        assert_eq!(resolve_project_path(&root, "dangling"), Err(PathRefusal::Outside));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_project_path(&root, "loop/x"), Err(PathRefusal::Outside));
    }

    #[test]
    fn cwd_is_confined_to_the_project() {
        let dir = tempfile::tempdir().unwrap();
        let project = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir(project.join("sub")).unwrap();
        let ok = |o: Value| validate_options("s", &project, o.as_object().unwrap(), true);
        assert_eq!(ok(json!({})).unwrap().1, project);
        assert_eq!(ok(json!({"cwd": "sub"})).unwrap().1, project.join("sub"));
        for bad in [json!({"cwd": ".."}), json!({"cwd": "/tmp"}), json!({"cwd": "missing"}), json!({"cwd": 3})] {
            assert_eq!(ok(bad).unwrap_err().code, ErrorCode::InvalidOptions);
        }
        assert_eq!(ok(json!({"permissionMode": "yolo"})).unwrap_err().code, ErrorCode::InvalidOptions);
        assert_eq!(ok(json!({"toolsSettings": {"allowedTools": [1]}})).unwrap_err().code, ErrorCode::InvalidOptions);
        let (opts, _) =
            ok(json!({"model": "m", "toolsSettings": {"allowedTools": ["Bash(git:*)"], "skipPermissions": true}}))
                .unwrap();
        assert_eq!(opts.model.as_deref(), Some("m"));
        assert_eq!(opts.allowed_tools, vec!["Bash(git:*)"]);
        assert!(opts.skip_permissions);
        let strict = |o: Value| validate_options("s", &project, o.as_object().unwrap(), false);
        assert_eq!(strict(json!({"permissionMode": "bypassPermissions"})).unwrap_err().code, ErrorCode::InvalidOptions);
        assert_eq!(strict(json!({"skipPermissions": true})).unwrap_err().code, ErrorCode::InvalidOptions);
        assert!(strict(json!({"permissionMode": "acceptEdits"})).is_ok());
    }

    #[test]
    fn every_option_upstream_s_composer_sends_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let project = std::fs::canonicalize(dir.path()).unwrap();
        let strict = |o: Value| validate_options("s", &project, o.as_object().unwrap(), false);
        for mode in ["default", "acceptEdits", "plan", "auto"] {
            let composer = json!({
                "projectPath": project.to_str().unwrap(),
                "cwd": project.to_str().unwrap(),
                "sessionId": "s",
                "resume": true,
                "toolsSettings": { "allowedTools": ["Read"], "disallowedTools": [], "skipPermissions": false },
                "permissionMode": mode,
                "model": "sonnet",
                "effort": "high",
                "sessionSummary": "Fix the tests",
                "images": [{ "data": "data:image/png;base64,iVBORw0KGgo=", "name": "a.png" }],
                "provider": "claude",
            });
            let (opts, cwd) = strict(composer).unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert_eq!((opts.permission_mode.as_deref(), cwd.as_path()), (Some(mode), project.as_path()));
            assert_eq!((opts.model.as_deref(), opts.effort.as_deref()), (Some("sonnet"), Some("high")));
        }
        // Refused on purpose, naming the flag or the rule.
        let bypass = strict(json!({ "permissionMode": "bypassPermissions" })).unwrap_err();
        assert!(bypass.message.contains("--allow-bypass-permissions"), "{bypass}");
        let outside = strict(json!({ "cwd": "/" })).unwrap_err();
        assert!(outside.message.contains("inside the session's project path"), "{outside}");
    }
}
