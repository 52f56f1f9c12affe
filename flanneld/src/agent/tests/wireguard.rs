//! The wireguard backend under the agent: the kernel path against the
//! in-memory kernel and an in-memory WireGuard device (generic netlink), the
//! choice of implementation, peers synced in place, the switch to and from vxlan.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::backend::wireguard::device::kernel::tests::FakeGenl;
use crate::backend::wireguard::device::{PeerConfig, Settings, userspace};
use crate::backend::wireguard::key::Key;
use crate::backend::wireguard::{WireGuard, WireguardData};

const WG_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25}}"#;

fn wg_peer(subnet: &str, ip: &str, key: u8) -> Lease {
    let mut l = peer(subnet, ip, 0);
    l.attrs.backend_type = "wireguard".into();
    l.attrs.backend_data = serde_json::json!({"PublicKey": Key([key; 32]).to_string(), "Port": 51820});
    l
}

fn no_tun(_: Settings) -> std::io::Result<userspace::Device> {
    Err(std::io::Error::other("no TUN in unit tests"))
}

fn backend(bed: &Bed, genl: &Rc<FakeGenl>, conf: &str) -> WireGuard<FakeGenl> {
    let cfg = NetConfig::parse(conf, |_| {}).unwrap();
    let c = crate::backend::wireguard::Config::parse(&cfg.backend, &mut |_| {}).unwrap();
    WireGuard::with_parts(c, genl.clone(), no_tun, bed.dir.join("wgkey"))
}

fn kernel_with_wireguard(bed: &Bed) {
    bed.kernel.tamper(|s| s.wireguard = true);
}

fn device_peers(genl: &FakeGenl) -> Vec<(u8, String, Vec<String>)> {
    genl.dev
        .borrow()
        .peers
        .iter()
        .map(|(k, c): (&Key, &PeerConfig)| {
            (
                k.0[0],
                c.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                c.allowed.iter().map(|n| n.to_string()).collect(),
            )
        })
        .collect()
}

#[test]
fn the_kernel_device_is_made_addressed_routed_and_advertised_as_upstream() {
    rt().block_on(async {
        let bed = Bed::new();
        kernel_with_wireguard(&bed);
        let genl = Rc::new(FakeGenl::default());
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.agent(&mgr, backend(&bed, &genl, WG_CONF), WG_CONF, &[]).await;

        let dev = bed.kernel.link("flannel-wg").expect("flannel-wg created");
        assert_eq!((dev.kind.as_deref(), dev.mtu, dev.up), (Some("wireguard"), 1420, true));
        assert!(bed.kernel.with(|s| s.addresses.iter().any(|x| x.index == dev.index && x.net == net("10.244.1.0/32"))));
        assert!(bed.subnet_env().contains("FLANNEL_MTU=1420"), "{}", bed.subnet_env());

        // The key file is made 0600, and the lease carries its public key and our port.
        let key_file = bed.dir.join("wgkey");
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
        let private = Key::parse(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
        assert_eq!(genl.dev.borrow().private, Some(private));
        assert_eq!(genl.dev.borrow().port, Some(51820));
        let claimed = mgr.store.borrow().claims[0].1.clone();
        assert_eq!(claimed.backend_type, "wireguard");
        let data: WireguardData = serde_json::from_value(claimed.backend_data.clone()).unwrap();
        assert_eq!(data, WireguardData { public_key: private.public().to_string(), port: Some(51820) });
        assert_eq!(claimed.backend_data.to_string(), format!(r#"{{"Port":51820,"PublicKey":"{}"}}"#, private.public()));

        // Peers: each one's subnet is its allowed IPs, its lease's address and port the endpoint;
        // one route carries the whole network onto the device. A vxlan peer is not programmed.
        let mut old = wg_peer("10.244.4.0/24", "192.0.2.4", 4);
        old.attrs.backend_data = serde_json::json!({"PublicKey": Key([4; 32]).to_string()});
        a.on_event(LeaseEvent::Snapshot(vec![
            wg_peer("10.244.2.0/24", "192.0.2.2", 2),
            wg_peer("10.244.3.0/24", "192.0.2.3", 3),
            old,
            peer("10.244.5.0/24", "192.0.2.5", 5),
        ]));
        a.reconcile().await;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), [format!("10.244.0.0/16 dev {}", dev.index)]);
        assert_eq!(
            device_peers(&genl),
            [
                (2, "192.0.2.2:51820".into(), vec!["10.244.2.0/24".into()]),
                (3, "192.0.2.3:51820".into(), vec!["10.244.3.0/24".into()]),
                // A v0.21 lease has no Port: ours is used, as upstream does.
                (4, "192.0.2.4:51820".into(), vec!["10.244.4.0/24".into()]),
            ]
        );
        assert_eq!(a.last_skipped.len(), 1, "{:?}", a.last_skipped);

        // A peer that goes is removed in place: one message naming only it.
        let sent = genl.sent.borrow().len();
        a.on_event(LeaseEvent::Removed(net("10.244.3.0/24")));
        a.sync().await;
        assert_eq!(genl.sent.borrow().len(), sent + 1);
        assert_eq!(device_peers(&genl).iter().map(|p| p.0).collect::<Vec<_>>(), [2, 4]);
        // A peer that moves is changed in place.
        a.on_event(LeaseEvent::Added(wg_peer("10.244.2.0/24", "192.0.2.22", 2)));
        a.sync().await;
        assert_eq!(device_peers(&genl)[0].1, "192.0.2.22:51820");

        // SIGTERM's stop removes the device, as upstream does.
        a.backend.stop(&bed.kernel).await;
        assert!(bed.kernel.link("flannel-wg").is_none());
        drop(a);

        // A restart keeps the key: the lease says the same public key.
        let genl2 = Rc::new(FakeGenl::default());
        let _a = bed.agent(&mgr, backend(&bed, &genl2, WG_CONF), WG_CONF, &[]).await;
        let again = mgr.store.borrow().claims.last().unwrap().1.backend_data.clone();
        assert_eq!(again, claimed.backend_data);
        assert_eq!(genl2.dev.borrow().private, Some(private));
    });
}

#[test]
fn without_kernel_wireguard_the_userspace_device_is_chosen() {
    rt().block_on(async {
        let bed = Bed::new();
        let genl = Rc::new(FakeGenl::default());
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let cfg = NetConfig::parse(WG_CONF, |_| {}).unwrap();
        let parts = Parts {
            mgr: mgr.clone(),
            kernel: bed.kernel.clone(),
            backend: backend(&bed, &genl, WG_CONF),
            firewall: bed.fw.clone(),
        };
        let e =
            Agent::start(bed.opts(&[]), parts, &cfg, bed.metrics.clone(), &bed.dir.join("proc")).await.err().unwrap();
        assert_eq!(e.to_string(), "flannel-wg: userspace WireGuard on UDP port 51820: no TUN in unit tests");
        assert!(genl.sent.borrow().is_empty(), "the kernel's WireGuard is not configured");
        assert!(mgr.store.borrow().claims.is_empty(), "no lease claimed for a backend that did not start");
        assert!(bed.kernel.link("flannel-wg").is_none());
    });
}

#[test]
fn dual_stack_separate_gets_two_devices_and_the_single_modes_one() {
    rt().block_on(async {
        for (mode, devices) in [("separate", vec!["flannel-wg", "flannel-wg-v6"]), ("ipv6", vec!["flannel-wg"])] {
            let bed = Bed::new();
            kernel_with_wireguard(&bed);
            bed.kernel.tamper(|s| {
                s.addresses.push(flannel_shared::netlink::Address { index: 2, net: net("2001:db8::1/64") });
            });
            let conf = format!(
                r#"{{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
            );
            let genl = Rc::new(FakeGenl::default());
            let mgr = FakeManager::granting(&["10.244.1.0/24"]);
            let a = bed.agent(&mgr, backend(&bed, &genl, &conf), &conf, &[]).await;
            let have: Vec<String> = bed.kernel.with(|s| {
                s.links.iter().filter(|l| l.kind.as_deref() == Some("wireguard")).map(|l| l.name.clone()).collect()
            });
            assert_eq!(have, devices, "{mode}");
            let claimed = mgr.store.borrow().claims[0].1.clone();
            let v6: WireguardData = serde_json::from_value(claimed.backend_v6_data.clone().unwrap()).unwrap();
            // The v6 data names the port the device carrying IPv6 listens on.
            assert_eq!(v6.port, Some(if mode == "separate" { 51821 } else { 51820 }), "{mode}");
            drop(a);
        }
    });
}

#[test]
fn a_switch_from_vxlan_to_wireguard_and_back_leaves_nothing_of_the_other() {
    rt().block_on(async {
        let bed = Bed::new();
        kernel_with_wireguard(&bed);
        let mgr = FakeManager::granting(&["10.244.1.0/24"]);
        let mut a = bed.vxlan(&mgr).await;
        a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)]));
        a.reconcile().await;
        drop(a);

        let genl = Rc::new(FakeGenl::default());
        let mut w = bed.agent(&mgr, backend(&bed, &genl, WG_CONF), WG_CONF, &[]).await;
        assert!(bed.kernel.link("flannel.1").is_none(), "the VTEP goes with a switch to wireguard");
        bed.kernel.with(|s| assert!(s.neighbours.is_empty() && s.fdb.is_empty()));
        w.on_event(LeaseEvent::Snapshot(vec![wg_peer("10.244.2.0/24", "192.0.2.2", 2)]));
        w.reconcile().await;
        let wg = bed.kernel.link("flannel-wg").unwrap().index;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), [format!("10.244.0.0/16 dev {wg}")]);
        drop(w); // killed, not stopped: the kernel device stays behind

        let mut a = bed.vxlan(&mgr).await;
        assert!(bed.kernel.link("flannel-wg").is_none(), "the WireGuard device goes with a switch to vxlan");
        a.on_event(LeaseEvent::Snapshot(vec![peer("10.244.2.0/24", "192.0.2.2", 2)]));
        a.reconcile().await;
        let vtep = bed.kernel.link("flannel.1").unwrap().index;
        assert_eq!(bed.kernel.routes_by(RTPROT_FLANNEL), [format!("10.244.2.0/24 via 10.244.2.0 dev {vtep} onlink")]);
    });
}
