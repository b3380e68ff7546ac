//! Set-based writes: a projection folds a batch in memory and then writes each table with one
//! statement, whatever the number of rows (rows travel as one JSON array and PostgreSQL turns it
//! into typed records with `jsonb_populate_recordset`), and keeps the folded states of its
//! entities in [`States`], loaded in one query and saved in one. A rebuild writes its empty,
//! unindexed copies with `COPY` instead ([`CopyIn`]).

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
    fn sql(&self) -> String {
        let cols = self.columns.join(", ");
        let mut sql = format!(
            "INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{t}, $1)",
            t = self.name
        );
        if !self.key.is_empty() {
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
    /// table is a rebuild's copy, written once per key and indexed afterwards (one `COPY`).
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        fresh: bool,
        rows: Vec<Value>,
    ) -> Result<(), ProjectionError> {
        if rows.is_empty() {
            return Ok(());
        }
        if fresh {
            return self.copy(conn, rows).await;
        }
        let sql = self.sql();
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

    /// `COPY`s `rows` in, each value converted as `jsonb_populate_recordset` would (the live
    /// path): JSON text into `json`/`jsonb` columns, PostgreSQL array literals into array columns,
    /// a JSON string's content, a number's or a nested value's JSON text into the rest, and a
    /// missing key or `null` as NULL. (An object, or a number in exponent notation, going into
    /// a text column would be written as serde's JSON text, not jsonb's; no table has one.)
    async fn copy(&self, conn: &mut PgConnection, rows: Vec<Value>) -> Result<(), ProjectionError> {
        let kinds: Vec<(String, String)> = sqlx::query_as(
            "SELECT a.attname::text, \
                    CASE WHEN coalesce(nullif(t.typbasetype, 0), a.atttypid) \
                              IN ('json'::regtype, 'jsonb'::regtype) THEN 'json' \
                         WHEN t.typcategory = 'A' THEN 'array' ELSE 'plain' END \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(self.name)
        .fetch_all(&mut *conn)
        .await?;
        let kinds: HashMap<String, String> = kinds.into_iter().collect();
        let columns: Vec<(&str, &str)> = self
            .columns
            .iter()
            .map(|c| (*c, kinds.get(*c).map_or("plain", String::as_str)))
            .collect();
        let mut copy = CopyIn::start(conn, self.name, self.columns).await?;
        for row in &rows {
            for (column, kind) in &columns {
                let value = row.get(*column).unwrap_or(&Value::Null);
                match (*kind, value) {
                    (_, Value::Null) => copy.rows.null(),
                    ("json", v) => copy.rows.json(v)?,
                    ("array", Value::Array(items)) => {
                        let mut literal = String::new();
                        array_literal(&mut literal, items);
                        copy.rows.text(&literal)
                    }
                    (_, Value::String(s)) => copy.rows.text(s),
                    // (As text: what a text column gets from the live path, too.)
                    (_, Value::Bool(b)) => copy.rows.text(if *b { "true" } else { "false" }),
                    (_, v) => copy.rows.json(v)?,
                }
            }
            copy.rows.end_row();
            copy.send_some().await?;
        }
        copy.finish().await
    }
}

/// A PostgreSQL array literal of JSON values (`{"a","b",NULL}`), as `jsonb_populate_record`
/// makes of a JSON array.
fn array_literal(out: &mut String, items: &[Value]) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => array_literal(out, inner),
            Value::String(s) => quoted(out, s),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            v => quoted(out, &v.to_string()),
        }
    }
    out.push('}');
}

fn quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Rows in the text format of `COPY ... FROM STDIN`: fields separated by tabs, rows by
/// newlines, `\N` for NULL, and backslash, tab, newline and carriage return escaped.
pub struct CopyText {
    buf: Vec<u8>,
    /// A field of the current row was written (the next one needs a separator).
    in_row: bool,
}

impl CopyText {
    fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            in_row: false,
        }
    }

    fn separate(&mut self) {
        if std::mem::replace(&mut self.in_row, true) {
            self.buf.push(b'\t');
        }
    }

    pub fn null(&mut self) {
        self.separate();
        self.buf.extend_from_slice(b"\\N");
    }

    /// A field's text, escaped.
    pub fn text(&mut self, s: &str) {
        self.separate();
        escape_into(&mut self.buf, s.as_bytes());
    }

    /// A field holding `value`'s JSON text, serialized straight into the buffer.
    pub fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ProjectionError> {
        self.separate();
        serde_json::to_writer(Escaping(&mut self.buf), value)
            .map_err(|e| copy_failed(e.to_string()))
    }

    /// A field written with `Display` (numbers, uuids: nothing to escape).
    pub fn display(&mut self, value: impl std::fmt::Display) {
        use std::io::Write;
        self.separate();
        // Writing into a Vec cannot fail.
        let _ = write!(self.buf, "{value}");
    }

    pub fn end_row(&mut self) {
        self.buf.push(b'\n');
        self.in_row = false;
    }
}

fn escape_into(buf: &mut Vec<u8>, bytes: &[u8]) {
    let special = |b: &u8| matches!(b, b'\\' | b'\t' | b'\n' | b'\r');
    if !bytes.iter().any(special) {
        buf.extend_from_slice(bytes);
        return;
    }
    for b in bytes {
        match b {
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b => buf.push(*b),
        }
    }
}

/// Escapes what is written through it into a COPY text field.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::io::Write for Escaping<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        escape_into(self.0, bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A `COPY ... FROM STDIN` in progress: rows are encoded into [`CopyIn::rows`] and sent a
/// megabyte at a time, so PostgreSQL parses while the next rows are encoded.
pub struct CopyIn<'c> {
    copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
    pub rows: CopyText,
}

const COPY_SEND: usize = 1 << 20;

impl<'c> CopyIn<'c> {
    pub async fn start(
        conn: &'c mut PgConnection,
        table: &str,
        columns: &[&str],
    ) -> Result<Self, ProjectionError> {
        let copy = conn
            .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN", columns.join(", ")))
            .await?;
        Ok(Self {
            copy,
            rows: CopyText::with_capacity(COPY_SEND + COPY_SEND / 4),
        })
    }

    /// Sends the encoded rows once there is a megabyte of them.
    pub async fn send_some(&mut self) -> Result<(), ProjectionError> {
        if self.rows.buf.len() >= COPY_SEND {
            self.copy.send(self.rows.buf.as_slice()).await?;
            self.rows.buf.clear();
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(), ProjectionError> {
        if !self.rows.buf.is_empty() {
            self.copy.send(self.rows.buf.as_slice()).await?;
        }
        self.copy.finish().await?;
        Ok(())
    }
}

/// A `COPY ... FROM STDIN` on a connection of its own, run by a task of its own: the caller
/// encodes rows into [`CopyStream::rows`] and goes on computing while PostgreSQL takes in the
/// rows before (a megabyte at a time, at most four megabytes ahead).
pub struct CopyStream {
    pub rows: CopyText,
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    /// Until it is awaited; a stream dropped before [`CopyStream::finish`] (its session failed)
    /// aborts the task, and with it the `COPY`, instead of committing what it got so far.
    task: Option<tokio::task::JoinHandle<Result<PgConnection, ProjectionError>>>,
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl CopyStream {
    pub fn start(
        mut conn: PgConnection,
        table: &'static str,
        columns: &'static [&'static str],
    ) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let task = tokio::spawn(async move {
            let mut copy = CopyIn::start(&mut conn, table, columns).await?;
            while let Some(rows) = rx.recv().await {
                copy.copy.send(rows.as_slice()).await?;
            }
            copy.finish().await?;
            Ok(conn)
        });
        Self {
            rows: CopyText::with_capacity(COPY_SEND + COPY_SEND / 4),
            tx,
            task: Some(task),
        }
    }

    /// Hands the encoded rows to the writer once there is a megabyte of them.
    pub async fn send_some(&mut self) -> Result<(), ProjectionError> {
        if self.rows.buf.len() < COPY_SEND {
            return Ok(());
        }
        let rows = std::mem::replace(
            &mut self.rows.buf,
            Vec::with_capacity(COPY_SEND + COPY_SEND / 4),
        );
        if self.tx.send(rows).await.is_ok() {
            return Ok(());
        }
        // The writer stopped on an error: that error.
        match self.finish_task().await {
            Err(e) => Err(e),
            Ok(_) => Err(copy_failed("the COPY writer stopped early".into())),
        }
    }

    /// Sends the rest, ends the `COPY` and gives the connection back.
    pub async fn finish(mut self) -> Result<PgConnection, ProjectionError> {
        if !self.rows.buf.is_empty() {
            let rows = std::mem::take(&mut self.rows.buf);
            // On a send error the writer has stopped, and its task says why.
            let _ = self.tx.send(rows).await;
        }
        self.finish_task().await
    }

    async fn finish_task(&mut self) -> Result<PgConnection, ProjectionError> {
        // Closing the channel ends the writer's loop.
        let (closed, _) = tokio::sync::mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, closed));
        let Some(task) = self.task.take() else {
            return Err(copy_failed("the COPY writer was already stopped".into()));
        };
        task.await
            .map_err(|e| copy_failed(format!("the COPY writer failed: {e}")))?
    }
}

fn copy_failed(reason: String) -> ProjectionError {
    ProjectionError::Unhandleable {
        position: 0,
        event_type: "copy".into(),
        event_version: String::new(),
        reason,
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
        let rows: Vec<(Uuid, String)> = sqlx::query_as(&format!(
            "SELECT id, state FROM {} WHERE id = ANY($1)",
            self.table
        ))
        .bind(&missing)
        .fetch_all(&mut *conn)
        .await?;
        for (id, state) in rows {
            let tracked: Tracked<A> =
                serde_json::from_str(&state).map_err(|e| ProjectionError::Unhandleable {
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

    /// Writes the changed states with one `COPY`: a rebuild's empty, unindexed table, each
    /// state written once.
    pub async fn copy_changed(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let mut copy = CopyIn::start(conn, self.table, &["id", "state"]).await?;
        for id in &self.dirty {
            if let Some(t) = self.map.get(id) {
                copy.rows.display(id);
                copy.rows.json(t)?;
                copy.rows.end_row();
                copy.send_some().await?;
            }
        }
        copy.finish().await
    }

    /// Saves the changed states in one statement (per chunk) and forgets which changed.
    pub async fn save(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        if self.complete {
            self.copy_changed(conn).await?;
            self.dirty.clear();
            return Ok(());
        }
        let mut ids = Vec::with_capacity(self.dirty.len());
        let mut states = Vec::with_capacity(self.dirty.len());
        for id in std::mem::take(&mut self.dirty) {
            if let Some(t) = self.map.get(&id) {
                // Straight to text (stored as is), no intermediate JSON tree.
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
            sqlx::query(&format!(
                "INSERT INTO {} (id, state) SELECT * FROM unnest($1::uuid[], $2::text[]) \
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state",
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
