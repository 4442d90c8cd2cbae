//! Idle connections kept between rounds when `KUBENURSE_REUSE_CONNECTIONS=true`: one per
//! target. Keyed by the target's type as well as its address, so a connection opened without
//! verification for one target never carries another target's token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::connection::Connection;
use super::model::Target;
use crate::sync::lock;

#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<String, Connection>>,
}

impl Pool {
    /// The idle connection of `target`, if it is still open.
    pub(super) fn take(&self, target: &Target) -> Option<Connection> {
        let conn = lock(&self.idle).remove(&key(target))?;
        conn.is_open().then_some(conn)
    }

    pub(super) fn put(&self, target: &Target, conn: Connection) {
        lock(&self.idle).insert(key(target), conn);
    }

    /// Drops idle connections of targets that are no longer probed.
    pub(super) fn retain(&self, targets: &[Arc<Target>]) {
        lock(&self.idle).retain(|k, _| targets.iter().any(|t| key(t) == *k));
    }
}

/// A target's type, scheme and authority.
fn key(target: &Target) -> String {
    let url = &target.url;
    format!("{} {}://{}", target.kind, url.scheme_str().unwrap_or("http"), url.authority().map_or("", |a| a.as_str()))
}
