//! Pod address allocation with a store that host-local can read and write too.
//!
//! Layout (host-local's): `<dataDir>/<network>/<ip>` holds `"<containerID>\r\n<ifname>"`,
//! `last_reserved_ip.<rangeID>` holds the last address handed out, and every
//! change happens under an exclusive `flock` on `<dataDir>/<network>/lock`.
//! A node that switches from upstream flannel to this plugin keeps its live
//! allocations, and the round-robin continues where host-local stopped.
//!
//! Crash safety (a runtime may SIGKILL the plugin at any instruction): a
//! reservation appears with its content or not at all. It is written to a
//! temp file (`.reserve-<ip>`, not an address, so host-local ignores it) and
//! made visible with `link(2)`, which cannot overwrite an existing
//! reservation; host-local's own `O_EXCL` create-then-write can leave an
//! empty file when killed. Every writer holds the lock for its whole write,
//! so under the lock an empty or unreadable reservation, or a leftover temp
//! file, belongs to a dead writer: it is removed when found (every DEL and GC
//! reads the store; a full range looks once more before saying so).
//! `last_reserved_ip.*` is replaced with a rename, never seen half written.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flannel_shared::IpNet;

const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
/// Temp files of writes in progress (or of writers killed mid-way).
const TEMP_PREFIX: &str = ".reserve-";
const LINE_BREAK: &str = "\r\n";
/// The boot the store's reservations were made in. Not an address, so
/// host-local (which only reads address files and `last_reserved_ip.*`) ignores it.
pub const BOOT_RECORD: &str = "boot_id";
/// Where the kernel says which boot this is.
pub const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Test hook: read the boot id from this file instead of [`KERNEL_BOOT_ID`].
pub const BOOT_ID_ENV: &str = "FLANNEL_CNI_BOOT_ID_FILE";

/// The id of the boot this host is in (`$FLANNEL_CNI_BOOT_ID_FILE`, else the kernel's).
pub fn current_boot_id() -> Result<String, IpamError> {
    let path = std::env::var_os(BOOT_ID_ENV).map_or_else(|| PathBuf::from(KERNEL_BOOT_ID), PathBuf::from);
    let id = fs::read_to_string(&path).map_err(io_at(&path))?;
    let id = id.trim();
    if id.is_empty() {
        return Err(IpamError::Io { path, source: io::Error::new(io::ErrorKind::InvalidData, "empty boot id") });
    }
    Ok(id.to_string())
}

/// One allocatable range: the node subnet minus network, gateway and (IPv4) broadcast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub gateway: IpAddr,
    /// host-local's range-set index, used in `last_reserved_ip.<id>`.
    pub id: usize,
}

impl Range {
    /// The range for a subnet in gateway form (`10.244.1.1/24`): gateway is the first host.
    pub fn from_gateway_form(subnet: IpNet, id: usize) -> Option<Range> {
        let net = subnet.network();
        // A /31 or /32 (or v6 /127, /128) leaves nothing to hand out beside the gateway.
        if net.host_bits() < 2 {
            return None;
        }
        Some(Range { subnet: net, gateway: net.nth(1)?, id })
    }

    fn first_offset(&self) -> u128 {
        1
    }

    fn last_offset(&self) -> u128 {
        let hb = self.subnet.host_bits() as u32;
        let max = if hb >= 128 { u128::MAX } else { (1u128 << hb) - 1 };
        // The IPv4 broadcast address is never handed out.
        if self.subnet.is_ipv4() { max - 1 } else { max }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.subnet
            .offset_of(ip)
            .is_some_and(|o| o >= self.first_offset() && o <= self.last_offset() && ip != self.gateway)
    }

    /// Number of addresses this range can hand out.
    pub fn capacity(&self) -> u128 {
        self.last_offset() - self.first_offset() // +1 for inclusive, -1 for the gateway
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no IP addresses available in range set {0} (all {1} addresses are in use)")]
    Exhausted(IpNet, u128),
    #[error("requested IP address {ip} is not in range {range}")]
    NotInRange { ip: IpAddr, range: IpNet },
    #[error("requested IP address {ip} is already allocated to container {owner}")]
    Taken { ip: IpAddr, owner: String },
    #[error("IPAM store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io { path: path.to_path_buf(), source }
}

/// An entry of the store: who holds which address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for entries written by old host-local versions (ID only).
    pub ifname: String,
}

pub struct Store {
    dir: PathBuf,
    lock: File,
}

/// Holds the store's flock; released on drop.
pub struct Locked<'a> {
    store: &'a Store,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.store.lock.unlock();
    }
}

impl Store {
    /// Opens (creating if needed) the store directory of one network.
    pub fn open(dir: &Path) -> Result<Store, IpamError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock_path = dir.join("lock");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io_at(&lock_path))?;
        Ok(Store { dir: dir.to_path_buf(), lock })
    }

    /// Takes the exclusive lock host-local also takes.
    pub fn lock(&self) -> Result<Locked<'_>, IpamError> {
        self.lock.lock().map_err(io_at(&self.dir))?;
        Ok(Locked { store: self })
    }

    /// Every address file in the store. Reservations a killed writer left
    /// empty (or unreadable), and its temp files, are removed on the way:
    /// under the lock no live writer can be mid-way through one.
    pub fn allocations(&self, _guard: &Locked<'_>) -> Result<Vec<Allocation>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let entry = entry.map_err(io_at(&self.dir))?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else { continue };
            let content = match fs::read(entry.path()) {
                Ok(c) => c,
                // Removed by a concurrent host-local that ignores the lock: simply gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => Vec::new(),
            };
            let content = String::from_utf8_lossy(&content);
            let content = content.trim();
            if content.is_empty() || content.chars().any(|c| c.is_control() && c != '\r' && c != '\n') {
                // A dead writer's reservation: nobody can DEL it by container ID.
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let (id, ifname) = match content.split_once(LINE_BREAK).or_else(|| content.split_once('\n')) {
                Some((id, ifname)) => (id.trim(), ifname.trim()),
                None => (content, ""),
            };
            out.push(Allocation { ip, container_id: id.to_string(), ifname: ifname.to_string() });
        }
        Ok(out)
    }

    /// Addresses held by (container, ifname), including legacy ID-only entries.
    pub fn find(&self, guard: &Locked<'_>, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let all = self.allocations(guard)?;
        let exact: Vec<IpAddr> =
            all.iter().filter(|a| a.container_id == id && a.ifname == ifname).map(|a| a.ip).collect();
        if !exact.is_empty() {
            return Ok(exact);
        }
        Ok(all.iter().filter(|a| a.container_id == id && a.ifname.is_empty()).map(|a| a.ip).collect())
    }

    fn last_reserved(&self, range: &Range) -> Option<IpAddr> {
        let s = fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{}", range.id))).ok()?;
        s.trim().parse().ok()
    }

    /// Reserves `ip` if free: content first, in a temp file, then `link(2)`
    /// to the address's name (EEXIST: taken), so the reservation is never
    /// visible without its container ID.
    fn try_reserve(&self, ip: IpAddr, id: &str, ifname: &str, range: &Range) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        let tmp = self.dir.join(format!("{TEMP_PREFIX}{ip}"));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(format!("{}{LINE_BREAK}{ifname}", id.trim()).as_bytes())
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp)(e));
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_at(&path)(e)),
        }
        self.write_last_reserved(range, ip)?;
        Ok(true)
    }

    /// Records the round-robin position: written beside and renamed over, so a
    /// reader never sees a torn address. No fsync: it is a hint (an unreadable
    /// one restarts the round robin at the first address).
    fn write_last_reserved(&self, range: &Range, ip: IpAddr) -> Result<(), IpamError> {
        let name = format!("{LAST_RESERVED_PREFIX}{}", range.id);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!("{TEMP_PREFIX}{name}"));
        fs::write(&tmp, ip.to_string()).map_err(io_at(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_at(&path))
    }

    /// Addresses in the store, from file names alone (no reads).
    fn used(&self) -> Result<HashSet<IpAddr>, IpamError> {
        let mut out = HashSet::new();
        for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))? {
            let entry = entry.map_err(io_at(&self.dir))?;
            if let Some(ip) = entry.file_name().to_str().and_then(|n| n.parse::<IpAddr>().ok()) {
                out.insert(ip);
            }
        }
        Ok(out)
    }

    /// Reserves an address of `range` for (id, ifname): the requested one if
    /// given, else the next free one after the last reservation (round robin,
    /// as host-local does). With `reuse`, an address this attachment already
    /// holds is returned again (that reads every entry, so ADD asks for it only
    /// when it has seen an earlier ADD of the same attachment).
    pub fn allocate(
        &self,
        guard: &Locked<'_>,
        range: &Range,
        id: &str,
        ifname: &str,
        requested: Option<IpAddr>,
        reuse: bool,
    ) -> Result<IpAddr, IpamError> {
        if reuse
            && let Some(a) = self.allocations(guard)?.into_iter().find(|a| {
                a.container_id == id && (a.ifname == ifname || a.ifname.is_empty()) && range.subnet.contains(a.ip)
            })
        {
            return Ok(a.ip);
        }
        if let Some(ip) = requested {
            if !range.contains(ip) {
                return Err(IpamError::NotInRange { ip, range: range.subnet });
            }
            if !self.try_reserve(ip, id, ifname, range)? {
                let owner = self
                    .allocations(guard)?
                    .into_iter()
                    .find(|a| a.ip == ip)
                    .map(|a| a.container_id)
                    .unwrap_or_default();
                return Err(IpamError::Taken { ip, owner });
            }
            return Ok(ip);
        }
        let used = self.used()?;
        let (first, last) = (range.first_offset(), range.last_offset());
        let start = self
            .last_reserved(range)
            .and_then(|ip| range.subnet.offset_of(ip))
            .filter(|o| *o >= first && *o < last)
            .map(|o| o + 1)
            .unwrap_or(first);
        let span = last - first + 1;
        let mut offset = start;
        for _ in 0..span.min(1 << 24) {
            let ip = range.subnet.nth(offset).expect("offset inside subnet");
            offset = if offset >= last { first } else { offset + 1 };
            if ip == range.gateway || used.contains(&ip) {
                continue;
            }
            if self.try_reserve(ip, id, ifname, range)? {
                return Ok(ip);
            }
        }
        // Full by names alone: reservations a killed writer left empty count
        // there. Reading every entry removes those; then look once more.
        let before = used.len();
        let live = self.allocations(guard)?.len();
        if live < before {
            return self.allocate(guard, range, id, ifname, requested, false);
        }
        Err(IpamError::Exhausted(range.subnet, range.capacity()))
    }

    /// After a reboot, frees every reservation made in the earlier boot: the pods
    /// died with it, and a runtime whose own state went too never calls DEL.
    /// `boot_id` is this boot's. A store without a record (new, or written by
    /// host-local) is taken to be from this boot: nothing is freed, the record is
    /// written. The round robin starts over, as on a fresh node. Returns what was
    /// freed and the earlier boot's id. Runs under the lock, so exactly one caller
    /// after a boot change frees anything.
    pub fn sweep_earlier_boot(
        &self,
        guard: &Locked<'_>,
        boot_id: &str,
    ) -> Result<Option<(String, Vec<Allocation>)>, IpamError> {
        let path = self.dir.join(BOOT_RECORD);
        let recorded = match fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_at(&path)(e)),
        };
        if recorded.as_deref() == Some(boot_id) {
            return Ok(None);
        }
        let mut freed = Vec::new();
        if recorded.is_some() {
            freed = self.allocations(guard)?;
            for a in &freed {
                self.release_ip(guard, a.ip)?;
            }
            for entry in fs::read_dir(&self.dir).map_err(io_at(&self.dir))?.flatten() {
                if entry.file_name().to_string_lossy().starts_with(LAST_RESERVED_PREFIX) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        // Written last and atomically: a crash before this point repeats the sweep, never half of it.
        let tmp = self.dir.join(format!(".{BOOT_RECORD}.tmp"));
        fs::write(&tmp, boot_id).map_err(io_at(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        Ok(recorded.map(|old| (old, freed)))
    }

    /// Frees one address, whoever holds it.
    pub fn release_ip(&self, _guard: &Locked<'_>, ip: IpAddr) -> Result<(), IpamError> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Frees every address of (id, ifname); legacy ID-only entries too when no exact match exists.
    pub fn release(&self, guard: &Locked<'_>, id: &str, ifname: &str) -> Result<Vec<IpAddr>, IpamError> {
        let ips = self.find(guard, id, ifname)?;
        for ip in &ips {
            self.release_ip(guard, *ip)?;
        }
        Ok(ips)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("ipam-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn range(s: &str) -> Range {
        Range::from_gateway_form(s.parse().unwrap(), 0).unwrap()
    }

    #[test]
    fn allocates_round_robin_in_host_local_format() {
        let t = TempDir::new("rr");
        let store = Store::open(&t.0.join("cbr0")).unwrap();
        let g = store.lock().unwrap();
        let r = range("10.244.1.1/24");
        let a = store.allocate(&g, &r, "c1", "eth0", None, false).unwrap();
        assert_eq!(a.to_string(), "10.244.1.2");
        let content = fs::read_to_string(t.0.join("cbr0/10.244.1.2")).unwrap();
        assert_eq!(content, "c1\r\neth0");
        assert_eq!(fs::read_to_string(t.0.join("cbr0/last_reserved_ip.0")).unwrap(), "10.244.1.2");
        // The same attachment gets the same address again.
        assert_eq!(store.allocate(&g, &r, "c1", "eth0", None, true).unwrap(), a);
        let b = store.allocate(&g, &r, "c2", "eth0", None, false).unwrap();
        assert_eq!(b.to_string(), "10.244.1.3");
        // Releasing does not rewind the round robin (host-local behaviour).
        assert_eq!(store.release(&g, "c1", "eth0").unwrap(), vec![a]);
        let c = store.allocate(&g, &r, "c3", "eth0", None, false).unwrap();
        assert_eq!(c.to_string(), "10.244.1.4");
    }

    #[test]
    fn exhaustion_and_requests() {
        let t = TempDir::new("ex");
        let store = Store::open(&t.0.join("n")).unwrap();
        let g = store.lock().unwrap();
        let r = range("10.9.0.1/29"); // .2 - .6 usable
        assert_eq!(r.capacity(), 5);
        let want: IpAddr = "10.9.0.5".parse().unwrap();
        assert_eq!(store.allocate(&g, &r, "req", "eth0", Some(want), false).unwrap(), want);
        assert!(matches!(store.allocate(&g, &r, "x", "eth0", Some(want), false), Err(IpamError::Taken { .. })));
        assert!(matches!(
            store.allocate(&g, &r, "x", "eth0", Some("10.9.0.7".parse().unwrap()), false),
            Err(IpamError::NotInRange { .. })
        ));
        for i in 0..4 {
            store.allocate(&g, &r, &format!("c{i}"), "eth0", None, false).unwrap();
        }
        assert!(matches!(store.allocate(&g, &r, "full", "eth0", None, false), Err(IpamError::Exhausted(..))));
        assert!(!t.0.join("n/10.9.0.7").exists() && !t.0.join("n/10.9.0.1").exists());
    }

    #[test]
    fn sweep_frees_an_earlier_boots_reservations_once() {
        let t = TempDir::new("boot");
        let store = Store::open(&t.0.join("n")).unwrap();
        let g = store.lock().unwrap();
        let r = range("10.244.1.1/24");
        // No record yet (new store, or host-local's): nothing freed, record written.
        store.allocate(&g, &r, "old1", "eth0", None, false).unwrap();
        assert_eq!(store.sweep_earlier_boot(&g, "boot-a").unwrap(), None);
        assert_eq!(fs::read_to_string(t.0.join("n/boot_id")).unwrap(), "boot-a");
        store.allocate(&g, &r, "old2", "eth0", None, false).unwrap();
        assert_eq!(store.sweep_earlier_boot(&g, "boot-a").unwrap(), None);
        assert_eq!(store.allocations(&g).unwrap().len(), 2);
        // Another boot: both go, the round robin starts over, and only once.
        let (old, freed) = store.sweep_earlier_boot(&g, "boot-b").unwrap().unwrap();
        assert_eq!(old, "boot-a");
        let mut ids: Vec<String> = freed.into_iter().map(|a| a.container_id).collect();
        ids.sort();
        assert_eq!(ids, ["old1", "old2"]);
        assert!(store.allocations(&g).unwrap().is_empty());
        assert!(!t.0.join("n/last_reserved_ip.0").exists());
        assert_eq!(store.allocate(&g, &r, "new", "eth0", None, false).unwrap().to_string(), "10.244.1.2");
        assert_eq!(store.sweep_earlier_boot(&g, "boot-b").unwrap(), None);
        assert_eq!(store.allocations(&g).unwrap().len(), 1);
    }

    /// What a writer killed mid-way leaves (host-local's empty `O_EXCL` file,
    /// our temp file) is found under the lock and freed; a full range looks
    /// again before saying so.
    #[test]
    fn a_dead_writers_leftovers_are_reclaimed() {
        let t = TempDir::new("dead");
        let store = Store::open(&t.0.join("n")).unwrap();
        let g = store.lock().unwrap();
        let r = range("10.9.0.1/29"); // .2 - .6 usable
        for i in 0..4 {
            store.allocate(&g, &r, &format!("c{i}"), "eth0", None, false).unwrap();
        }
        fs::write(t.0.join("n/10.9.0.6"), "").unwrap();
        fs::write(t.0.join("n/.reserve-10.9.0.6"), "c9\r\neth0").unwrap();
        // Full by names: the empty one is reclaimed and handed out.
        assert_eq!(store.allocate(&g, &r, "new", "eth0", None, false).unwrap().to_string(), "10.9.0.6");
        assert_eq!(fs::read_to_string(t.0.join("n/10.9.0.6")).unwrap(), "new\r\neth0");
        assert!(!t.0.join("n/.reserve-10.9.0.6").exists());
        // Any read of the store (DEL, GC) frees empty reservations too.
        store.release(&g, "new", "eth0").unwrap();
        fs::write(t.0.join("n/10.9.0.6"), "  \n").unwrap();
        assert_eq!(store.allocations(&g).unwrap().len(), 4);
        assert!(!t.0.join("n/10.9.0.6").exists());
        // No temp file is left by a normal reservation, and last_reserved_ip is whole.
        store.allocate(&g, &r, "x", "eth0", None, false).unwrap();
        let names: Vec<String> = fs::read_dir(t.0.join("n"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.starts_with(TEMP_PREFIX)), "{names:?}");
        assert_eq!(fs::read_to_string(t.0.join("n/last_reserved_ip.0")).unwrap(), "10.9.0.6");
    }

    #[test]
    fn releases_legacy_id_only_entries() {
        let t = TempDir::new("legacy");
        let store = Store::open(&t.0.join("n")).unwrap();
        fs::write(t.0.join("n/10.244.1.9"), "oldcontainer\n").unwrap();
        let g = store.lock().unwrap();
        assert_eq!(store.release(&g, "oldcontainer", "eth0").unwrap(), vec!["10.244.1.9".parse::<IpAddr>().unwrap()]);
        assert!(!t.0.join("n/10.244.1.9").exists());
    }
}
