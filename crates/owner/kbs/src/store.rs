//! The persistent store (redb): resources, policies, reference values and
//! trusted software-TEE roots. Every write is one redb transaction committed
//! with immediate durability, so an acknowledged write survives `kill -9`.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const REFERENCE_VALUES: TableDefinition<&str, &str> = TableDefinition::new("reference_values");

/// Keys of the SETTINGS table.
pub const ATTESTATION_POLICY: &str = "attestation-policy";
pub const RESOURCE_POLICY: &str = "resource-policy";
pub const SOFTWARE_TEE_ROOTS: &str = "software-tee-roots";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        let db =
            Database::create(path).map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        // Create the tables so that reads never meet a missing table.
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(RESOURCES).map_err(err)?;
        txn.open_table(SETTINGS).map_err(err)?;
        txn.open_table(REFERENCE_VALUES).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Store { db })
    }

    fn put<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        table: TableDefinition<K, V>,
        key: K::SelfType<'_>,
        value: V::SelfType<'_>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(table).map_err(err)?;
            t.insert(key, value).map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    pub fn set_resource(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(RESOURCES, path, value)
    }

    pub fn resource(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(RESOURCES).map_err(err)?;
        Ok(t.get(path).map_err(err)?.map(|v| v.value().to_vec()))
    }

    pub fn delete_resource(&self, path: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(err)?;
        let existed = {
            let mut t = txn.open_table(RESOURCES).map_err(err)?;
            let removed = t.remove(path).map_err(err)?;
            removed.is_some()
        };
        txn.commit().map_err(err)?;
        Ok(existed)
    }

    pub fn set_setting(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put(SETTINGS, key, value)
    }

    pub fn setting(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(SETTINGS).map_err(err)?;
        Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    pub fn set_reference_values(&self, name: &str, values_json: &str) -> Result<(), StoreError> {
        self.put(REFERENCE_VALUES, name, values_json)
    }

    /// All reference values as one JSON object `{name: [values]}`.
    pub fn reference_values(&self) -> Result<serde_json::Value, StoreError> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(REFERENCE_VALUES).map_err(err)?;
        let mut out = serde_json::Map::new();
        for entry in t.iter().map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let value: serde_json::Value = serde_json::from_str(v.value()).map_err(err)?;
            out.insert(k.value().to_string(), value);
        }
        Ok(serde_json::Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn values_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kbs.redb");
        {
            let store = Store::open(&path).unwrap();
            store.set_resource("default/key/1", b"secret").unwrap();
            store
                .set_reference_values("measurement", r#"["ab"]"#)
                .unwrap();
            store.set_setting(RESOURCE_POLICY, b"package x").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.resource("default/key/1").unwrap().unwrap(), b"secret");
        assert_eq!(store.resource("default/key/2").unwrap(), None);
        assert_eq!(
            store.reference_values().unwrap(),
            serde_json::json!({"measurement": ["ab"]})
        );
        assert!(store.delete_resource("default/key/1").unwrap());
        assert!(!store.delete_resource("default/key/1").unwrap());
    }
}
