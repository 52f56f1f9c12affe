//! `flanneld`: the node agent binary.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use flanneld::agent::{self, AgentError};
use flanneld::config::Opts;
use flanneld::health;
use flanneld::metrics::Metrics;
use flanneld::preflight;

async fn run(opts: Opts) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::default());
    if opts.healthz_port != 0 {
        let addr = std::net::SocketAddr::new(opts.healthz_ip, opts.healthz_port);
        let bound = health::start(addr, metrics.clone()).await.map_err(|e| {
            AgentError::Preflight(preflight::PreflightError(format!("--healthz-port: cannot listen on {addr}: {e}")))
        })?;
        info!("health and metrics on http://{bound}/ (healthz, readyz, metrics)");
    }
    if opts.kube_subnet_mgr { agent::run_kube(opts, metrics).await } else { agent::run_etcd(opts, metrics).await }
}

fn main() -> ExitCode {
    // `flanneld doctor ...`: the agent's flags after the word; upstream has no
    // positional arguments, so the word cannot clash with a flag.
    if std::env::args().nth(1).as_deref() == Some("doctor") {
        let args = flanneld::doctor::DoctorArgs::parse_from(std::env::args().skip(1));
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("flanneld doctor: starting the runtime: {e}");
                return ExitCode::from(2);
            }
        };
        return ExitCode::from(rt.block_on(flanneld::doctor::run(args)));
    }
    let opts = Opts::parse();
    if opts.version {
        eprintln!("{}", flanneld::config::version());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = opts.validate() {
        eprintln!("flanneld: error: {e}");
        return ExitCode::FAILURE;
    }
    let level = match opts.verbosity {
        0 => tracing::Level::INFO,
        1 | 2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    // Our own crates at the chosen level; libraries (gRPC, HTTP/2) only when they warn.
    // boringtun (the userspace WireGuard) only at -v=3 and up: it warns and errs per
    // peer and per handshake timeout (a node that is down: one line per 5 s each),
    // where flanneld says what matters once.
    let boringtun = if opts.verbosity >= 3 { LevelFilter::TRACE } else { LevelFilter::OFF };
    let filter = Targets::new()
        .with_target("flanneld", level)
        .with_target("flannel_shared", level)
        .with_target("boringtun", boringtun)
        .with_default(tracing::Level::WARN);
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .with(filter)
        .init();
    info!("flanneld {} starting", flanneld::config::version());
    if opts.vmodule.is_some() || opts.log_backtrace_at.is_some() {
        tracing::warn!("--vmodule and --log_backtrace_at (klog's) are accepted and ignored; -v sets the level");
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flanneld: error: {e}");
            ExitCode::FAILURE
        }
    }
}
