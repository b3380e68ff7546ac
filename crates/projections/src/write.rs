//! Set-based writes: a projection folds a batch in memory and then writes each table with one
//! statement, whatever the number of rows (rows travel as one JSON array and PostgreSQL turns it
//! into typed records with `jsonb_populate_recordset`), and keeps the folded states of its
//! entities in [`States`], loaded in one query and saved in one. A rebuild writes its empty,
//! unindexed copies with `COPY` instead ([`CopyIn`]): JSON rows in text format, converted as
//! `jsonb_populate_recordset` would ([`CopyText`]); the large tables' rows by one function per
//! table into a [`Row`], which is the live path's JSON object or a rebuild's binary `COPY` row,
//! each typed [`Field`] in PostgreSQL's binary form for its column's [`Kind`]
//! ([`Table::write_each`], [`CopyRows`]).

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
        let mut copy = CopyIn::text(conn, self.name, self.columns).await?;
        for row in &rows {
            for (column, kind) in &columns {
                let value = row.get(*column).unwrap_or(&Value::Null);
                copy.rows.value(kind, value)?;
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

    /// A field holding `value`'s JSON text: serialized at the end of the buffer, then escaped
    /// in place (one pass over the text rather than one call per token serde writes).
    pub fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ProjectionError> {
        self.separate();
        let start = self.buf.len();
        serde_json::to_writer(&mut self.buf, value).map_err(|e| copy_failed(e.to_string()))?;
        if self.buf[start..].iter().any(special) {
            let json = self.buf.split_off(start);
            escape_into(&mut self.buf, &json);
        }
        Ok(())
    }

    /// A field holding a JSON value, converted as `jsonb_populate_recordset` converts it for a
    /// column of this kind (`json`, `array` or `plain`: see `Table::copy`).
    pub fn value(&mut self, kind: &str, value: &Value) -> Result<(), ProjectionError> {
        match (kind, value) {
            (_, Value::Null) => self.null(),
            ("json", v) => self.json(v)?,
            ("array", Value::Array(items)) => {
                let mut literal = String::new();
                array_literal(&mut literal, items);
                self.text(&literal)
            }
            (_, Value::String(s)) => self.text(s),
            // (As text: what a text column gets from the live path, too.)
            (_, Value::Bool(b)) => self.text(if *b { "true" } else { "false" }),
            (_, v) => self.json(v)?,
        }
        Ok(())
    }

    pub fn end_row(&mut self) {
        self.buf.push(b'\n');
        self.in_row = false;
    }
}

/// A byte that `COPY` text escapes.
fn special(b: &u8) -> bool {
    matches!(b, b'\\' | b'\t' | b'\n' | b'\r')
}

fn escape_into(buf: &mut Vec<u8>, bytes: &[u8]) {
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

/// A `COPY ... FROM STDIN` in progress: rows are encoded into [`CopyIn::rows`] (text, see
/// [`CopyText`], or binary, see [`CopyRows`]) and sent a megabyte at a time, so PostgreSQL
/// parses while the next rows are encoded.
pub struct CopyIn<'c, R> {
    copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
    pub rows: R,
}

const COPY_SEND: usize = 1 << 20;

/// The bytes of a `COPY` in one of its formats.
pub trait CopyFormat {
    fn bytes(&mut self) -> &mut Vec<u8>;
    /// What ends the data (after the last row).
    fn end(&mut self) {}
}

impl CopyFormat for CopyText {
    fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl CopyFormat for CopyRows {
    fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.out.buf
    }

    fn end(&mut self) {
        self.out.trailer();
    }
}

impl<'c> CopyIn<'c, CopyText> {
    /// A `COPY` in text format.
    pub async fn text(
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
}

impl<'c> CopyIn<'c, CopyRows> {
    /// A `COPY` in binary format: typed fields as PostgreSQL stores them, nothing for it to
    /// parse but JSON documents.
    pub async fn binary(
        conn: &'c mut PgConnection,
        table: &'static str,
        columns: &'static [&'static str],
    ) -> Result<Self, ProjectionError> {
        let rows = CopyRows::new(conn, table, columns).await?;
        let copy = conn.copy_in_raw(&rows.statement()).await?;
        Ok(Self { copy, rows })
    }
}

impl CopyIn<'_, CopyRows> {
    /// Writes the row `fields` writes (see [`CopyRows::row`]); on a row that does not fit,
    /// ends the `COPY` (nothing of it stays) and returns why.
    pub async fn row(&mut self, fields: impl FnOnce(&mut Row<'_>)) -> Result<(), ProjectionError> {
        match self.rows.row(fields) {
            Ok(true) => self.send_some().await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Ends the `COPY` with nothing written and returns `reason`. The connection is ready for
    /// the next statement unless the server had already failed the `COPY` (a value it refused
    /// in an earlier chunk): then, as after any error, the caller discards it (a rebuild's
    /// connections are detached, and dropped with its failure).
    pub async fn abort(self, reason: ProjectionError) -> ProjectionError {
        if let Err(e) = self.copy.abort(reason.to_string()).await {
            tracing::debug!(error = %e, "ending a failed COPY");
        }
        reason
    }
}

impl<R: CopyFormat> CopyIn<'_, R> {
    /// Sends the encoded rows once there is a megabyte of them.
    pub async fn send_some(&mut self) -> Result<(), ProjectionError> {
        let bytes = self.rows.bytes();
        if bytes.len() >= COPY_SEND {
            self.copy.send(bytes.as_slice()).await?;
            self.rows.bytes().clear();
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(), ProjectionError> {
        self.rows.end();
        let bytes = self.rows.bytes();
        if !bytes.is_empty() {
            self.copy.send(bytes.as_slice()).await?;
        }
        self.copy.finish().await?;
        Ok(())
    }
}

/// A binary `COPY ... FROM STDIN` on a connection of its own, run by a task of its own: the
/// caller encodes rows into [`CopyStream::rows`] and goes on computing while PostgreSQL takes in
/// the previous ones.
pub struct CopyStream {
    pub rows: CopyRows,
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
    pub async fn start(
        mut conn: PgConnection,
        table: &'static str,
        columns: &'static [&'static str],
    ) -> Result<Self, ProjectionError> {
        let rows = CopyRows::new(&mut conn, table, columns).await?;
        let statement = rows.statement();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let task = tokio::spawn(async move {
            let mut copy = conn.copy_in_raw(&statement).await?;
            while let Some(rows) = rx.recv().await {
                copy.send(rows.as_slice()).await?;
            }
            copy.finish().await?;
            Ok(conn)
        });
        Ok(Self {
            rows,
            tx,
            task: Some(task),
        })
    }

    /// Hands the encoded rows to the writer once there is a megabyte of them.
    pub async fn send_some(&mut self) -> Result<(), ProjectionError> {
        if self.rows.out.buf.len() < COPY_SEND {
            return Ok(());
        }
        let rows = std::mem::replace(
            &mut self.rows.out.buf,
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
        self.rows.end();
        let rows = std::mem::take(&mut self.rows.out.buf);
        // On a send error the writer has stopped, and its task says why.
        let _ = self.tx.send(rows).await;
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
    /// Boxed: growing the map moves pointers, not states (a booking's is about 600 bytes).
    map: HashMap<Uuid, Box<Tracked<A>>>,
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
            self.map.insert(id, Box::new(tracked));
        }
        Ok(())
    }

    /// The state of `id` (new if unknown), marked as changed.
    pub fn change(&mut self, id: Uuid) -> &mut Tracked<A> {
        self.dirty.insert(id);
        self.map.entry(id).or_default()
    }

    pub fn get(&self, id: &Uuid) -> Option<&Tracked<A>> {
        self.map.get(id).map(|t| &**t)
    }

    /// The ids changed since the last [`States::save`], in order.
    pub fn changed(&self) -> Vec<Uuid> {
        self.dirty.iter().copied().collect()
    }

    /// Writes the changed states with one `COPY`: a rebuild's empty, unindexed table, each
    /// state written once.
    pub async fn copy_changed(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let mut copy = CopyIn::binary(conn, self.table, &["id", "state"]).await?;
        for id in &self.dirty {
            let Some(t) = self.map.get(id) else { continue };
            let written = copy
                .row(|out| {
                    out.field("id", id);
                    // The same text `save` stores: serde's, straight into the `COPY`.
                    out.json_text("state", &**t);
                })
                .await;
            if let Err(e) = written {
                return Err(copy.abort(e).await);
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

/// A column's type, as far as a binary `COPY` field has to match it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Numeric,
    /// A string type (`text`, `varchar`, `citext`...) or an enum (whose binary form is its
    /// label).
    Text,
    Uuid,
    Date,
    Timestamptz,
    Json,
    Jsonb,
    /// An array of text-like elements, with the element type's oid.
    TextArray(u32),
    /// Any other type: no field writes it.
    Other,
}

impl Kind {
    /// The kinds of `columns` of `table` (as `search_path` resolves it).
    async fn of(
        conn: &mut PgConnection,
        table: &str,
        columns: &[&str],
    ) -> Result<Vec<Kind>, ProjectionError> {
        let rows: Vec<(String, String, String, String, i64, String, String)> = sqlx::query_as(
            // A domain is written as its base type (through any number of domains).
            "WITH RECURSIVE base(name, type) AS ( \
                 SELECT a.attname::text, a.atttypid FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
               UNION ALL \
                 SELECT base.name, t.typbasetype FROM base JOIN pg_type t ON t.oid = base.type \
                 WHERE t.typtype = 'd') \
             SELECT base.name, b.typname::text, b.typtype::text, b.typcategory::text, \
                    b.typelem::int8, coalesce(e.typtype::text, ''), coalesce(e.typcategory::text, '') \
             FROM base JOIN pg_type b ON b.oid = base.type AND b.typtype <> 'd' \
             LEFT JOIN pg_type e ON e.oid = b.typelem AND b.typcategory = 'A'",
        )
        .bind(table)
        .fetch_all(&mut *conn)
        .await?;
        let kinds: HashMap<String, Kind> = rows
            .into_iter()
            .map(
                |(name, typname, typtype, category, elem, elem_type, elem_category)| {
                    let kind = match (typname.as_str(), typtype.as_str(), category.as_str()) {
                        (_, "e", _) => Kind::Text,
                        ("bool", ..) => Kind::Bool,
                        ("int2", ..) => Kind::Int2,
                        ("int4", ..) => Kind::Int4,
                        ("int8", ..) => Kind::Int8,
                        ("numeric", ..) => Kind::Numeric,
                        ("uuid", ..) => Kind::Uuid,
                        ("date", ..) => Kind::Date,
                        ("timestamptz", ..) => Kind::Timestamptz,
                        ("json", ..) => Kind::Json,
                        ("jsonb", ..) => Kind::Jsonb,
                        // text, varchar, char(n), citext, name: binary as text.
                        (_, _, "S") => Kind::Text,
                        (_, _, "A") if elem_type == "e" || elem_category == "S" => {
                            Kind::TextArray(u32::try_from(elem).unwrap_or(0))
                        }
                        _ => Kind::Other,
                    };
                    (name, kind)
                },
            )
            .collect();
        columns
            .iter()
            .map(|c| {
                kinds
                    .get(*c)
                    .copied()
                    .ok_or_else(|| copy_failed(format!("{table} has no column {c}")))
            })
            .collect()
    }
}

/// Rows in the binary format of `COPY ... FROM STDIN`: a header, then per row the number of
/// fields and each field's length and bytes (-1: NULL), then a trailer.
pub struct CopyBinary {
    buf: Vec<u8>,
    fields: i16,
    in_row: bool,
}

impl CopyBinary {
    fn new(fields: usize) -> Self {
        let mut buf = Vec::with_capacity(COPY_SEND + COPY_SEND / 4);
        // Signature, flags, length of the header extension.
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes());
        buf.extend_from_slice(&0i32.to_be_bytes());
        Self {
            buf,
            fields: i16::try_from(fields).unwrap_or(i16::MAX),
            in_row: false,
        }
    }

    fn start_field(&mut self) {
        if !std::mem::replace(&mut self.in_row, true) {
            self.buf.extend_from_slice(&self.fields.to_be_bytes());
        }
    }

    pub fn null(&mut self) {
        self.start_field();
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    pub fn bytes(&mut self, bytes: &[u8]) {
        self.start_field();
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// A field whose bytes `write` appends (its length is filled in afterwards).
    pub fn sized<T>(&mut self, write: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        self.start_field();
        let at = self.buf.len();
        self.buf.extend_from_slice(&0i32.to_be_bytes());
        let result = write(&mut self.buf);
        let len = (self.buf.len() - at - 4) as i32;
        self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
        result
    }

    fn end_row(&mut self) {
        self.in_row = false;
    }

    fn trailer(&mut self) {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
    }
}

/// The rows of one binary `COPY`: each written by a function of `Row`s, checked against the
/// table's columns (order and kinds) as it goes.
pub struct CopyRows {
    out: CopyBinary,
    table: &'static str,
    columns: &'static [&'static str],
    kinds: Vec<Kind>,
}

impl CopyRows {
    async fn new(
        conn: &mut PgConnection,
        table: &'static str,
        columns: &'static [&'static str],
    ) -> Result<Self, ProjectionError> {
        Ok(Self {
            out: CopyBinary::new(columns.len()),
            table,
            columns,
            kinds: Kind::of(conn, table, columns).await?,
        })
    }

    fn statement(&self) -> String {
        format!(
            "COPY {} ({}) FROM STDIN WITH (FORMAT binary)",
            self.table,
            self.columns.join(", ")
        )
    }

    /// Writes the row `fields` writes: `Ok(false)` if it writes no field (no row), an error
    /// (and nothing written) if it writes fewer or other columns, or a value of another kind.
    pub fn row(&mut self, fields: impl FnOnce(&mut Row<'_>)) -> Result<bool, ProjectionError> {
        let mark = self.out.buf.len();
        let mut out = Row::Copy {
            out: &mut self.out,
            columns: self.columns,
            kinds: &self.kinds,
            next: 0,
            wrong: None,
        };
        fields(&mut out);
        let Row::Copy { next, wrong, .. } = out else {
            return Ok(false);
        };
        if next == 0 && wrong.is_none() {
            return Ok(false);
        }
        if wrong.is_some() || next != self.columns.len() {
            self.out.buf.truncate(mark);
            self.out.in_row = false;
            return Err(copy_failed(format!(
                "a row of {} wrote {next} of {} columns: {}",
                self.table,
                self.columns.len(),
                wrong.unwrap_or_else(|| "too few".into())
            )));
        }
        self.out.end_row();
        Ok(true)
    }
}

/// A read-model column's value, written alike by both paths: into the JSON object the live path
/// binds (`jsonb_populate_recordset` converts it with the column type's text input) and
/// straight into a rebuild's binary `COPY`, as the value that conversion gives.
pub trait Field: Serialize {
    /// Whether a value of this type can go into a column of `kind` (checked for NULLs too, so
    /// a wrong mapping fails on the first row, not on the first row with a value).
    fn fits(kind: Kind) -> bool;

    /// Writes the value for a column of `kind`; the kind back if it cannot go there.
    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind>;
}

/// Days between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i64 = 10_957;

/// An integer into an integer, numeric or text column (out of range: an error, as in
/// PostgreSQL).
fn integer(value: i64, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
    match kind {
        Kind::Int2 => out.bytes(&i16::try_from(value).map_err(|_| kind)?.to_be_bytes()),
        Kind::Int4 => out.bytes(&i32::try_from(value).map_err(|_| kind)?.to_be_bytes()),
        Kind::Int8 => out.bytes(&value.to_be_bytes()),
        Kind::Numeric => numeric(&rust_decimal::Decimal::from(value), out),
        Kind::Text => out.bytes(value.to_string().as_bytes()),
        _ => return Err(kind),
    }
    Ok(())
}

macro_rules! integer_fields {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn fits(kind: Kind) -> bool {
                matches!(kind, Kind::Int2 | Kind::Int4 | Kind::Int8 | Kind::Numeric | Kind::Text)
            }

            fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
                integer(i64::from(*self), out, kind)
            }
        }
    )*};
}
integer_fields!(i64, i32, i16, u32);

/// `numeric`'s binary form: base-10000 digits, the weight of the first, sign and display
/// scale (the decimal's own, as `numeric_in` keeps it; the column's type modifier is applied
/// by PostgreSQL on both paths).
fn numeric(d: &rust_decimal::Decimal, out: &mut CopyBinary) {
    let scale = d.scale() as usize;
    let digits = d.mantissa().unsigned_abs().to_string();
    let (int, frac) = if digits.len() > scale {
        let (i, f) = digits.split_at(digits.len() - scale);
        (i.to_string(), f.to_string())
    } else {
        (String::new(), format!("{digits:0>scale$}"))
    };
    let int = format!("{}{int}", "0".repeat((4 - int.len() % 4) % 4));
    let frac = format!("{frac}{}", "0".repeat((4 - frac.len() % 4) % 4));
    let group = |s: &str| s.parse::<i16>().unwrap_or(0);
    let mut groups: Vec<i16> = int
        .as_bytes()
        .chunks(4)
        .chain(frac.as_bytes().chunks(4))
        .map(|c| group(std::str::from_utf8(c).unwrap_or("0")))
        .collect();
    let mut weight = (int.len() / 4) as i16 - 1;
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    weight -= leading as i16;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    let negative = d.is_sign_negative() && !groups.is_empty();
    if groups.is_empty() {
        weight = 0;
    }
    out.sized(|buf| {
        buf.extend_from_slice(&(groups.len() as i16).to_be_bytes());
        buf.extend_from_slice(&weight.to_be_bytes());
        buf.extend_from_slice(&(if negative { 0x4000u16 } else { 0 }).to_be_bytes());
        buf.extend_from_slice(&(scale as u16).to_be_bytes());
        for g in &groups {
            buf.extend_from_slice(&g.to_be_bytes());
        }
    });
}

impl Field for rust_decimal::Decimal {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::Numeric | Kind::Text)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Numeric => numeric(self, out),
            Kind::Text => out.bytes(self.to_string().as_bytes()),
            _ => return Err(kind),
        }
        Ok(())
    }
}

impl Field for Uuid {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::Uuid | Kind::Text)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Uuid => out.bytes(self.as_bytes()),
            Kind::Text => out.bytes(self.hyphenated().to_string().as_bytes()),
            _ => return Err(kind),
        }
        Ok(())
    }
}

impl Field for str {
    fn fits(kind: Kind) -> bool {
        kind == Kind::Text
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Text => out.bytes(self.as_bytes()),
            _ => return Err(kind),
        }
        Ok(())
    }
}

impl Field for String {
    fn fits(kind: Kind) -> bool {
        str::fits(kind)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        self.as_str().binary(out, kind)
    }
}

impl Field for bool {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::Bool | Kind::Text)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Bool => out.bytes(&[u8::from(*self)]),
            Kind::Text => out.bytes(if *self { b"true" } else { b"false" }),
            _ => return Err(kind),
        }
        Ok(())
    }
}

impl Field for chrono::NaiveDate {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::Date | Kind::Text)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Date => {
                let days = i64::from(self.to_epoch_days()) - PG_EPOCH_DAYS;
                out.bytes(&i32::try_from(days).map_err(|_| kind)?.to_be_bytes());
            }
            Kind::Text => out.bytes(self.to_string().as_bytes()),
            _ => return Err(kind),
        }
        Ok(())
    }
}

impl Field for chrono::DateTime<chrono::Utc> {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::Timestamptz | Kind::Text)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match kind {
            Kind::Timestamptz => out.bytes(&postgres_micros(self).to_be_bytes()),
            Kind::Text => out.bytes(
                self.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .as_bytes(),
            ),
            _ => return Err(kind),
        }
        Ok(())
    }
}

/// Microseconds since 2000-01-01 that `timestamptz_in` makes of serde's text of `t`: the
/// fraction of a second is read as a double (the nearest to nanoseconds / 10^9, which is also
/// the nearest to the digits serde prints) and rounded half to even to microseconds (`rint`).
fn postgres_micros(t: &chrono::DateTime<chrono::Utc>) -> i64 {
    // A leap second (`:60`, nanoseconds past 10^9) is the next second to PostgreSQL; its
    // fraction is rounded on its own, as PostgreSQL reads it.
    let nanos = t.timestamp_subsec_nanos();
    let seconds = t.timestamp() - PG_EPOCH_DAYS * 86_400 + i64::from(nanos / 1_000_000_000);
    let fraction = f64::from(nanos % 1_000_000_000) / 1e9;
    seconds * 1_000_000 + (fraction * 1e6).round_ties_even() as i64
}

/// A text array column (`{"a","b"}`).
impl Field for Vec<String> {
    fn fits(kind: Kind) -> bool {
        matches!(kind, Kind::TextArray(_))
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        let Kind::TextArray(element) = kind else {
            return Err(kind);
        };
        out.sized(|buf| {
            let dimensions: i32 = if self.is_empty() { 0 } else { 1 };
            buf.extend_from_slice(&dimensions.to_be_bytes());
            buf.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
            buf.extend_from_slice(&element.to_be_bytes());
            if !self.is_empty() {
                buf.extend_from_slice(&(self.len() as i32).to_be_bytes());
                buf.extend_from_slice(&1i32.to_be_bytes()); // lower bound
            }
            for item in self {
                buf.extend_from_slice(&(item.len() as i32).to_be_bytes());
                buf.extend_from_slice(item.as_bytes());
            }
        });
        Ok(())
    }
}

impl<T: Field> Field for Option<T> {
    fn fits(kind: Kind) -> bool {
        T::fits(kind)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        match self {
            Some(v) => v.binary(out, kind),
            None if T::fits(kind) => {
                out.null();
                Ok(())
            }
            None => Err(kind),
        }
    }
}

impl<T: Field + ?Sized> Field for &T {
    fn fits(kind: Kind) -> bool {
        T::fits(kind)
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        (**self).binary(out, kind)
    }
}

/// JSON text for a `jsonb` column, stored as PostgreSQL parses it. Only for a rebuild whose live
/// path binds the same text itself (the timeline's `insert_timeline`): through a JSON row it
/// would pass through a `serde_json::Value`, whose numbers are `f64`.
pub struct JsonText<'a>(pub &'a str);

impl Serialize for JsonText<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let value: Value = serde_json::from_str(self.0).map_err(serde::ser::Error::custom)?;
        value.serialize(s)
    }
}

impl Field for JsonText<'_> {
    fn fits(kind: Kind) -> bool {
        kind == Kind::Jsonb
    }

    fn binary(&self, out: &mut CopyBinary, kind: Kind) -> Result<(), Kind> {
        if kind != Kind::Jsonb {
            return Err(kind);
        }
        out.sized(|buf| {
            buf.push(1); // jsonb's binary format version
            buf.extend_from_slice(self.0.as_bytes());
        });
        Ok(())
    }
}

/// Where a row's fields go: a JSON object (the live path binds an array of them) or a binary
/// `COPY` (a rebuild's fresh table; the fields must come in the table's column order). One
/// function writes a table's row for both, so the two paths cannot drift apart.
pub enum Row<'a> {
    Json(serde_json::Map<String, Value>),
    Copy {
        out: &'a mut CopyBinary,
        columns: &'static [&'static str],
        kinds: &'a [Kind],
        next: usize,
        /// The first field that went wrong, and how.
        wrong: Option<String>,
    },
}

impl Row<'_> {
    pub fn field<F: Field + ?Sized>(&mut self, column: &'static str, value: &F) {
        match self {
            Row::Json(map) => {
                map.insert(
                    column.to_string(),
                    serde_json::to_value(value).unwrap_or(Value::Null),
                );
            }
            Row::Copy { .. } => self.copy_field(column, |out, kind| {
                value.binary(out, kind).map_err(|kind| {
                    format!("is {kind:?}: a {} does not fit", std::any::type_name::<F>())
                })
            }),
        }
    }

    /// A text column holding serde's JSON text of `value` (a folded state), serialized straight
    /// into the `COPY`; the live path's JSON row carries the same text as a JSON string.
    pub fn json_text<T: Serialize + ?Sized>(&mut self, column: &'static str, value: &T) {
        match self {
            Row::Json(map) => {
                let text = serde_json::to_string(value).unwrap_or_default();
                map.insert(column.to_string(), Value::String(text));
            }
            Row::Copy { .. } => self.copy_field(column, |out, kind| {
                if kind != Kind::Text {
                    return Err(format!("is {kind:?}, written JSON text"));
                }
                out.sized(|buf| {
                    serde_json::to_writer(buf, value)
                        .map_err(|e| format!("could not be serialized: {e}"))
                })
            }),
        }
    }

    /// Writes the next field of a `COPY` row with `write`, given the column's kind; records
    /// the first field out of order or that `write` refuses.
    fn copy_field(
        &mut self,
        column: &'static str,
        write: impl FnOnce(&mut CopyBinary, Kind) -> Result<(), String>,
    ) {
        let Row::Copy {
            out,
            columns,
            kinds,
            next,
            wrong,
        } = self
        else {
            return;
        };
        if wrong.is_some() {
            return;
        }
        if columns.get(*next) != Some(&column) {
            *wrong = Some(format!("{column} out of order"));
            return;
        }
        let kind = kinds.get(*next).copied().unwrap_or(Kind::Other);
        *next += 1;
        if let Err(e) = write(out, kind) {
            *wrong = Some(format!("{column} {e}"));
        }
    }
}

/// The JSON row `fields` writes, `None` if it writes nothing (the live path).
pub fn json_row(fields: impl FnOnce(&mut Row<'static>)) -> Option<Value> {
    let mut row = Row::Json(serde_json::Map::new());
    fields(&mut row);
    match row {
        Row::Json(map) if !map.is_empty() => Some(Value::Object(map)),
        _ => None,
    }
}

impl Table {
    /// Writes the rows of `items`, each written by `row` (which may write nothing: no row):
    /// into a rebuild's fresh table (`fresh`) straight as a binary `COPY`, with no JSON in
    /// between; otherwise as JSON rows through [`Table::write`].
    pub async fn write_each<I>(
        &self,
        conn: &mut PgConnection,
        fresh: bool,
        items: impl IntoIterator<Item = I>,
        mut row: impl FnMut(I, &mut Row<'_>),
    ) -> Result<(), ProjectionError> {
        if !fresh {
            let rows: Vec<Value> = items
                .into_iter()
                .filter_map(|item| json_row(|out| row(item, out)))
                .collect();
            return self.write(conn, false, rows).await;
        }
        let mut copy = CopyIn::binary(conn, self.name, self.columns).await?;
        for item in items {
            if let Err(e) = copy.row(|out| row(item, out)).await {
                return Err(copy.abort(e).await);
            }
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(kinds: Vec<Kind>) -> CopyRows {
        const COLUMNS: &[&str] = &["id", "label"];
        CopyRows {
            out: CopyBinary::new(COLUMNS.len()),
            table: "t",
            columns: COLUMNS,
            kinds,
        }
    }

    /// The bytes of one field written for `kind` (without its length).
    fn field_bytes<F: Field>(value: F, kind: Kind) -> Vec<u8> {
        let mut out = CopyBinary::new(1);
        let start = out.buf.len() + 2 + 4;
        assert!(value.binary(&mut out, kind).is_ok());
        out.buf[start..].to_vec()
    }

    fn words(words: &[i16]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    #[test]
    fn decimals_are_written_as_base_10000_digits_with_their_scale() {
        use rust_decimal::Decimal;
        // ndigits, weight, sign, dscale, digits.
        let cases: [(Decimal, &[i16]); 6] = [
            (Decimal::new(15_000, 2), &[1, 0, 0, 2, 150]),
            (Decimal::new(1, 4), &[1, -1, 0, 4, 1]),
            (Decimal::new(123_456_789, 4), &[3, 1, 0, 4, 1, 2345, 6789]),
            (Decimal::new(-50_000, 0), &[1, 1, 0x4000, 0, 5]),
            (Decimal::new(0, 2), &[0, 0, 0, 2]),
            (-Decimal::new(0, 3), &[0, 0, 0, 3]),
        ];
        for (d, expected) in cases {
            assert_eq!(field_bytes(d, Kind::Numeric), words(expected), "{d}");
        }
    }

    #[test]
    fn instants_and_dates_count_from_2000_and_round_to_microseconds_as_postgres_reads_them() {
        use chrono::{NaiveDate, TimeZone, Utc};
        let epoch = Utc.with_ymd_and_hms(2000, 1, 1, 0, 0, 0).unwrap();
        let micros = |nanos: i64| {
            let t = epoch + chrono::Duration::nanoseconds(nanos);
            i64::from_be_bytes(field_bytes(t, Kind::Timestamptz).try_into().unwrap())
        };
        assert_eq!(micros(0), 0);
        assert_eq!(micros(1_499), 1);
        assert_eq!(micros(1_501), 2);
        assert_eq!(micros(-1_000_000), -1_000);
        // 999,999,999 ns is 1,000,000 us: the next second, as PostgreSQL rounds it.
        assert_eq!(micros(999_999_999), 1_000_000);
        let day = |d: NaiveDate| i32::from_be_bytes(field_bytes(d, Kind::Date).try_into().unwrap());
        assert_eq!(day(NaiveDate::from_ymd_opt(2000, 1, 1).unwrap()), 0);
        assert_eq!(day(NaiveDate::from_ymd_opt(1999, 12, 31).unwrap()), -1);
        assert_eq!(day(NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()), -10_957);
    }

    #[test]
    fn text_arrays_carry_their_element_type_and_an_empty_one_has_no_dimension() {
        let mut empty = 0i32.to_be_bytes().to_vec(); // dimensions
        empty.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
        empty.extend_from_slice(&25u32.to_be_bytes()); // text
        assert_eq!(
            field_bytes(Vec::<String>::new(), Kind::TextArray(25)),
            empty
        );
        let one = field_bytes(vec!["a,b".to_string()], Kind::TextArray(25));
        assert_eq!(&one[..4], &1i32.to_be_bytes());
        assert_eq!(&one[one.len() - 7..], b"\0\0\0\x03a,b");
        // A NULL of a type that cannot go into the column is refused like a value.
        let mut out = CopyBinary::new(1);
        assert!(None::<String>.binary(&mut out, Kind::Date).is_err());
        assert!(None::<String>.binary(&mut out, Kind::Text).is_ok());
    }

    #[test]
    fn a_row_that_does_not_fit_its_table_is_refused_and_leaves_nothing_behind() {
        let mut copy = rows(vec![Kind::Uuid, Kind::Text]);
        let empty = copy.out.buf.len();
        let id = Uuid::from_u128(7);
        // A value of another kind, a column out of order, a column missing.
        let wrong_kind = copy.row(|out| {
            out.field("id", "not a uuid");
            out.field("label", "x");
        });
        let out_of_order = copy.row(|out| {
            out.field("label", "x");
            out.field("id", &id);
        });
        let missing = copy.row(|out| out.field("id", &id));
        for refused in [wrong_kind, out_of_order, missing] {
            assert!(refused.is_err());
        }
        assert_eq!(copy.out.buf.len(), empty);
        // A row that writes nothing is no row.
        assert!(matches!(copy.row(|_| {}), Ok(false)));
        assert!(matches!(
            copy.row(|out| {
                out.field("id", &id);
                out.field("label", &None::<String>);
            }),
            Ok(true)
        ));
        // Field count, a 16-byte uuid, a NULL.
        let mut row = 2i16.to_be_bytes().to_vec();
        row.extend_from_slice(&16i32.to_be_bytes());
        row.extend_from_slice(id.as_bytes());
        row.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(&copy.out.buf[empty..], row.as_slice());
    }
}
