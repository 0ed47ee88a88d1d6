//! Child-process machinery shared by the CLI runtimes (docs/protocol.md §Providers, docs/providers.md).
//!
//! A provider CLI runs in its own process group with the session's working
//! directory, started under the run's containment ([`super::sandbox`]: a
//! clean environment, resource bounds, the sandbox). Its stdout is read line by line with a length cap (no unbounded
//! buffer); its stderr lines become rate-limited, capped `error` events. The
//! whole group is killed on cancel (SIGTERM, then SIGKILL after a grace), when
//! the CLI exits (leftover grandchildren), and when the handle is dropped. A
//! program that cannot be found ends the run with an `error` naming it and
//! exit code 127.
//!
//! [`run_cli`] drives the common case: spawn, feed every stdout line to a
//! [`StreamParser`], emit what it produces, and turn the exit into a
//! [`RunOutcome`]. The Claude runtime, which also writes to stdin, uses the
//! lower-level [`CliProcess`].

use std::{
    borrow::Cow,
    io,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::Duration,
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, ChildStdout},
    task::JoinHandle,
    time::Instant,
};

use super::{
    RunContext, RunOutcome,
    sandbox::{Prepared, RunCgroup},
};

/// Longest stdout line kept; a longer one is dropped with an `error` event.
pub const MAX_STDOUT_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Longest stderr line forwarded; the rest of a longer line is cut off.
const MAX_STDERR_LINE_BYTES: usize = 4 * 1024;
/// At most this many stderr lines become `error` events in one run.
const MAX_STDERR_EVENTS: usize = 200;
/// At most this many stderr lines become `error` events in any one second.
const STDERR_EVENTS_PER_SECOND: usize = 20;
/// How long a group gets between SIGTERM and SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_millis(1500);
/// After the CLI exited, how long to wait for more stdout from processes outside its group.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// Exit code reported when the run was cancelled (abort, drain, lost lock).
pub const CANCELLED_EXIT_CODE: i32 = 1;
/// Exit code of a program that could not be found (as a shell reports it).
pub const NOT_FOUND_EXIT_CODE: i32 = 127;
/// Exit code of a program that exists but cannot be executed.
pub const NOT_EXECUTABLE_EXIT_CODE: i32 = 126;

/// A prompt passed as a command-line argument: one starting with `-` gets a
/// leading space so the CLI cannot read it as a flag.
pub fn prompt_arg(content: &str) -> String {
    if content.starts_with('-') { format!(" {content}") } else { content.to_string() }
}

/// One CLI invocation.
#[derive(Debug, Clone)]
pub struct CliCommand {
    /// Provider id, for messages.
    pub provider: &'static str,
    /// Program name or path.
    pub program: String,
    /// The environment variable that overrides `program` (named in the not-found message).
    pub program_env: &'static str,
    pub args: Vec<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Whether the CLI gets a stdin pipe (else stdin is `/dev/null`).
    pub stdin: bool,
}

/// Drops stderr lines that are known noise (`None`), or gives the text to show for a line
/// (the line itself, or a clearer message).
pub type StderrFilter = for<'a> fn(&'a str) -> Option<Cow<'a, str>>;

/// Keeps every stderr line.
pub fn keep_all_stderr(line: &str) -> Option<Cow<'_, str>> {
    Some(Cow::Borrowed(line))
}

/// One line read from a pipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// The line without its `\n` / `\r\n`, lossily decoded as UTF-8; cut at the cap.
    pub text: String,
    /// The line was longer than the cap; `text` holds only its start.
    pub truncated: bool,
    /// The line's full length in bytes.
    pub len: usize,
}

/// Reads lines from a pipe, never holding more than `max` bytes of one line.
pub struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
    buf: Vec<u8>,
    len: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader { inner: BufReader::new(inner), max, buf: Vec::new(), len: 0 }
    }

    /// The next line, or `None` at end of input. Cancel safe: a partly read
    /// line stays buffered for the next call.
    pub async fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                if self.len == 0 {
                    return Ok(None);
                }
                return Ok(Some(self.take()));
            }
            let (chunk, found, used) = match available.iter().position(|b| *b == b'\n') {
                Some(i) => (&available[..i], true, i + 1),
                None => (available, false, available.len()),
            };
            let room = self.max.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            self.len += chunk.len();
            self.inner.consume(used);
            if found {
                return Ok(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> Line {
        if self.buf.last() == Some(&b'\r') && self.len <= self.max {
            self.buf.pop();
        }
        let text = String::from_utf8_lossy(&self.buf).into_owned();
        let line = Line { text, truncated: self.len > self.max, len: self.len };
        self.buf.clear();
        self.len = 0;
        line
    }
}

/// Kills a process group when dropped, unless it was already reaped and killed.
struct ProcessGroup {
    pgid: Option<Pid>,
}

impl ProcessGroup {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            // ESRCH (the group is gone) is the expected outcome once everything exited.
            let _ = killpg(pgid, signal);
        }
    }

    /// Kills whatever is left of the group and forgets it.
    fn kill_and_forget(&mut self) {
        self.signal(Signal::SIGKILL);
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
    }
}

/// A running provider CLI in its own process group.
pub struct CliProcess {
    child: Child,
    group: ProcessGroup,
    stdin: Option<ChildStdin>,
    stdout: LineReader<ChildStdout>,
    stderr: Option<JoinHandle<()>>,
    exit: Option<ExitStatus>,
    exited_at: Option<Instant>,
    /// The run's cgroup, removed once the process is gone.
    _cgroup: Option<Arc<RunCgroup>>,
}

impl CliProcess {
    /// Starts `cmd`. On failure an `error` event has been emitted and the
    /// outcome to return is given (127 for a missing program).
    pub async fn spawn(cmd: &CliCommand, ctx: &RunContext, stderr_filter: StderrFilter) -> Result<Self, RunOutcome> {
        if !cmd.cwd.is_dir() {
            let message = format!("{}: working directory does not exist: {}", cmd.provider, cmd.cwd.display());
            ctx.emit("error", json!({ "content": message })).await;
            return Err(RunOutcome::exit(1));
        }
        let Prepared { mut command, cgroup } = match ctx.launch().command(&cmd.program, &cmd.args, &cmd.cwd) {
            Ok(prepared) => prepared,
            Err(e) => return Err(spawn_failed(cmd, &e, ctx).await),
        };
        command
            .stdin(if cmd.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return Err(spawn_failed(cmd, &e, ctx).await),
        };
        let group = ProcessGroup { pgid: child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw) };
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            drop(group);
            ctx.emit("error", json!({ "content": format!("{}: could not open the CLI's output pipes", cmd.provider) }))
                .await;
            return Err(RunOutcome::exit(1));
        };
        tracing::debug!(provider = cmd.provider, program = %cmd.program, args = ?cmd.args, "spawned provider CLI");
        Ok(CliProcess {
            stdin: child.stdin.take(),
            child,
            group,
            stdout: LineReader::new(stdout, MAX_STDOUT_LINE_BYTES),
            stderr: Some(tokio::spawn(forward_stderr(stderr, ctx.clone(), stderr_filter))),
            exit: None,
            exited_at: None,
            _cgroup: cgroup,
        })
    }

    /// The CLI's stdin (once; `None` when it was not piped).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// The next stdout line, or `None` once stdout is closed. When the CLI
    /// exits first, leftovers of its group are killed and the rest of its
    /// output is drained. Cancel safe.
    pub async fn next_line(&mut self) -> io::Result<Option<Line>> {
        loop {
            if let Some(exited_at) = self.exited_at {
                let deadline = exited_at + DRAIN_AFTER_EXIT;
                return match tokio::time::timeout_at(deadline, self.stdout.next_line()).await {
                    Ok(line) => line,
                    Err(_) => Ok(None),
                };
            }
            tokio::select! {
                line = self.stdout.next_line() => return line,
                status = self.child.wait() => self.mark_exited(status?),
            }
        }
    }

    fn mark_exited(&mut self, status: ExitStatus) {
        self.exit = Some(status);
        self.exited_at = Some(Instant::now());
        // The leader is reaped but its group may live on: end it now.
        self.group.kill_and_forget();
    }

    /// Waits for the CLI to exit after its stdout closed, kills leftovers and
    /// lets the stderr forwarder finish. Returns the exit code.
    pub async fn wait(&mut self) -> io::Result<i32> {
        let status = match self.exit {
            Some(status) => status,
            None => {
                let status = self.child.wait().await?;
                self.mark_exited(status);
                status
            }
        };
        self.join_stderr().await;
        Ok(exit_code(status))
    }

    /// Ends the CLI: SIGTERM to the group, SIGKILL after the grace period.
    pub async fn terminate(&mut self) -> i32 {
        self.stdin = None;
        if self.exit.is_none() {
            self.group.signal(Signal::SIGTERM);
            match tokio::time::timeout(TERMINATE_GRACE, self.child.wait()).await {
                Ok(Ok(status)) => self.mark_exited(status),
                _ => {
                    self.group.signal(Signal::SIGKILL);
                    if let Ok(status) = self.child.wait().await {
                        self.mark_exited(status);
                    }
                }
            }
        }
        self.group.kill_and_forget();
        self.join_stderr().await;
        self.exit.map(exit_code).unwrap_or(CANCELLED_EXIT_CODE)
    }

    /// Waits up to `limit` for the CLI to exit on its own.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> bool {
        if self.exit.is_some() {
            return true;
        }
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.mark_exited(status);
                true
            }
            _ => false,
        }
    }

    async fn join_stderr(&mut self) {
        if let Some(mut task) = self.stderr.take() {
            // Every writer of the pipe is dead by now unless one left the group; don't wait on those.
            if tokio::time::timeout(DRAIN_AFTER_EXIT, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}

async fn spawn_failed(cmd: &CliCommand, error: &io::Error, ctx: &RunContext) -> RunOutcome {
    let (message, code) = match error.kind() {
        io::ErrorKind::NotFound => (
            format!(
                "{} CLI not found: could not run `{}` (is it installed and on PATH? set {} to its path)",
                cmd.provider, cmd.program, cmd.program_env
            ),
            NOT_FOUND_EXIT_CODE,
        ),
        io::ErrorKind::PermissionDenied => {
            (format!("{} CLI `{}` is not executable: {error}", cmd.provider, cmd.program), NOT_EXECUTABLE_EXIT_CODE)
        }
        _ => (format!("{}: could not start `{}`: {error}", cmd.provider, cmd.program), 1),
    };
    tracing::warn!(provider = cmd.provider, program = %cmd.program, %error, "provider CLI failed to start");
    ctx.emit("error", json!({ "content": message })).await;
    RunOutcome::exit(code)
}

/// The shell's view of an exit: the code, or 128 + the signal number.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}

/// Turns stderr lines into `error` events, at most [`STDERR_EVENTS_PER_SECOND`]
/// a second and [`MAX_STDERR_EVENTS`] a run; the rest is counted and reported
/// once. Keeps reading to the end so the CLI never blocks on a full pipe.
async fn forward_stderr<R: AsyncRead + Unpin>(stderr: R, ctx: RunContext, filter: StderrFilter) {
    let mut reader = LineReader::new(stderr, MAX_STDERR_LINE_BYTES);
    let mut sent = 0usize;
    let mut suppressed = 0usize;
    let mut window_start = Instant::now();
    let mut in_window = 0usize;
    let mut open = true;
    while let Ok(Some(line)) = reader.next_line().await {
        let text = line.text.trim_end();
        if text.trim().is_empty() {
            continue;
        }
        let Some(text) = filter(text) else { continue };
        if window_start.elapsed() >= Duration::from_secs(1) {
            window_start = Instant::now();
            in_window = 0;
        }
        if !open || sent >= MAX_STDERR_EVENTS || in_window >= STDERR_EVENTS_PER_SECOND {
            suppressed += 1;
            continue;
        }
        let content = if line.truncated { format!("{text}…") } else { text.to_string() };
        open = ctx.emit("error", json!({ "content": content })).await;
        sent += 1;
        in_window += 1;
    }
    if open && suppressed > 0 {
        ctx.emit("error", json!({ "content": format!("({suppressed} more stderr lines not shown)") })).await;
    }
}

/// What a parser asks the runner to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    /// A normalized event: kind and upstream's fields.
    Event(&'static str, Value),
    /// The provider's own session id, as the CLI reported it.
    ProviderSessionId(String),
}

impl Emit {
    pub fn event(kind: &'static str, fields: Value) -> Self {
        Emit::Event(kind, fields)
    }
}

/// Maps one provider's stdout to normalized events.
pub trait StreamParser: Send {
    /// A stdout line that is a JSON object.
    fn on_json(&mut self, value: Map<String, Value>, out: &mut Vec<Emit>);

    /// A stdout line that is not a JSON object (default: ignored).
    fn on_text(&mut self, line: &str, out: &mut Vec<Emit>) {
        let _ = (line, out);
    }

    /// The CLI exited with `exit_code` (not called when the run was cancelled).
    fn on_exit(&mut self, exit_code: i32, out: &mut Vec<Emit>) -> RunOutcome {
        let _ = out;
        RunOutcome::exit(exit_code)
    }
}

/// Options of [`run_cli`].
#[derive(Debug, Clone)]
pub struct RunCliOptions {
    /// End the CLI when it prints nothing on stdout for this long; the string is the `error` text.
    pub inactivity: Option<(Duration, String)>,
    pub stderr_filter: StderrFilter,
    /// Written to the CLI's stdin, which is then closed (`cmd` must ask for a stdin pipe).
    pub stdin_text: Option<String>,
}

impl Default for RunCliOptions {
    fn default() -> Self {
        RunCliOptions { inactivity: None, stderr_filter: keep_all_stderr, stdin_text: None }
    }
}

/// Writes `text` to a CLI's stdin and closes it, in the background (a CLI that reads its
/// stdin only after printing cannot block the run). A CLI that exits without reading it
/// (a broken pipe) is not an error of the run.
fn feed_stdin(stdin: ChildStdin, text: String, provider: &'static str) {
    tokio::spawn(async move {
        let mut stdin = stdin;
        if let Err(error) = stdin.write_all(text.as_bytes()).await {
            tracing::debug!(provider, %error, "the CLI did not read its whole stdin");
        }
    });
}

/// Sends parser output to the run, announcing a provider session id once
/// (only when it differs from the id the run resumed).
pub struct Emitter<'a> {
    ctx: &'a RunContext,
    resumed: Option<String>,
    announced: bool,
}

impl<'a> Emitter<'a> {
    pub fn new(ctx: &'a RunContext, resumed: Option<String>) -> Self {
        Emitter { ctx, resumed, announced: false }
    }

    /// Sends everything in `out` (draining it); false once the run is over.
    pub async fn send(&mut self, out: &mut Vec<Emit>) -> bool {
        for emit in out.drain(..) {
            let open = match emit {
                Emit::Event(kind, fields) => self.ctx.emit(kind, fields).await,
                Emit::ProviderSessionId(id) => {
                    if self.announced || id.is_empty() || self.resumed.as_deref() == Some(id.as_str()) {
                        true
                    } else {
                        self.announced = true;
                        self.ctx.provider_session_id(&id).await
                    }
                }
            };
            if !open {
                return false;
            }
        }
        true
    }
}

/// Feeds one stdout line to `parser`: JSON objects to `on_json`, anything
/// else (including a line that looks like JSON but does not parse) to `on_text`.
pub fn dispatch_line(parser: &mut dyn StreamParser, line: &Line, provider: &str, out: &mut Vec<Emit>) {
    if line.truncated {
        out.push(Emit::event(
            "error",
            json!({ "content": format!("{provider}: dropped an output line of {} bytes (limit {MAX_STDOUT_LINE_BYTES})", line.len) }),
        ));
        return;
    }
    let text = line.text.trim();
    if text.is_empty() {
        return;
    }
    if text.starts_with('{')
        && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(text)
    {
        parser.on_json(map, out);
        return;
    }
    parser.on_text(text, out);
}

/// Runs `cmd` to its end, mapping its stdout through `parser`.
pub async fn run_cli(
    cmd: &CliCommand,
    ctx: &RunContext,
    resumed: Option<String>,
    parser: &mut dyn StreamParser,
    options: RunCliOptions,
) -> RunOutcome {
    let mut process = match CliProcess::spawn(cmd, ctx, options.stderr_filter).await {
        Ok(process) => process,
        Err(outcome) => return outcome,
    };
    if let Some(text) = options.stdin_text {
        match process.take_stdin() {
            Some(stdin) => feed_stdin(stdin, text, cmd.provider),
            None => tracing::warn!(provider = cmd.provider, "the CLI has no stdin pipe for its input"),
        }
    }
    let mut emitter = Emitter::new(ctx, resumed);
    let mut out = Vec::new();
    let inactivity_limit = options.inactivity.as_ref().map(|(limit, _)| *limit);
    let mut last_output = Instant::now();
    loop {
        let idle_deadline = inactivity_limit.map(|limit| last_output + limit);
        tokio::select! {
            _ = ctx.cancelled().cancelled() => {
                process.terminate().await;
                return RunOutcome::exit(CANCELLED_EXIT_CODE);
            }
            _ = sleep_until_opt(idle_deadline) => {
                let message = options.inactivity.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
                ctx.emit("error", json!({ "content": message })).await;
                process.terminate().await;
                return RunOutcome::exit(1);
            }
            line = process.next_line() => match line {
                Ok(Some(line)) => {
                    last_output = Instant::now();
                    dispatch_line(parser, &line, cmd.provider, &mut out);
                    if !emitter.send(&mut out).await {
                        process.terminate().await;
                        return RunOutcome::exit(CANCELLED_EXIT_CODE);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ctx.emit("error", json!({ "content": format!("{}: reading output failed: {e}", cmd.provider) })).await;
                    break;
                }
            },
        }
    }
    let code = tokio::select! {
        _ = ctx.cancelled().cancelled() => {
            process.terminate().await;
            return RunOutcome::exit(CANCELLED_EXIT_CODE);
        }
        code = process.wait() => match code {
            Ok(code) => code,
            Err(e) => {
                ctx.emit("error", json!({ "content": format!("{}: waiting for the CLI failed: {e}", cmd.provider) })).await;
                process.terminate().await;
                1
            }
        },
    };
    let outcome = parser.on_exit(code, &mut out);
    emitter.send(&mut out).await;
    outcome
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads a string field.
pub fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    map.get(key).and_then(Value::as_str)
}

/// A whole number from a JSON number or numeric string; 0 otherwise.
pub fn number(value: Option<&Value>) -> u64 {
    match value {
        Some(Value::Number(n)) => {
            n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)).unwrap_or(0)
        }
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().await.unwrap_or(None) {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn line_reader_splits_and_caps() {
        let got = lines(b"one\r\ntwo\n0123456789abc\nlast", 8).await;
        let texts: Vec<_> = got.iter().map(|l| (l.text.as_str(), l.truncated, l.len)).collect();
        assert_eq!(texts, vec![("one", false, 4), ("two", false, 3), ("01234567", true, 13), ("last", false, 4)]);
    }

    #[tokio::test]
    async fn line_reader_handles_lines_longer_than_its_buffer() {
        let mut input = vec![b'x'; 100_000];
        input.push(b'\n');
        input.extend_from_slice(b"{\"a\":1}\n");
        let got = lines(&input, 50_000).await;
        assert_eq!(got.len(), 2);
        assert!(got[0].truncated);
        assert_eq!(got[0].text.len(), 50_000);
        assert_eq!(got[0].len, 100_000);
        assert_eq!(got[1].text, "{\"a\":1}");
    }

    #[test]
    fn prompt_arg_protects_leading_dash() {
        assert_eq!(prompt_arg("--help me"), " --help me");
        assert_eq!(prompt_arg("hello"), "hello");
    }

    #[test]
    fn number_reads_numbers_and_strings() {
        assert_eq!(number(Some(&json!(12))), 12);
        assert_eq!(number(Some(&json!("7"))), 7);
        assert_eq!(number(Some(&json!(-3))), 0);
        assert_eq!(number(None), 0);
    }
}
