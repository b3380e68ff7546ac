//! Tests of the Lead aggregate: every command's happy path and rejections.

use chrono::{DateTime, TimeZone, Utc};
use cqrs_es::DomainEvent;
use cqrs_es::test::TestFramework;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::*;
use crate::booking::{BookingStatus, BookingType};

type Lf = TestFramework<Lead>;

fn at(h: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap() + chrono::Duration::hours(h)
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn money(cents: i64) -> Money {
    Money::parse("x", Decimal::new(cents, 2)).unwrap()
}

const OWNER: u128 = 1;
const CLIENT: u128 = 2;
const BOOKING: u128 = 3;
const VEHICLE: u128 = 4;

fn stage(id: &str, pct: i64, booking_status: Option<BookingStatus>) -> StageRef {
    StageRef {
        id: id.to_string(),
        probability: Decimal::new(pct, 2),
        sla_days: 3,
        booking_status,
    }
}

fn create_cmd() -> LeadCommand {
    LeadCommand::Create {
        lead_code: " LD-1201 ".into(),
        client_id: Some(id(CLIENT)),
        owner_id: id(OWNER),
        stage: stage("new", 10, None),
        value_amount: Decimal::new(1_500_000, 2),
        source: "Kommo".into(),
        title: Some("  G-Class for a week ".into()),
        requested_start_at: Some(at(0)),
        requested_end_at: Some(at(24 * 7)),
        fleet_size: 1,
        expected_close_at: Some(at(-24)),
        kommo_lead_id: Some(900_001),
    }
}

fn created() -> LeadEvent {
    LeadEvent::LeadCreated {
        lead_code: "LD-1201".into(),
        client_id: Some(id(CLIENT)),
        owner_id: id(OWNER),
        stage_id: "new".into(),
        probability: Decimal::new(10, 2),
        sla_days: 3,
        booking_status: None,
        value_amount: money(1_500_000),
        source: "Kommo".into(),
        title: Some("G-Class for a week".into()),
        requested_start_at: Some(at(0)),
        requested_end_at: Some(at(24 * 7)),
        fleet_size: 1,
        expected_close_at: Some(at(-24)),
        kommo_lead_id: Some(900_001),
    }
}

/// A lead with neither client nor requested period.
fn created_bare() -> LeadEvent {
    match created() {
        LeadEvent::LeadCreated {
            lead_code,
            owner_id,
            stage_id,
            probability,
            sla_days,
            booking_status,
            value_amount,
            source,
            title,
            fleet_size,
            expected_close_at,
            kommo_lead_id,
            ..
        } => LeadEvent::LeadCreated {
            lead_code,
            client_id: None,
            owner_id,
            stage_id,
            probability,
            sla_days,
            booking_status,
            value_amount,
            source,
            title,
            requested_start_at: None,
            requested_end_at: None,
            fleet_size,
            expected_close_at,
            kommo_lead_id,
        },
        _ => unreachable!(),
    }
}

fn win_cmd() -> LeadCommand {
    LeadCommand::Win {
        booking_id: id(BOOKING),
        booking_code: "BK-1052".into(),
        booking_type: BookingType::Rental,
        start_at: None,
        end_at: None,
        price_daily: Decimal::new(250_000, 2),
        vehicle_id: Some(id(VEHICLE)),
        client_id: None,
    }
}

/// `win_cmd()` naming a client (`None`: the lead's own), at a daily price, over a period of its
/// own (`None`: the lead's requested one).
fn win_cmd_with(
    client: Option<u128>,
    price: Decimal,
    period: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> LeadCommand {
    let mut cmd = win_cmd();
    if let LeadCommand::Win {
        client_id,
        price_daily,
        start_at,
        end_at,
        ..
    } = &mut cmd
    {
        *client_id = client.map(id);
        *price_daily = price;
        (*start_at, *end_at) = (period.map(|p| p.0), period.map(|p| p.1));
    }
    cmd
}

fn won() -> LeadEvent {
    LeadEvent::LeadWon {
        booking_id: id(BOOKING),
        booking_code: "BK-1052".into(),
        client_id: id(CLIENT),
        owner_id: id(OWNER),
        booking_type: BookingType::Rental,
        start_at: at(0),
        end_at: at(24 * 7),
        price_daily: money(250_000),
        vehicle_id: Some(id(VEHICLE)),
        value_amount: money(1_500_000),
        source: "Kommo".into(),
        booking_status: None,
    }
}

fn lost() -> LeadEvent {
    LeadEvent::LeadLost {
        reason: "chose another operator".into(),
    }
}

fn validation(field: &str, message: &str) -> LeadError {
    LeadError::Validation(ValidationError::new(field, message))
}

fn invalid(action: &'static str, status: LeadStatus) -> LeadError {
    LeadError::InvalidTransition { action, status }
}

fn fold(events: Vec<LeadEvent>) -> Lead {
    let mut lead = Lead::default();
    for e in events {
        lead.apply(e);
    }
    lead
}

/// Every command but `Create`, for the "not created" and "wrong status" checks.
fn every_other_command() -> Vec<LeadCommand> {
    vec![
        LeadCommand::MoveToStage {
            stage: stage("qualified", 30, None),
        },
        LeadCommand::ChangeValue {
            value_amount: Decimal::new(1, 0),
        },
        LeadCommand::AssignOwner { owner_id: id(9) },
        LeadCommand::SetNextAction {
            next_action: "call".into(),
            next_action_at: at(1),
        },
        LeadCommand::AttachClient { client_id: id(9) },
        win_cmd(),
        LeadCommand::Lose {
            reason: "no budget".into(),
        },
        LeadCommand::ApplyKommoStatus {
            kommo_status_id: 1,
            previous_kommo_status_id: None,
            stage: None,
            delivered_at: None,
        },
        LeadCommand::LinkBooking {
            booking_id: id(BOOKING),
        },
    ]
}

// ---- Create ----

#[test]
fn create_trims_and_records_every_field() {
    Lf::with(())
        .given_no_previous_events()
        .when(create_cmd())
        .then_expect_events(vec![created()]);
}

#[test]
fn create_without_client_or_period_is_fine() {
    let cmd = LeadCommand::Create {
        lead_code: "LD-1201".into(),
        client_id: None,
        owner_id: id(OWNER),
        stage: stage("new", 10, None),
        value_amount: Decimal::new(1_500_000, 2),
        source: "Kommo".into(),
        title: Some("G-Class for a week".into()),
        requested_start_at: None,
        requested_end_at: None,
        fleet_size: 1,
        expected_close_at: Some(at(-24)),
        kommo_lead_id: Some(900_001),
    };
    Lf::with(())
        .given_no_previous_events()
        .when(cmd)
        .then_expect_events(vec![created_bare()]);
}

#[test]
fn create_twice_is_rejected() {
    Lf::with(())
        .given(vec![created()])
        .when(create_cmd())
        .then_expect_error(LeadError::AlreadyExists);
}

fn create_with(edit: impl FnOnce(&mut LeadCommand)) -> LeadCommand {
    let mut cmd = create_cmd();
    edit(&mut cmd);
    cmd
}

#[test]
fn create_rejects_bad_input() {
    let cases: Vec<(LeadCommand, LeadError)> = vec![
        (
            create_with(|c| {
                if let LeadCommand::Create {
                    requested_end_at, ..
                } = c
                {
                    *requested_end_at = Some(at(0));
                }
            }),
            validation("end_at", "must be after start_at"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { value_amount, .. } = c {
                    *value_amount = Decimal::new(-1, 2);
                }
            }),
            validation("value_amount", "must not be negative"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { value_amount, .. } = c {
                    *value_amount = Decimal::new(1001, 3);
                }
            }),
            validation("value_amount", "must have at most two decimals"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { fleet_size, .. } = c {
                    *fleet_size = 0;
                }
            }),
            validation("fleet_size", "must be between 1 and 100"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { fleet_size, .. } = c {
                    *fleet_size = 101;
                }
            }),
            validation("fleet_size", "must be between 1 and 100"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { source, .. } = c {
                    *source = "  ".into();
                }
            }),
            validation("source", "must not be empty"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { lead_code, .. } = c {
                    *lead_code = String::new();
                }
            }),
            validation("lead_code", "must not be empty"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { stage, .. } = c {
                    stage.probability = Decimal::new(101, 2);
                }
            }),
            validation("probability", "must be between 0 and 1"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { stage, .. } = c {
                    stage.probability = Decimal::new(-1, 2);
                }
            }),
            validation("probability", "must be between 0 and 1"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { stage, .. } = c {
                    stage.sla_days = -1;
                }
            }),
            validation("sla_days", "must not be negative"),
        ),
        (
            create_with(|c| {
                if let LeadCommand::Create { stage, .. } = c {
                    stage.id = " ".into();
                }
            }),
            validation("stage_id", "must not be empty"),
        ),
    ];
    for (cmd, err) in cases {
        Lf::with(())
            .given_no_previous_events()
            .when(cmd)
            .then_expect_error(err);
    }
}

#[test]
fn probability_bounds_are_inclusive() {
    for pct in [0, 100] {
        let cmd = create_with(|c| {
            if let LeadCommand::Create { stage, .. } = c {
                stage.probability = Decimal::new(pct, 2);
            }
        });
        let events = Lf::with(())
            .given_no_previous_events()
            .when(cmd)
            .inspect_result()
            .unwrap();
        assert_eq!(events.len(), 1);
    }
}

#[test]
fn every_command_on_a_missing_lead_is_not_found() {
    for cmd in every_other_command() {
        Lf::with(())
            .given_no_previous_events()
            .when(cmd)
            .then_expect_error(LeadError::NotFound);
    }
}

#[test]
fn created_state_is_folded() {
    let lead = fold(vec![created()]);
    assert!(lead.created);
    assert_eq!(lead.status, LeadStatus::Active);
    assert_eq!(lead.lead_code, "LD-1201");
    assert_eq!(lead.client_id, Some(id(CLIENT)));
    assert_eq!(lead.owner_id, id(OWNER));
    assert_eq!(lead.stage_id, "new");
    assert_eq!(lead.probability, Decimal::new(10, 2));
    assert_eq!(lead.sla_days, 3);
    assert_eq!(lead.value_amount, money(1_500_000));
    assert_eq!(lead.requested_start_at, Some(at(0)));
    assert_eq!(lead.requested_end_at, Some(at(24 * 7)));
    assert_eq!(lead.fleet_size, 1);
    assert_eq!(lead.kommo_lead_id, Some(900_001));
}

// ---- MoveToStage ----

#[test]
fn move_to_stage_records_from_and_to() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::MoveToStage {
            stage: stage("negotiation", 60, Some(BookingStatus::Confirmed)),
        })
        .then_expect_events(vec![LeadEvent::LeadStageMoved {
            from_stage_id: "new".into(),
            stage_id: "negotiation".into(),
            probability: Decimal::new(60, 2),
            sla_days: 3,
            booking_status: Some(BookingStatus::Confirmed),
        }]);
}

#[test]
fn moving_to_the_current_stage_is_a_no_op() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::MoveToStage {
            stage: stage("new", 10, None),
        })
        .then_expect_events(vec![]);
}

#[test]
fn move_to_stage_rejects_a_bad_probability() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::MoveToStage {
            stage: stage("negotiation", 150, None),
        })
        .then_expect_error(validation("probability", "must be between 0 and 1"));
}

#[test]
fn stage_move_updates_state() {
    let lead = fold(vec![
        created(),
        LeadEvent::LeadStageMoved {
            from_stage_id: "new".into(),
            stage_id: "negotiation".into(),
            probability: Decimal::new(60, 2),
            sla_days: 5,
            booking_status: Some(BookingStatus::Confirmed),
        },
    ]);
    assert_eq!(lead.stage_id, "negotiation");
    assert_eq!(lead.probability, Decimal::new(60, 2));
    assert_eq!(lead.sla_days, 5);
    assert_eq!(lead.booking_status, Some(BookingStatus::Confirmed));
}

// ---- ChangeValue ----

#[test]
fn change_value() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ChangeValue {
            value_amount: Decimal::new(2_000_000, 2),
        })
        .then_expect_events(vec![LeadEvent::LeadValueChanged {
            value_amount: money(2_000_000),
        }]);
}

#[test]
fn change_value_to_the_same_amount_is_a_no_op() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ChangeValue {
            value_amount: Decimal::new(15_000, 0),
        })
        .then_expect_events(vec![]);
}

#[test]
fn change_value_rejects_negative_money() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ChangeValue {
            value_amount: Decimal::new(-500, 0),
        })
        .then_expect_error(validation("value_amount", "must not be negative"));
}

// ---- AssignOwner ----

#[test]
fn assign_owner() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::AssignOwner { owner_id: id(7) })
        .then_expect_events(vec![LeadEvent::LeadOwnerAssigned { owner_id: id(7) }]);
}

#[test]
fn assigning_the_same_owner_is_a_no_op() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::AssignOwner {
            owner_id: id(OWNER),
        })
        .then_expect_events(vec![]);
}

// ---- SetNextAction ----

#[test]
fn set_next_action() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::SetNextAction {
            next_action: " call back ".into(),
            next_action_at: at(2),
        })
        .then_expect_events(vec![LeadEvent::LeadNextActionSet {
            next_action: "call back".into(),
            next_action_at: at(2),
        }]);
}

#[test]
fn setting_the_same_next_action_is_a_no_op() {
    Lf::with(())
        .given(vec![
            created(),
            LeadEvent::LeadNextActionSet {
                next_action: "call back".into(),
                next_action_at: at(2),
            },
        ])
        .when(LeadCommand::SetNextAction {
            next_action: "call back".into(),
            next_action_at: at(2),
        })
        .then_expect_events(vec![]);
}

#[test]
fn next_action_must_not_be_empty() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::SetNextAction {
            next_action: "   ".into(),
            next_action_at: at(2),
        })
        .then_expect_error(validation("next_action", "must not be empty"));
}

// ---- AttachClient ----

#[test]
fn attach_client_to_a_lead_without_one() {
    Lf::with(())
        .given(vec![created_bare()])
        .when(LeadCommand::AttachClient {
            client_id: id(CLIENT),
        })
        .then_expect_events(vec![LeadEvent::LeadClientAttached {
            client_id: id(CLIENT),
        }]);
}

#[test]
fn attach_client_replaces_another_client() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::AttachClient { client_id: id(8) })
        .then_expect_events(vec![LeadEvent::LeadClientAttached { client_id: id(8) }]);
}

#[test]
fn attaching_the_same_client_is_a_no_op() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::AttachClient {
            client_id: id(CLIENT),
        })
        .then_expect_events(vec![]);
}

// ---- Win ----

#[test]
fn win_uses_the_requested_period_by_default() {
    Lf::with(())
        .given(vec![created()])
        .when(win_cmd())
        .then_expect_events(vec![won()]);
}

#[test]
fn win_uses_the_commands_period_and_the_stages_booking_status() {
    let cmd = LeadCommand::Win {
        booking_id: id(BOOKING),
        booking_code: "BK-1052".into(),
        booking_type: BookingType::Chauffeur,
        start_at: Some(at(48)),
        end_at: Some(at(72)),
        price_daily: Decimal::new(3_000, 0),
        vehicle_id: None,
        client_id: None,
    };
    Lf::with(())
        .given(vec![
            created_bare(),
            LeadEvent::LeadClientAttached {
                client_id: id(CLIENT),
            },
            LeadEvent::LeadStageMoved {
                from_stage_id: "new".into(),
                stage_id: "contract".into(),
                probability: Decimal::new(90, 2),
                sla_days: 1,
                booking_status: Some(BookingStatus::Confirmed),
            },
            LeadEvent::LeadValueChanged {
                value_amount: money(300_000),
            },
        ])
        .when(cmd)
        .then_expect_events(vec![LeadEvent::LeadWon {
            booking_id: id(BOOKING),
            booking_code: "BK-1052".into(),
            client_id: id(CLIENT),
            owner_id: id(OWNER),
            booking_type: BookingType::Chauffeur,
            start_at: at(48),
            end_at: at(72),
            price_daily: money(300_000),
            vehicle_id: None,
            value_amount: money(300_000),
            source: "Kommo".into(),
            booking_status: Some(BookingStatus::Confirmed),
        }]);
}

#[test]
fn win_naming_another_client_attaches_it_in_the_same_command() {
    let price = Decimal::new(250_000, 2);
    let cmd = win_cmd_with(Some(77), price, None);
    let mut expected = won();
    if let LeadEvent::LeadWon { client_id, .. } = &mut expected {
        *client_id = id(77);
    }
    Lf::with(())
        .given(vec![created()])
        .when(cmd)
        .then_expect_events(vec![
            LeadEvent::LeadClientAttached { client_id: id(77) },
            expected,
        ]);
    // Its own client again: nothing to attach.
    let same = win_cmd_with(Some(CLIENT), price, None);
    Lf::with(())
        .given(vec![created()])
        .when(same)
        .then_expect_events(vec![won()]);
    // A lead without a client is won with the one named.
    let bare = win_cmd_with(Some(CLIENT), price, Some((at(0), at(24 * 7))));
    Lf::with(())
        .given(vec![created_bare()])
        .when(bare)
        .then_expect_events(vec![
            LeadEvent::LeadClientAttached {
                client_id: id(CLIENT),
            },
            won(),
        ]);
}

#[test]
fn win_without_a_client_is_rejected() {
    Lf::with(())
        .given(vec![created_bare()])
        .when(win_cmd())
        .then_expect_error(LeadError::ClientRequired);
}

#[test]
fn win_without_any_period_is_rejected() {
    Lf::with(())
        .given(vec![
            created_bare(),
            LeadEvent::LeadClientAttached {
                client_id: id(CLIENT),
            },
        ])
        .when(win_cmd())
        .then_expect_error(validation(
            "start_at",
            "is required: the lead has no requested period",
        ));
}

#[test]
fn win_with_a_backwards_period_is_rejected() {
    let cmd = LeadCommand::Win {
        booking_id: id(BOOKING),
        booking_code: "BK-1052".into(),
        booking_type: BookingType::Rental,
        start_at: Some(at(24 * 8)),
        end_at: None,
        price_daily: Decimal::new(2_500, 0),
        vehicle_id: None,
        client_id: None,
    };
    Lf::with(())
        .given(vec![created()])
        .when(cmd)
        .then_expect_error(validation("end_at", "must be after start_at"));
}

#[test]
fn win_rejects_a_negative_price() {
    let cmd = LeadCommand::Win {
        booking_id: id(BOOKING),
        booking_code: "BK-1052".into(),
        booking_type: BookingType::Rental,
        start_at: None,
        end_at: None,
        price_daily: Decimal::new(-1, 0),
        vehicle_id: None,
        client_id: None,
    };
    Lf::with(())
        .given(vec![created()])
        .when(cmd)
        .then_expect_error(validation("price_daily", "must not be negative"));
}

#[test]
fn win_rejects_a_price_whose_booking_total_would_be_too_large() {
    // A valid amount on its own, but not for the seven days of the requested period: the
    // process manager could never create the booking.
    let cmd = win_cmd_with(None, Decimal::new(999_999_999_999, 2), None);
    Lf::with(())
        .given(vec![created()])
        .when(cmd)
        .then_expect_error(validation(
            "price_daily",
            "is too large: the booking's total for the period would be too",
        ));
}

#[test]
fn won_state_is_folded() {
    let lead = fold(vec![created(), won()]);
    assert_eq!(lead.status, LeadStatus::Won);
    assert_eq!(lead.won_booking_id, Some(id(BOOKING)));
    assert_eq!(lead.booking_id, None);
}

// ---- Lose ----

#[test]
fn lose_records_the_reason() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::Lose {
            reason: " chose another operator ".into(),
        })
        .then_expect_events(vec![lost()]);
    let lead = fold(vec![created(), lost()]);
    assert_eq!(lead.status, LeadStatus::Lost);
    assert_eq!(lead.loss_reason.as_deref(), Some("chose another operator"));
}

#[test]
fn lose_needs_a_reason() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::Lose { reason: "".into() })
        .then_expect_error(validation("reason", "must not be empty"));
}

// ---- Wrong status ----

#[test]
fn active_only_commands_are_rejected_on_won_and_lost_leads() {
    let actions = [
        "move",
        "change the value of",
        "assign an owner to",
        "set the next action of",
        "attach a client to",
        "win",
        "lose",
    ];
    for (closing, status) in [(won(), LeadStatus::Won), (lost(), LeadStatus::Lost)] {
        let cmds = every_other_command();
        for (cmd, action) in cmds.into_iter().take(actions.len()).zip(actions) {
            Lf::with(())
                .given(vec![created(), closing.clone()])
                .when(cmd)
                .then_expect_error(invalid(action, status));
        }
    }
}

// ---- ApplyKommoStatus ----

#[test]
fn kommo_status_without_stage_is_recorded() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 555,
            previous_kommo_status_id: None,
            stage: None,
            delivered_at: None,
        })
        .then_expect_events(vec![kommo_recorded(555)]);
}

/// A Kommo status recorded without moving the lead.
fn kommo_recorded(status: i64) -> LeadEvent {
    LeadEvent::LeadKommoStatusApplied {
        kommo_status_id: status,
        stage_id: None,
        probability: None,
        sla_days: None,
        booking_status: None,
        delivered_at: None,
    }
}

fn kommo_moved(status: i64) -> LeadEvent {
    LeadEvent::LeadKommoStatusApplied {
        kommo_status_id: status,
        stage_id: Some("negotiation".into()),
        probability: Some(Decimal::new(60, 2)),
        sla_days: Some(3),
        booking_status: Some(BookingStatus::Lead),
        delivered_at: None,
    }
}

#[test]
fn kommo_status_with_a_new_stage_moves_the_lead() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 556,
            previous_kommo_status_id: None,
            stage: Some(stage("negotiation", 60, Some(BookingStatus::Lead))),
            delivered_at: None,
        })
        .then_expect_events(vec![kommo_moved(556)]);
    let lead = fold(vec![created(), kommo_moved(556)]);
    assert_eq!(lead.kommo_status_id, Some(556));
    assert_eq!(lead.stage_id, "negotiation");
    assert_eq!(lead.probability, Decimal::new(60, 2));
    assert_eq!(lead.booking_status, Some(BookingStatus::Lead));
}

#[test]
fn same_kommo_status_and_stage_is_a_no_op() {
    Lf::with(())
        .given(vec![created(), kommo_moved(556)])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 556,
            previous_kommo_status_id: None,
            stage: Some(stage("negotiation", 60, Some(BookingStatus::Lead))),
            delivered_at: None,
        })
        .then_expect_events(vec![]);
    Lf::with(())
        .given(vec![created(), kommo_moved(556)])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 556,
            previous_kommo_status_id: None,
            stage: None,
            delivered_at: None,
        })
        .then_expect_events(vec![]);
}

#[test]
fn same_kommo_status_with_a_different_stage_moves_the_lead() {
    Lf::with(())
        .given(vec![created(), kommo_recorded(556)])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 556,
            previous_kommo_status_id: None,
            stage: Some(stage("negotiation", 60, Some(BookingStatus::Lead))),
            delivered_at: None,
        })
        .then_expect_events(vec![kommo_moved(556)]);
}

#[test]
fn kommo_status_on_a_closed_lead_is_recorded_without_moving_it() {
    for closing in [won(), lost()] {
        Lf::with(())
            .given(vec![created(), closing])
            .when(LeadCommand::ApplyKommoStatus {
                kommo_status_id: 142,
                previous_kommo_status_id: None,
                stage: Some(stage("negotiation", 60, None)),
                delivered_at: None,
            })
            .then_expect_events(vec![kommo_recorded(142)]);
    }
}

#[test]
fn kommo_status_rejects_a_bad_stage() {
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 1,
            previous_kommo_status_id: None,
            stage: Some(stage("x", -5, None)),
            delivered_at: None,
        })
        .then_expect_error(validation("probability", "must be between 0 and 1"));
}

// ---- LinkBooking ----

#[test]
fn link_booking_on_a_won_lead() {
    Lf::with(())
        .given(vec![created(), won()])
        .when(LeadCommand::LinkBooking {
            booking_id: id(BOOKING),
        })
        .then_expect_events(vec![LeadEvent::LeadBookingLinked {
            booking_id: id(BOOKING),
        }]);
}

#[test]
fn linking_the_same_booking_again_is_a_no_op() {
    Lf::with(())
        .given(vec![
            created(),
            won(),
            LeadEvent::LeadBookingLinked {
                booking_id: id(BOOKING),
            },
        ])
        .when(LeadCommand::LinkBooking {
            booking_id: id(BOOKING),
        })
        .then_expect_events(vec![]);
}

#[test]
fn linking_another_booking_conflicts() {
    Lf::with(())
        .given(vec![
            created(),
            won(),
            LeadEvent::LeadBookingLinked {
                booking_id: id(BOOKING),
            },
        ])
        .when(LeadCommand::LinkBooking { booking_id: id(99) })
        .then_expect_error(LeadError::BookingConflict {
            linked: id(BOOKING),
        });
}

#[test]
fn link_booking_needs_a_won_lead() {
    for (events, status) in [
        (vec![created()], LeadStatus::Active),
        (vec![created(), lost()], LeadStatus::Lost),
    ] {
        Lf::with(())
            .given(events)
            .when(LeadCommand::LinkBooking {
                booking_id: id(BOOKING),
            })
            .then_expect_error(invalid("link a booking to", status));
    }
}

// ---- Errors and events ----

#[test]
fn errors_have_kinds_and_stable_codes() {
    use crate::{DomainError, ErrorKind};
    let cases = [
        (LeadError::NotFound, ErrorKind::NotFound, "lead.not_found"),
        (
            LeadError::AlreadyExists,
            ErrorKind::Conflict,
            "lead.already_exists",
        ),
        (
            validation("x", "y"),
            ErrorKind::Validation,
            "lead.validation",
        ),
        (
            invalid("win", LeadStatus::Lost),
            ErrorKind::InvalidTransition,
            "lead.invalid_transition",
        ),
        (
            LeadError::ClientRequired,
            ErrorKind::Validation,
            "lead.client_required",
        ),
        (
            LeadError::BookingConflict { linked: id(1) },
            ErrorKind::Conflict,
            "lead.booking_conflict",
        ),
    ];
    for (err, kind, code) in cases {
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(err.code(), code);
    }
    assert_eq!(
        invalid("win", LeadStatus::Lost).to_string(),
        "cannot win a lead that is lost"
    );
}

#[test]
fn event_type_is_the_variant_name_and_events_round_trip() {
    let events = vec![
        created(),
        LeadEvent::LeadStageMoved {
            from_stage_id: "new".into(),
            stage_id: "negotiation".into(),
            probability: Decimal::new(60, 2),
            sla_days: 3,
            booking_status: None,
        },
        LeadEvent::LeadValueChanged {
            value_amount: money(1),
        },
        LeadEvent::LeadOwnerAssigned { owner_id: id(1) },
        LeadEvent::LeadNextActionSet {
            next_action: "call".into(),
            next_action_at: at(1),
        },
        LeadEvent::LeadClientAttached { client_id: id(1) },
        won(),
        lost(),
        LeadEvent::LeadReopened {},
        kommo_moved(1),
        LeadEvent::LeadBookingLinked { booking_id: id(1) },
    ];
    for e in events {
        let json = serde_json::to_value(&e).unwrap();
        let name = json.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(e.event_type(), name);
        assert_eq!(e.event_version(), "1.0");
        let back: LeadEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }
}

#[test]
fn status_serializes_in_snake_case() {
    assert_eq!(
        serde_json::to_string(&LeadStatus::Active).unwrap(),
        "\"active\""
    );
    assert_eq!(serde_json::to_string(&LeadStatus::Won).unwrap(), "\"won\"");
    assert_eq!(
        serde_json::to_string(&LeadStatus::Lost).unwrap(),
        "\"lost\""
    );
}

#[test]
fn closed_as_lost_in_kommo_loses_the_lead_in_the_same_commit() {
    let lost_stage = || Some(stage("lost", 0, None));
    let applied = LeadEvent::LeadKommoStatusApplied {
        kommo_status_id: KOMMO_CLOSED_LOST,
        stage_id: Some("lost".into()),
        probability: Some(Decimal::ZERO),
        sla_days: Some(3),
        booking_status: None,
        delivered_at: None,
    };
    let lose = LeadEvent::LeadLost {
        reason: "closed as lost in Kommo".into(),
    };
    Lf::with(())
        .given(vec![created()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: KOMMO_CLOSED_LOST,
            previous_kommo_status_id: None,
            stage: lost_stage(),
            delivered_at: None,
        })
        .then_expect_events(vec![applied.clone(), lose.clone()]);
    let lead = fold(vec![created(), applied.clone(), lose.clone()]);
    assert_eq!(lead.status, LeadStatus::Lost);
    // Recorded before this rule: delivered again, the lead is lost now.
    Lf::with(())
        .given(vec![created(), applied.clone()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: KOMMO_CLOSED_LOST,
            previous_kommo_status_id: None,
            stage: lost_stage(),
            delivered_at: None,
        })
        .then_expect_events(vec![lose.clone()]);
    // Already lost, or won here: nothing more.
    Lf::with(())
        .given(vec![created(), applied.clone(), lose])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: KOMMO_CLOSED_LOST,
            previous_kommo_status_id: None,
            stage: lost_stage(),
            delivered_at: None,
        })
        .then_expect_events(vec![]);
    Lf::with(())
        .given(vec![created(), won()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: KOMMO_CLOSED_LOST,
            previous_kommo_status_id: None,
            stage: lost_stage(),
            delivered_at: None,
        })
        .then_expect_events(vec![kommo_recorded(KOMMO_CLOSED_LOST)]);
}

#[test]
fn moved_out_of_closed_lost_in_kommo_a_lost_lead_is_active_again() {
    let from = |previous: Option<i64>| LeadCommand::ApplyKommoStatus {
        kommo_status_id: 556,
        previous_kommo_status_id: previous,
        stage: Some(stage("negotiation", 60, Some(BookingStatus::Lead))),
        delivered_at: None,
    };
    Lf::with(())
        .given(vec![created(), lost()])
        .when(from(Some(KOMMO_CLOSED_LOST)))
        .then_expect_events(vec![LeadEvent::LeadReopened {}, kommo_moved(556)]);
    let lead = fold(vec![
        created(),
        lost(),
        LeadEvent::LeadReopened {},
        kommo_moved(556),
    ]);
    assert_eq!(lead.status, LeadStatus::Active);
    assert_eq!(lead.stage_id, "negotiation");
    assert_eq!(lead.loss_reason, None);

    // A move that did not start at "Closed - lost" (a delivery from before the loss), or one
    // whose start is unknown, is only recorded; so is any move of a won lead.
    let recorded = kommo_recorded(556);
    for previous in [Some(555), None] {
        Lf::with(())
            .given(vec![created(), lost()])
            .when(from(previous))
            .then_expect_events(vec![recorded.clone()]);
    }
    Lf::with(())
        .given(vec![created(), won()])
        .when(from(Some(KOMMO_CLOSED_LOST)))
        .then_expect_events(vec![recorded]);
}

#[test]
fn a_kommo_delivery_received_before_the_status_applied_changes_nothing() {
    let applied_at = |status: i64, at: Option<DateTime<Utc>>| LeadEvent::LeadKommoStatusApplied {
        kommo_status_id: status,
        stage_id: None,
        probability: None,
        sla_days: None,
        booking_status: None,
        delivered_at: at,
    };
    let close = |at: DateTime<Utc>| LeadCommand::ApplyKommoStatus {
        kommo_status_id: KOMMO_CLOSED_LOST,
        previous_kommo_status_id: Some(47_873_539),
        stage: None,
        delivered_at: Some(at),
    };
    // Reopened at t2 in Kommo; the closing delivered at t1 is processed only afterwards.
    let given = || vec![created(), applied_at(47_873_536, Some(at(2)))];
    Lf::with(())
        .given(given())
        .when(close(at(1)))
        .then_expect_events(vec![]);
    Lf::with(())
        .given(given())
        .when(close(at(3)))
        .then_expect_events(vec![
            applied_at(KOMMO_CLOSED_LOST, Some(at(3))),
            LeadEvent::LeadLost {
                reason: "closed as lost in Kommo".into(),
            },
        ]);
}

#[test]
fn a_lost_lead_moved_to_an_unmapped_kommo_status_is_active_again_at_its_stage() {
    Lf::with(())
        .given(vec![created(), lost()])
        .when(LeadCommand::ApplyKommoStatus {
            kommo_status_id: 999,
            previous_kommo_status_id: Some(KOMMO_CLOSED_LOST),
            stage: None,
            delivered_at: None,
        })
        .then_expect_events(vec![LeadEvent::LeadReopened {}, kommo_recorded(999)]);
}
