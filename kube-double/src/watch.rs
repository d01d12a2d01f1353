//! Watch streams: newline-delimited `{"type": …, "object": …}` events over a chunked
//! response, replayed from history after the requested resourceVersion, then live.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};

use crate::Shared;
use crate::select::Selector;
use crate::store::{Change, EventType, Kind};

/// Where a watch starts.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// Synthetic ADDED events for what exists now, then changes (`resourceVersion` unset or
    /// "0", or `sendInitialEvents=true`).
    Initial { end_bookmark: bool },
    /// Changes after this resourceVersion.
    After(u64),
}

#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub start: Start,
    pub bookmarks: bool,
    pub timeout: Duration,
}

fn line(event: &str, object: &Value) -> Result<Bytes, Infallible> {
    let mut buf = serde_json::to_vec(&json!({"type": event, "object": object})).unwrap_or_default();
    buf.push(b'\n');
    Ok(Bytes::from(buf))
}

fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"kind": kind.kind(), "apiVersion": "v1", "metadata": meta})
}

/// The event (if any) a change means to this watcher: objects moving into or out of the
/// selector show up as ADDED or DELETED, as the apiserver does it.
fn translate<'a>(req: &WatchRequest, change: &'a Change) -> Option<(&'static str, &'a Value)> {
    if change.key.kind != req.kind
        || req
            .namespace
            .as_deref()
            .is_some_and(|ns| ns != change.key.namespace)
    {
        return None;
    }
    let was = change
        .prev
        .as_deref()
        .is_some_and(|p| req.selector.matches(p));
    let is = change.event != EventType::Deleted && req.selector.matches(&change.obj);
    let event = match (change.event, was, is) {
        (EventType::Deleted, true, _) => EventType::Deleted,
        (_, false, true) => EventType::Added,
        (_, true, true) => EventType::Modified,
        (_, true, false) => EventType::Deleted,
        _ => return None,
    };
    Some((event.as_str(), &change.obj))
}

/// Waits while watches hang; false when every watch is to end meanwhile.
async fn released(
    hang: &mut tokio::sync::watch::Receiver<bool>,
    epoch: &mut tokio::sync::watch::Receiver<u64>,
) -> bool {
    loop {
        if !*hang.borrow_and_update() {
            return true;
        }
        tokio::select! {
            changed = hang.changed() => if changed.is_err() { return true },
            _ = epoch.changed() => return false,
        }
    }
}

pub fn stream(
    shared: Arc<Shared>,
    req: WatchRequest,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    async_stream::stream! {
        let mut rv_rx = shared.rv_tx.subscribe();
        let mut epoch_rx = shared.epoch.subscribe();
        epoch_rx.borrow_and_update();
        let mut hang_rx = shared.hang.subscribe();
        let deadline = tokio::time::Instant::now() + req.timeout;
        let mut cursor = match req.start {
            Start::After(rv) => rv,
            Start::Initial { end_bookmark } => {
                if !released(&mut hang_rx, &mut epoch_rx).await {
                    return;
                }
                let (objects, rv) = {
                    let db = shared.db();
                    let objects = db.snapshot(req.kind, req.namespace.as_deref(), None);
                    (objects.unwrap_or_default(), db.rv())
                };
                for obj in objects.iter().filter(|o| req.selector.matches(o)) {
                    yield line("ADDED", obj);
                }
                if end_bookmark {
                    yield line("BOOKMARK", &bookmark(req.kind, rv, true));
                }
                rv
            }
        };
        let mut ticker = tokio::time::interval(shared.bookmark_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            // A hung watch sends nothing, not even its end at the timeout.
            if !released(&mut hang_rx, &mut epoch_rx).await {
                break;
            }
            rv_rx.borrow_and_update();
            let changes = {
                let db = shared.db();
                db.changes_since(cursor).map(|c| (c, db.rv()))
            };
            match changes {
                Ok((changes, now)) => {
                    for change in &changes {
                        if let Some((event, obj)) = translate(&req, change) {
                            yield line(event, obj);
                        }
                    }
                    cursor = now;
                }
                Err(err) => {
                    shared.stats.expired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(kind = req.kind.kind(), cursor, "watch expired: {}", err.message);
                    yield line("ERROR", &err.status());
                    break;
                }
            }
            tokio::select! {
                changed = rv_rx.changed() => if changed.is_err() { break },
                _ = epoch_rx.changed() => break,
                _ = tokio::time::sleep_until(deadline) => if !*hang_rx.borrow() { break },
                _ = hang_rx.changed() => {}
                _ = ticker.tick(), if req.bookmarks => {
                    shared.stats.bookmarks.fetch_add(1, Ordering::Relaxed);
                    yield line("BOOKMARK", &bookmark(req.kind, cursor, false));
                }
            }
        }
    }
}
