//! The nftables driver, through `nft -j` and the `nftables` crate's typed
//! schema (tables, chains, rules and expressions as Rust values, serialized
//! to nft's JSON API: no rule text is assembled or quoted by hand).
//!
//! The agent's rules live in flannel's own tables, upstream's names:
//! `table ip flannel-ipv4` / `table ip6 flannel-ipv6`, with the base chains
//! `postrtg` (type nat, hook postrouting, priority srcnat) and `forward`
//! (type filter, hook forward, priority filter). A change replaces the whole
//! table in one transaction (one `nft -f`): the table is never seen half
//! written. A resync reads the table back and rewrites it when it differs
//! from what the last write left (a hand-deleted rule or table, an added one).
//!
//! A pod's `ipMasq` rule is the bridge plugin's nftables layout:
//! `table inet cni_plugins_masquerade`, one rule per pod address in chain
//! `masq_checks` with a comment starting with a hash of network, interface
//! and container, reached from the `postrouting` base chain.

use std::collections::HashSet;
use std::net::IpAddr;

use nftables::batch::Batch;
use nftables::expr::{BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::helper::{self, NftablesError};
use nftables::schema::{self, Chain, FlushObject, NfCmd, NfListObject, Rule, Table};
use nftables::stmt::{JumpTarget, Match, NAT, NATFlag, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde_json::Value;
use sha2::{Digest, Sha512};

use super::{Firewall, FirewallError, Mode, PodMasq, RuleSet};
use crate::IpNet;

pub const IPV4_TABLE: &str = "flannel-ipv4";
pub const IPV6_TABLE: &str = "flannel-ipv6";
pub const POSTRTG_CHAIN: &str = "postrtg";
pub const FORWARD_CHAIN: &str = "forward";
/// nftables' standard priorities, by their names in `nft list`.
pub const PRIORITY_SRCNAT: i32 = 100;
pub const PRIORITY_FILTER: i32 = 0;
/// kube-proxy's masquerade mark.
pub const KUBE_MARK_MASQ: u32 = 0x4000;

pub const POD_TABLE: &str = "cni_plugins_masquerade";
pub const POD_CHAIN: &str = "masq_checks";
const POD_POSTROUTING: &str = "postrouting";
/// nft's limit on comment length.
const COMMENT_MAX: usize = 128;

const NFT: &str = "nft";

fn family(v6: bool) -> NfFamily {
    if v6 { NfFamily::IP6 } else { NfFamily::IP }
}

/// flannel's table for a family.
pub fn table_name(v6: bool) -> &'static str {
    if v6 { IPV6_TABLE } else { IPV4_TABLE }
}

fn proto(v6: bool) -> &'static str {
    if v6 { "ip6" } else { "ip" }
}

fn field(v6: bool, name: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: proto(v6).into(),
        field: name.into(),
    })))
}

fn prefix(n: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(n.network_addr().to_string().into())),
        len: u32::from(n.prefix()),
    }))
}

fn address(ip: IpAddr) -> Expression<'static> {
    Expression::String(ip.to_string().into())
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn saddr(v6: bool, op: Operator, n: Expression<'static>) -> Statement<'static> {
    is(field(v6, "saddr"), op, n)
}

fn daddr(v6: bool, op: Operator, n: Expression<'static>) -> Statement<'static> {
    is(field(v6, "daddr"), op, n)
}

fn masquerade(random_fully: bool) -> Statement<'static> {
    if random_fully {
        Statement::Masquerade(Some(NAT {
            addr: None,
            family: None,
            port: None,
            flags: Some(HashSet::from([NATFlag::FullyRandom])),
        }))
    } else {
        Statement::Masquerade(None)
    }
}

fn multicast(v6: bool) -> IpNet {
    if v6 { "ff00::/8" } else { "224.0.0.0/4" }.parse().expect("a valid prefix")
}

/// The base chain `name` of `table`.
fn base_chain(
    fam: NfFamily,
    table: &'static str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family: fam,
        table: table.into(),
        name: name.into(),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(fam: NfFamily, table: &'static str, chain: &'static str, expr: Vec<Statement<'static>>) -> Rule<'static> {
    Rule { family: fam, table: table.into(), chain: chain.into(), expr: expr.into(), ..Rule::default() }
}

/// The chain of flannel's table that holds `set`.
fn chain_of(set: &RuleSet) -> &'static str {
    match set {
        RuleSet::Masq { .. } => POSTRTG_CHAIN,
        RuleSet::Forward { .. } => FORWARD_CHAIN,
    }
}

/// The chain and rules of one set, in flannel's table for its family.
pub fn render(set: &RuleSet) -> (Chain<'static>, Vec<Rule<'static>>) {
    let v6 = !set.is_ipv4();
    let (fam, table) = (family(v6), table_name(v6));
    match *set {
        RuleSet::Masq { network, subnet, random_fully } => {
            let (n, s) = (network.network(), subnet.network());
            let chain = base_chain(fam, table, chain_of(set), NfChainType::NAT, NfHook::Postrouting, PRIORITY_SRCNAT);
            let mark = Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                Expression::Named(NamedExpression::Meta(Meta { key: MetaKey::Mark })),
                Expression::Number(KUBE_MARK_MASQ),
            )));
            let r = |expr| rule(fam, table, POSTRTG_CHAIN, expr);
            let rules = vec![
                // kube-proxy marks what it masquerades itself: not twice.
                r(vec![is(mark, Operator::EQ, Expression::Number(KUBE_MARK_MASQ)), Statement::Return(None)]),
                // Inside the cluster network, pods see each other's addresses.
                r(vec![
                    saddr(v6, Operator::EQ, prefix(s)),
                    daddr(v6, Operator::EQ, prefix(n)),
                    Statement::Return(None),
                ]),
                r(vec![
                    saddr(v6, Operator::EQ, prefix(n)),
                    daddr(v6, Operator::EQ, prefix(s)),
                    Statement::Return(None),
                ]),
                // From outside to this node's pods: keep the client's address.
                r(vec![
                    saddr(v6, Operator::NEQ, prefix(n)),
                    daddr(v6, Operator::EQ, prefix(s)),
                    Statement::Return(None),
                ]),
                // Pods to the world (multicast aside) leave as the node.
                r(vec![
                    saddr(v6, Operator::EQ, prefix(n)),
                    daddr(v6, Operator::NEQ, prefix(multicast(v6))),
                    masquerade(random_fully),
                ]),
                // The host to other nodes' pods.
                r(vec![
                    saddr(v6, Operator::NEQ, prefix(n)),
                    daddr(v6, Operator::EQ, prefix(n)),
                    masquerade(random_fully),
                ]),
            ];
            (chain, rules)
        }
        RuleSet::Forward { network } => {
            let n = network.network();
            let chain = base_chain(fam, table, chain_of(set), NfChainType::Filter, NfHook::Forward, PRIORITY_FILTER);
            let r = |expr| rule(fam, table, FORWARD_CHAIN, expr);
            let rules = vec![
                r(vec![saddr(v6, Operator::EQ, prefix(n)), Statement::Accept(None)]),
                r(vec![daddr(v6, Operator::EQ, prefix(n)), Statement::Accept(None)]),
            ];
            (chain, rules)
        }
    }
}

/// The transaction that makes a family's table exactly `sets`: created (so
/// the delete cannot fail), deleted, written anew. Empty `sets` leave no table.
pub fn replace_table(v6: bool, sets: &[RuleSet]) -> schema::Nftables<'static> {
    let t = Table { family: family(v6), name: table_name(v6).into(), handle: None };
    let mut b = Batch::new();
    b.add(NfListObject::Table(t.clone()));
    b.delete(NfListObject::Table(t.clone()));
    if !sets.is_empty() {
        b.add(NfListObject::Table(t));
        for set in sets {
            let (chain, rules) = render(set);
            b.add(NfListObject::Chain(chain));
            for r in rules {
                b.add(NfListObject::Rule(r));
            }
        }
    }
    b.to_nftables()
}

fn nft_err(args: &[&str], e: NftablesError) -> FirewallError {
    let cmd = format!("{NFT} -j {}", args.join(" "));
    match e {
        NftablesError::NftFailed { stderr, .. } => FirewallError::Command { cmd, msg: stderr.trim().to_string() },
        NftablesError::NftExecution { inner, .. } => FirewallError::Command { cmd, msg: inner.to_string() },
        other => FirewallError::Output { cmd, msg: other.to_string() },
    }
}

/// Runs one transaction.
pub fn apply(tx: &schema::Nftables<'_>) -> Result<(), FirewallError> {
    helper::apply_ruleset_with_args(tx, Some(NFT), &[] as &[&str]).map_err(|e| nft_err(&["-f", "-"], e))
}

/// `nft -j <args>`'s objects, handles included; `None` when the object
/// listed does not exist.
fn objects(args: &[&str]) -> Result<Option<Vec<Value>>, FirewallError> {
    let out = match helper::get_current_ruleset_raw(Some(NFT), args) {
        Ok(out) => out,
        Err(NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file or directory") => {
            return Ok(None);
        }
        Err(e) => return Err(nft_err(args, e)),
    };
    let v: Value = serde_json::from_str(&out)
        .map_err(|e| FirewallError::Output { cmd: format!("{NFT} -j {}", args.join(" ")), msg: e.to_string() })?;
    let all = v.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(Some(all.into_iter().filter(|o| o.get("metainfo").is_none()).collect()))
}

/// [`objects`] without their handles, so two listings of the same rules compare equal.
fn list(args: &[&str]) -> Result<Option<Vec<Value>>, FirewallError> {
    let mut objects = objects(args)?;
    for o in objects.iter_mut().flatten() {
        if let Some(inner) = o.as_object_mut().and_then(|m| m.values_mut().next()).and_then(Value::as_object_mut) {
            inner.remove("handle");
        }
    }
    Ok(objects)
}

/// What the driver last wrote for a family: the sets, and the table as read
/// back right after (nft's own rendering, so a later listing compares equal).
struct Written {
    sets: Vec<RuleSet>,
    listing: Option<Vec<Value>>,
}

/// The agent's driver. Remembers each family's last write, to tell on a
/// resync whether the sets or the kernel changed since.
#[derive(Default)]
pub struct Nftables {
    written: [Option<Written>; 2],
}

impl Nftables {
    pub fn new() -> Nftables {
        Nftables::default()
    }
}

impl Firewall for Nftables {
    fn mode(&self) -> Mode {
        Mode::Nftables
    }

    fn sync(&mut self, v6: bool, sets: &[RuleSet]) -> Result<Vec<String>, FirewallError> {
        let name = table_name(v6);
        let now = list(&["list", "table", proto(v6), name])?;
        let slot = &mut self.written[usize::from(v6)];
        if sets.is_empty() {
            *slot = None;
            if now.is_none() {
                return Ok(Vec::new());
            }
            apply(&replace_table(v6, sets))?;
            return Ok(vec![format!("removed table {} {name}", proto(v6))]);
        }
        if let Some(w) = slot.as_ref()
            && w.sets == sets
            && now.is_some()
            && now == w.listing
        {
            return Ok(Vec::new());
        }
        apply(&replace_table(v6, sets))?;
        let listing = list(&["list", "table", proto(v6), name])?;
        *slot = Some(Written { sets: sets.to_vec(), listing });
        let chains: Vec<&str> = sets.iter().map(chain_of).collect();
        Ok(vec![format!("wrote table {} {name} (chains {})", proto(v6), chains.join(", "))])
    }
}

/// Base chains of other tables hooked on forward with a drop policy (Docker's
/// iptables FORWARD policy, as iptables-nft writes it, is one): in nftables a
/// packet must pass every base chain of a hook, so flannel's `forward` accept
/// does not override them. As `family table/chain`.
pub fn forward_drop_chains() -> Result<Vec<String>, FirewallError> {
    let objects = list(&["list", "chains"])?.unwrap_or_default();
    Ok(objects
        .iter()
        .filter_map(|o| o.get("chain"))
        .filter(|c| c["hook"] == "forward" && c["policy"] == "drop")
        .filter(|c| c["table"] != IPV4_TABLE && c["table"] != IPV6_TABLE)
        .map(|c| {
            format!(
                "{} {}/{}",
                c["family"].as_str().unwrap_or("?"),
                c["table"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?")
            )
        })
        .collect())
}

/// Removes what the iptables driver left in the kernel through iptables-nft
/// (the `FLANNEL-POSTRTG`/`FLANNEL-FWD` chains and the jumps to them), with
/// nft itself: a switch to nftables mode works on nodes without the iptables
/// binaries. Returns one line per chain removed.
pub fn purge_iptables_nft(chains: &[&str]) -> Result<Vec<String>, FirewallError> {
    let all = objects(&["list", "ruleset"])?.unwrap_or_default();
    let fam = |s: &str| match s {
        "ip" => Some(NfFamily::IP),
        "ip6" => Some(NfFamily::IP6),
        _ => None,
    };
    let mut b = Batch::new();
    let mut removed = Vec::new();
    for r in all.iter().filter_map(|o| o.get("rule")) {
        let jumps = r["expr"].as_array().into_iter().flatten().any(|s| {
            s.get("jump")
                .or_else(|| s.get("goto"))
                .and_then(|j| j["target"].as_str())
                .is_some_and(|t| chains.contains(&t))
        });
        let (Some(f), Some(table), Some(chain), Some(handle)) = (
            fam(r["family"].as_str().unwrap_or_default()),
            r["table"].as_str(),
            r["chain"].as_str(),
            r["handle"].as_u64(),
        ) else {
            continue;
        };
        if jumps && !chains.contains(&chain) {
            b.delete(NfListObject::Rule(Rule {
                family: f,
                table: table.to_string().into(),
                chain: chain.to_string().into(),
                handle: u32::try_from(handle).ok(),
                ..Rule::default()
            }));
        }
    }
    for c in all.iter().filter_map(|o| o.get("chain")) {
        let (Some(f), Some(table), Some(name)) =
            (fam(c["family"].as_str().unwrap_or_default()), c["table"].as_str(), c["name"].as_str())
        else {
            continue;
        };
        if chains.contains(&name) {
            let chain =
                Chain { family: f, table: table.to_string().into(), name: name.to_string().into(), ..Chain::default() };
            b.add_cmd(NfCmd::Flush(FlushObject::Chain(chain.clone())));
            b.delete(NfListObject::Chain(chain));
            removed.push(format!("removed iptables chain {name} from {} {table}", c["family"].as_str().unwrap_or("?")));
        }
    }
    if !removed.is_empty() {
        apply(&b.to_nftables())?;
    }
    Ok(removed)
}

/// Deletes flannel's tables of both families, if present (a switch to iptables mode).
pub fn purge_tables() -> Result<Vec<String>, FirewallError> {
    let mut removed = Vec::new();
    for v6 in [false, true] {
        if list(&["list", "table", proto(v6), table_name(v6)])?.is_some() {
            apply(&replace_table(v6, &[]))?;
            removed.push(format!("removed table {} {}", proto(v6), table_name(v6)));
        }
    }
    Ok(removed)
}

fn hash16(s: &str) -> String {
    let d = Sha512::digest(s.as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The bridge plugin's comment for one attachment: a hash of the network,
/// `-`, a hash of `ifname:containerID`, then a readable description.
pub fn pod_comment(network: &str, ifname: &str, container_id: &str) -> String {
    let clean = |s: &str| s.replace('"', "");
    let mut c = format!(
        "{}-{}, net: {}, if: {}, id: {}",
        hash16(network),
        hash16(&format!("{ifname}:{container_id}")),
        clean(network),
        clean(ifname),
        clean(container_id)
    );
    c.truncate(COMMENT_MAX);
    c
}

/// The part of [`pod_comment`] that identifies the attachment: the two hashes
/// (the readable rest may have been truncated, or written by another version).
fn instance_prefix(comment: &str) -> &str {
    &comment[..2 * 16 + 1]
}

fn pod_table() -> Table<'static> {
    Table { family: NfFamily::INet, name: POD_TABLE.into(), handle: None }
}

/// Handles of the rules in `masq_checks` whose comment starts with `prefix`.
fn pod_rules(prefix: &str) -> Result<Vec<u32>, FirewallError> {
    let rules = objects(&["list", "chain", "inet", POD_TABLE, POD_CHAIN])?.unwrap_or_default();
    Ok(rules
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| r["comment"].as_str().is_some_and(|c| c.starts_with(prefix)))
        .filter_map(|r| r["handle"].as_u64().and_then(|h| u32::try_from(h).ok()))
        .collect())
}

fn delete_pod_rules(b: &mut Batch<'static>, handles: &[u32]) {
    for h in handles {
        b.delete(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: POD_TABLE.into(),
            chain: POD_CHAIN.into(),
            handle: Some(*h),
            ..Rule::default()
        }));
    }
}

/// Installs one attachment's masquerade (every address in `addrs` of `p`'s
/// attachment), replacing rules an earlier ADD of it left.
pub fn pod_setup(p: &PodMasq<'_>, addrs: &[IpNet]) -> Result<(), FirewallError> {
    let comment = pod_comment(p.network, p.ifname, p.container_id);
    let stale = pod_rules(instance_prefix(&comment))?;
    let fam = NfFamily::INet;
    let mut b = Batch::new();
    b.add(NfListObject::Table(pod_table()));
    b.add(NfListObject::Chain(Chain {
        family: fam,
        table: POD_TABLE.into(),
        name: POD_CHAIN.into(),
        ..Chain::default()
    }));
    let post = base_chain(fam, POD_TABLE, POD_POSTROUTING, NfChainType::NAT, NfHook::Postrouting, PRIORITY_SRCNAT);
    b.add(NfListObject::Chain(post.clone()));
    b.add_cmd(NfCmd::Flush(FlushObject::Chain(post)));
    let r = |chain, expr| rule(fam, POD_TABLE, chain, expr);
    for v6 in [false, true] {
        b.add(NfListObject::Rule(r(
            POD_POSTROUTING,
            vec![daddr(v6, Operator::EQ, prefix(multicast(v6))), Statement::Return(None)],
        )));
    }
    b.add(NfListObject::Rule(r(POD_POSTROUTING, vec![Statement::Goto(JumpTarget { target: POD_CHAIN.into() })])));
    delete_pod_rules(&mut b, &stale);
    for a in addrs {
        let v6 = !a.is_ipv4();
        let mut rule = r(
            POD_CHAIN,
            vec![
                saddr(v6, Operator::EQ, address(a.addr())),
                daddr(v6, Operator::NEQ, prefix(a.network())),
                Statement::Masquerade(None),
            ],
        );
        rule.comment = Some(comment.clone().into());
        b.add(NfListObject::Rule(rule));
    }
    apply(&b.to_nftables())
}

/// What of [`pod_setup`]'s rules is missing for the attachment's `addrs`.
pub fn pod_missing(p: &PodMasq<'_>, addrs: &[IpNet]) -> Vec<String> {
    let comment = pod_comment(p.network, p.ifname, p.container_id);
    match pod_rules(&comment) {
        Ok(h) if h.len() >= addrs.len() => Vec::new(),
        Ok(h) => vec![format!(
            "ipMasq: {} of {} rule(s) in inet {POD_TABLE}/{POD_CHAIN} for {}",
            h.len(),
            addrs.len(),
            p.container_id
        )],
        Err(e) => vec![format!("ipMasq: cannot read inet {POD_TABLE}: {e}")],
    }
}

/// Removes the attachment's rules; none being there is fine (DEL is idempotent).
pub fn pod_teardown(network: &str, ifname: &str, container_id: &str) -> Result<(), FirewallError> {
    let comment = pod_comment(network, ifname, container_id);
    let handles = pod_rules(instance_prefix(&comment))?;
    if handles.is_empty() {
        return Ok(());
    }
    let mut b = Batch::new();
    delete_pod_rules(&mut b, &handles);
    apply(&b.to_nftables())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(tx: &schema::Nftables<'_>) -> String {
        serde_json::to_string(tx).unwrap()
    }

    #[test]
    fn masq_set_renders_upstreams_rules_for_both_families() {
        let v4 = RuleSet::Masq {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            random_fully: true,
        };
        let (chain, rules) = render(&v4);
        assert_eq!((chain.family, &*chain.table, &*chain.name), (NfFamily::IP, "flannel-ipv4", "postrtg"));
        assert_eq!(
            (chain._type, chain.hook, chain.prio),
            (Some(NfChainType::NAT), Some(NfHook::Postrouting), Some(100))
        );
        let text: Vec<String> = rules.iter().map(|r| serde_json::to_string(&r.expr).unwrap()).collect();
        assert_eq!(text.len(), 6);
        assert_eq!(
            text[0],
            r#"[{"match":{"left":{"&":[{"meta":{"key":"mark"}},16384]},"right":16384,"op":"=="}},{"return":null}]"#
        );
        assert_eq!(
            text[1],
            r#"[{"match":{"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.244.1.0","len":24}},"op":"=="}},{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"10.244.0.0","len":16}},"op":"=="}},{"return":null}]"#
        );
        assert!(text[4].contains(r#""right":{"prefix":{"addr":"224.0.0.0","len":4}},"op":"!="}}"#), "{}", text[4]);
        assert!(text[4].ends_with(r#"{"masquerade":{"flags":["fully-random"]}}]"#), "{}", text[4]);
        assert!(text[5].starts_with(r#"[{"match":{"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":{"prefix":{"addr":"10.244.0.0","len":16}},"op":"!="}}"#));

        let v6 = RuleSet::Masq {
            network: "fd00:10::/56".parse().unwrap(),
            subnet: "fd00:10:0:1::/64".parse().unwrap(),
            random_fully: false,
        };
        let (chain, rules) = render(&v6);
        assert_eq!((chain.family, &*chain.table), (NfFamily::IP6, "flannel-ipv6"));
        let last = serde_json::to_string(&rules[4].expr).unwrap();
        assert!(
            last.contains(r#"{"protocol":"ip6","field":"daddr"}},"right":{"prefix":{"addr":"ff00::","len":8}}"#),
            "{last}"
        );
        assert!(last.ends_with(r#"{"masquerade":null}]"#), "{last}");
    }

    #[test]
    fn a_family_table_is_replaced_whole_in_one_transaction() {
        let net: IpNet = "10.244.0.0/16".parse().unwrap();
        let sets = [
            RuleSet::Masq { network: net, subnet: "10.244.1.0/24".parse().unwrap(), random_fully: true },
            RuleSet::Forward { network: net },
        ];
        let tx = json(&replace_table(false, &sets));
        let first = [
            r#"{"add":{"table":{"family":"ip","name":"flannel-ipv4"}}}"#,
            r#"{"delete":{"table":{"family":"ip","name":"flannel-ipv4"}}}"#,
            r#"{"add":{"table":{"family":"ip","name":"flannel-ipv4"}}}"#,
        ]
        .join(",");
        assert!(tx.starts_with(&format!(r#"{{"nftables":[{first},{{"add":{{"chain":"#)), "{tx}");
        assert!(tx.contains(r#""name":"forward","type":"filter","hook":"forward","prio":0,"policy":"accept""#), "{tx}");
        assert!(tx.contains(r#"{"match":{"left":{"payload":{"protocol":"ip","field":"daddr"}},"right":{"prefix":{"addr":"10.244.0.0","len":16}},"op":"=="}},{"accept":null}"#), "{tx}");
        let none = json(&replace_table(true, &[]));
        assert_eq!(
            none,
            r#"{"nftables":[{"add":{"table":{"family":"ip6","name":"flannel-ipv6"}}},{"delete":{"table":{"family":"ip6","name":"flannel-ipv6"}}}]}"#
        );
    }

    #[test]
    fn pod_comments_are_the_bridge_plugins() {
        let c = pod_comment("cbr0", "eth0", "abc");
        assert_eq!(c.len(), 33 + ", net: cbr0, if: eth0, id: abc".len());
        assert_eq!(&c[16..17], "-");
        assert!(c.ends_with(", net: cbr0, if: eth0, id: abc"), "{c}");
        assert_eq!(&c[..16], &pod_comment("cbr0", "eth1", "x")[..16], "the network's hash leads");
        assert!(pod_comment("n", "eth0", &"x".repeat(200)).len() <= COMMENT_MAX);
    }
}
