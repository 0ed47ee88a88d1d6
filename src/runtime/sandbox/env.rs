//! The environment a provider CLI gets: built from an allow-list, never inherited.
//!
//! A CLI runs commands a model chose, so whatever is in its environment its
//! user can read. It gets `PATH`, a home of its user's own, locale and time
//! zone, a `TMPDIR`, and exactly the variables the operator named with
//! `--provider-env` (passed through from the gateway's environment) or
//! `--provider-env-file` (read from a file at every run). Nothing else: no
//! `CHATGATE_*`, no `DATABASE_URL`, no `REDIS_URL`.

use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
};

/// Used when the gateway itself has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Locale and time-zone variables copied from the gateway when set.
const LOCALE_VARS: [&str; 3] = ["LANG", "LANGUAGE", "TZ"];

/// Names that are never passed, even when an operator lists them: the gateway's own secrets.
fn is_gateway_variable(name: &str) -> bool {
    name.starts_with("CHATGATE_")
        || matches!(name, "DATABASE_URL" | "DATABASE_URL_FILE" | "REDIS_URL" | "REDIS_URL_FILE" | "RUST_LOG")
}

/// Whether `name` can be an environment variable name a CLI is given.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !is_gateway_variable(name)
}

/// The operator's choice of variables for the CLIs (`--provider-env`, `--provider-env-file`).
#[derive(Debug, Clone, Default)]
pub struct EnvPolicy {
    /// Passed through from the gateway's environment when set there.
    pub pass: Vec<String>,
    /// `NAME` = the contents of the file (trailing newline trimmed), read at every run.
    pub from_files: Vec<(String, PathBuf)>,
}

impl EnvPolicy {
    /// The files a CLI must never see (they hold the credentials it is given by value).
    pub fn secret_files(&self) -> impl Iterator<Item = &Path> {
        self.from_files.iter().map(|(_, path)| path.as_path())
    }

    /// The environment of one CLI run. `home` is its user's provider home;
    /// `tmp` its `TMPDIR`. A credential file that cannot be read is skipped
    /// with a warning (the CLI then reports the missing credential itself).
    pub fn build(&self, home: &Path, tmp: &Path) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        let path = std::env::var_os("PATH").filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_PATH.into());
        env.push(("PATH".into(), path));
        env.push(("HOME".into(), home.into()));
        env.push(("USER".into(), "chatgate".into()));
        env.push(("LOGNAME".into(), "chatgate".into()));
        env.push(("TMPDIR".into(), tmp.into()));
        env.push(("TERM".into(), "dumb".into()));
        for (name, value) in std::env::vars_os() {
            let Some(text) = name.to_str() else { continue };
            if LOCALE_VARS.contains(&text) || text.starts_with("LC_") {
                env.push((name, value));
            }
        }
        for name in &self.pass {
            if let Some(value) = std::env::var_os(name) {
                set(&mut env, name, value);
            }
        }
        for (name, file) in &self.from_files {
            match std::fs::read(file) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    set(&mut env, name, text.trim_end_matches(['\n', '\r']).into());
                }
                Err(e) => tracing::warn!(variable = %name, file = %file.display(), error = %e,
                    "--provider-env-file: cannot read the file; the CLI runs without it"),
            }
        }
        env
    }
}

fn set(env: &mut Vec<(OsString, OsString)>, name: &str, value: OsString) {
    env.retain(|(n, _)| n.as_os_str() != OsStr::new(name));
    env.push((name.into(), value));
}

/// Parses `--provider-env`: a comma list of variable names.
pub fn parse_names(raw: &str) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if !valid_name(name) {
            return Err(format!(
                "\"{name}\" is not a variable a CLI may get (a name like ANTHROPIC_API_KEY; never CHATGATE_*, \
                 DATABASE_URL or REDIS_URL)"
            ));
        }
        names.push(name.to_string());
    }
    Ok(names)
}

/// Parses `--provider-env-file`: a comma list of `NAME=/path/to/file`.
pub fn parse_files(raw: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut pairs = Vec::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, path)) = item.split_once('=') else {
            return Err(format!("expected NAME=/path/to/file, got \"{item}\""));
        };
        let name = parse_names(name)?.pop().ok_or_else(|| format!("expected NAME=/path/to/file, got \"{item}\""))?;
        let path = PathBuf::from(path.trim());
        if !path.is_absolute() {
            return Err(format!("{name}: the file must be an absolute path, got \"{}\"", path.display()));
        }
        pairs.push((name, path));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a OsString> {
        env.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[test]
    fn names_refuse_the_gateways_own_variables() {
        assert_eq!(parse_names("ANTHROPIC_API_KEY, OPENAI_API_KEY").unwrap().len(), 2);
        for bad in ["CHATGATE_JWT_SECRET", "DATABASE_URL", "REDIS_URL", "1X", "A-B", "A B"] {
            assert!(parse_names(bad).is_err(), "{bad}");
        }
        assert!(parse_files("KEY=relative/file").is_err());
        assert!(parse_files("KEY").is_err());
        assert!(parse_files("REDIS_URL=/run/x").is_err());
        assert_eq!(parse_files("KEY=/run/key").unwrap(), vec![("KEY".to_string(), PathBuf::from("/run/key"))]);
    }

    #[test]
    fn build_keeps_only_the_allow_list() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let policy = EnvPolicy {
            pass: vec!["CARGO_PKG_NAME".into(), "NOT_SET_ANYWHERE_X".into()],
            from_files: vec![("API_KEY".into(), file)],
        };
        let env = policy.build(Path::new("/homes/u"), Path::new("/tmp"));
        assert_eq!(lookup(&env, "HOME").unwrap(), "/homes/u");
        assert_eq!(lookup(&env, "API_KEY").unwrap(), "from-file");
        assert!(lookup(&env, "NOT_SET_ANYWHERE_X").is_none());
        assert!(lookup(&env, "PATH").is_some());
        // Cargo sets these for the test process; none is on the list.
        assert!(lookup(&env, "CARGO_MANIFEST_DIR").is_none());
        assert!(env.iter().all(|(n, _)| !n.to_string_lossy().starts_with("CHATGATE_")));
    }
}
