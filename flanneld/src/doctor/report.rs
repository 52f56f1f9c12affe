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
    /// How long the peer probes took (most of a run with many silent peers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_seconds: Option<f64>,
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
        let mut v = format!("{} of {} peers reachable", count(self.peers_ok), count(self.peers));
        for (problem, ips) in &by_problem {
            let shown: Vec<&str> = ips.iter().take(3).copied().collect();
            let more = if ips.len() > 3 { format!(" and {} more", count(ips.len() - 3)) } else { String::new() };
            let _ = write!(v, "; {} fail: {problem} towards {}{more}", count(ips.len()), shown.join(", "));
        }
        let _ = write!(v, "; {bad} node check(s) failing, {warn} warning(s)");
        self.verdict = format!("{}: {v}", self.worst().word());
    }

    /// The table; at most `peer_lines` peers with problems are listed (the verdict counts them all).
    pub fn render(&self, colour: bool, peer_lines: usize) -> String {
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
            let (listed, all) = (self.peer_problems.len().min(peer_lines), self.peer_problems.len());
            let _ = writeln!(out, "\npeers with problems ({} of {}):", count(all), count(self.peers));
            for p in &self.peer_problems[..listed] {
                let detail = if p.detail.is_empty() { String::new() } else { format!(" ({})", p.detail) };
                let _ = writeln!(out, "{}  {} via {}: {}{detail}", paint(p.level), p.subnet, p.public_ip, p.problem);
                let _ = writeln!(out, "      fix: {}", p.fix);
            }
            if listed < all {
                let _ = writeln!(
                    out,
                    "... and {} more (--all-peers lists every one; --json has them all)",
                    count(all - listed)
                );
            }
        }
        let _ = writeln!(out, "\n{}", self.verdict);
        out
    }
}

/// 5000 -> "5,000".
pub fn count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
        let text = r.render(false, usize::MAX);
        assert!(text.contains("WARN  rp_filter") && text.contains("fix: sysctl -w"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][1]["level"], "WARN");
        assert_eq!(json["peer_problems"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn thousands_of_failing_peers_are_summed_up_not_listed() {
        let mut r = Report { peers: 5000, peers_ok: 0, ..Report::default() };
        for i in 0..5000 {
            r.peer_problems.push(PeerProblem {
                subnet: format!("10.{}.{}.0/24", i / 256, i % 256),
                public_ip: format!("198.18.{}.{}", i / 256, i % 256),
                level: Level::Fail,
                problem: "no answer through the VXLAN tunnel".into(),
                detail: String::new(),
                fix: "allow UDP 8472".into(),
            });
        }
        r.conclude();
        assert_eq!(
            r.verdict,
            "FAIL: 0 of 5,000 peers reachable; 5,000 fail: no answer through the VXLAN tunnel towards 198.18.0.0, \
             198.18.0.1, 198.18.0.2 and 4,997 more; 0 node check(s) failing, 0 warning(s)"
        );
        let text = r.render(false, 20);
        assert!(text.contains("peers with problems (5,000 of 5,000):"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("FAIL  10.")).count(), 20, "{text}");
        assert!(text.contains("... and 4,980 more (--all-peers lists every one"), "{text}");
        assert_eq!(r.render(false, usize::MAX).lines().filter(|l| l.starts_with("FAIL  10.")).count(), 5000);
        assert_eq!(
            (count(0), count(999), count(1000), count(1_234_567)),
            ("0".into(), "999".into(), "1,000".into(), "1,234,567".into())
        );
    }
}
