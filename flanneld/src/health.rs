//! `/healthz` (the process answers), `/readyz` (lease held, subnet.env
//! written, rules in place) and `/metrics` on `--healthz-ip:--healthz-port`,
//! served by hyper's HTTP/1 server (already in the tree through kube and tonic).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

fn respond(path: &str, m: &Metrics) -> (StatusCode, &'static str, String) {
    match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match m.readiness() {
            Ok(()) => (StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {why}\n")),
        },
        "/metrics" => (StatusCode::OK, crate::metrics::CONTENT_TYPE, m.render()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn handle(req: &Request<Incoming>, m: &Metrics) -> Response<Full<Bytes>> {
    let (code, ctype, body) = match *req.method() {
        Method::GET | Method::HEAD => respond(req.uri().path(), m),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "method not allowed\n".to_string()),
    };
    // hyper leaves the body out of HEAD responses itself.
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
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
                let svc = hyper::service::service_fn(move |req| {
                    let resp = handle(&req, &m);
                    async move { Ok::<_, Infallible>(resp) }
                });
                // One response per connection, as kubelet probes use it.
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(s), svc);
                if let Err(e) = conn.await {
                    debug!("health client {peer}: {e}");
                }
            });
        }
    });
    Ok(local)
}
