//! `sales_leads` (stage, probability, value, weighted value, velocity against the stage SLA),
//! `deals` and `deal_events` (the audit projection of deal events).

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::deal::{Deal, DealEvent};
use domain::lead::{Lead, LeadEvent};
use serde_json::json;
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::bookings::{Tracked, enum_str};
use crate::util::{actor_staff_id, aggregate_uuid, decode, event_row_id};
use crate::write::{States, Table};
use crate::{Projection, ProjectionError, Session};

pub struct Sales;

#[async_trait::async_trait]
impl Projection for Sales {
    fn name(&self) -> &'static str {
        "sales"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[
            "sales_leads",
            "lead_states",
            "deals",
            "deal_events",
            "deal_states",
        ]
    }

    fn session(&self, fresh: bool) -> Option<Box<dyn Session>> {
        Some(Box::new(SalesSession {
            fresh,
            leads: States::new("lead_states", fresh),
            deals: States::new("deal_states", fresh),
        }))
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        velocity(conn, now).await
    }
}

struct SalesSession {
    /// A rebuild's session (see [`Table::write`]).
    fresh: bool,
    leads: States<Lead>,
    deals: States<Deal>,
}

const DEAL_EVENTS: Table = Table {
    name: "deal_events",
    columns: &[
        "id",
        "deal_id",
        "event_type",
        "payload",
        "created_by",
        "created_at",
        "last_position",
    ],
    key: &[],
    keep: &[],
};

const LEADS: Table = Table {
    name: "sales_leads",
    columns: &[
        "id",
        "lead_code",
        "client_id",
        "owner_id",
        "stage_id",
        "probability",
        "sla_days",
        "status",
        "value_amount",
        "weighted_value",
        "source",
        "title",
        "requested_start_at",
        "requested_end_at",
        "fleet_size",
        "next_action",
        "next_action_at",
        "expected_close_at",
        "loss_reason",
        "booking_id",
        "kommo_lead_id",
        "kommo_status_id",
        "stage_entered_at",
        "created_at",
        "updated_at",
        "last_position",
    ],
    key: &["id"],
    keep: &["lead_code", "source", "created_at"],
};

const DEALS: Table = Table {
    name: "deals",
    columns: &[
        "id",
        "deal_number",
        "client_id",
        "vehicle_id",
        "application_id",
        "status",
        "principal_amount",
        "monthly_payment",
        "interest_rate",
        "security_deposit",
        "term_months",
        "contract_start_date",
        "contract_end_date",
        "first_payment_date",
        "contract_terms",
        "total_paid",
        "missed_payments",
        "closing_reason",
        "created_at",
        "updated_at",
        "last_position",
    ],
    key: &["id"],
    keep: &[
        "deal_number",
        "client_id",
        "vehicle_id",
        "application_id",
        "principal_amount",
        "monthly_payment",
        "interest_rate",
        "security_deposit",
        "term_months",
        "contract_start_date",
        "contract_end_date",
        "first_payment_date",
        "contract_terms",
        "created_at",
    ],
};

#[async_trait::async_trait]
impl Session for SalesSession {
    async fn apply(
        &mut self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), ProjectionError> {
        let (mut lead_ids, mut deal_ids) = (Vec::new(), Vec::new());
        for e in events {
            match e.aggregate_type.as_str() {
                "Lead" => lead_ids.push(aggregate_uuid(e)?),
                "Deal" => deal_ids.push(aggregate_uuid(e)?),
                _ => {}
            }
        }
        self.leads.load(conn, lead_ids).await?;
        self.deals.load(conn, deal_ids).await?;
        let mut deal_events = Vec::new();
        for e in events {
            match e.aggregate_type.as_str() {
                "Lead" => {
                    let ev: LeadEvent = decode(e)?;
                    let t = self.leads.change(aggregate_uuid(e)?);
                    let before = (t.state.created, t.state.status, t.state.stage_id.clone());
                    t.state.apply(ev);
                    t.touch(e);
                    if before != (t.state.created, t.state.status, t.state.stage_id.clone()) {
                        // For leads this is when the current stage (or status) was entered.
                        t.status_changed_at = Some(e.recorded_at);
                    }
                }
                "Deal" => {
                    let ev: DealEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    deal_events.push(json!({
                        "id": event_row_id(e),
                        "deal_id": id,
                        "event_type": e.event_type,
                        "payload": serde_json::to_value(&ev).unwrap_or_default(),
                        "created_by": actor_staff_id(e),
                        "created_at": e.recorded_at,
                        "last_position": e.position.global_position,
                    }));
                    let t = self.deals.change(id);
                    t.state.apply(ev);
                    t.touch(e);
                }
                _ => {}
            }
        }
        DEAL_EVENTS.write(conn, self.fresh, deal_events).await
    }

    async fn flush(&mut self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        let leads = self.leads.changed();
        self.leads.save(conn).await?;
        let mut rows = Vec::new();
        let (mut ids, mut ats) = (Vec::new(), Vec::new());
        for id in leads {
            if let Some(t) = self.leads.get(&id) {
                rows.push(lead_row(id, t));
                if let Some(at) = t.updated_at {
                    ids.push(id);
                    ats.push(at);
                }
            }
        }
        LEADS.write(conn, self.fresh, rows).await?;
        // Velocity as of each lead's own latest event.
        if !ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE sales_leads l SET {VELOCITY_SET} \
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, now) WHERE l.id = u.id"
            ))
            .bind(ids)
            .bind(ats)
            .execute(&mut *conn)
            .await?;
        }
        let deals = self.deals.changed();
        self.deals.save(conn).await?;
        let rows: Vec<_> = deals
            .iter()
            .filter_map(|id| self.deals.get(id).and_then(|t| deal_row(*id, t)))
            .collect();
        DEALS.write(conn, self.fresh, rows).await
    }
}

fn lead_row(id: Uuid, t: &Tracked<Lead>) -> serde_json::Value {
    let l = &t.state;
    json!({
        "id": id,
        "lead_code": l.lead_code,
        "client_id": l.client_id,
        "owner_id": l.owner_id,
        "stage_id": l.stage_id,
        "probability": l.probability,
        "sla_days": l.sla_days,
        "status": l.status.as_str(),
        "value_amount": l.value_amount.amount(),
        "weighted_value": l.value_amount.amount() * l.probability,
        "source": l.source,
        "title": l.title,
        "requested_start_at": l.requested_start_at,
        "requested_end_at": l.requested_end_at,
        "fleet_size": l.fleet_size,
        "next_action": l.next_action,
        "next_action_at": l.next_action_at,
        "expected_close_at": l.expected_close_at,
        "loss_reason": l.loss_reason,
        "booking_id": l.booking_id.or(l.won_booking_id),
        "kommo_lead_id": l.kommo_lead_id,
        "kommo_status_id": l.kommo_status_id,
        "stage_entered_at": t.status_changed_at.or(t.created_at),
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "last_position": t.last_position,
    })
}

/// The velocity columns as of `now` (a column or a parameter of the statement).
const VELOCITY_SET: &str = "velocity_days = greatest(0, floor(extract(epoch FROM (now - stage_entered_at)) / 86400))::int, \
    is_overdue = status = 'active' \
      AND greatest(0, floor(extract(epoch FROM (now - stage_entered_at)) / 86400)) > sla_days";

/// Days in the current stage and whether that exceeds the stage's SLA, as of `now`, for every lead.
async fn velocity(conn: &mut PgConnection, now: DateTime<Utc>) -> Result<(), ProjectionError> {
    sqlx::query(&format!(
        "UPDATE sales_leads SET {} ",
        VELOCITY_SET.replace("now", "$1::timestamptz")
    ))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn deal_row(id: Uuid, t: &Tracked<Deal>) -> Option<serde_json::Value> {
    let d = &t.state;
    let (Some(start), Some(end), Some(first)) = (
        d.contract_start_date,
        d.contract_end_date,
        d.first_payment_date,
    ) else {
        return None;
    };
    Some(json!({
        "id": id,
        "deal_number": d.deal_number,
        "client_id": d.client_id,
        "vehicle_id": d.vehicle_id,
        "application_id": d.application_id,
        "status": enum_str(&d.status),
        "principal_amount": d.principal_amount.amount(),
        "monthly_payment": d.monthly_payment.amount(),
        "interest_rate": d.interest_rate,
        "security_deposit": d.security_deposit.amount(),
        "term_months": d.term_months,
        "contract_start_date": start,
        "contract_end_date": end,
        "first_payment_date": first,
        "contract_terms": d.contract_terms,
        "total_paid": d.total_paid.amount(),
        "missed_payments": d.missed_payments,
        "closing_reason": d.default_reason.clone().or_else(|| d.cancel_reason.clone()),
        "created_at": t.created_at,
        "updated_at": t.updated_at,
        "last_position": t.last_position,
    }))
}
