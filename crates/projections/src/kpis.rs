//! `kpi_snapshots`: one row per business day (Asia/Dubai).
//!
//! Counters (bookings created/cancelled, revenue of completions, deliveries and their SLA) count
//! the day's events. State metrics (active bookings, pipeline value, win rate, active deals,
//! outstanding amount) are the state right after the day's last event; fleet utilization is
//! measured over the 30 days ending at the end of that day, over the vehicles in the fleet when
//! the day began (`vehicle_fleet_periods`, kept by a trigger on the reference table). Days
//! without events get a row from the tick (or when the next day's first event arrives), with the
//! state carried over. So a row depends only on the events and the fleet's history, never on
//! when it was computed: a rebuild reproduces it exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use domain::booking::BookingEvent;
use domain::deal::DealEvent;
use domain::lead::LeadEvent;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::rules;
use crate::util::{aggregate_uuid, business_day, decode};
use crate::write::Table;
use crate::{Projection, ProjectionError, Session};

pub struct Kpis;

#[async_trait::async_trait]
impl Projection for Kpis {
    fn name(&self) -> &'static str {
        "kpis"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "kpi_snapshots",
            "kpi_daily_counts",
            "kpi_booking_facts",
            "kpi_lead_facts",
            "kpi_deal_facts",
            "kpi_totals",
        ]
    }

    fn session(&self, fresh: bool) -> Option<Box<dyn Session>> {
        Some(Box::new(KpisSession::new(fresh)))
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        let today = business_day(now);
        let position: i64 = sqlx::query_scalar(
            "SELECT coalesce(max(global_position), 0) FROM consumer_checkpoints WHERE name = 'projection:kpis'",
        )
        .fetch_one(&mut *conn)
        .await?;
        let mut session = KpisSession::new(false);
        let last = session.last_snapshot(conn).await?.map(|(d, _)| d);
        let mut day = last.map_or(today, |d| d + Duration::days(1));
        while day <= today {
            session.snapshot(conn, day, position).await?;
            day += Duration::days(1);
        }
        session.flush(conn).await
    }
}

/// What the KPIs need of a booking (`kpi_booking_facts`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct BookingFact {
    vehicle_id: Option<Uuid>,
    status: String,
    total_amount: Decimal,
    /// All paid so far (the latest `BookingPaymentRecorded`'s `paid_amount`).
    paid_amount: Decimal,
    start_at: DateTime<Utc>,
    end_at: DateTime<Utc>,
}

impl BookingFact {
    fn active(&self) -> bool {
        matches!(
            self.status.as_str(),
            "confirmed" | "delivery" | "in_progress"
        )
    }

    /// `total_amount - paid_amount`, never below zero (the booking's own rule, SPEC §2); none
    /// for a cancelled booking.
    fn outstanding(&self) -> Decimal {
        if self.status == "cancelled" {
            Decimal::ZERO
        } else {
            rules::outstanding(self.total_amount, self.paid_amount)
        }
    }

    /// The vehicle and period it occupies, when it counts for utilization.
    fn usage(&self) -> Option<(Uuid, DateTime<Utc>, DateTime<Utc>)> {
        let counts = self.active() || self.status == "completed";
        match self.vehicle_id {
            Some(v) if counts => Some((v, self.start_at, self.end_at)),
            _ => None,
        }
    }
}

/// What the KPIs need of a lead (`kpi_lead_facts`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct LeadFact {
    status: String,
    value_amount: Decimal,
    probability: Decimal,
}

impl LeadFact {
    fn pipeline(&self) -> Decimal {
        if self.status == "active" {
            self.value_amount * self.probability
        } else {
            Decimal::ZERO
        }
    }
}

/// The day's counters (`kpi_daily_counts`).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
struct Counts {
    bookings_created: i32,
    bookings_cancelled: i32,
    revenue: Decimal,
    deliveries: i32,
    deliveries_on_time: i32,
}

/// Sums over every fact, kept up to date by differences (`kpi_totals`), so a snapshot never
/// rescans the facts.
#[derive(Debug, Clone, Default, sqlx::FromRow)]
struct Totals {
    active_bookings: i64,
    outstanding_amount: Decimal,
    pipeline_value: Decimal,
    leads_won: i64,
    leads_lost: i64,
    active_deals: i64,
}

impl Totals {
    fn booking(&mut self, fact: &BookingFact, sign: i64) {
        self.active_bookings += sign * i64::from(fact.active());
        self.outstanding_amount += Decimal::from(sign) * fact.outstanding();
    }

    fn lead(&mut self, fact: &LeadFact, sign: i64) {
        self.pipeline_value += Decimal::from(sign) * fact.pipeline();
        self.leads_won += sign * i64::from(fact.status == "won");
        self.leads_lost += sign * i64::from(fact.status == "lost");
    }

    fn deal(&mut self, status: &str, sign: i64) {
        self.active_deals += sign * i64::from(status == "active");
    }
}

/// Facts by id; `None`: looked up, there is none.
type Facts<T> = HashMap<Uuid, Option<T>>;

struct KpisSession {
    /// Every stored fact, counter and total is in memory (a rebuild into empty tables).
    complete: bool,
    bookings: Facts<BookingFact>,
    leads: Facts<LeadFact>,
    deals: Facts<String>,
    changed: BTreeSet<(u8, Uuid)>,
    counts: BTreeMap<NaiveDate, Counts>,
    changed_days: BTreeSet<NaiveDate>,
    totals: Option<Totals>,
    totals_changed: bool,
    /// The newest snapshot's day and position, once known (`Some(None)`: there is none).
    last: Option<Option<(NaiveDate, i64)>>,
    /// When each vehicle was in the fleet (`vehicle_fleet_periods`): start and end, unbounded
    /// when `None`.
    fleet: Option<Vec<FleetPeriod>>,
    snapshots: BTreeMap<NaiveDate, (Value, i64)>,
    /// The day being folded and the position of its latest event.
    current: Option<(NaiveDate, i64)>,
}

type FleetPeriod = (Uuid, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

const BOOKING: u8 = 0;
const LEAD: u8 = 1;
const DEAL: u8 = 2;

impl KpisSession {
    fn new(fresh: bool) -> Self {
        Self {
            complete: fresh,
            bookings: HashMap::new(),
            leads: HashMap::new(),
            deals: HashMap::new(),
            changed: BTreeSet::new(),
            counts: BTreeMap::new(),
            changed_days: BTreeSet::new(),
            totals: fresh.then(Totals::default),
            totals_changed: false,
            last: fresh.then_some(None),
            fleet: None,
            snapshots: BTreeMap::new(),
            current: None,
        }
    }

    /// Loads the facts of the entities `events` touch that are not in memory yet.
    async fn load(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        if self.complete {
            return Ok(());
        }
        let (mut bookings, mut leads, mut deals) = (Vec::new(), Vec::new(), Vec::new());
        for e in events {
            let (list, known) = match e.aggregate_type.as_str() {
                "Booking" => (
                    &mut bookings,
                    self.bookings.contains_key(&aggregate_uuid(e)?),
                ),
                "Lead" => (&mut leads, self.leads.contains_key(&aggregate_uuid(e)?)),
                "Deal" => (&mut deals, self.deals.contains_key(&aggregate_uuid(e)?)),
                _ => continue,
            };
            if !known {
                list.push(aggregate_uuid(e)?);
            }
        }
        if !bookings.is_empty() {
            let rows: Vec<(Uuid, BookingFact)> = fetch(
                conn,
                "SELECT booking_id AS id, vehicle_id, status::text AS status, total_amount, \
                   paid_amount, start_at, end_at FROM kpi_booking_facts WHERE booking_id = ANY($1)",
                &bookings,
            )
            .await?;
            fill(&mut self.bookings, bookings, rows);
        }
        if !leads.is_empty() {
            let rows: Vec<(Uuid, LeadFact)> = fetch(
                conn,
                "SELECT lead_id AS id, status::text AS status, value_amount, probability \
                 FROM kpi_lead_facts WHERE lead_id = ANY($1)",
                &leads,
            )
            .await?;
            fill(&mut self.leads, leads, rows);
        }
        if !deals.is_empty() {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT deal_id, status::text FROM kpi_deal_facts WHERE deal_id = ANY($1)",
            )
            .bind(&deals)
            .fetch_all(&mut *conn)
            .await?;
            fill(&mut self.deals, deals, rows);
        }
        Ok(())
    }

    /// The totals, loaded on first use.
    async fn load_totals(&mut self, conn: &mut PgConnection) -> Result<Totals, ProjectionError> {
        if self.totals.is_none() {
            let stored: Option<Totals> = sqlx::query_as(
                "SELECT active_bookings, outstanding_amount, pipeline_value, leads_won, leads_lost, \
                   active_deals FROM kpi_totals",
            )
            .fetch_optional(&mut *conn)
            .await?;
            self.totals = Some(stored.unwrap_or_default());
        }
        Ok(self.totals.clone().unwrap_or_default())
    }

    /// The totals, to change (saved on flush).
    async fn totals(&mut self, conn: &mut PgConnection) -> Result<&mut Totals, ProjectionError> {
        self.load_totals(conn).await?;
        self.totals_changed = true;
        Ok(self.totals.get_or_insert_with(Totals::default))
    }

    async fn counts(
        &mut self,
        conn: &mut PgConnection,
        day: NaiveDate,
    ) -> Result<&mut Counts, ProjectionError> {
        if !self.complete && !self.counts.contains_key(&day) {
            let stored: Option<Counts> = sqlx::query_as(
                "SELECT bookings_created, bookings_cancelled, revenue, deliveries, deliveries_on_time \
                 FROM kpi_daily_counts WHERE day = $1",
            )
            .bind(day)
            .fetch_optional(&mut *conn)
            .await?;
            self.counts.insert(day, stored.unwrap_or_default());
        }
        Ok(self.counts.entry(day).or_default())
    }

    async fn last_snapshot(
        &mut self,
        conn: &mut PgConnection,
    ) -> Result<Option<(NaiveDate, i64)>, ProjectionError> {
        if let Some(last) = self.last {
            return Ok(last);
        }
        let row: Option<(NaiveDate, i64)> = sqlx::query_as(
            "SELECT snapshot_date, last_position FROM kpi_snapshots ORDER BY snapshot_date DESC LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await?;
        self.last = Some(row);
        Ok(row)
    }

    /// Replaces a booking's fact, keeping the totals in step.
    async fn set_booking(
        &mut self,
        conn: &mut PgConnection,
        id: Uuid,
        change: impl FnOnce(&mut BookingFact),
    ) -> Result<(), ProjectionError> {
        let Some(Some(fact)) = self.bookings.get(&id).cloned() else {
            return Ok(());
        };
        let mut new = fact.clone();
        change(&mut new);
        let totals = self.totals(conn).await?;
        totals.booking(&fact, -1);
        totals.booking(&new, 1);
        self.bookings.insert(id, Some(new));
        self.changed.insert((BOOKING, id));
        Ok(())
    }

    async fn fold(
        &mut self,
        conn: &mut PgConnection,
        e: &RecordedEvent,
    ) -> Result<(), ProjectionError> {
        let day = business_day(e.recorded_at);
        let id = match e.aggregate_type.as_str() {
            "Booking" | "Lead" | "Deal" => aggregate_uuid(e)?,
            _ => return Ok(()),
        };
        match e.aggregate_type.as_str() {
            "Booking" => self.fold_booking(conn, id, decode(e)?, day).await,
            "Lead" => self.fold_lead(conn, id, decode(e)?).await,
            _ => {
                let status = match decode::<DealEvent>(e)? {
                    DealEvent::DealDrafted { .. } => "draft",
                    DealEvent::DealActivated {} => "active",
                    DealEvent::DealCompleted { .. } => "completed",
                    DealEvent::DealDefaulted { .. } => "defaulted",
                    DealEvent::DealCancelled { .. } => "cancelled",
                    _ => return Ok(()),
                };
                let old = self.deals.get(&id).cloned().flatten();
                let totals = self.totals(conn).await?;
                if let Some(old) = &old {
                    totals.deal(old, -1);
                }
                totals.deal(status, 1);
                self.deals.insert(id, Some(status.to_string()));
                self.changed.insert((DEAL, id));
                Ok(())
            }
        }
    }

    async fn fold_booking(
        &mut self,
        conn: &mut PgConnection,
        id: Uuid,
        ev: BookingEvent,
        day: NaiveDate,
    ) -> Result<(), ProjectionError> {
        use BookingEvent as E;
        let status = |s: &'static str| move |f: &mut BookingFact| f.status = s.to_string();
        match ev {
            E::BookingCreated {
                vehicle_id,
                start_at,
                end_at,
                total_amount,
                ..
            } => {
                let fact = BookingFact {
                    vehicle_id,
                    status: "lead".into(),
                    total_amount: total_amount.amount(),
                    paid_amount: Decimal::ZERO,
                    start_at,
                    end_at,
                };
                self.totals(conn).await?.booking(&fact, 1);
                self.bookings.insert(id, Some(fact));
                self.changed.insert((BOOKING, id));
                self.counts(conn, day).await?.bookings_created += 1;
            }
            E::BookingVehicleAssigned { vehicle_id, .. } => {
                self.set_booking(conn, id, |f| f.vehicle_id = Some(vehicle_id))
                    .await?;
            }
            E::BookingRescheduled {
                start_at,
                end_at,
                total_amount,
                ..
            } => {
                self.set_booking(conn, id, |f| {
                    f.start_at = start_at;
                    f.end_at = end_at;
                    f.total_amount = total_amount.amount();
                })
                .await?;
            }
            E::BookingServiceAdded { total_amount, .. }
            | E::BookingServiceRemoved { total_amount, .. } => {
                self.set_booking(conn, id, |f| f.total_amount = total_amount.amount())
                    .await?;
            }
            E::BookingExtended {
                new_end_at,
                total_amount,
                ..
            } => {
                self.set_booking(conn, id, |f| {
                    f.end_at = new_end_at;
                    f.total_amount = total_amount.amount();
                })
                .await?;
            }
            E::BookingConfirmed { .. } => self.set_booking(conn, id, status("confirmed")).await?,
            E::BookingDeliveryStarted { .. } => {
                self.set_booking(conn, id, status("delivery")).await?;
            }
            E::BookingRentalStarted {
                delivered_on_time, ..
            } => {
                self.set_booking(conn, id, status("in_progress")).await?;
                let counts = self.counts(conn, day).await?;
                counts.deliveries += 1;
                counts.deliveries_on_time += i32::from(delivered_on_time);
            }
            E::BookingCompleted { returned_at, .. } => {
                self.set_booking(conn, id, |f| {
                    f.status = "completed".into();
                    f.end_at = f.start_at.max(returned_at);
                })
                .await?;
                let total = self
                    .bookings
                    .get(&id)
                    .cloned()
                    .flatten()
                    .map_or(Decimal::ZERO, |f| f.total_amount);
                self.counts(conn, day).await?.revenue += total;
            }
            E::BookingCancelled { .. } => {
                self.set_booking(conn, id, status("cancelled")).await?;
                self.counts(conn, day).await?.bookings_cancelled += 1;
            }
            E::BookingPaymentRecorded { paid_amount, .. } => {
                self.set_booking(conn, id, |f| f.paid_amount = paid_amount.amount())
                    .await?;
            }
            _ => return Ok(()),
        }
        self.changed_days.insert(day);
        Ok(())
    }

    async fn fold_lead(
        &mut self,
        conn: &mut PgConnection,
        id: Uuid,
        ev: LeadEvent,
    ) -> Result<(), ProjectionError> {
        use LeadEvent as E;
        // As stored: numeric(3, 2).
        let two = |d: Decimal| rules::round(d, 2);
        let old = self.leads.get(&id).cloned().flatten();
        let new = match (ev, &old) {
            (
                E::LeadCreated {
                    value_amount,
                    probability,
                    ..
                },
                _,
            ) => LeadFact {
                status: "active".into(),
                value_amount: value_amount.amount(),
                probability: two(probability),
            },
            (E::LeadStageMoved { probability, .. }, Some(f)) => LeadFact {
                probability: two(probability),
                ..f.clone()
            },
            (E::LeadKommoStatusApplied { probability, .. }, Some(f)) => LeadFact {
                probability: probability.map_or(f.probability, two),
                ..f.clone()
            },
            (E::LeadValueChanged { value_amount }, Some(f)) => LeadFact {
                value_amount: value_amount.amount(),
                ..f.clone()
            },
            (E::LeadWon { .. }, Some(f)) => LeadFact {
                status: "won".into(),
                ..f.clone()
            },
            (E::LeadLost { .. }, Some(f)) => LeadFact {
                status: "lost".into(),
                ..f.clone()
            },
            (E::LeadReopened {}, Some(f)) => LeadFact {
                status: "active".into(),
                ..f.clone()
            },
            _ => return Ok(()),
        };
        let totals = self.totals(conn).await?;
        if let Some(old) = &old {
            totals.lead(old, -1);
        }
        totals.lead(&new, 1);
        self.leads.insert(id, Some(new));
        self.changed.insert((LEAD, id));
        Ok(())
    }

    /// Writes the snapshot rows for the days after the newest snapshot and before `day`.
    async fn fill_gaps(
        &mut self,
        conn: &mut PgConnection,
        day: NaiveDate,
        position: Option<i64>,
    ) -> Result<(), ProjectionError> {
        let Some((last, last_pos)) = self.last_snapshot(conn).await? else {
            return Ok(());
        };
        let position = position.unwrap_or(last_pos);
        let mut d = last + Duration::days(1);
        while d < day {
            self.snapshot(conn, d, position).await?;
            d += Duration::days(1);
        }
        Ok(())
    }

    /// Computes the snapshot of `day` from the current state.
    async fn snapshot(
        &mut self,
        conn: &mut PgConnection,
        day: NaiveDate,
        position: i64,
    ) -> Result<(), ProjectionError> {
        let counts = self.counts(conn, day).await?.clone();
        let totals = self.load_totals(conn).await?;
        // Utilization over the 30 days ending at the end of the business day.
        let end_of_day = Utc.from_utc_datetime(
            &(day + Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default(),
        ) - Duration::hours(4);
        let (window_start, _) = rules::utilization_window(end_of_day);
        let periods = match &self.fleet {
            Some(f) => f,
            None => {
                let f: Vec<FleetPeriod> = sqlx::query_as(
                    "SELECT vehicle_id, lower(in_fleet), upper(in_fleet) FROM vehicle_fleet_periods",
                )
                .fetch_all(&mut *conn)
                .await?;
                self.fleet.insert(f)
            }
        };
        // The vehicles in the fleet when the business day began: known from then on, so the
        // day's row is the same whenever it is computed (a car bought during the day counts
        // from the next; one sold during the day still counts that day).
        let start_of_day = end_of_day - Duration::days(1);
        let fleet: BTreeSet<Uuid> = periods
            .iter()
            .filter(|(_, from, until)| {
                from.is_none_or(|from| from <= start_of_day)
                    && until.is_none_or(|until| until > start_of_day)
            })
            .map(|(v, _, _)| *v)
            .collect();
        let mut periods: HashMap<Uuid, Vec<rules::Span>> = HashMap::new();
        let overlaps = |s: DateTime<Utc>, e: DateTime<Utc>| e > window_start && s < end_of_day;
        if !self.complete {
            // Stored facts in the window, except those this session holds newer versions of.
            let stored: Vec<(Uuid, Uuid, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
                "SELECT booking_id, vehicle_id, start_at, end_at FROM kpi_booking_facts \
                 WHERE status IN ('confirmed', 'delivery', 'in_progress', 'completed') \
                   AND vehicle_id IS NOT NULL AND end_at > $1 AND start_at < $2",
            )
            .bind(window_start)
            .bind(end_of_day)
            .fetch_all(&mut *conn)
            .await?;
            for (booking, v, s, e) in stored {
                if !self.bookings.contains_key(&booking) {
                    periods.entry(v).or_default().push((s, e));
                }
            }
        }
        for (v, s, e) in self
            .bookings
            .values()
            .flatten()
            .filter_map(BookingFact::usage)
        {
            if overlaps(s, e) {
                periods.entry(v).or_default().push((s, e));
            }
        }
        let fleet_size = fleet.len() as i64;
        let mut total_util = Decimal::ZERO;
        for v in &fleet {
            let mine = periods.get(v).map_or(&[][..], Vec::as_slice);
            total_util += rules::utilization(mine, end_of_day);
        }
        let money = |d: Decimal| {
            let mut d = rules::round(d, 2);
            d.rescale(2);
            d
        };
        let revenue = money(counts.revenue);
        let (fleet_utilization, revenue_per_car) = if fleet_size == 0 {
            (Value::Null, Value::Null)
        } else {
            (
                json!(rules::round(total_util / Decimal::from(fleet_size), 2)),
                json!(rules::round(revenue / Decimal::from(fleet_size), 2)),
            )
        };
        let metrics = json!({
            "active_bookings": totals.active_bookings,
            "bookings_created": counts.bookings_created,
            "bookings_cancelled": counts.bookings_cancelled,
            "revenue": revenue,
            "fleet_utilization": fleet_utilization,
            "avg_revenue_per_car": revenue_per_car,
            "sla_compliance": ratio(i64::from(counts.deliveries_on_time), i64::from(counts.deliveries)),
            "deliveries": counts.deliveries,
            "pipeline_value": money(totals.pipeline_value),
            "lead_win_rate": ratio(totals.leads_won, totals.leads_won + totals.leads_lost),
            "active_deals": totals.active_deals,
            "outstanding_amount": money(totals.outstanding_amount),
        });
        self.snapshots.insert(day, (metrics, position));
        let newest = self.last.flatten().is_none_or(|(d, _)| d <= day);
        if newest {
            self.last = Some(Some((day, position)));
        }
        Ok(())
    }
}

/// Reads `(id, fact)` rows.
async fn fetch<T>(
    conn: &mut PgConnection,
    sql: &str,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, T)>, ProjectionError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    use sqlx::Row;
    let rows = sqlx::query(sql).bind(ids).fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push((row.try_get("id")?, T::from_row(&row)?));
    }
    Ok(out)
}

/// Records what was looked up: found facts, and `None` for the rest.
fn fill<T>(facts: &mut Facts<T>, ids: Vec<Uuid>, rows: Vec<(Uuid, T)>) {
    for id in ids {
        facts.insert(id, None);
    }
    for (id, fact) in rows {
        facts.insert(id, Some(fact));
    }
}

fn ratio(num: i64, den: i64) -> Value {
    if den == 0 {
        Value::Null
    } else {
        json!(rules::round(Decimal::from(num) / Decimal::from(den), 4))
    }
}

const SNAPSHOTS: Table = Table {
    name: "kpi_snapshots",
    columns: &[
        "id",
        "snapshot_date",
        "metrics",
        "created_at",
        "last_position",
    ],
    key: &["snapshot_date"],
    keep: &["id", "created_at"],
};

const COUNTS: Table = Table {
    name: "kpi_daily_counts",
    columns: &[
        "day",
        "bookings_created",
        "bookings_cancelled",
        "revenue",
        "deliveries",
        "deliveries_on_time",
    ],
    key: &["day"],
    keep: &[],
};

const BOOKING_FACTS: Table = Table {
    name: "kpi_booking_facts",
    columns: &[
        "booking_id",
        "vehicle_id",
        "status",
        "total_amount",
        "paid_amount",
        "outstanding_amount",
        "start_at",
        "end_at",
    ],
    key: &["booking_id"],
    keep: &[],
};

const LEAD_FACTS: Table = Table {
    name: "kpi_lead_facts",
    columns: &["lead_id", "status", "value_amount", "probability"],
    key: &["lead_id"],
    keep: &[],
};

const DEAL_FACTS: Table = Table {
    name: "kpi_deal_facts",
    columns: &["deal_id", "status"],
    key: &["deal_id"],
    keep: &[],
};

const TOTALS: Table = Table {
    name: "kpi_totals",
    columns: &[
        "id",
        "active_bookings",
        "outstanding_amount",
        "pipeline_value",
        "leads_won",
        "leads_lost",
        "active_deals",
    ],
    key: &["id"],
    keep: &[],
};

#[async_trait::async_trait]
impl Session for KpisSession {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        self.load(conn, events).await?;
        for e in events {
            let day = business_day(e.recorded_at);
            if let Some((d, pos)) = self.current
                && d != day
            {
                self.snapshot(conn, d, pos).await?;
            }
            if self.current.is_none_or(|(d, _)| d != day) {
                // Days without events between the last snapshot and this one carry the state.
                self.fill_gaps(conn, day, self.current.map(|(_, p)| p))
                    .await?;
            }
            self.fold(conn, e).await?;
            self.current = Some((day, e.position.global_position));
        }
        Ok(())
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        if let Some((d, pos)) = self.current.take() {
            self.snapshot(conn, d, pos).await?;
            // Days after it that already have a snapshot (the tick wrote them while this
            // projection was behind: a backlog around midnight, a restart after a quiet night)
            // have had no events of their own applied yet, so they carry this state too.
            if let Some((last, _)) = self.last_snapshot(conn).await? {
                let mut later = d + Duration::days(1);
                while later <= last {
                    self.snapshot(conn, later, pos).await?;
                    later += Duration::days(1);
                }
            }
        }
        let (mut bookings, mut leads, mut deals) = (Vec::new(), Vec::new(), Vec::new());
        for (kind, id) in std::mem::take(&mut self.changed) {
            match kind {
                BOOKING => bookings.push(id),
                LEAD => {
                    if let Some(Some(f)) = self.leads.get(&id) {
                        leads.push(json!({
                            "lead_id": id,
                            "status": f.status,
                            "value_amount": f.value_amount,
                            "probability": f.probability,
                        }));
                    }
                }
                _ => {
                    if let Some(Some(status)) = self.deals.get(&id) {
                        deals.push(json!({"deal_id": id, "status": status}));
                    }
                }
            }
        }
        // The one large table: a rebuild writes it without JSON rows.
        let facts = &self.bookings;
        BOOKING_FACTS
            .write_each(conn, self.complete, bookings, |id, out| {
                let Some(Some(f)) = facts.get(&id) else {
                    return;
                };
                out.field("booking_id", &id);
                out.field("vehicle_id", &f.vehicle_id);
                out.field("status", &f.status);
                out.field("total_amount", &f.total_amount);
                out.field("paid_amount", &f.paid_amount);
                // As stored until now: not zeroed by a cancellation (the totals skip those).
                out.field(
                    "outstanding_amount",
                    &rules::outstanding(f.total_amount, f.paid_amount),
                );
                out.field("start_at", &f.start_at);
                out.field("end_at", &f.end_at);
            })
            .await?;
        LEAD_FACTS.write(conn, self.complete, leads).await?;
        DEAL_FACTS.write(conn, self.complete, deals).await?;
        let counts: Vec<_> = std::mem::take(&mut self.changed_days)
            .into_iter()
            .filter_map(|day| {
                let c = self.counts.get(&day)?;
                Some(json!({
                    "day": day,
                    "bookings_created": c.bookings_created,
                    "bookings_cancelled": c.bookings_cancelled,
                    "revenue": c.revenue,
                    "deliveries": c.deliveries,
                    "deliveries_on_time": c.deliveries_on_time,
                }))
            })
            .collect();
        COUNTS.write(conn, self.complete, counts).await?;
        if let Some(t) = self.totals.as_ref().filter(|_| self.totals_changed) {
            TOTALS
                .write(
                    conn,
                    self.complete,
                    vec![json!({
                        "id": true,
                        "active_bookings": t.active_bookings,
                        "outstanding_amount": t.outstanding_amount,
                        "pipeline_value": t.pipeline_value,
                        "leads_won": t.leads_won,
                        "leads_lost": t.leads_lost,
                        "active_deals": t.active_deals,
                    })],
                )
                .await?;
            self.totals_changed = false;
        }
        let snapshots: Vec<_> = std::mem::take(&mut self.snapshots)
            .into_iter()
            .map(|(day, (metrics, position))| {
                let end_of_day = Utc.from_utc_datetime(
                    &(day + Duration::days(1))
                        .and_hms_opt(0, 0, 0)
                        .unwrap_or_default(),
                ) - Duration::hours(4);
                json!({
                    "id": crate::util::stable_id(&format!("kpi:{day}")),
                    "snapshot_date": day,
                    "metrics": metrics,
                    "created_at": end_of_day - Duration::days(1),
                    "last_position": position,
                })
            })
            .collect();
        SNAPSHOTS.write(conn, self.complete, snapshots).await
    }
}
