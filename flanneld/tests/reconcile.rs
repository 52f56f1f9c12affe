//! The reconciler against a real kernel (root, in a private namespace).

use e2e::Netns;
use flannel_shared::Mac;
use flannel_shared::netlink::{Netlink, VxlanSpec};
use flanneld::backend::{hostgw, vxlan};
use flanneld::reconcile::{Desired, Peer, RTPROT_FLANNEL, apply, apply_family};
use serde_json::Value;

fn peers(n: usize) -> Vec<Peer<Mac>> {
    (2..2 + n)
        .map(|i| Peer {
            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
            public_ip: format!("192.0.2.{i}").parse().unwrap(),
            data: Some(Mac([0x0e, 0, 0, 0, 0, i as u8])),
        })
        .collect()
}

fn owned_routes(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip_json(&["route", "show", "proto", &RTPROT_FLANNEL.to_string()])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} via {} dev {}",
                r["dst"].as_str().unwrap(),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap()
            )
        })
        .collect();
    v.sort();
    v
}

fn neigh(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .ip_json(&["neigh", "show", "dev", "flannel.1", "nud", "permanent"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{} {}", n["dst"].as_str().unwrap(), n["lladdr"].as_str().unwrap()))
        .collect();
    v.sort();
    v
}

fn fdb(ns: &Netns) -> Vec<String> {
    let out = ns.run("bridge", &["-j", "fdb", "show", "dev", "flannel.1"]);
    let j: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    let mut v: Vec<String> = j
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some(format!("{} {}", e["mac"].as_str()?, e["dst"].as_str()?)))
        .collect();
    v.sort();
    v
}

/// A VXLAN device `name` (VNI 1, port 8472) on `uplink` from `local`, up; its index.
async fn vtep(nl: &Netlink, name: &str, local: &str, uplink: u32) -> u32 {
    nl.create_vxlan(&VxlanSpec {
        name,
        vni: 1,
        port: 8472,
        local: Some(local.parse().unwrap()),
        uplink: Some(uplink),
        mtu: None,
        gbp: false,
        learning: false,
        mac: None,
    })
    .await
    .unwrap();
    let index = nl.link_by_name(name).await.unwrap().unwrap().index;
    nl.set_up(index).await.unwrap();
    index
}

#[test]
fn vxlan_state_is_reconciled_not_appended() {
    let node = Netns::new("rc");
    let wire = Netns::new("rw");
    node.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "p1", "netns", wire.name()]);
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"]);
    node.ip(&["link", "set", "eth0", "up"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl = Netlink::connect_in(&node.open()).unwrap();
        let uplink = nl.link_by_name("eth0").await.unwrap().unwrap().index;
        let vtep = vtep(&nl, "flannel.1", "192.0.2.1", uplink).await;
        // A route that belongs to someone else.
        node.ip(&["route", "add", "10.99.0.0/16", "via", "192.0.2.254"]);

        let all = peers(3);
        let want = vxlan::desired(vtep, uplink, None, &all);
        let done = apply(&nl, &want, Some(vtep)).await.unwrap();
        assert_eq!((done.routes_added, done.neighbours_set, done.fdb_set), (3, 3, 3));
        assert_eq!(
            owned_routes(&node),
            [
                "10.244.2.0/24 via 10.244.2.0 dev flannel.1",
                "10.244.3.0/24 via 10.244.3.0 dev flannel.1",
                "10.244.4.0/24 via 10.244.4.0 dev flannel.1"
            ]
        );
        assert_eq!(
            neigh(&node),
            ["10.244.2.0 0e:00:00:00:00:02", "10.244.3.0 0e:00:00:00:00:03", "10.244.4.0 0e:00:00:00:00:04"]
        );
        assert_eq!(
            fdb(&node),
            ["0e:00:00:00:00:02 192.0.2.2", "0e:00:00:00:00:03 192.0.2.3", "0e:00:00:00:00:04 192.0.2.4"]
        );

        // A second pass changes nothing.
        assert!(apply(&nl, &want, Some(vtep)).await.unwrap().is_noop());

        // Entries deleted by hand come back, and only those.
        node.ip(&["route", "del", "10.244.3.0/24"]);
        node.ip(&["neigh", "del", "10.244.4.0", "dev", "flannel.1"]);
        let done = apply(&nl, &want, Some(vtep)).await.unwrap();
        assert_eq!((done.routes_added, done.neighbours_set, done.fdb_set, done.routes_removed), (1, 1, 0, 0));
        assert_eq!(owned_routes(&node).len(), 3);

        // A peer whose lease is gone disappears everywhere; a changed VtepMAC is followed.
        let mut fewer = all[..2].to_vec();
        fewer[1].data = Some(Mac([0x0e, 0, 0, 0, 0, 0x33]));
        let want = vxlan::desired(vtep, uplink, None, &fewer);
        let done = apply(&nl, &want, Some(vtep)).await.unwrap();
        assert_eq!(done.routes_removed, 1);
        assert_eq!(owned_routes(&node).len(), 2);
        assert_eq!(neigh(&node), ["10.244.2.0 0e:00:00:00:00:02", "10.244.3.0 0e:00:00:00:00:33"]);
        assert_eq!(fdb(&node), ["0e:00:00:00:00:02 192.0.2.2", "0e:00:00:00:00:33 192.0.2.3"]);

        // Switching to host-gw: routes via the peers' public IPs replace the overlay ones.
        let hg = hostgw::desired(uplink, &fewer);
        apply(&nl, &hg, None).await.unwrap();
        assert_eq!(
            owned_routes(&node),
            ["10.244.2.0/24 via 192.0.2.2 dev eth0", "10.244.3.0/24 via 192.0.2.3 dev eth0"]
        );

        // Nothing wanted: everything owned goes, the foreign route stays.
        apply(&nl, &Desired::default(), Some(vtep)).await.unwrap();
        assert!(owned_routes(&node).is_empty());
        assert!(neigh(&node).is_empty() && fdb(&node).is_empty(), "{:?} {:?}", neigh(&node), fdb(&node));
        let foreign = node.ip_json(&["route", "show", "10.99.0.0/16"]);
        assert_eq!(foreign.as_array().unwrap().len(), 1, "foreign route was touched");
    });
}

#[test]
fn ipv6_passes_settle() {
    // IPv6 routes come back from the kernel with metric 1024 when added without
    // one: a second pass must still see them as in place, for host-gw and vxlan.
    let node = Netns::new("r6");
    let wire = Netns::new("w6");
    node.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "p1", "netns", wire.name()]);
    node.ip(&["addr", "add", "2001:db8::1/64", "dev", "eth0", "nodad"]);
    node.ip(&["link", "set", "eth0", "up"]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl = Netlink::connect_in(&node.open()).unwrap();
        let uplink = nl.link_by_name("eth0").await.unwrap().unwrap().index;
        let peers: Vec<Peer<Mac>> = (2..4)
            .map(|i| Peer {
                subnet: format!("fd00:10:244:{i}::/64").parse().unwrap(),
                public_ip: format!("2001:db8::{i}").parse().unwrap(),
                data: Some(Mac([0x0e, 0, 0, 0, 0, i as u8])),
            })
            .collect();
        let want = hostgw::desired(uplink, &peers);
        let done = apply_family(&nl, &want, None, false, true).await.unwrap();
        assert_eq!(done.routes_added, 2);
        let again = apply_family(&nl, &want, None, false, true).await.unwrap();
        assert!(again.is_noop(), "{again:?}: {}", node.ip(&["-6", "route"]));

        let vtep = vtep(&nl, "flannel-v6.1", "2001:db8::1", uplink).await;
        let want = vxlan::desired(vtep, uplink, None, &peers);
        let done = apply_family(&nl, &want, Some(vtep), false, true).await.unwrap();
        assert_eq!((done.routes_added, done.neighbours_set, done.fdb_set), (2, 2, 2));
        let again = apply_family(&nl, &want, Some(vtep), false, true).await.unwrap();
        assert!(again.is_noop(), "{again:?}: {}", node.ip(&["-6", "route"]));
    });
}
