//! What `flanneld doctor` found, and how it is shown: a table a person reads
//! in a few seconds (colour on a terminal), or the same as JSON for tools.

use std::fmt::Write;

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
    fn colour(self) -> &'static str {
        match self {
            Level::Ok => "\x1b[32m",
            Level::Warn => "\x1b[33m",
            Level::Fail => "\x1b[31m",
        }
    }
}

/// One check: what was looked at, the verdict, the evidence, the fix.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub check: String,
    pub level: Level,
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// A peer that is not fine.
#[derive(Clone, Debug, Serialize)]
pub struct PeerProblem {
    pub subnet: String,
    pub public_ip: String,
    pub level: Level,
    /// What is wrong, in words shared by every peer with the same trouble (the verdict groups by it).
    pub problem: String,
    /// This peer's particulars.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    pub fix: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Finding>,
    pub peers: usize,
    pub peers_ok: usize,
    pub peer_problems: Vec<PeerProblem>,
    pub verdict: String,
}

impl Report {
    pub fn add(&mut self, check: &str, level: Level, evidence: impl Into<String>, fix: Option<&str>) {
        self.checks.push(Finding { check: check.into(), level, evidence: evidence.into(), fix: fix.map(String::from) });
    }
    pub fn ok(&mut self, check: &str, evidence: impl Into<String>) {
        self.add(check, Level::Ok, evidence, None);
    }
    pub fn warn(&mut self, check: &str, evidence: impl Into<String>, fix: &str) {
        self.add(check, Level::Warn, evidence, Some(fix));
    }
    pub fn fail(&mut self, check: &str, evidence: impl Into<String>, fix: &str) {
        self.add(check, Level::Fail, evidence, Some(fix));
    }

    pub fn worst(&self) -> Level {
        let checks = self.checks.iter().map(|c| c.level);
        checks.chain(self.peer_problems.iter().map(|p| p.level)).max().unwrap_or(Level::Ok)
    }

    /// 0 all OK, 1 warnings only, 2 any failure.
    pub fn exit_code(&self) -> u8 {
        match self.worst() {
            Level::Ok => 0,
            Level::Warn => 1,
            Level::Fail => 2,
        }
    }

    /// The one-line verdict, grouping failing peers by what is wrong.
    pub fn conclude(&mut self) {
        let bad = self.checks.iter().filter(|c| c.level == Level::Fail).count();
        let warn = self.checks.iter().filter(|c| c.level == Level::Warn).count();
        let mut by_problem: Vec<(String, Vec<&str>)> = Vec::new();
        for p in &self.peer_problems {
            match by_problem.iter_mut().find(|(k, _)| *k == p.problem) {
                Some((_, ips)) => ips.push(&p.public_ip),
                None => by_problem.push((p.problem.clone(), vec![&p.public_ip])),
            }
        }
        let mut v = format!("{} of {} peers reachable", self.peers_ok, self.peers);
        for (problem, ips) in &by_problem {
            let shown: Vec<&str> = ips.iter().take(3).copied().collect();
            let more = if ips.len() > 3 { format!(" and {} more", ips.len() - 3) } else { String::new() };
            let _ = write!(v, "; {} fail: {problem} towards {}{more}", ips.len(), shown.join(", "));
        }
        let _ = write!(v, "; {bad} node check(s) failing, {warn} warning(s)");
        self.verdict = format!("{}: {v}", self.worst().word());
    }

    pub fn render(&self, colour: bool) -> String {
        let paint = |l: Level| {
            if colour { format!("{}{:<4}\x1b[0m", l.colour(), l.word()) } else { format!("{:<4}", l.word()) }
        };
        let width = self.checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
        let mut out = String::new();
        for c in &self.checks {
            let _ = writeln!(out, "{}  {:<width$}  {}", paint(c.level), c.check, c.evidence);
            if let Some(f) = &c.fix {
                let _ = writeln!(out, "      {:<width$}  fix: {f}", "");
            }
        }
        if !self.peer_problems.is_empty() {
            let _ = writeln!(out, "\npeers with problems ({} of {}):", self.peer_problems.len(), self.peers);
            for p in &self.peer_problems {
                let detail = if p.detail.is_empty() { String::new() } else { format!(" ({})", p.detail) };
                let _ = writeln!(out, "{}  {} via {}: {}{detail}", paint(p.level), p.subnet, p.public_ip, p.problem);
                let _ = writeln!(out, "      fix: {}", p.fix);
            }
        }
        let _ = writeln!(out, "\n{}", self.verdict);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_groups_peers_and_exit_codes_follow_the_worst() {
        let mut r = Report { peers: 5, peers_ok: 3, ..Report::default() };
        r.ok("ip_forward", "1");
        assert_eq!(r.exit_code(), 0);
        r.warn("rp_filter", "strict on eth0", "sysctl -w ...");
        assert_eq!(r.exit_code(), 1);
        for ip in ["192.0.2.7", "192.0.2.9"] {
            r.peer_problems.push(PeerProblem {
                subnet: "10.244.7.0/24".into(),
                public_ip: ip.into(),
                level: Level::Fail,
                problem: "no answer through the tunnel".into(),
                detail: String::new(),
                fix: "open UDP 8472".into(),
            });
        }
        r.conclude();
        assert_eq!(r.exit_code(), 2);
        assert!(
            r.verdict.starts_with(
                "FAIL: 3 of 5 peers reachable; 2 fail: no answer through the tunnel towards 192.0.2.7, 192.0.2.9"
            ),
            "{}",
            r.verdict
        );
        let text = r.render(false);
        assert!(text.contains("WARN  rp_filter") && text.contains("fix: sysctl -w"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["level"], "WARN");
        assert_eq!(json["peer_problems"].as_array().unwrap().len(), 2);
    }
}
