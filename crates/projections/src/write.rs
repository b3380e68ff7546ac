//! Set-based writes: a projection folds a batch in memory and then writes each table with one
//! statement, whatever the number of rows (rows travel as one JSON array and PostgreSQL turns it
//! into typed records with `jsonb_populate_recordset`), and keeps the folded states of its
//! entities in [`States`], loaded in one query and saved in one.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::ProjectionError;
use crate::bookings::Tracked;

/// Rows per statement: bounds the size of one message, not the number of statements per batch
/// in the live path (batches are smaller).
const CHUNK: usize = 5_000;

/// How rows go into one table.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// The columns written; every row is a JSON object with (at most) these keys.
    pub columns: &'static [&'static str],
    /// The conflict target; empty: plain inserts.
    pub key: &'static [&'static str],
    /// Columns that keep their stored value on a key conflict; every other column is
    /// overwritten.
    pub keep: &'static [&'static str],
}

impl Table {
    fn sql(&self, fresh: bool) -> String {
        let cols = self.columns.join(", ");
        let mut sql = format!(
            "INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{t}, $1)",
            t = self.name
        );
        if !self.key.is_empty() && !fresh {
            let sets: Vec<String> = self
                .columns
                .iter()
                .filter(|c| !self.key.contains(c) && !self.keep.contains(c))
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            sql.push_str(&format!(" ON CONFLICT ({}) DO ", self.key.join(", ")));
            if sets.is_empty() {
                sql.push_str("NOTHING");
            } else {
                sql.push_str(&format!("UPDATE SET {}", sets.join(", ")));
            }
        }
        sql
    }

    /// Writes `rows` (JSON objects) in as few statements as the chunk size allows. `fresh`: the
    /// table is a rebuild's copy, written once per key and indexed afterwards (plain inserts).
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        fresh: bool,
        rows: Vec<Value>,
    ) -> Result<(), ProjectionError> {
        if rows.is_empty() {
            return Ok(());
        }
        let sql = self.sql(fresh);
        let mut rows = rows;
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(CHUNK));
            sqlx::query(&sql)
                .bind(Value::Array(rows))
                .execute(&mut *conn)
                .await?;
            rows = rest;
        }
        Ok(())
    }
}

/// Deletes the rows of `table` whose `column` is one of `ids`, in one statement.
pub async fn delete_where(
    conn: &mut PgConnection,
    table: &str,
    column: &str,
    ids: &[Uuid],
) -> Result<(), ProjectionError> {
    if ids.is_empty() {
        return Ok(());
    }
    for chunk in ids.chunks(CHUNK) {
        sqlx::query(&format!("DELETE FROM {table} WHERE {column} = ANY($1)"))
            .bind(chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The folded states of one kind of entity (`*_states` tables), with the ones changed since the
/// last save.
pub struct States<A> {
    table: &'static str,
    map: HashMap<Uuid, Tracked<A>>,
    dirty: BTreeSet<Uuid>,
    /// A rebuild into empty tables: every state is in `map` (never load), each saved once.
    complete: bool,
}

impl<A> States<A>
where
    A: Serialize + DeserializeOwned + Default + Send,
{
    pub fn new(table: &'static str, complete: bool) -> Self {
        Self {
            table,
            map: HashMap::new(),
            dirty: BTreeSet::new(),
            complete,
        }
    }

    /// Loads the stored states of those `ids` not in memory yet, in one query.
    pub async fn load(
        &mut self,
        conn: &mut PgConnection,
        ids: impl IntoIterator<Item = Uuid>,
    ) -> Result<(), ProjectionError> {
        if self.complete {
            return Ok(());
        }
        let mut missing: Vec<Uuid> = ids
            .into_iter()
            .filter(|id| !self.map.contains_key(id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        let rows: Vec<(Uuid, Value)> = sqlx::query_as(&format!(
            "SELECT id, state FROM {} WHERE id = ANY($1)",
            self.table
        ))
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        for (id, state) in rows {
            let tracked: Tracked<A> =
                serde_json::from_value(state).map_err(|e| ProjectionError::Unhandleable {
                    position: 0,
                    event_type: self.table.into(),
                    event_version: String::new(),
                    reason: format!("stored state of {id} is unreadable: {e}"),
                })?;
            self.map.insert(id, tracked);
        }
        Ok(())
    }

    /// The state of `id` (new if unknown), marked as changed.
    pub fn change(&mut self, id: Uuid) -> &mut Tracked<A> {
        self.dirty.insert(id);
        self.map.entry(id).or_default()
    }

    pub fn get(&self, id: &Uuid) -> Option<&Tracked<A>> {
        self.map.get(id)
    }

    /// The ids changed since the last [`States::save`], in order.
    pub fn changed(&self) -> Vec<Uuid> {
        self.dirty.iter().copied().collect()
    }

    /// Saves the changed states in one statement (per chunk) and forgets which changed.
    pub async fn save(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let mut ids = Vec::with_capacity(self.dirty.len());
        let mut states = Vec::with_capacity(self.dirty.len());
        for id in std::mem::take(&mut self.dirty) {
            if let Some(t) = self.map.get(&id) {
                // Straight to text (PostgreSQL parses it once), no intermediate JSON tree.
                let json = serde_json::to_string(t).map_err(|e| ProjectionError::Unhandleable {
                    position: t.last_position,
                    event_type: self.table.into(),
                    event_version: String::new(),
                    reason: e.to_string(),
                })?;
                ids.push(id);
                states.push(json);
            }
        }
        for (ids, states) in ids.chunks(CHUNK).zip(states.chunks(CHUNK)) {
            let upsert = if self.complete {
                ""
            } else {
                " ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state"
            };
            sqlx::query(&format!(
                "INSERT INTO {} (id, state) SELECT i, s::jsonb FROM unnest($1::uuid[], $2::text[]) AS u(i, s){upsert}",
                self.table
            ))
            .bind(ids)
            .bind(states)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}
