//! The netlink layer against the real kernel (root): two nodes joined by a
//! veth underlay, a VXLAN device on each, and the per-peer ARP, FDB and
//! onlink route flanneld programs. Proof is a ping across the overlay.

use std::fs::File;
use std::net::IpAddr;
use std::process::Command;

use flannel_shared::IpNet;
use flannel_shared::Mac;
use flannel_shared::netlink::{Netlink, Route, VxlanSpec};

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("nlt{tag}{}", std::process::id());
        assert!(Command::new("ip").args(["netns", "add", &name]).status().unwrap().success());
        Ns(name)
    }
    fn file(&self) -> File {
        File::open(format!("/var/run/netns/{}", self.0)).unwrap()
    }
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip").arg("-n").arg(&self.0).args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn vxlan_overlay_between_two_nodes() {
    let n1 = Ns::new("a");
    let n2 = Ns::new("b");
    n1.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &n2.0]);
    for (n, ip) in [(&n1, "192.0.2.1/24"), (&n2, "192.0.2.2/24")] {
        n.ip(&["addr", "add", ip, "dev", "eth0"]);
        n.ip(&["link", "set", "eth0", "up"]);
        n.ip(&["link", "set", "lo", "up"]);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nl1 = Netlink::connect_in(&n1.file()).unwrap();
        let nl2 = Netlink::connect_in(&n2.file()).unwrap();
        let mut vteps = Vec::new();
        for (nl, local, subnet) in [(&nl1, "192.0.2.1", "10.244.1.0/32"), (&nl2, "192.0.2.2", "10.244.2.0/32")] {
            let uplink = nl.link_by_name("eth0").await.unwrap().unwrap();
            let spec = VxlanSpec {
                name: "flannel.1",
                vni: 1,
                port: 8472,
                local: Some(local.parse().unwrap()),
                uplink: Some(uplink.index),
                mtu: Some(uplink.mtu - 50),
                gbp: false,
                learning: false,
                mac: None,
            };
            nl.create_vxlan(&spec).await.unwrap();
            assert!(nl.create_vxlan(&spec).await.unwrap_err().is_exists());
            let dev = nl.link_by_name("flannel.1").await.unwrap().unwrap();
            let info = dev.vxlan.clone().expect("vxlan info");
            assert_eq!((info.vni, info.port, info.learning), (1, 8472, false));
            assert_eq!(info.local, Some(local.parse().unwrap()));
            assert_eq!(info.uplink, Some(uplink.index));
            assert_eq!(dev.mtu, 1450);
            nl.add_address(dev.index, subnet.parse().unwrap()).await.unwrap();
            nl.set_up(dev.index).await.unwrap();
            vteps.push(dev);
        }
        // Each node learns the other: ARP, FDB, onlink route.
        for (nl, me, peer, peer_ip, peer_net) in [
            (&nl1, &vteps[0], &vteps[1], "192.0.2.2", "10.244.2.0/24"),
            (&nl2, &vteps[1], &vteps[0], "192.0.2.1", "10.244.1.0/24"),
        ] {
            let net: IpNet = peer_net.parse().unwrap();
            let gw = net.network_addr();
            let mac = peer.mac.unwrap();
            nl.replace_neighbour(me.index, gw, mac).await.unwrap();
            nl.replace_fdb(me.index, mac, peer_ip.parse().unwrap()).await.unwrap();
            // Replacing again is idempotent.
            nl.replace_fdb(me.index, mac, peer_ip.parse().unwrap()).await.unwrap();
            nl.replace_route(&Route::new(net).via(gw).dev(me.index).onlink().protocol(11)).await.unwrap();
            let arp = nl.neighbours(me.index, false).await.unwrap();
            assert!(arp.iter().any(|n| n.ip == Some(gw) && n.mac == Some(mac) && n.permanent), "{arp:?}");
            let fdb = nl.neighbours(me.index, true).await.unwrap();
            assert!(fdb.iter().any(|n| n.mac == Some(mac) && n.ip == Some(peer_ip.parse().unwrap())), "{fdb:?}");
            let routes = nl.routes(true, Some(254)).await.unwrap();
            let r = routes.iter().find(|r| r.dst == net).expect("route");
            assert!(r.onlink && r.gateway == Some(gw) && r.protocol == 11 && r.oif == Some(me.index), "{r:?}");
        }
        // A ping from node 1's overlay address to node 2's crosses the VXLAN.
        let out = Command::new("ip")
            .args(["netns", "exec", &n1.0, "ping", "-c", "1", "-W", "2", "-I", "10.244.1.0", "10.244.2.0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ping over vxlan failed: {}", String::from_utf8_lossy(&out.stdout));

        // Removal: route, ARP, FDB.
        let net: IpNet = "10.244.2.0/24".parse().unwrap();
        let gw: IpAddr = net.network_addr();
        let mac = vteps[1].mac.unwrap();
        nl1.del_route(&Route::new(net).via(gw).dev(vteps[0].index).onlink().protocol(11)).await.unwrap();
        nl1.del_neighbour(vteps[0].index, gw).await.unwrap();
        nl1.del_fdb(vteps[0].index, mac, "192.0.2.2".parse().unwrap()).await.unwrap();
        assert!(nl1.routes(true, Some(254)).await.unwrap().iter().all(|r| r.dst != net));
        assert!(nl1.neighbours(vteps[0].index, false).await.unwrap().iter().all(|n| n.ip != Some(gw)));
        assert!(nl1.neighbours(vteps[0].index, true).await.unwrap().iter().all(|n| n.mac != Some(mac)));
        assert!(nl1.del_neighbour(vteps[0].index, gw).await.unwrap_err().is_not_found());

        // A VXLAN device created with a given MAC keeps it (VtepMAC survives a rebuild).
        let keep: Mac = "0e:00:00:00:00:42".parse().unwrap();
        nl1.del_link(vteps[0].index).await.unwrap();
        let uplink = nl1.link_by_name("eth0").await.unwrap().unwrap();
        nl1.create_vxlan(&VxlanSpec {
            name: "flannel.1",
            vni: 1,
            port: 8472,
            local: Some("192.0.2.1".parse().unwrap()),
            uplink: Some(uplink.index),
            mtu: None,
            gbp: false,
            learning: false,
            mac: Some(keep),
        })
        .await
        .unwrap();
        assert_eq!(nl1.link_by_name("flannel.1").await.unwrap().unwrap().mac, Some(keep));
    });
    let _ = n1.ip(&["link", "show"]);
}
