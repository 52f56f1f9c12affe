//! STATUS: ready once subnet.env is there and usable (50 otherwise); the
//! first STATUS of a new boot frees the reservations of the earlier one.

use flannel_shared::subnet_env::{SubnetEnv, SubnetEnvError};

use super::with_existing_store;
use crate::conf::PluginConf;
use crate::error::{CniError, Result, code};
use crate::log::Log;

pub fn status(conf: &PluginConf, log: &mut Log) -> Result<()> {
    with_existing_store(&conf.ipam_dir(), |t| t.sweep_earlier_boot(conf, log))?;
    SubnetEnv::read(&conf.subnet_file).map(|_| ()).map_err(|e: SubnetEnvError| {
        let msg = if e.is_missing() {
            format!(
                "{} does not exist: flanneld is not running or has not leased a subnet yet",
                conf.subnet_file.display()
            )
        } else {
            format!("{} is unusable", conf.subnet_file.display())
        };
        CniError::new(code::NOT_AVAILABLE, msg).with_details(e.to_string())
    })
}
