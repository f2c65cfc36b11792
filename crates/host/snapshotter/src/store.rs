//! Snapshot metadata in redb: one record per snapshot key. Every change is
//! one write transaction, checked inside it, so an acknowledged change
//! survives a crash and concurrent requests cannot interleave.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::SnapshotError;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory; never reused.
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// (bytes, inodes) of a committed snapshot, measured at commit.
    pub usage: Option<(i64, i64)>,
    /// A layer the guest pulls: committed for containerd, empty on the host.
    pub guest_pulled: bool,
}

fn store_error(e: impl Into<redb::Error>) -> SnapshotError {
    SnapshotError::Store(e.into().to_string())
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes)
        .map_err(|e| SnapshotError::Store(format!("record of {key:?} is unreadable: {e}")))
}

fn encode(record: &Record) -> Result<Vec<u8>, SnapshotError> {
    serde_json::to_vec(record).map_err(|e| SnapshotError::Store(e.to_string()))
}

pub struct Store {
    db: Database,
}

type Table<'t> = redb::Table<'t, &'static str, &'static [u8]>;

fn get(table: &Table<'_>, key: &str) -> Result<Option<Record>, SnapshotError> {
    match table.get(key).map_err(store_error)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, SnapshotError> {
        let db = Database::create(path).map_err(store_error)?;
        let tx = db.begin_write().map_err(store_error)?;
        tx.open_table(SNAPSHOTS).map_err(store_error)?;
        tx.open_table(COUNTERS).map_err(store_error)?;
        tx.commit().map_err(store_error)?;
        Ok(Store { db })
    }

    /// A fresh directory id (ids are never reused, even after a crash).
    pub fn next_id(&self) -> Result<u64, SnapshotError> {
        self.write(|_, counters| {
            let id = counters
                .get(NEXT_ID)
                .map_err(store_error)?
                .map(|v| v.value())
                .unwrap_or(1);
            counters.insert(NEXT_ID, id + 1).map_err(store_error)?;
            Ok(id)
        })
    }

    fn write<T>(
        &self,
        f: impl FnOnce(
            &mut Table<'_>,
            &mut redb::Table<'_, &'static str, u64>,
        ) -> Result<T, SnapshotError>,
    ) -> Result<T, SnapshotError> {
        let tx = self.db.begin_write().map_err(store_error)?;
        let out = {
            let mut snapshots = tx.open_table(SNAPSHOTS).map_err(store_error)?;
            let mut counters = tx.open_table(COUNTERS).map_err(store_error)?;
            f(&mut snapshots, &mut counters)?
        };
        tx.commit().map_err(store_error)?;
        Ok(out)
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let tx = self.db.begin_read().map_err(store_error)?;
        let table = tx.open_table(SNAPSHOTS).map_err(store_error)?;
        match table.get(key).map_err(store_error)? {
            Some(v) => decode(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    pub fn all(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let tx = self.db.begin_read().map_err(store_error)?;
        let table = tx.open_table(SNAPSHOTS).map_err(store_error)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(store_error)? {
            let (k, v) = item.map_err(store_error)?;
            out.push((k.value().to_string(), decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Adds `key` if it is new and its parent (if any) is committed.
    pub fn insert(&self, key: &str, record: &Record) -> Result<(), SnapshotError> {
        self.write(|table, _| {
            if get(table, key)?.is_some() {
                return Err(SnapshotError::AlreadyExists(key.to_string()));
            }
            if !record.parent.is_empty() {
                match get(table, &record.parent)? {
                    Some(p) if p.kind == Kind::Committed => {}
                    Some(_) => {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "parent {:?} of {key:?} is not committed",
                            record.parent
                        )))
                    }
                    None => return Err(SnapshotError::NotFound(record.parent.clone())),
                }
            }
            table
                .insert(key, encode(record)?.as_slice())
                .map_err(store_error)?;
            Ok(())
        })
    }

    /// Turns active `key` (directory `id`, whose usage was measured) into
    /// committed `name` with `labels`.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        id: u64,
        labels: HashMap<String, String>,
        usage: (i64, i64),
    ) -> Result<(), SnapshotError> {
        self.write(|table, _| {
            let mut record = get(table, key)?.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            if record.id != id {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} was replaced while it was being committed"
                )));
            }
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            if get(table, name)?.is_some() {
                return Err(SnapshotError::AlreadyExists(name.to_string()));
            }
            record.kind = Kind::Committed;
            record.labels = labels;
            record.usage = Some(usage);
            record.updated = SystemTime::now();
            table.remove(key).map_err(store_error)?;
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(store_error)?;
            Ok(())
        })
    }

    /// Applies `change` to `key`'s record.
    pub fn update(
        &self,
        key: &str,
        change: impl FnOnce(&mut Record) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        self.write(|table, _| {
            let mut record = get(table, key)?.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            change(&mut record)?;
            record.updated = SystemTime::now();
            table
                .insert(key, encode(&record)?.as_slice())
                .map_err(store_error)?;
            Ok(record)
        })
    }

    /// Removes `key` unless another snapshot builds on it.
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        self.write(|table, _| {
            let record = get(table, key)?.ok_or_else(|| SnapshotError::NotFound(key.into()))?;
            for item in table.iter().map_err(store_error)? {
                let (k, v) = item.map_err(store_error)?;
                if decode(k.value(), v.value())?.parent == key {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "snapshot {key:?} has a child ({:?}); remove it first",
                        k.value()
                    )));
                }
            }
            table.remove(key).map_err(store_error)?;
            Ok(record)
        })
    }
}
