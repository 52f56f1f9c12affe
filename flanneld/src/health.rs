//! `/healthz` (the process answers), `/readyz` (lease held, subnet.env
//! written, rules in place) and `/metrics` on `--healthz-ip:--healthz-port`.
//! Three GET routes do not justify an HTTP framework; this answers HTTP/1.x
//! GETs and closes the connection after each response.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::metrics::Metrics;

fn respond(path: &str, m: &Metrics) -> (u16, &'static str, String) {
    match path {
        "/healthz" => (200, "text/plain", "ok\n".into()),
        "/readyz" => match m.readiness() {
            Ok(()) => (200, "text/plain", "ok\n".into()),
            Err(why) => (503, "text/plain", format!("not ready: {why}\n")),
        },
        "/metrics" => (200, "text/plain; version=0.0.4", m.render()),
        _ => (404, "text/plain", "not found\n".into()),
    }
}

async fn serve_one(mut s: TcpStream, m: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let path = target.split('?').next().unwrap_or("/");
    let (code, ctype, body) = if method == "GET" || method == "HEAD" {
        respond(path, m)
    } else {
        (405, "text/plain", "method not allowed\n".to_string())
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        out.push_str(&body);
    }
    s.write_all(out.as_bytes()).await?;
    s.shutdown().await
}

/// Binds now (so a port clash stops the agent at start) and serves in the background.
pub async fn start(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, peer)) = listener.accept().await else { continue };
            let m = m.clone();
            tokio::spawn(async move {
                let timeout = std::time::Duration::from_secs(5);
                if let Err(e) = tokio::time::timeout(timeout, serve_one(s, &m)).await.unwrap_or(Ok(())) {
                    debug!("health client {peer}: {e}");
                }
            });
        }
    });
    Ok(local)
}
