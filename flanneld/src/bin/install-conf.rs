//! `install-conf <src> <dest>`: what upstream's DaemonSet runs in its
//! `install-cni` init container to put the ConfigMap's conflist where the
//! kubelet's runtime reads it. The file appears whole or not at all: it is
//! written beside the destination as `.<name>.tmp` (a name the CNI config
//! loaders skip: it has none of their extensions), flushed to disk, and renamed
//! over the destination; a runtime never reads half a conflist. Written here
//! rather than `cp`, which truncates the destination and writes it in place.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The temporary name beside `dest`.
fn temp_for(dest: &Path) -> Result<PathBuf, String> {
    let name = dest.file_name().ok_or_else(|| format!("{}: not a file name", dest.display()))?;
    Ok(dest.with_file_name(format!(".{}.tmp", name.to_string_lossy())))
}

/// Copies `src` over `dest` atomically (temp file + fsync + rename + fsync of the directory).
fn install(src: &Path, dest: &Path) -> Result<(), String> {
    let data = fs::read(src).map_err(|e| format!("reading {}: {e}", src.display()))?;
    let tmp = temp_for(dest)?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(&data)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        fs::rename(&tmp, dest)?;
        // The rename itself survives a crash only once the directory is on disk.
        File::open(dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("installing {} as {}: {e}", src.display(), dest.display())
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, src, dest] = args.as_slice() else {
        eprintln!("usage: {} <src> <dest>", args.first().map(String::as_str).unwrap_or("install-conf"));
        return ExitCode::FAILURE;
    };
    match install(Path::new(src), Path::new(dest)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("install-conf: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("install-conf-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    #[test]
    fn replaces_whole_and_leaves_no_temp_file() {
        let d = dir("ok");
        let (src, dest) = (d.0.join("cni-conf.json"), d.0.join("10-flannel.conflist"));
        fs::write(&src, r#"{"name":"cbr0"}"#).unwrap();
        fs::write(&dest, "old").unwrap();
        install(&src, &dest).unwrap();
        assert_eq!(fs::read_to_string(&dest).unwrap(), r#"{"name":"cbr0"}"#);
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o644);
        let names: Vec<_> = fs::read_dir(&d.0).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_failure_leaves_the_old_file_and_no_temp_file() {
        let d = dir("bad");
        let dest = d.0.join("10-flannel.conflist");
        fs::write(&dest, "old").unwrap();
        let e = install(&d.0.join("missing.json"), &dest).unwrap_err();
        assert!(e.contains("missing.json"), "{e}");
        // The destination's directory is gone: nothing is left half-written.
        let e = install(&dest, &d.0.join("nodir/x.conflist")).unwrap_err();
        assert!(e.contains("nodir"), "{e}");
        assert_eq!(fs::read_to_string(&dest).unwrap(), "old");
        assert_eq!(fs::read_dir(&d.0).unwrap().count(), 1);
        assert_eq!(
            temp_for(Path::new("/etc/cni/net.d/10-flannel.conflist")).unwrap(),
            Path::new("/etc/cni/net.d/.10-flannel.conflist.tmp")
        );
    }
}
