//! `flannel`: the CNI plugin. A container runtime execs it with the CNI
//! environment and the network configuration on stdin; it prints the result
//! (or a CNI error) on stdout. See README.md for the supported configuration.

mod cmd;
mod conf;
mod dataplane;
mod decode;
mod error;
mod ipam;
mod kernel;
mod log;
mod result;
mod state;

use std::io::{Read, Write};

use conf::{Command, Env, PluginConf, SUPPORTED_VERSIONS};
use error::{CniError, code};

const LATEST: &str = "1.1.0";

fn command() -> Result<Command, CniError> {
    match std::env::var("CNI_COMMAND").as_deref() {
        Ok("ADD") => Ok(Command::Add),
        Ok("DEL") => Ok(Command::Del),
        Ok("CHECK") => Ok(Command::Check),
        Ok("VERSION") => Ok(Command::Version),
        Ok("STATUS") => Ok(Command::Status),
        Ok("GC") => Ok(Command::Gc),
        Ok(other) => Err(CniError::new(code::INVALID_ENV, format!("CNI_COMMAND {other:?} is not supported"))),
        Err(_) => Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
    }
}

/// Runs one command; returns what to print on success (if anything).
fn run(stdin: &[u8], version: &mut String) -> Result<Option<String>, CniError> {
    let cmd = command()?;
    if cmd == Command::Version {
        return Ok(Some(
            serde_json::json!({"cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    let env = Env::load(cmd, |k| std::env::var(k).ok())?;
    let mut log = log::Log::new(format!("{cmd:?} {}/{}", env.container_id, env.ifname).to_uppercase());
    let mut warnings = Vec::new();
    let conf = PluginConf::parse(stdin, &env, |w| warnings.push(w))?;
    *version = conf.cni_version.clone();
    if let Some(p) = &conf.log_file {
        log.open_file(p);
    }
    for w in &warnings {
        log.warn(w);
    }
    let res = cmd::run(cmd, &env, &conf, &mut log);
    if let Err(e) = &res {
        log.error(&e.to_string());
    }
    res
}

fn main() {
    let mut stdin = Vec::new();
    let mut version = LATEST.to_string();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => run(&stdin, &mut version),
        Err(e) => Err(error::io_err("cannot read the network configuration from stdin", e)),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(s)) => {
            let _ = writeln!(out, "{s}");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            let _ = out.flush();
            std::process::exit(1);
        }
    }
}
