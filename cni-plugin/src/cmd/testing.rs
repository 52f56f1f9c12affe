//! Test scaffolding shared by the commands' unit tests: a scratch directory
//! for subnet.env, the store and the state, and ADD against the fake kernel.

use std::fs::{self, File};
use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::add::{Plan, add_with};
use super::{Ctx, Pod, read_subnet_env, runtime};
use crate::conf::{Env, PluginConf};
use crate::error::Result;
use crate::kernel::fake::FakeKernel;
use crate::log::Log;

/// A scratch directory holding subnet.env, the store and the state.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("flannel-cmd-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    pub fn subnet_env(&self, text: &str) -> &Self {
        fs::write(self.0.join("subnet.env"), text).unwrap();
        self
    }

    /// Upstream's conflist entry pointed at this directory, with `delegate` merged in.
    pub fn conf(&self, version: &str, delegate: Value) -> PluginConf {
        let mut d = json!({"hairpinMode": true, "isDefaultGateway": true, "ipMasq": false});
        d.as_object_mut().unwrap().extend(delegate.as_object().unwrap().clone());
        let c = json!({
            "cniVersion": version, "name": "cbr0", "type": "flannel",
            "subnetFile": self.0.join("subnet.env"), "dataDir": self.0.join("state"),
            "ipam": {"dataDir": self.0.join("ipam")}, "delegate": d,
        });
        PluginConf::parse(c.to_string().as_bytes(), &env("c1", Some("/x")), |_| {}).unwrap()
    }

    pub fn reserved(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.0.join("ipam/cbr0"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.retain(|n| n.parse::<IpAddr>().is_ok());
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub const V4: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

pub fn env(id: &str, netns: Option<&str>) -> Env {
    Env { container_id: id.into(), netns: netns.map(PathBuf::from), ifname: "eth0".into(), args: vec![] }
}

pub fn block_on<T>(f: impl Future<Output = T>) -> T {
    runtime().unwrap().block_on(f)
}

/// ADD against the fake kernel, from the point where the pod namespace is open.
pub fn fake_add(ctx: &Ctx<'_>, host: &FakeKernel, pod: &FakeKernel) -> Result<Value> {
    let plan = Plan::new(ctx.conf, &read_subnet_env(ctx.conf)?)?;
    plan.check_requested(ctx.conf)?;
    // The fake ignores the namespace file; any open file does.
    let ns = File::open(&ctx.conf.subnet_file).unwrap();
    let path = ctx.require_netns()?;
    let out = block_on(add_with(ctx, &plan, host, &Pod { kernel: pod, ns: &ns, path }, &mut Log::default()))?;
    Ok(serde_json::from_str(&out).unwrap())
}
