//! The peer Nodes: listed, then watched from the listing's resourceVersion, as
//! client-go's reflector behind upstream's informer does. The listing asks for
//! `resourceVersion=0`, so the API server answers from its watch cache (no etcd
//! read, no paging: `limit` is ignored there), and its body is decoded a Node at
//! a time as it arrives ([`ItemSplitter`]), so memory does not grow with it.
//!
//! Why not kube-runtime's `watcher`: it lists either in pages (`limit`, read
//! from etcd: 1.39-1.51 s to the kernel at 5,000 real Nodes, against 1.18 s for
//! the cache's one response) or whole into memory (`any_semantic()`, no page
//! size: 96 MB peak RSS for the 43.5 MB body), and kube-core drops
//! `resourceVersion=0` when a page size is set. The rest of what it does is
//! this loop: re-watch from the last version seen when a watch ends, list again
//! on `410 Gone`, back off on errors.

use std::sync::Arc;
use std::time::Duration;

use futures_util::io::AsyncBufReadExt;
use futures_util::{StreamExt, TryStreamExt};
use kube::Client;
use kube::api::{Api, WatchEvent, WatchParams};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use flannel_shared::lease::Lease;

use super::node::{PeerNode, lease_key_of, node_lease};
use super::split::{ItemSplitter, SplitError};
use super::{Keys, api_err};
use crate::backoff::Backoff;
use crate::metrics::Metrics;
use crate::subnet::{LeaseEvent, SubnetError};

/// The collection path, and the query the listing sends: `resourceVersion=0`
/// (any version, from the watch cache), or none after a `410 Gone` (the latest,
/// from etcd), as client-go's reflector does.
pub const NODES: &str = "/api/v1/nodes";

impl From<SplitError> for SubnetError {
    fn from(e: SplitError) -> Self {
        SubnetError::Store(format!("list nodes: {e}"))
    }
}

/// One listing: every peer lease and the list's resourceVersion.
pub async fn list(client: &Client, keys: &Keys, from_cache: bool) -> Result<(Vec<Lease>, String), SubnetError> {
    let uri = if from_cache { format!("{NODES}?resourceVersion=0") } else { NODES.to_string() };
    let req = http::Request::get(&uri).body(Vec::new()).map_err(|e| api_err("list nodes", e))?;
    let body = client.request_stream(req).await.map_err(|e| api_err("list nodes", e))?;
    let mut body = Box::pin(body);
    let mut split = ItemSplitter::new();
    let mut leases = Vec::new();
    loop {
        let chunk = body.fill_buf().await.map_err(|e| api_err("list nodes: reading the body", e))?;
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        split.feed::<SubnetError>(chunk, |item| {
            let node: PeerNode = serde_json::from_slice(item).map_err(|e| api_err("list nodes: a Node", e))?;
            leases.extend(node_lease(&node, keys));
            Ok(())
        })?;
        body.consume_unpin(n);
    }
    let nodes = split.items;
    let top: ListMeta = serde_json::from_slice(&split.finish()?).map_err(|e| api_err("list nodes", e))?;
    if top.kind.as_deref().is_some_and(|k| k != "NodeList") {
        return Err(SubnetError::Store(format!("list nodes: the answer is a {:?}, not a NodeList", top.kind)));
    }
    debug!("listed {nodes} nodes ({} peers) at resourceVersion {:?}", leases.len(), top.metadata.resource_version);
    Ok((leases, top.metadata.resource_version.unwrap_or_default()))
}

#[derive(serde::Deserialize)]
struct ListMeta {
    kind: Option<String>,
    #[serde(default)]
    metadata: ListMetadata,
}

#[derive(Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMetadata {
    resource_version: Option<String>,
}

/// A watch that ends sooner than this without an event counts as broken.
const QUICK_END: Duration = Duration::from_secs(1);

fn is_gone(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 410)
}

/// Lists and watches until `tx` closes. Every listing is sent whole
/// ([`LeaseEvent::Snapshot`]); single changes as the Node says: a Node
/// without a lease is reported removed by its podCIDR, which never changes
/// once set, so no map of what was reported is kept.
pub async fn run(client: Client, keys: Keys, tx: mpsc::Sender<LeaseEvent>, metrics: Arc<Metrics>) {
    let api: Api<PeerNode> = Api::all(client.clone());
    let mut backoff = Backoff::new(Duration::from_millis(800), Duration::from_secs(30));
    // The version to watch from; none: list first.
    let mut version: Option<String> = None;
    // After a 410, the next listing reads the latest state, not the cache's.
    let mut from_cache = true;
    loop {
        let rv = match version.take() {
            Some(v) => v,
            None => match list(&client, &keys, from_cache).await {
                Ok((leases, rv)) => {
                    if tx.send(LeaseEvent::Snapshot(leases)).await.is_err() {
                        return;
                    }
                    from_cache = true;
                    backoff.reset();
                    rv
                }
                Err(e) => {
                    metrics.watch_restarts.inc();
                    let wait = backoff.delay();
                    warn!("{e}; listing again in {wait:?}");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            },
        };
        let mut last = rv.clone();
        let stream = match api.watch(&WatchParams::default(), &rv).await {
            Ok(s) => s,
            Err(e) => {
                metrics.watch_restarts.inc();
                if is_gone(&e) {
                    warn!("watching nodes from resourceVersion {rv}: {e}; listing again");
                    from_cache = false;
                } else {
                    let wait = backoff.delay();
                    warn!("watching nodes: {e}; resuming in {wait:?}");
                    tokio::time::sleep(wait).await;
                    version = Some(rv);
                }
                continue;
            }
        };
        let mut stream = std::pin::pin!(stream.into_stream());
        // Whether the watch ended in a way that needs a new listing, or broke.
        let (mut relist, mut broke) = (false, false);
        let (started, mut events) = (std::time::Instant::now(), 0usize);
        while let Some(ev) = stream.next().await {
            events += 1;
            let out = match ev {
                Ok(WatchEvent::Added(n)) | Ok(WatchEvent::Modified(n)) => {
                    backoff.reset();
                    last = n.metadata.resource_version.clone().unwrap_or(last);
                    match node_lease(&n, &keys) {
                        Some(l) => LeaseEvent::Added(l),
                        None => match lease_key_of(&n) {
                            Some(s) => LeaseEvent::Removed(s),
                            None => continue,
                        },
                    }
                }
                Ok(WatchEvent::Deleted(n)) => {
                    last = n.metadata.resource_version.clone().unwrap_or(last);
                    match lease_key_of(&n) {
                        Some(s) => LeaseEvent::Removed(s),
                        None => continue,
                    }
                }
                Ok(WatchEvent::Bookmark(b)) => {
                    last = b.metadata.resource_version;
                    continue;
                }
                Ok(WatchEvent::Error(s)) => {
                    metrics.watch_restarts.inc();
                    relist = s.code == 410;
                    broke = !relist;
                    warn!(
                        "watching nodes: {} ({}); {}",
                        s.message,
                        s.code,
                        if relist { "listing again" } else { "resuming" }
                    );
                    break;
                }
                Err(e) => {
                    metrics.watch_restarts.inc();
                    relist = is_gone(&e);
                    broke = !relist;
                    warn!("watching nodes: {e}; resuming");
                    break;
                }
            };
            if tx.send(out).await.is_err() {
                return;
            }
        }
        if relist {
            from_cache = false;
        } else {
            // The server ended the watch (its timeout) or it broke: resume where it was.
            // A watch that ends at once with nothing (a proxy cutting it) is not
            // re-opened in a tight loop either.
            version = Some(last);
            if broke || (events == 0 && started.elapsed() < QUICK_END) {
                tokio::time::sleep(backoff.delay()).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}
