//! Who issued a command and in answer to what: recorded on every event it produces.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A staff member's role (`role_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Operations,
    Sales,
    Ceo,
    Driver,
    Integration,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Operations => "operations",
            Self::Sales => "sales",
            Self::Ceo => "ceo",
            Self::Driver => "driver",
            Self::Integration => "integration",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "operations" => Self::Operations,
            "sales" => Self::Sales,
            "ceo" => Self::Ceo,
            "driver" => Self::Driver,
            "integration" => Self::Integration,
            _ => return None,
        })
    }
}

/// What kind of actor issued the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActorKind {
    Staff,
    System,
    Kommo,
    OutboxWorker,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Staff => "staff",
            Self::System => "system",
            Self::Kommo => "kommo",
            Self::OutboxWorker => "outbox-worker",
        }
    }
}

/// The issuer of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub kind: ActorKind,
    pub staff_id: Option<Uuid>,
    pub role: Option<Role>,
}

impl Actor {
    pub fn staff(staff_id: Uuid, role: Role) -> Self {
        Self {
            kind: ActorKind::Staff,
            staff_id: Some(staff_id),
            role: Some(role),
        }
    }
    pub fn system() -> Self {
        Self::non_staff(ActorKind::System)
    }
    pub fn kommo() -> Self {
        Self::non_staff(ActorKind::Kommo)
    }
    pub fn outbox_worker() -> Self {
        Self::non_staff(ActorKind::OutboxWorker)
    }
    fn non_staff(kind: ActorKind) -> Self {
        Self {
            kind,
            staff_id: None,
            role: None,
        }
    }
}

/// Metadata recorded on every event of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandMetadata {
    pub actor: Actor,
    /// Shared by every command of one conversation (a request and all it caused).
    pub correlation_id: String,
    /// What caused this command: a request id, or an event (`Lead/<id>/<sequence>`).
    pub causation_id: String,
    pub request_id: String,
    /// The `Idempotency-Key` claim the command runs under, if the request sent a key: the
    /// database writes its events only while the claim is current (a retry may take it over).
    pub idempotency_claim: Option<Uuid>,
}

impl CommandMetadata {
    /// A command that starts a new conversation: its own correlation and causation.
    pub fn new(actor: Actor, request_id: impl Into<String>) -> Self {
        let request_id = request_id.into();
        Self {
            actor,
            correlation_id: Uuid::now_v7().to_string(),
            causation_id: request_id.clone(),
            request_id,
            idempotency_claim: None,
        }
    }

    /// A command caused by an earlier event (a process manager, the outbox worker).
    pub fn caused_by(actor: Actor, correlation_id: String, causation_id: String) -> Self {
        Self {
            actor,
            request_id: causation_id.clone(),
            correlation_id,
            causation_id,
            idempotency_claim: None,
        }
    }

    /// The string map cqrs-es stores beside each event.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            (
                "actor_type".to_string(),
                self.actor.kind.as_str().to_string(),
            ),
            (
                "correlation_id".to_string(),
                self.correlation_id.to_string(),
            ),
            ("causation_id".to_string(), self.causation_id.clone()),
            ("request_id".to_string(), self.request_id.clone()),
        ]);
        if let Some(id) = self.actor.staff_id {
            m.insert("actor_id".into(), id.to_string());
        }
        if let Some(role) = self.actor.role {
            m.insert("actor_role".into(), role.as_str().to_string());
        }
        if let Some(claim) = self.idempotency_claim {
            m.insert("idempotency_claim".into(), claim.to_string());
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staff_metadata_names_actor_role_and_ids() {
        let staff = Uuid::now_v7();
        let m = CommandMetadata::new(Actor::staff(staff, Role::Ceo), "req-1").to_map();
        assert_eq!(m["actor_type"], "staff");
        assert_eq!(m["actor_id"], staff.to_string());
        assert_eq!(m["actor_role"], "ceo");
        assert_eq!(m["request_id"], "req-1");
        assert_eq!(m["causation_id"], "req-1");
        assert!(Uuid::parse_str(&m["correlation_id"]).is_ok());
    }

    #[test]
    fn system_actors_have_no_staff_id() {
        let m = CommandMetadata::new(Actor::outbox_worker(), "r").to_map();
        assert_eq!(m["actor_type"], "outbox-worker");
        assert!(!m.contains_key("actor_id"));
    }
}
