//! The nat chains kube-proxy writes in iptables mode (seeds 000-002), so
//! Service traffic in the test-bed is DNATed exactly as in a cluster:
//! `KUBE-SERVICES` (from nat PREROUTING and OUTPUT) -> `KUBE-SVC-<hash>` with
//! `-m statistic --mode random --probability 1/n, 1/(n-1), ...` ->
//! `KUBE-SEP-<hash>` (hairpin `KUBE-MARK-MASQ`, then DNAT), plus
//! `KUBE-NODEPORTS`, `KUBE-MARK-MASQ` (mark 0x4000) and `KUBE-POSTROUTING`.
//! Chain names are derived the way kube-proxy derives them.

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::Netns;

/// One port of one Service.
#[derive(Clone, Debug)]
pub struct Service {
    /// kube-proxy's "service port name": `namespace/name:port-name`.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// kube-proxy's `portProtoHash`: base32(sha256(s))[:16].
fn hash16(s: &str) -> String {
    base32(&Sha256::digest(s.as_bytes()))[..16].to_string()
}

impl Service {
    /// The demo's and tests' Service: `default/web:http`, ClusterIP 10.96.0.10:80,
    /// NodePort 30080, in front of `endpoints`.
    pub fn web(endpoints: Vec<(Ipv4Addr, u16)>) -> Service {
        Service {
            name: "default/web:http".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            node_port: Some(30080),
            endpoints,
        }
    }

    pub fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", hash16(&format!("{}tcp", self.name)))
    }

    pub fn sep_chain(&self, ep: (Ipv4Addr, u16)) -> String {
        format!("KUBE-SEP-{}", hash16(&format!("{}tcp{}:{}", self.name, ep.0, ep.1)))
    }
}

/// The `iptables-restore` input for the nat table.
pub fn nat_rules(services: &[Service], cluster_cidr: &str) -> String {
    let mut chains =
        vec!["KUBE-SERVICES".to_string(), "KUBE-NODEPORTS".into(), "KUBE-POSTROUTING".into(), "KUBE-MARK-MASQ".into()];
    let mut rules = vec![
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#.into(),
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".into(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".into(),
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".into(),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into(),
    ];
    for s in services {
        let (name, svc) = (&s.name, s.svc_chain());
        let (ip, port) = (s.cluster_ip, s.port);
        chains.push(svc.clone());
        rules.push(format!(
            r#"-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" -m tcp --dport {port} -j {svc}"#
        ));
        rules.push(format!(
            r#"-A {svc} ! -s {cluster_cidr} -d {ip}/32 -p tcp -m comment --comment "{name} cluster IP" -m tcp --dport {port} -j KUBE-MARK-MASQ"#
        ));
        if let Some(np) = s.node_port {
            rules.push(format!(
                r#"-A KUBE-NODEPORTS -p tcp -m comment --comment "{name}" -m tcp --dport {np} -j KUBE-MARK-MASQ"#
            ));
            rules.push(format!(
                r#"-A KUBE-NODEPORTS -p tcp -m comment --comment "{name}" -m tcp --dport {np} -j {svc}"#
            ));
        }
        let n = s.endpoints.len();
        for (i, &ep) in s.endpoints.iter().enumerate() {
            let sep = s.sep_chain(ep);
            chains.push(sep.clone());
            let (eip, eport) = ep;
            let stat = if i + 1 < n {
                format!(" -m statistic --mode random --probability {:.10}", 1.0 / (n - i) as f64)
            } else {
                String::new()
            };
            rules.push(format!(r#"-A {svc} -m comment --comment "{name} -> {eip}:{eport}"{stat} -j {sep}"#));
            rules.push(format!(r#"-A {sep} -s {eip}/32 -m comment --comment "{name}" -j KUBE-MARK-MASQ"#));
            rules.push(format!(
                r#"-A {sep} -p tcp -m comment --comment "{name}" -m tcp -j DNAT --to-destination {eip}:{eport}"#
            ));
        }
    }
    rules.push(
        r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#.into(),
    );
    let mut out = String::from("*nat\n");
    for c in chains {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for r in rules {
        out.push_str(&r);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// Loads the rules into `node`'s nat table (our chains are replaced whole, the rest kept).
pub fn install(node: &Netns, services: &[Service], cluster_cidr: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = node
        .command("iptables-restore")
        .args(["--noflush", "-w", "5"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    child.stdin.take().expect("stdin").write_all(nat_rules(services, cluster_cidr).as_bytes()).expect("write rules");
    let out = child.wait_with_output().expect("iptables-restore");
    assert!(out.status.success(), "iptables-restore: {}", String::from_utf8_lossy(&out.stderr));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_and_probabilities_are_kube_proxys() {
        // RFC 4648 test vectors (kube-proxy uses Go's StdEncoding).
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"fo"), "MZXQ");
        let s = Service {
            name: "default/web:http".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            node_port: Some(30080),
            endpoints: vec![(Ipv4Addr::new(10, 244, 1, 2), 8080), (Ipv4Addr::new(10, 244, 2, 2), 8080)],
        };
        assert!(s.svc_chain().starts_with("KUBE-SVC-") && s.svc_chain().len() == 25);
        assert_ne!(s.sep_chain(s.endpoints[0]), s.sep_chain(s.endpoints[1]));
        let text = nat_rules(std::slice::from_ref(&s), "10.244.0.0/16");
        assert!(text.contains("-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-"), "{text}");
        assert_eq!(text.matches("--probability").count(), 1, "the last endpoint has no probability");
        assert!(text.contains("-j DNAT --to-destination 10.244.2.2:8080"));
        assert!(text.trim_end().ends_with("COMMIT"));
    }
}
