//! nginx as the load balancer in front of N nodes: round robin, no stickiness, WebSocket
//! upgrade, configured like `deploy/local/up.sh`, in the foreground, without an access log.
//! Used by the chaos soak and `chatgate-stack`; stopped (only the nginx started here) when
//! dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{sys::signal::Signal, unistd::Pid};

/// A running nginx.
pub struct Balancer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Balancer {
    /// nginx on `port` in front of `upstreams` (ports on 127.0.0.1); its config, temporary
    /// files and error log live in `dir` (which nginx's workers must be able to traverse).
    /// Returns once `/healthz` answers through it.
    pub async fn start(dir: &Path, port: u16, upstreams: &[u16]) -> anyhow::Result<Balancer> {
        let nginx = nginx_bin()
            .context("nginx is the load balancer and it is not installed (as root: apt-get install nginx)")?;
        let conf = dir.join("nginx.conf");
        std::fs::create_dir_all(dir.join("nginx-tmp"))?;
        std::fs::write(&conf, config(dir, port, upstreams))?;
        let child = Command::new(&nginx)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", nginx.display()))?;
        let balancer = Balancer { port, dir: dir.to_path_buf(), child: Some(child) };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await
                && r.status().is_success()
            {
                return Ok(balancer);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        balancer.stop().await;
        bail!("nginx on :{port} does not answer (see {})", dir.join("nginx-error.log").display())
    }

    /// nginx's error log.
    pub fn error_log(&self) -> PathBuf {
        self.dir.join("nginx-error.log")
    }

    /// Fast shutdown (SIGTERM to the master, which stops its workers); SIGKILL after 10 s.
    pub async fn stop(mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }
}

/// nginx as `deploy/local/up.sh` configures it.
fn config(dir: &Path, port: u16, upstreams: &[u16]) -> String {
    let d = dir.display();
    let servers: String =
        upstreams.iter().map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n")).collect();
    let tries = upstreams.len().clamp(1, 3);
    format!(
        "# Load balancer written by chatgate-testkit.
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}
    upstream chatgate {{
        zone chatgate 64k;
{servers}        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chatgate;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_connect_timeout 2s;
            proxy_buffering off;
            client_max_body_size 16m;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries {tries};
        }}
    }}
}}
"
    )
}

/// nginx on the PATH, or Debian's /usr/sbin/nginx.
pub fn nginx_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join("nginx")).find(|p| p.is_file()));
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
}
