//! Set-based writes: a projection folds a batch in memory and then writes each table with one
//! statement, whatever the number of rows (rows travel as one JSON array and PostgreSQL turns it
//! into typed records with `jsonb_populate_recordset`), and keeps the folded states of its
//! entities in [`States`], loaded in one query and saved in one. A rebuild writes its empty,
//! unindexed copies with `COPY` instead ([`CopyIn`]); the large tables' rows are written by one
//! function per table into a [`Row`], which is the live path's JSON object or a rebuild's `COPY`
//! text ([`Table::write_each`]).

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

    /// A field written with `Display` (numbers, uuids: nothing to escape).
    pub fn display(&mut self, value: impl std::fmt::Display) {
        use std::io::Write;
        self.separate();
        // Writing into a Vec cannot fail.
        let _ = write!(self.buf, "{value}");
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

/// A read-model column's value, written alike by both paths: into the JSON object the live path
/// binds (`jsonb_populate_recordset` converts it) and straight into a rebuild's `COPY` text,
/// as the text `jsonb_populate_recordset` would have made of that JSON (see `Table::copy`).
pub trait Field: Serialize {
    fn copy(&self, c: &mut CopyText);
}

macro_rules! displayed_fields {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn copy(&self, c: &mut CopyText) {
                c.display(self);
            }
        }
    )*};
}
displayed_fields!(Uuid, i64, i32, i16, u32, rust_decimal::Decimal);

impl Field for str {
    fn copy(&self, c: &mut CopyText) {
        c.text(self);
    }
}

impl Field for String {
    fn copy(&self, c: &mut CopyText) {
        c.text(self);
    }
}

impl Field for chrono::NaiveDate {
    fn copy(&self, c: &mut CopyText) {
        c.display(self);
    }
}

/// A text array column (`{"a","b"}`).
impl Field for Vec<String> {
    fn copy(&self, c: &mut CopyText) {
        let mut literal = String::new();
        literal.push('{');
        for (i, item) in self.iter().enumerate() {
            if i > 0 {
                literal.push(',');
            }
            quoted(&mut literal, item);
        }
        literal.push('}');
        c.text(&literal);
    }
}

impl Field for bool {
    fn copy(&self, c: &mut CopyText) {
        c.text(if *self { "true" } else { "false" });
    }
}

impl Field for chrono::DateTime<chrono::Utc> {
    fn copy(&self, c: &mut CopyText) {
        // serde's text of an instant.
        c.text(&self.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
    }
}

impl<T: Field> Field for Option<T> {
    fn copy(&self, c: &mut CopyText) {
        match self {
            Some(v) => v.copy(c),
            None => c.null(),
        }
    }
}

impl<T: Field + ?Sized> Field for &T {
    fn copy(&self, c: &mut CopyText) {
        (**self).copy(c);
    }
}

/// Where a row's fields go: a JSON object (the live path binds an array of them) or `COPY`
/// text (a rebuild's fresh table; the fields must come in the table's column order). One
/// function writes a table's row for both, so the two paths cannot drift apart.
pub enum Row<'a> {
    Json(serde_json::Map<String, Value>),
    Copy {
        rows: &'a mut CopyText,
        columns: &'static [&'static str],
        next: usize,
        misplaced: Option<&'static str>,
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
            Row::Copy {
                rows,
                columns,
                next,
                misplaced,
            } => {
                if columns.get(*next) != Some(&column) {
                    misplaced.get_or_insert(column);
                }
                *next += 1;
                value.copy(rows);
            }
        }
    }

    /// No field was written: the item has no row.
    fn is_empty(&self) -> bool {
        match self {
            Row::Json(map) => map.is_empty(),
            Row::Copy {
                next, misplaced, ..
            } => *next == 0 && misplaced.is_none(),
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
    /// into a rebuild's fresh table (`fresh`) straight as `COPY` text, with no JSON in
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
        let mut copy = CopyIn::start(conn, self.name, self.columns).await?;
        for item in items {
            let mut out = Row::Copy {
                rows: &mut copy.rows,
                columns: self.columns,
                next: 0,
                misplaced: None,
            };
            row(item, &mut out);
            if out.is_empty() {
                continue;
            }
            let Row::Copy {
                next, misplaced, ..
            } = out
            else {
                continue;
            };
            if misplaced.is_some() || next != self.columns.len() {
                return Err(copy_failed(format!(
                    "a row of {} wrote {next} of {} columns, out of order at {misplaced:?}",
                    self.name,
                    self.columns.len()
                )));
            }
            copy.rows.end_row();
            copy.send_some().await?;
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use rust_decimal::Decimal;

    /// The text a typed field writes equals what the live path's JSON of it becomes.
    fn same<F: Field>(value: F) {
        let mut typed = CopyText::with_capacity(64);
        value.copy(&mut typed);
        let mut via_json = CopyText::with_capacity(64);
        let json = serde_json::to_value(&value).unwrap_or(Value::Null);
        assert!(via_json.value("plain", &json).is_ok());
        assert_eq!(
            String::from_utf8_lossy(&typed.buf),
            String::from_utf8_lossy(&via_json.buf),
            "{json}"
        );
    }

    #[test]
    fn typed_fields_write_what_their_json_would() {
        for d in [
            Decimal::new(0, 2),
            Decimal::ZERO,
            Decimal::new(150, 2),
            Decimal::new(-3, 0),
            Decimal::new(123_456_789_012, 4),
        ] {
            same(d);
        }
        same(Utc.with_ymd_and_hms(2025, 10, 19, 20, 37, 43).unwrap());
        same(
            Utc.with_ymd_and_hms(2025, 10, 19, 20, 37, 43).unwrap()
                + chrono::Duration::nanoseconds(891_039_288),
        );
        same(Some(
            Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::milliseconds(5),
        ));
        same(None::<Uuid>);
        same(Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef));
        same(true);
        same(Some(false));
        same(-42i64);
        same(7i16);
        same(3u32);
        same("tab\there\nnewline \\ backslash \"quoted\"".to_string());
        same(String::new());
        same(chrono::NaiveDate::from_ymd_opt(1990, 2, 28).unwrap());
        same(Some("x".to_string()));
        same(Some("y"));
    }

    #[test]
    fn a_text_array_field_writes_what_its_json_would_in_an_array_column() {
        for items in [
            vec![],
            vec!["telegram".to_string()],
            vec!["a\"b".into(), "c\\d".into(), "{e,f}".into()],
        ] {
            let mut typed = CopyText::with_capacity(64);
            items.copy(&mut typed);
            let mut via_json = CopyText::with_capacity(64);
            assert!(via_json.value("array", &serde_json::json!(items)).is_ok());
            assert_eq!(typed.buf, via_json.buf);
        }
    }
}
