//! Given/when/then tests of every booking command: the happy path and each rejection.

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::test::TestFramework;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::*;

const CLIENT: Uuid = Uuid::from_u128(1);
const OWNER: Uuid = Uuid::from_u128(2);
const VEHICLE: Uuid = Uuid::from_u128(3);
const DRIVER: Uuid = Uuid::from_u128(4);
const SERVICE: Uuid = Uuid::from_u128(5);
const LINE: Uuid = Uuid::from_u128(6);

fn t(h: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 1, 10, 0, 0).unwrap() + Duration::hours(h)
}
fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}
fn m(s: &str) -> Money {
    Money::parse("x", d(s)).unwrap()
}

fn framework() -> TestFramework<Booking> {
    TestFramework::with(())
}

fn create_cmd() -> CreateBooking {
    CreateBooking {
        external_code: "BK-1052".into(),
        client_id: CLIENT,
        owner_id: OWNER,
        booking_type: BookingType::Rental,
        priority: Priority::High,
        channel: "Kommo".into(),
        start_at: t(0),
        end_at: t(49), // 2 days and 1 hour: 3 days
        vehicle_id: Some(VEHICLE),
        driver_id: None,
        price_daily: d("6500"),
        deposit_amount: d("5000"),
        advance_payment: d("1000"),
        full_insurance_fee: d("750.50"),
        currency: None,
        pickup_location: Some(" Dubai Marina ".into()),
        dropoff_location: None,
        services: vec![ServiceInput {
            line_id: LINE,
            service_id: SERVICE,
            price: d("150"),
            quantity: 2,
            description: None,
        }],
        lead_id: None,
    }
}

fn line() -> ServiceLine {
    ServiceLine {
        line_id: LINE,
        service_id: SERVICE,
        price: m("150"),
        quantity: 2,
        description: None,
    }
}

/// 6500 x 3 + 150 x 2 + 750.50
const TOTAL: &str = "20550.50";

fn created() -> BookingEvent {
    BookingEvent::BookingCreated {
        external_code: "BK-1052".into(),
        client_id: CLIENT,
        owner_id: OWNER,
        booking_type: BookingType::Rental,
        priority: Priority::High,
        channel: "Kommo".into(),
        start_at: t(0),
        end_at: t(49),
        rental_duration_days: 3,
        vehicle_id: Some(VEHICLE),
        driver_id: None,
        price_daily: m("6500"),
        deposit_amount: m("5000"),
        advance_payment: m("1000"),
        full_insurance_fee: m("750.50"),
        currency: "AED".into(),
        pickup_location: Some("Dubai Marina".into()),
        dropoff_location: None,
        services: vec![line()],
        lead_id: None,
        total_amount: m(TOTAL),
    }
}

fn confirmed() -> BookingEvent {
    BookingEvent::BookingConfirmed {
        vehicle_id: VEHICLE,
        start_at: t(0),
        end_at: t(49),
    }
}
fn delivering() -> BookingEvent {
    BookingEvent::BookingDeliveryStarted {
        driver_id: Some(DRIVER),
        promised_at: t(0),
    }
}
fn rental_started() -> BookingEvent {
    BookingEvent::BookingRentalStarted {
        started_at: t(0),
        promised_at: Some(t(0)),
        delivered_on_time: true,
        pickup_mileage_km: 12_000,
        fuel_level_pct: 100,
    }
}
fn completed() -> BookingEvent {
    BookingEvent::BookingCompleted {
        returned_at: t(48),
        return_mileage_km: 12_400,
        fuel_level_pct: 80,
    }
}
fn cancelled() -> BookingEvent {
    BookingEvent::BookingCancelled {
        reason: "client changed plans".into(),
        previous_status: BookingStatus::Lead,
    }
}

/// The event history that puts a booking in each status.
fn history(status: BookingStatus) -> Vec<BookingEvent> {
    let all = [
        created(),
        confirmed(),
        delivering(),
        rental_started(),
        completed(),
    ];
    match status {
        BookingStatus::Lead => all[..1].to_vec(),
        BookingStatus::Confirmed => all[..2].to_vec(),
        BookingStatus::Delivery => all[..3].to_vec(),
        BookingStatus::InProgress => all[..4].to_vec(),
        BookingStatus::Completed => all.to_vec(),
        BookingStatus::Cancelled => vec![created(), cancelled()],
    }
}

const ALL: [BookingStatus; 6] = [
    BookingStatus::Lead,
    BookingStatus::Confirmed,
    BookingStatus::Delivery,
    BookingStatus::InProgress,
    BookingStatus::Completed,
    BookingStatus::Cancelled,
];

/// Checks that `command` is accepted exactly in `allowed` and refused with an invalid
/// transition in every other status, and refused as not found before creation.
fn check_statuses(command: BookingCommand, action: &'static str, allowed: &[BookingStatus]) {
    for status in ALL {
        let result = framework()
            .given(history(status))
            .when(command.clone())
            .inspect_result();
        if allowed.contains(&status) {
            assert!(result.is_ok(), "{action} in {status}: {result:?}");
        } else {
            assert_eq!(
                result,
                Err(BookingError::InvalidTransition { action, status }),
                "{action} in {status}"
            );
        }
    }
    framework()
        .given_no_previous_events()
        .when(command)
        .then_expect_error(BookingError::NotFound);
}

use BookingStatus as S;
const OPEN: [BookingStatus; 4] = [S::Lead, S::Confirmed, S::Delivery, S::InProgress];

#[test]
fn create_computes_duration_and_total() {
    framework()
        .given_no_previous_events()
        .when(BookingCommand::Create(Box::new(create_cmd())))
        .then_expect_events(vec![created()]);
}

#[test]
fn create_refuses_bad_input() {
    type Mutation = Box<dyn Fn(&mut CreateBooking)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (Box::new(|c| c.end_at = c.start_at), "end_at"),
        (Box::new(|c| c.end_at = t(-1)), "end_at"),
        (Box::new(|c| c.price_daily = d("-1")), "price_daily"),
        (
            Box::new(|c| c.deposit_amount = d("-0.01")),
            "deposit_amount",
        ),
        (
            Box::new(|c| c.advance_payment = d("1.001")),
            "advance_payment",
        ),
        (
            Box::new(|c| c.full_insurance_fee = d("-5")),
            "full_insurance_fee",
        ),
        (Box::new(|c| c.services[0].quantity = 0), "quantity"),
        (Box::new(|c| c.services[0].price = d("-150")), "price"),
        (Box::new(|c| c.channel = "  ".into()), "channel"),
        (Box::new(|c| c.currency = Some("dirham".into())), "currency"),
    ];
    for (mutate, field) in cases {
        let mut cmd = create_cmd();
        mutate(&mut cmd);
        let result = framework()
            .given_no_previous_events()
            .when(BookingCommand::Create(Box::new(cmd)))
            .inspect_result();
        match result {
            Err(BookingError::Validation(v)) => assert_eq!(v.field, field),
            other => panic!("{field}: expected a validation error, got {other:?}"),
        }
    }
}

#[test]
fn create_twice_is_refused() {
    framework()
        .given(vec![created()])
        .when(BookingCommand::Create(Box::new(create_cmd())))
        .then_expect_error(BookingError::AlreadyExists);
}

#[test]
fn assign_vehicle_before_and_after_confirmation() {
    let other = Uuid::from_u128(99);
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::AssignVehicle { vehicle_id: other })
        .then_expect_events(vec![BookingEvent::BookingVehicleAssigned {
            vehicle_id: other,
            holds_vehicle: false,
        }]);
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::AssignVehicle { vehicle_id: other })
        .then_expect_events(vec![BookingEvent::BookingVehicleAssigned {
            vehicle_id: other,
            holds_vehicle: true,
        }]);
    // The same vehicle again changes nothing.
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::AssignVehicle {
            vehicle_id: VEHICLE,
        })
        .then_expect_events(vec![]);
    check_statuses(
        BookingCommand::AssignVehicle { vehicle_id: other },
        "assign a vehicle to",
        &[S::Lead, S::Confirmed],
    );
}

#[test]
fn assign_driver_and_change_owner() {
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::AssignDriver { driver_id: DRIVER })
        .then_expect_events(vec![BookingEvent::BookingDriverAssigned {
            driver_id: DRIVER,
        }]);
    check_statuses(
        BookingCommand::AssignDriver { driver_id: DRIVER },
        "assign a driver to",
        &OPEN,
    );
    let new_owner = Uuid::from_u128(42);
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::ChangeOwner {
            owner_id: new_owner,
        })
        .then_expect_events(vec![BookingEvent::BookingOwnerChanged {
            owner_id: new_owner,
        }]);
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::ChangeOwner { owner_id: OWNER })
        .then_expect_events(vec![]);
    check_statuses(
        BookingCommand::ChangeOwner {
            owner_id: new_owner,
        },
        "change the owner of",
        &OPEN,
    );
}

#[test]
fn reschedule_reprices_and_keeps_the_vehicle_hold() {
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::Reschedule {
            start_at: t(24),
            end_at: t(48),
        })
        .then_expect_events(vec![BookingEvent::BookingRescheduled {
            start_at: t(24),
            end_at: t(48),
            rental_duration_days: 1,
            total_amount: m("7550.50"),
            holds_vehicle: true,
        }]);
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::Reschedule {
            start_at: t(24),
            end_at: t(24),
        })
        .then_expect_error(ValidationError::new("end_at", "must be after start_at").into());
    check_statuses(
        BookingCommand::Reschedule {
            start_at: t(24),
            end_at: t(48),
        },
        "reschedule",
        &[S::Lead, S::Confirmed],
    );
}

#[test]
fn add_and_remove_services() {
    let wifi = ServiceInput {
        line_id: Uuid::from_u128(77),
        service_id: Uuid::from_u128(78),
        price: d("100"),
        quantity: 3,
        description: Some("5G".into()),
    };
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::AddService(wifi.clone()))
        .then_expect_events(vec![BookingEvent::BookingServiceAdded {
            line: ServiceLine {
                line_id: wifi.line_id,
                service_id: wifi.service_id,
                price: m("100"),
                quantity: 3,
                description: Some("5G".into()),
            },
            total_amount: m("20850.50"),
        }]);
    // A line id already on the booking is refused (a retry must not add it twice).
    let mut dup = wifi.clone();
    dup.line_id = LINE;
    assert!(matches!(
        framework()
            .given(history(S::Lead))
            .when(BookingCommand::AddService(dup))
            .inspect_result(),
        Err(BookingError::Validation(_))
    ));
    check_statuses(BookingCommand::AddService(wifi), "add a service to", &OPEN);

    framework()
        .given(history(S::Lead))
        .when(BookingCommand::RemoveService { line_id: LINE })
        .then_expect_events(vec![BookingEvent::BookingServiceRemoved {
            line_id: LINE,
            total_amount: m("20250.50"),
        }]);
    assert!(matches!(
        framework()
            .given(history(S::Lead))
            .when(BookingCommand::RemoveService {
                line_id: Uuid::from_u128(1234)
            })
            .inspect_result(),
        Err(BookingError::Validation(_))
    ));
    check_statuses(
        BookingCommand::RemoveService { line_id: LINE },
        "remove a service from",
        &OPEN,
    );
}

#[test]
fn confirm_needs_a_vehicle_and_a_lead() {
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::Confirm)
        .then_expect_events(vec![confirmed()]);
    let mut without_vehicle = create_cmd();
    without_vehicle.vehicle_id = None;
    let events = framework()
        .given_no_previous_events()
        .when(BookingCommand::Create(Box::new(without_vehicle)))
        .inspect_result()
        .unwrap();
    framework()
        .given(events)
        .when(BookingCommand::Confirm)
        .then_expect_error(BookingError::VehicleRequired);
    check_statuses(BookingCommand::Confirm, "confirm", &[S::Lead]);
}

#[test]
fn delivery_rental_and_sla() {
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::StartDelivery {
            driver_id: Some(DRIVER),
            promised_at: t(0),
        })
        .then_expect_events(vec![delivering()]);
    check_statuses(
        BookingCommand::StartDelivery {
            driver_id: None,
            promised_at: t(0),
        },
        "start the delivery of",
        &[S::Confirmed],
    );

    framework()
        .given(history(S::Delivery))
        .when(BookingCommand::StartRental {
            started_at: t(0),
            pickup_mileage_km: 12_000,
            fuel_level_pct: 100,
        })
        .then_expect_events(vec![rental_started()]);
    // Late by a minute: counts against the SLA.
    let late = framework()
        .given(history(S::Delivery))
        .when(BookingCommand::StartRental {
            started_at: t(0) + Duration::minutes(1),
            pickup_mileage_km: 12_000,
            fuel_level_pct: 100,
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(
        late[0],
        BookingEvent::BookingRentalStarted {
            delivered_on_time: false,
            ..
        }
    ));
    for (km, fuel) in [(-1, 50), (100, 101), (100, -1)] {
        assert!(matches!(
            framework()
                .given(history(S::Delivery))
                .when(BookingCommand::StartRental {
                    started_at: t(0),
                    pickup_mileage_km: km,
                    fuel_level_pct: fuel,
                })
                .inspect_result(),
            Err(BookingError::Validation(_))
        ));
    }
    check_statuses(
        BookingCommand::StartRental {
            started_at: t(0),
            pickup_mileage_km: 1,
            fuel_level_pct: 1,
        },
        "start the rental of",
        &[S::Delivery],
    );
}

#[test]
fn extend_prices_the_extra_days() {
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::Extend {
            new_end_at: t(49 + 30),
            price_daily: Some(d("6000")),
        })
        .then_expect_events(vec![BookingEvent::BookingExtended {
            previous_end_at: t(49),
            new_end_at: t(79),
            extra_days: 2,
            price_daily: m("6000"),
            amount: m("12000"),
            total_amount: m("32550.50"),
        }]);
    // Without a price, the booking's own daily price applies.
    let events = framework()
        .given(history(S::Delivery))
        .when(BookingCommand::Extend {
            new_end_at: t(49 + 24),
            price_daily: None,
        })
        .inspect_result()
        .unwrap();
    assert!(matches!(
        &events[0],
        BookingEvent::BookingExtended { amount, .. } if *amount == m("6500")
    ));
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::Extend {
            new_end_at: t(49),
            price_daily: None,
        })
        .then_expect_error(
            ValidationError::new("new_end_at", "must be after the current end_at").into(),
        );
    check_statuses(
        BookingCommand::Extend {
            new_end_at: t(100),
            price_daily: None,
        },
        "extend",
        &[S::Delivery, S::InProgress],
    );
}

#[test]
fn complete_checks_mileage_and_time() {
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::Complete {
            returned_at: t(48),
            return_mileage_km: 12_400,
            fuel_level_pct: 80,
        })
        .then_expect_events(vec![completed()]);
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::Complete {
            returned_at: t(48),
            return_mileage_km: 11_999,
            fuel_level_pct: 80,
        })
        .then_expect_error(
            ValidationError::new("return_mileage_km", "must not be below the pickup mileage")
                .into(),
        );
    framework()
        .given(history(S::InProgress))
        .when(BookingCommand::Complete {
            returned_at: t(-1),
            return_mileage_km: 12_400,
            fuel_level_pct: 80,
        })
        .then_expect_error(
            ValidationError::new("returned_at", "must not be before the rental started").into(),
        );
    check_statuses(
        BookingCommand::Complete {
            returned_at: t(48),
            return_mileage_km: 12_400,
            fuel_level_pct: 80,
        },
        "complete",
        &[S::InProgress],
    );
}

#[test]
fn cancel_from_lead_confirmed_or_delivery_with_a_reason() {
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::Cancel {
            reason: "flight cancelled".into(),
        })
        .then_expect_events(vec![BookingEvent::BookingCancelled {
            reason: "flight cancelled".into(),
            previous_status: S::Confirmed,
        }]);
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::Cancel { reason: " ".into() })
        .then_expect_error(ValidationError::new("reason", "must not be empty").into());
    check_statuses(
        BookingCommand::Cancel { reason: "x".into() },
        "cancel",
        &[S::Lead, S::Confirmed, S::Delivery],
    );
}

#[test]
fn invoice_labels_count_per_booking_without_gaps() {
    let invoice = |n: u128| BookingCommand::IssueInvoice {
        invoice_id: Uuid::from_u128(n),
        invoice_type: "rental".into(),
        amount: d("1000"),
        issued_at: t(0),
        due_at: Some(t(24)),
    };
    let first = framework()
        .given(history(S::Confirmed))
        .when(invoice(1))
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&first[0], BookingEvent::BookingInvoiceIssued { label, .. } if label == "INV-1052-1")
    );
    let mut given = history(S::Confirmed);
    given.extend(first);
    // A refused invoice in between does not use up a number.
    assert!(
        framework()
            .given(given.clone())
            .when(BookingCommand::IssueInvoice {
                invoice_id: Uuid::from_u128(2),
                invoice_type: "rental".into(),
                amount: d("0"),
                issued_at: t(0),
                due_at: None,
            })
            .inspect_result()
            .is_err()
    );
    let second = framework()
        .given(given)
        .when(invoice(3))
        .inspect_result()
        .unwrap();
    assert!(
        matches!(&second[0], BookingEvent::BookingInvoiceIssued { label, .. } if label == "INV-1052-2")
    );
    framework()
        .given(history(S::Lead))
        .when(BookingCommand::IssueInvoice {
            invoice_id: Uuid::from_u128(9),
            invoice_type: "rental".into(),
            amount: d("10"),
            issued_at: t(24),
            due_at: Some(t(0)),
        })
        .then_expect_error(ValidationError::new("due_at", "must not be before issued_at").into());
    check_statuses(
        invoice(5),
        "invoice",
        &[
            S::Lead,
            S::Confirmed,
            S::Delivery,
            S::InProgress,
            S::Completed,
        ],
    );
}

#[test]
fn payments_reduce_the_outstanding_and_never_exceed_it() {
    let pay = |amount: &str| BookingCommand::RecordPayment {
        payment_id: Uuid::from_u128(10),
        amount: d(amount),
        method: "card".into(),
        paid_at: t(1),
    };
    framework()
        .given(history(S::Completed))
        .when(pay("20000"))
        .then_expect_events(vec![BookingEvent::BookingPaymentRecorded {
            payment_id: Uuid::from_u128(10),
            amount: m("20000"),
            method: "card".into(),
            paid_at: t(1),
            paid_amount: m("20000"),
            outstanding_amount: m("550.50"),
        }]);
    framework()
        .given(history(S::Completed))
        .when(pay("20550.51"))
        .then_expect_error(BookingError::Overpayment {
            amount: m("20550.51"),
            outstanding: m(TOTAL),
        });
    framework()
        .given(history(S::Completed))
        .when(pay("0"))
        .then_expect_error(ValidationError::new("amount", "must be positive").into());
    framework()
        .given(history(S::Completed))
        .when(pay("-5"))
        .then_expect_error(ValidationError::new("amount", "must not be negative").into());
    check_statuses(
        pay("1"),
        "record a payment on",
        &[
            S::Lead,
            S::Confirmed,
            S::Delivery,
            S::InProgress,
            S::Completed,
        ],
    );
}

#[test]
fn sales_service_rating_is_0_to_10() {
    framework()
        .given(history(S::Completed))
        .when(BookingCommand::RateSalesService {
            rating: 10,
            feedback: Some("Lina was superb".into()),
        })
        .then_expect_events(vec![BookingEvent::BookingSalesServiceRated {
            rating: 10,
            feedback: Some("Lina was superb".into()),
        }]);
    for bad in [-1, 11] {
        framework()
            .given(history(S::Completed))
            .when(BookingCommand::RateSalesService {
                rating: bad,
                feedback: None,
            })
            .then_expect_error(ValidationError::new("rating", "must be between 0 and 10").into());
    }
    check_statuses(
        BookingCommand::RateSalesService {
            rating: 0,
            feedback: None,
        },
        "rate the sales service of",
        &[S::Confirmed, S::Delivery, S::InProgress, S::Completed],
    );
}

#[test]
fn crm_write_backs_are_idempotent() {
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::ApplyKommoStatus {
            kommo_status_id: 47_888_833,
        })
        .then_expect_events(vec![BookingEvent::BookingKommoStatusApplied {
            kommo_status_id: 47_888_833,
        }]);
    let mut given = history(S::Confirmed);
    given.push(BookingEvent::BookingKommoStatusApplied {
        kommo_status_id: 47_888_833,
    });
    framework()
        .given(given)
        .when(BookingCommand::ApplyKommoStatus {
            kommo_status_id: 47_888_833,
        })
        .then_expect_events(vec![]);

    let linked = BookingEvent::BookingZohoSalesOrderLinked {
        zoho_sales_order_id: "4150868000003194003".into(),
    };
    framework()
        .given(history(S::Confirmed))
        .when(BookingCommand::LinkZohoSalesOrder {
            zoho_sales_order_id: "4150868000003194003".into(),
        })
        .then_expect_events(vec![linked.clone()]);
    let mut given = history(S::Confirmed);
    given.push(linked.clone());
    framework()
        .given(given.clone())
        .when(BookingCommand::LinkZohoSalesOrder {
            zoho_sales_order_id: "4150868000003194003".into(),
        })
        .then_expect_events(vec![]);
    framework()
        .given(given)
        .when(BookingCommand::RecordZohoSyncFailure {
            error: "INVALID_DATA: Subject".into(),
        })
        .then_expect_events(vec![BookingEvent::BookingZohoSyncFailed {
            error: "INVALID_DATA: Subject".into(),
        }]);
    for cmd in [
        BookingCommand::ApplyKommoStatus { kommo_status_id: 1 },
        BookingCommand::LinkZohoSalesOrder {
            zoho_sales_order_id: "1".into(),
        },
        BookingCommand::RecordZohoSyncFailure { error: "x".into() },
    ] {
        framework()
            .given_no_previous_events()
            .when(cmd)
            .then_expect_error(BookingError::NotFound);
    }
}

#[test]
fn folded_state_tracks_totals_and_outstanding() {
    let mut booking = Booking::default();
    for e in history(S::InProgress) {
        booking.apply(e);
    }
    booking.apply(BookingEvent::BookingPaymentRecorded {
        payment_id: Uuid::from_u128(1),
        amount: m("550.50"),
        method: "cash".into(),
        paid_at: t(2),
        paid_amount: m("550.50"),
        outstanding_amount: m("20000"),
    });
    assert_eq!(booking.status, S::InProgress);
    assert_eq!(booking.total_amount, m(TOTAL));
    assert_eq!(booking.outstanding_amount(), m("20000"));
    assert_eq!(booking.delivered_at, Some(t(0)));
}
