//! What a node that did not exit after SIGTERM was doing, recorded before it is SIGKILLed:
//! every thread's stack (`gdb -batch`, when gdb is installed), each thread's state and kernel
//! wait channel (`/proc`), and whether its HTTP listener still answers `/metrics` (a wedged
//! runtime does not). Written to a file in the soak's directory, kept with the logs.

use std::{path::Path, time::Duration};

/// How long gdb may take to attach and print.
const GDB_WAIT: Duration = Duration::from_secs(30);

/// Writes `dir/node-<id>-stuck-<unix seconds>.txt`; failures to look are written into it too.
pub async fn stuck_process(pid: u32, port: u16, id: &str, dir: &Path) {
    let mut out = format!("node {id} (pid {pid}, port {port}) had not exited after SIGTERM\n\n");
    out.push_str(&threads(pid));
    out.push_str(&http_probe(port).await);
    out.push_str(&gdb(pid).await);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let path = dir.join(format!("node-{id}-stuck-{stamp}.txt"));
    if let Err(e) = std::fs::write(&path, out) {
        eprintln!("could not write {}: {e}", path.display());
    } else {
        eprintln!("node {id} did not exit: see {}", path.display());
    }
}

/// `name state wchan` of each thread.
fn threads(pid: u32) -> String {
    let mut out = String::from("== threads (name, state, wchan)\n");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out + "(cannot read /proc)\n\n";
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default().trim().to_string();
        let state = read("status").lines().find(|l| l.starts_with("State:")).unwrap_or_default().to_string();
        out.push_str(&format!(
            "{} {} {} wchan={}\n",
            task.file_name().to_string_lossy(),
            read("comm"),
            state,
            read("wchan")
        ));
    }
    out + "\n"
}

/// Whether `/metrics` answers within 2 s.
async fn http_probe(port: u16) -> String {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build();
    let answer = match client {
        Ok(client) => match client.get(format!("http://127.0.0.1:{port}/metrics")).send().await {
            Ok(response) => format!("answered {}", response.status()),
            Err(e) => format!("no answer: {e}"),
        },
        Err(e) => format!("no client: {e}"),
    };
    format!("== GET /metrics: {answer}\n\n")
}

/// `thread apply all bt` of gdb attached to the process.
async fn gdb(pid: u32) -> String {
    let mut command = tokio::process::Command::new("gdb");
    command.args(["-p", &pid.to_string(), "-batch", "-nx", "-ex", "thread apply all bt"]).kill_on_drop(true);
    match tokio::time::timeout(GDB_WAIT, command.output()).await {
        Ok(Ok(output)) => format!(
            "== gdb: thread apply all bt\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
        Ok(Err(e)) => format!("== gdb could not run: {e}\n"),
        Err(_) => format!("== gdb took longer than {GDB_WAIT:?}\n"),
    }
}
