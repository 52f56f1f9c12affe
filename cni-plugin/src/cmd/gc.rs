//! GC: frees the addresses, masquerades and saved state of every attachment
//! not in `cni.dev/valid-attachments`, and refuses to run without that list.

use std::fs;

use super::{flannel_ipmasq, masquerade, pod_masq, state_path, with_existing_store};
use crate::conf::PluginConf;
use crate::error::{CniError, Result, code};
use crate::log::Log;
use crate::state;

pub fn gc(conf: &PluginConf, log: &mut Log) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(code::INVALID_CONFIG, "GC needs cni.dev/valid-attachments (refusing to free every address)")
    })?;
    let is_valid =
        |id: &str, ifname: &str| valid.iter().any(|(v_id, v_if)| v_id == id && (ifname.is_empty() || v_if == ifname));
    let mut freed = Vec::new();
    let senv_ipmasq = std::cell::OnceCell::new();
    with_existing_store(&conf.ipam_dir(), |t| {
        for a in t.allocations()? {
            if is_valid(&a.container_id, &a.ifname) {
                continue;
            }
            t.release_ip(a.ip)?;
            let saved = state::load(&state_path(conf, &a.container_id));
            let ipmasq = || *senv_ipmasq.get_or_init(|| flannel_ipmasq(conf));
            if let Some(mode) = masquerade(conf, saved.as_ref(), ipmasq)
                && let Err(e) = pod_masq(&conf.name, &a.container_id, &a.ifname).teardown(mode, &[a.ip])
            {
                log.warn(&e.to_string());
            }
            freed.push(format!("{} ({})", a.ip, a.container_id));
        }
        Ok(())
    })?;
    // Saved state of attachments that no longer exist, for this network only.
    if let Ok(entries) = fs::read_dir(&conf.data_dir) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if valid.iter().any(|(v, _)| *v == id) {
                continue;
            }
            if let Some(s) = state::load(&e.path())
                && s.name.as_deref() == Some(conf.name.as_str())
            {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if !freed.is_empty() {
        log.warn(&format!("GC freed {}", freed.join(", ")));
    }
    Ok(())
}
