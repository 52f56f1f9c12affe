//! Images the tests need besides ours, built here from Debian packages (no
//! registry): the sandbox ("pause") image containerd's CRI starts for every
//! pod, and a busybox root for podman's test containers. Built once per target directory, under a file lock so parallel test
//! binaries share it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The pause program: sleeps until SIGTERM/SIGINT, reaps nothing else (one process).
const PAUSE_C: &str = r#"#include <signal.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    for (;;) pause();
}
"#;

fn cache_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-images");
    std::fs::create_dir_all(&d).expect("image cache dir");
    d
}

/// `target/e2e-images/pause.tar`, a docker-archive of [`crate::containerd::PAUSE_IMAGE`]
/// (a static binary made with gcc, assembled with buildah).
pub fn pause() -> PathBuf {
    let dir = cache_dir();
    let lock = std::fs::File::create(dir.join("lock")).expect("lock file");
    lock.lock().expect("lock");
    let archive = dir.join("pause.tar");
    let src = dir.join("pause.c");
    if archive.is_file() && std::fs::read_to_string(&src).is_ok_and(|s| s == PAUSE_C) {
        return archive;
    }
    let _ = std::fs::remove_file(&archive);
    std::fs::write(&src, PAUSE_C).expect("pause.c");
    let bin = dir.join("pause");
    let mut gcc = Command::new("gcc");
    gcc.args(["-static", "-Os", "-s", "-o"]).arg(&bin).arg(&src);
    crate::cluster::check(gcc, "gcc -static (pause)");
    let store = dir.join(".store");
    let _ = std::fs::remove_dir_all(&store);
    let buildah = |args: &[&str]| {
        let mut c = Command::new("buildah");
        c.arg("--root").arg(store.join("root")).arg("--runroot").arg(store.join("run"));
        c.args(["--storage-driver", "vfs"]).args(args);
        let out = c.output().expect("buildah (bash scripts/deps.sh installs it)");
        assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let ctr = buildah(&["from", "--quiet", "scratch"]);
    buildah(&["copy", "--quiet", &ctr, bin.to_str().expect("utf-8"), "/pause"]);
    buildah(&["config", "--entrypoint", r#"["/pause"]"#, "--os", "linux", "--arch", "amd64", &ctr]);
    let name = crate::containerd::PAUSE_IMAGE;
    buildah(&["commit", "--quiet", &ctr, name]);
    let tmp = dir.join("pause.tar.tmp");
    let _ = std::fs::remove_file(&tmp);
    buildah(&["push", "--quiet", name, &format!("docker-archive:{}:{name}", tmp.display())]);
    let _ = std::fs::remove_dir_all(&store);
    std::fs::rename(&tmp, &archive).expect("pause.tar");
    archive
}

/// A root file system with Debian's static busybox (`sh`, `sleep`, `ping`, ...)
/// under `dir`, for `podman import`.
pub fn busybox_root(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.is_file(), "/bin/busybox missing: `bash scripts/deps.sh` installs busybox-static");
    let root = dir.join("busybox-root");
    std::fs::create_dir_all(root.join("bin")).expect("busybox root");
    std::fs::copy(busybox, root.join("bin/busybox")).expect("copy busybox");
    for tool in ["sh", "sleep", "ping", "ip", "cat", "nc"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).expect("busybox link");
    }
    root
}
