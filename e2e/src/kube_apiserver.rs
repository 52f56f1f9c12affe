//! The real `kube-apiserver` (from `../shared/reference/kubernetes/`, outside
//! the project) over Debian's etcd, run inside a test namespace, so the agent's
//! Kubernetes mode meets real authentication, RBAC and admission instead of
//! the stand-in of [`crate::kube_api`]. Certificates come from a throwaway CA
//! (the `openssl` CLI); clients are `curl` run in the same namespace, so no
//! request leaves it. Processes are killed and files removed on drop, also
//! after a panic.

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Netns, TempDir};

/// The API server's port on its listen address.
pub const PORT: u16 = 6443;
/// etcd's client and peer ports on the namespace's loopback. They are not the
/// test-bed etcd's (2379 on the underlay address, 2380 on loopback), which may
/// run in the same namespace.
const ETCD_CLIENT: &str = "http://127.0.0.1:12379";
const ETCD_PEER: &str = "http://127.0.0.1:12380";
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Who a request is made as: each has a client certificate from the test CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// `O=system:masters`: every right, for setting the scene.
    Admin,
    /// `CN=system:serviceaccount:kube-flannel:flannel` and no groups: the apiserver
    /// adds `system:authenticated` itself, and RBAC binds a `ServiceAccount` subject
    /// by this user name alone, so the manifest's ClusterRoleBinding is what applies.
    Flannel,
}

impl Identity {
    fn file_stem(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::Flannel => "flannel",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Identity::Admin => "/O=system:masters/CN=e2e-admin",
            Identity::Flannel => "/CN=system:serviceaccount:kube-flannel:flannel",
        }
    }
}

/// The folder with `kube-apiserver`: `$FLANNEL_KUBE_REFERENCE_DIR`, else
/// `<workspace>/../shared/reference/kubernetes`.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("FLANNEL_KUBE_REFERENCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/kubernetes"),
    }
}

/// A binary of [`reference_dir`], or an error naming the folder.
pub fn reference_binary(name: &str) -> Result<PathBuf, String> {
    let dir = reference_dir();
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{name} not found in {}: these tests need the real Kubernetes binaries from \
             ../shared/reference/kubernetes (or FLANNEL_KUBE_REFERENCE_DIR pointing at a folder with them)",
            dir.display()
        ))
    }
}

fn run(mut c: Command, what: &str) -> Result<String, String> {
    let out = c.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// CA, serving certificate, service-account key and one client certificate per
/// [`Identity`], all ECDSA P-256 (a second's work, where RSA keys take several).
fn make_pki(dir: &Path, ip: IpAddr) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ssl = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.current_dir(dir).args(args);
        run(c, "openssl (apt-get install openssl)").map(drop)
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    ssl(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=e2e-kube-ca"],
    ]
    .concat())?;
    let server_ext = format!("subjectAltName=IP:{ip},IP:127.0.0.1,DNS:kubernetes\nextendedKeyUsage=serverAuth\n");
    let client_ext = "extendedKeyUsage=clientAuth\n".to_string();
    let certs = [
        ("server", "/CN=kube-apiserver", server_ext),
        (Identity::Admin.file_stem(), Identity::Admin.subject(), client_ext.clone()),
        (Identity::Flannel.file_stem(), Identity::Flannel.subject(), client_ext),
    ];
    for (name, subject, ext) in certs {
        let (key, csr, extfile, out) =
            (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}.ext"), format!("{name}.pem"));
        ssl(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", subject]].concat())?;
        std::fs::write(dir.join(&extfile), ext).map_err(|e| format!("{extfile}: {e}"))?;
        ssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &out,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ])?;
    }
    ssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa-key.pem"])?;
    ssl(&["pkey", "-in", "sa-key.pem", "-pubout", "-out", "sa.pem"])
}

/// The collection a manifest object is created in.
fn collection(obj: &Value) -> Result<String, String> {
    let ns = obj["metadata"]["namespace"].as_str();
    let kind = obj["kind"].as_str().unwrap_or_default();
    match (kind, ns) {
        ("Namespace", _) => Ok("/api/v1/namespaces".into()),
        ("ServiceAccount", Some(ns)) => Ok(format!("/api/v1/namespaces/{ns}/serviceaccounts")),
        ("ClusterRole", _) => Ok("/apis/rbac.authorization.k8s.io/v1/clusterroles".into()),
        ("ClusterRoleBinding", _) => Ok("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".into()),
        _ => Err(format!("no collection known for {kind} (namespace {ns:?})")),
    }
}

/// A kube-apiserver with its own etcd, both running in a namespace.
pub struct KubeApiServer {
    /// The namespace both run in; not ours to delete.
    ns: Netns,
    ip: IpAddr,
    dir: TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// How long `/readyz` took to answer 200 after the apiserver was started.
    pub ready_after: Duration,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver in `ns`, the apiserver on `ip`:[`PORT`]
    /// (an address `ns` holds, e.g. the underlay bridge's), and waits for `/readyz`.
    /// Files live in a temp dir whose name starts with `dir_prefix`.
    pub fn start(dir_prefix: &str, ns: &Netns, ip: IpAddr) -> Result<KubeApiServer, String> {
        let bin = reference_binary("kube-apiserver")?;
        let mut s = KubeApiServer {
            ns: Netns::existing(ns.name()),
            ip,
            dir: TempDir::new(dir_prefix),
            etcd: None,
            apiserver: None,
            ready_after: Duration::ZERO,
        };
        make_pki(&s.pki(), ip)?;
        for who in [Identity::Admin, Identity::Flannel] {
            s.write_kubeconfig(who)?;
        }
        s.start_etcd()?;
        s.start_apiserver(&bin)?;
        Ok(s)
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    fn pki_file(&self, name: &str) -> String {
        self.pki().join(name).display().to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `https://<ip>:6443`.
    pub fn url(&self) -> String {
        match self.ip {
            IpAddr::V4(v4) => format!("https://{v4}:{PORT}"),
            IpAddr::V6(v6) => format!("https://[{v6}]:{PORT}"),
        }
    }

    /// The kubeconfig (absolute paths to the CA and `who`'s certificate and key).
    pub fn kubeconfig(&self, who: Identity) -> PathBuf {
        self.dir.join(format!("kubeconfig-{}", who.file_stem()))
    }

    fn write_kubeconfig(&self, who: Identity) -> Result<(), String> {
        let stem = who.file_stem();
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: {stem}\n  user:\n    client-certificate: {}\n    \
             client-key: {}\ncontexts:\n- name: {stem}\n  context:\n    cluster: e2e\n    user: {stem}\n\
             current-context: {stem}\n",
            self.url(),
            self.pki_file("ca.pem"),
            self.pki_file(&format!("{stem}.pem")),
            self.pki_file(&format!("{stem}-key.pem")),
        );
        let p = self.kubeconfig(who);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    }

    fn log_file(&self, what: &str) -> Result<File, String> {
        let p = self.dir.join(format!("{what}.log"));
        File::options().create(true).append(true).open(&p).map_err(|e| format!("{}: {e}", p.display()))
    }

    /// The last `lines` lines of the apiserver's (or etcd's) log.
    pub fn log_tail(&self, what: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn start_etcd(&mut self) -> Result<(), String> {
        let log = self.log_file("etcd")?;
        let log2 = log.try_clone().map_err(|e| format!("etcd log: {e}"))?;
        let child = self
            .ns
            .command("etcd")
            .args(["--name", "kube", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args(["--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT])
            .args(["--listen-peer-urls", ETCD_PEER, "--initial-advertise-peer-urls", ETCD_PEER])
            .args(["--initial-cluster", &format!("kube={ETCD_PEER}"), "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("start etcd (apt-get install etcd-server): {e}"))?;
        self.etcd = Some(child);
        Ok(())
    }

    fn start_apiserver(&mut self, bin: &Path) -> Result<(), String> {
        let log = self.log_file("kube-apiserver")?;
        let log2 = log.try_clone().map_err(|e| format!("apiserver log: {e}"))?;
        let bin = bin.to_str().ok_or("kube-apiserver's path is not UTF-8")?;
        let started = Instant::now();
        let child = self
            .ns
            .command(bin)
            .arg(format!("--etcd-servers={ETCD_CLIENT}"))
            .arg(format!("--bind-address={}", self.ip))
            .arg(format!("--advertise-address={}", self.ip))
            .arg(format!("--secure-port={PORT}"))
            .arg(format!("--tls-cert-file={}", self.pki_file("server.pem")))
            .arg(format!("--tls-private-key-file={}", self.pki_file("server-key.pem")))
            .arg(format!("--client-ca-file={}", self.pki_file("ca.pem")))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", self.pki_file("sa.pem")))
            .arg(format!("--service-account-signing-key-file={}", self.pki_file("sa-key.pem")))
            .args(["--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/12"])
            .arg(format!("--cert-dir={}", self.dir.join("cert-dir").display()))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("start {bin}: {e}"))?;
        self.apiserver = Some(child);
        loop {
            if let Ok((200, _)) = self.request(Identity::Admin, "GET", "/readyz", None) {
                self.ready_after = started.elapsed();
                return Ok(());
            }
            let exited = self.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || started.elapsed() > READY_TIMEOUT {
                let why = match exited {
                    Some(st) => format!("kube-apiserver exited ({st})"),
                    None => format!("kube-apiserver not ready within {READY_TIMEOUT:?}"),
                };
                return Err(format!(
                    "{why}; its log ends:\n{}\n-- etcd's:\n{}",
                    self.log_tail("kube-apiserver", 60),
                    self.log_tail("etcd", 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// One HTTPS request as `who`, with an optional body and its content type;
    /// returns the status code and the body (JSON, or the text as a JSON string).
    pub fn request(
        &self,
        who: Identity,
        method: &str,
        path: &str,
        body: Option<(&str, &Value)>,
    ) -> Result<(u16, Value), String> {
        let stem = who.file_stem();
        let mut c = self.ns.command("curl");
        c.args(["-sS", "--max-time", "10", "-X", method, "-H", "Accept: application/json"])
            .args(["--cacert", &self.pki_file("ca.pem")])
            .args(["--cert", &self.pki_file(&format!("{stem}.pem"))])
            .args(["--key", &self.pki_file(&format!("{stem}-key.pem"))])
            .args(["-w", "\n%{http_code}"]);
        if let Some((ctype, _)) = body {
            c.args(["-H", &format!("Content-Type: {ctype}"), "--data-binary", "@-"]);
        }
        c.arg(format!("{}{path}", self.url()));
        let mut child = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("curl (apt-get install curl): {e}"))?;
        let mut stdin = child.stdin.take().ok_or("curl's stdin")?;
        if let Some((_, b)) = body {
            stdin.write_all(b.to_string().as_bytes()).map_err(|e| format!("curl's stdin: {e}"))?;
        }
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
        let what = format!("{method} {path} as {who:?}");
        if !out.status.success() {
            return Err(format!("{what}: curl {}: {}", out.status, String::from_utf8_lossy(&out.stderr)));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').ok_or_else(|| format!("{what}: no status from curl: {text}"))?;
        let code: u16 = code.trim().parse().map_err(|_| format!("{what}: status {code:?} from curl"))?;
        let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
        Ok((code, body))
    }

    /// [`KubeApiServer::request`] as [`Identity::Admin`] that must succeed (2xx).
    pub fn admin(&self, method: &str, path: &str, body: Option<(&str, &Value)>) -> Result<Value, String> {
        match self.request(Identity::Admin, method, path, body)? {
            (200..=299, v) => Ok(v),
            (code, v) => Err(format!("{method} {path}: {code} {v}")),
        }
    }

    /// Creates a Node with `spec.podCIDR` (as the controller manager's nodeipam
    /// would have set it) and `annotations`.
    pub fn create_node(&self, name: &str, pod_cidr: &str, annotations: Value) -> Result<Value, String> {
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        });
        self.admin("POST", "/api/v1/nodes", Some(("application/json", &node)))
    }

    pub fn node(&self, name: &str) -> Result<Value, String> {
        self.admin("GET", &format!("/api/v1/nodes/{name}"), None)
    }

    /// A strategic-merge patch of a Node (or of its status subresource) as the admin.
    pub fn patch_node(&self, name: &str, status: bool, patch: &Value) -> Result<Value, String> {
        let path = format!("/api/v1/nodes/{name}{}", if status { "/status" } else { "" });
        self.admin("PATCH", &path, Some(("application/strategic-merge-patch+json", patch)))
    }

    /// Creates the manifest's Namespace, ServiceAccount, ClusterRole and
    /// ClusterRoleBinding (read from `manifests/kube-flannel.yml`, nothing
    /// else), then waits until the binding is in force (RBAC reads its rules
    /// from an informer, a moment behind the write). Returns `Kind/name` of each.
    pub fn apply_manifest_rbac(&self) -> Result<Vec<String>, String> {
        let path = crate::manifest::path();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut applied = Vec::new();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let y = serde_yaml::Value::deserialize(d).map_err(|e| format!("{}: {e}", path.display()))?;
            let obj = serde_json::to_value(y).map_err(|e| format!("{}: {e}", path.display()))?;
            let kind = obj["kind"].as_str().unwrap_or_default();
            if !["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
                continue;
            }
            self.admin("POST", &collection(&obj)?, Some(("application/json", &obj)))?;
            applied.push(format!("{kind}/{}", obj["metadata"]["name"].as_str().unwrap_or_default()));
        }
        let in_force = crate::wait_until(Duration::from_secs(15), || {
            matches!(self.request(Identity::Flannel, "GET", "/api/v1/nodes?limit=1", None), Ok((200, _)))
        });
        if !in_force {
            let got = self.request(Identity::Flannel, "GET", "/api/v1/nodes?limit=1", None);
            return Err(format!(
                "after applying {applied:?} the flannel ServiceAccount still cannot list nodes: {got:?}"
            ));
        }
        Ok(applied)
    }

    fn stop(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            // SIGKILL: a SIGTERMed apiserver drains for seconds; nothing here needs a clean stop.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- kube-apiserver log (tail) ----\n{}", self.log_tail("kube-apiserver", 40));
        }
        Self::stop(&mut self.apiserver);
        Self::stop(&mut self.etcd);
    }
}
