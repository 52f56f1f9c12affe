//! A small CRI v1 client: the RuntimeService calls a kubelet makes to create
//! and remove pod sandboxes, over the runtime's unix socket (gRPC). Debian has
//! no crictl, so the messages are defined here with the CRI API's field numbers
//! (k8s.io/cri-api `pkg/apis/runtime/v1/api.proto`), only the fields we use;
//! proto3 skips the rest on the wire.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Clone, PartialEq, Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
    #[prost(string, tag = "4")]
    pub runtime_api_version: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

/// `Protocol`: TCP = 0, UDP = 1, SCTP = 2.
#[derive(Clone, PartialEq, Message)]
pub struct PortMapping {
    #[prost(int32, tag = "1")]
    pub protocol: i32,
    #[prost(int32, tag = "2")]
    pub container_port: i32,
    #[prost(int32, tag = "3")]
    pub host_port: i32,
    #[prost(string, tag = "4")]
    pub host_ip: String,
}

/// `NamespaceMode`: POD = 0, CONTAINER = 1, NODE = 2.
#[derive(Clone, PartialEq, Message)]
pub struct NamespaceOption {
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
    #[prost(bool, tag = "6")]
    pub privileged: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(message, repeated, tag = "5")]
    pub port_mappings: Vec<PortMapping>,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(map = "string, string", tag = "7")]
    pub annotations: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

/// Stop and Remove requests carry only the sandbox id; their responses are empty.
#[derive(Clone, PartialEq, Message)]
pub struct SandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(bool, tag = "2")]
    pub verbose: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodIp {
    #[prost(string, tag = "1")]
    pub ip: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxNetworkStatus {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(message, repeated, tag = "2")]
    pub additional_ips: Vec<PodIp>,
}

/// `PodSandboxState`: SANDBOX_READY = 0, SANDBOX_NOTREADY = 1.
pub const SANDBOX_READY: i32 = 0;

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int64, tag = "4")]
    pub created_at: i64,
    #[prost(message, optional, tag = "5")]
    pub network: Option<PodSandboxNetworkStatus>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandboxStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<PodSandboxStatus>,
    /// With `verbose`: containerd puts its sandbox record (JSON) under `info`.
    #[prost(map = "string, string", tag = "2")]
    pub info: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(message, optional, tag = "2")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(int32, tag = "3")]
    pub state: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

/// A CRI error: the gRPC status code and the runtime's message.
#[derive(Debug, Clone)]
pub struct CriError {
    pub code: tonic::Code,
    pub message: String,
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// A blocking CRI RuntimeService client on a unix socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    socket: PathBuf,
}

impl Cri {
    /// Connects to the runtime's socket (lazily: the first call dials).
    pub fn new(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
        let path = socket.to_path_buf();
        let channel = rt.block_on(async {
            // The URI is required but unused: every connection goes to the socket.
            Endpoint::from_static("http://cri.invalid").timeout(Duration::from_secs(120)).connect_with_connector_lazy(
                tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(hyper_util::rt::TokioIo::new) }
                }),
            )
        });
        Cri { rt, channel, socket: socket.to_path_buf() }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn call<Req, Resp>(&self, method: &'static str, req: Req) -> Result<Resp, CriError>
    where
        Req: Message + Send + Sync + 'static,
        Resp: Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        self.rt.block_on(async {
            grpc.ready().await.map_err(|e| CriError { code: tonic::Code::Unavailable, message: e.to_string() })?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            grpc.unary(tonic::Request::new(req), PathAndQuery::from_static(method), codec)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| CriError { code: s.code(), message: s.message().to_string() })
        })
    }

    pub fn version(&self) -> Result<VersionResponse, CriError> {
        self.call("/runtime.v1.RuntimeService/Version", VersionRequest { version: "v1".into() })
    }

    /// `RunPodSandbox`; returns the sandbox id.
    pub fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, CriError> {
        let req = RunPodSandboxRequest { config: Some(config), runtime_handler: String::new() };
        let r: RunPodSandboxResponse = self.call("/runtime.v1.RuntimeService/RunPodSandbox", req)?;
        Ok(r.pod_sandbox_id)
    }

    pub fn pod_sandbox_status(&self, id: &str, verbose: bool) -> Result<PodSandboxStatusResponse, CriError> {
        let req = PodSandboxStatusRequest { pod_sandbox_id: id.into(), verbose };
        self.call("/runtime.v1.RuntimeService/PodSandboxStatus", req)
    }

    pub fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, CriError> {
        let r: ListPodSandboxResponse =
            self.call("/runtime.v1.RuntimeService/ListPodSandbox", ListPodSandboxRequest {})?;
        Ok(r.items)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: Empty =
            self.call("/runtime.v1.RuntimeService/StopPodSandbox", SandboxIdRequest { pod_sandbox_id: id.into() })?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let _: Empty =
            self.call("/runtime.v1.RuntimeService/RemovePodSandbox", SandboxIdRequest { pod_sandbox_id: id.into() })?;
        Ok(())
    }
}

/// A kubelet-like sandbox config: metadata, hostname, the pod's network
/// namespace (POD mode), and `port_mappings` for hostPorts.
pub fn sandbox_config(namespace: &str, name: &str, uid: &str, ports: Vec<PortMapping>) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: namespace.into(),
            attempt: 0,
        }),
        hostname: name.into(),
        port_mappings: ports,
        labels: HashMap::from([("io.kubernetes.pod.name".into(), name.into())]),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption { network: 0, pid: 1, ipc: 0 }),
                privileged: false,
            }),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes on the wire carry the API's field numbers (a wrong tag would be
    /// silently ignored by the runtime).
    #[test]
    fn field_numbers_are_the_cri_apis() {
        let port = PortMapping { protocol: 1, container_port: 80, host_port: 8080, host_ip: String::new() };
        assert_eq!(port.encode_to_vec(), [0x08, 1, 0x10, 80, 0x18, 0x90, 0x3f]);
        let c = PodSandboxConfig {
            hostname: "h".into(),
            port_mappings: vec![PortMapping::default()],
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        // hostname = 2 (0x12), port_mappings = 5 (0x2a), linux = 8 (0x42).
        assert_eq!(c.encode_to_vec(), [0x12, 1, b'h', 0x2a, 0, 0x42, 0]);
        let s = PodSandboxStatus::decode(&[0x0a, 1, b'x', 0x18, 1, 0x2a, 3, 0x0a, 1, b'9'][..]).unwrap();
        assert_eq!((s.id.as_str(), s.state, s.network.unwrap().ip.as_str()), ("x", 1, "9"));
    }
}
