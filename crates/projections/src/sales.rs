//! `sales_leads` (stage, probability, value, weighted value, velocity against the stage SLA),
//! `deals` and `deal_events` (the audit projection of deal events).

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use domain::deal::{Deal, DealEvent};
use domain::lead::{Lead, LeadEvent};
use sqlx::PgConnection;
use store::RecordedEvent;
use uuid::Uuid;

use crate::bookings::{Tracked, enum_str, load_states, save_state};
use crate::util::{actor_staff_id, aggregate_uuid, decode, event_row_id};
use crate::{Projection, ProjectionError};

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

    async fn apply(
        &self,
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
        let mut leads: HashMap<Uuid, Tracked<Lead>> =
            load_states(conn, "lead_states", &lead_ids).await?;
        let mut deals: HashMap<Uuid, Tracked<Deal>> =
            load_states(conn, "deal_states", &deal_ids).await?;
        let (mut touched_leads, mut touched_deals) = (BTreeSet::new(), BTreeSet::new());

        for e in events {
            match e.aggregate_type.as_str() {
                "Lead" => {
                    let ev: LeadEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    let t = leads.entry(id).or_default();
                    let before = (t.state.created, t.state.status, t.state.stage_id.clone());
                    t.state.apply(ev);
                    t.touch(e);
                    if before != (t.state.created, t.state.status, t.state.stage_id.clone()) {
                        // For leads this is when the current stage (or status) was entered.
                        t.status_changed_at = Some(e.recorded_at);
                    }
                    touched_leads.insert(id);
                }
                "Deal" => {
                    let ev: DealEvent = decode(e)?;
                    let id = aggregate_uuid(e)?;
                    sqlx::query(
                        "INSERT INTO deal_events (id, deal_id, event_type, payload, created_by, created_at, last_position) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(event_row_id(e))
                    .bind(id)
                    .bind(&e.event_type)
                    .bind(serde_json::to_value(&ev).unwrap_or_default())
                    .bind(actor_staff_id(e))
                    .bind(e.recorded_at)
                    .bind(e.position.global_position)
                    .execute(&mut *conn)
                    .await?;
                    let t = deals.entry(id).or_default();
                    t.state.apply(ev);
                    t.touch(e);
                    touched_deals.insert(id);
                }
                _ => {}
            }
        }
        for id in touched_leads {
            if let Some(t) = leads.get(&id) {
                save_state(conn, "lead_states", id, t).await?;
                write_lead(conn, id, t).await?;
            }
        }
        for id in touched_deals {
            if let Some(t) = deals.get(&id) {
                save_state(conn, "deal_states", id, t).await?;
                write_deal(conn, id, t).await?;
            }
        }
        Ok(())
    }

    async fn tick(
        &self,
        conn: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        velocity(conn, None, now).await
    }
}

async fn write_lead(
    conn: &mut PgConnection,
    id: Uuid,
    t: &Tracked<Lead>,
) -> Result<(), ProjectionError> {
    let l = &t.state;
    let weighted = l.value_amount.amount() * l.probability;
    sqlx::query(
        "INSERT INTO sales_leads (id, lead_code, client_id, owner_id, stage_id, probability, sla_days, \
           status, value_amount, weighted_value, source, title, requested_start_at, requested_end_at, \
           fleet_size, next_action, next_action_at, expected_close_at, loss_reason, booking_id, \
           kommo_lead_id, kommo_status_id, stage_entered_at, created_at, updated_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::lead_status, $9, $10, $11, $12, $13, $14, $15, $16, \
           $17, $18, $19, $20, $21, $22, $23, $24, $25, $26) \
         ON CONFLICT (id) DO UPDATE SET client_id = EXCLUDED.client_id, owner_id = EXCLUDED.owner_id, \
           stage_id = EXCLUDED.stage_id, probability = EXCLUDED.probability, \
           sla_days = EXCLUDED.sla_days, status = EXCLUDED.status, \
           value_amount = EXCLUDED.value_amount, weighted_value = EXCLUDED.weighted_value, \
           title = EXCLUDED.title, requested_start_at = EXCLUDED.requested_start_at, \
           requested_end_at = EXCLUDED.requested_end_at, fleet_size = EXCLUDED.fleet_size, \
           next_action = EXCLUDED.next_action, next_action_at = EXCLUDED.next_action_at, \
           expected_close_at = EXCLUDED.expected_close_at, loss_reason = EXCLUDED.loss_reason, \
           booking_id = EXCLUDED.booking_id, kommo_lead_id = EXCLUDED.kommo_lead_id, \
           kommo_status_id = EXCLUDED.kommo_status_id, stage_entered_at = EXCLUDED.stage_entered_at, \
           updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position",
    )
    .bind(id)
    .bind(&l.lead_code)
    .bind(l.client_id)
    .bind(l.owner_id)
    .bind(&l.stage_id)
    .bind(l.probability)
    .bind(l.sla_days)
    .bind(l.status.as_str())
    .bind(l.value_amount.amount())
    .bind(weighted)
    .bind(&l.source)
    .bind(&l.title)
    .bind(l.requested_start_at)
    .bind(l.requested_end_at)
    .bind(l.fleet_size)
    .bind(&l.next_action)
    .bind(l.next_action_at)
    .bind(l.expected_close_at)
    .bind(&l.loss_reason)
    .bind(l.booking_id.or(l.won_booking_id))
    .bind(l.kommo_lead_id)
    .bind(l.kommo_status_id)
    .bind(t.status_changed_at.or(t.created_at))
    .bind(t.created_at)
    .bind(t.updated_at)
    .bind(t.last_position)
    .execute(&mut *conn)
    .await?;
    if let Some(at) = t.updated_at {
        velocity(conn, Some(id), at).await?;
    }
    Ok(())
}

/// Days in the current stage and whether that exceeds the stage's SLA, as of `now`.
async fn velocity(
    conn: &mut PgConnection,
    lead: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    sqlx::query(
        "UPDATE sales_leads SET \
           velocity_days = greatest(0, floor(extract(epoch FROM ($2 - stage_entered_at)) / 86400))::int, \
           is_overdue = status = 'active' \
             AND greatest(0, floor(extract(epoch FROM ($2 - stage_entered_at)) / 86400)) > sla_days \
         WHERE ($1::uuid IS NULL OR id = $1)",
    )
    .bind(lead)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn write_deal(
    conn: &mut PgConnection,
    id: Uuid,
    t: &Tracked<Deal>,
) -> Result<(), ProjectionError> {
    let d = &t.state;
    let (Some(start), Some(end), Some(first)) = (
        d.contract_start_date,
        d.contract_end_date,
        d.first_payment_date,
    ) else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO deals (id, deal_number, client_id, vehicle_id, application_id, status, \
           principal_amount, monthly_payment, interest_rate, security_deposit, term_months, \
           contract_start_date, contract_end_date, first_payment_date, contract_terms, total_paid, \
           missed_payments, closing_reason, created_at, updated_at, last_position) \
         VALUES ($1, $2, $3, $4, $5, $6::deal_status, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
           $17, $18, $19, $20, $21) \
         ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, total_paid = EXCLUDED.total_paid, \
           missed_payments = EXCLUDED.missed_payments, closing_reason = EXCLUDED.closing_reason, \
           updated_at = EXCLUDED.updated_at, last_position = EXCLUDED.last_position",
    )
    .bind(id)
    .bind(&d.deal_number)
    .bind(d.client_id)
    .bind(d.vehicle_id)
    .bind(d.application_id)
    .bind(enum_str(&d.status))
    .bind(d.principal_amount.amount())
    .bind(d.monthly_payment.amount())
    .bind(d.interest_rate)
    .bind(d.security_deposit.amount())
    .bind(d.term_months)
    .bind(start)
    .bind(end)
    .bind(first)
    .bind(&d.contract_terms)
    .bind(d.total_paid.amount())
    .bind(d.missed_payments)
    .bind(d.default_reason.clone().or_else(|| d.cancel_reason.clone()))
    .bind(t.created_at)
    .bind(t.updated_at)
    .bind(t.last_position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
