//! Typed handlers and the exactly-once wrapper.
//!
//! A [`TypedHandler`] receives a decoded [`Message`] and returns `Result<(), HandleError>`; the
//! runtime turns that into the acknowledgement ([`typed`]). An [`EffectHandler`] does its effect
//! inside a database transaction that [`exactly_once`] owns: the id check, begin, the inbox
//! check, the effect, commit, and the outcome. Handlers write only the effect.

use crate::SdkError;
use crate::consumer::{Handler, Incoming, Outcome};
use crate::inbox::{Inbox, Seen};
use crate::message::Message;
use std::future::Future;
use std::marker::PhantomData;

/// Why a handler did not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// It may work later (a database or service unavailable): requeue, after the queue's backoff,
    /// until its delivery limit.
    #[error("transient: {0}")]
    Transient(String),
    /// It can never work (a malformed message, a business rule that refuses it): dead-letter it
    /// with this reason.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandleError {
    /// The outcome the runtime applies.
    pub fn outcome(self) -> Outcome {
        match self {
            HandleError::Transient(_) => Outcome::Retry,
            HandleError::Permanent(reason) => Outcome::Reject(reason),
        }
    }
}

/// Database errors are transient: the same message may well succeed once the database answers.
impl From<sqlx::Error> for HandleError {
    fn from(error: sqlx::Error) -> HandleError {
        HandleError::Transient(format!("database: {error}"))
    }
}

/// SDK errors: an invalid message or body is permanent, everything else transient.
impl From<SdkError> for HandleError {
    fn from(error: SdkError) -> HandleError {
        match error {
            // A duplicate id inside a handler is a conflict (another message already wrote that
            // event), not something a retry can change.
            SdkError::Invalid { .. } | SdkError::Body(_) | SdkError::Duplicate { .. } => {
                HandleError::Permanent(error.to_string())
            }
            other => HandleError::Transient(other.to_string()),
        }
    }
}

fn outcome_of(result: Result<(), HandleError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Ack,
        Err(error) => {
            if let HandleError::Transient(reason) = &error {
                tracing::warn!(%reason, "handler failed for now; the message is requeued");
            }
            error.outcome()
        }
    }
}

/// Handles messages of one type.
pub trait TypedHandler<M: Message>: Send + Sync + 'static {
    /// Handles one message; `incoming` has its id, headers and properties.
    fn handle(&self, message: M, incoming: &Incoming) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// A [`Handler`] for the runtime that decodes each delivery as `M` (a body that is not one is
/// rejected with the reason) and runs `handler`.
pub fn typed<M: Message, H: TypedHandler<M>>(handler: H) -> Typed<M, H> {
    Typed { handler, message: PhantomData }
}

/// See [`typed`].
pub struct Typed<M, H> {
    handler: H,
    message: PhantomData<fn() -> M>,
}

impl<M, H> std::fmt::Debug for Typed<M, H> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Typed").field("message", &std::any::type_name::<M>()).finish_non_exhaustive()
    }
}

impl<M: Message, H: TypedHandler<M>> Handler for Typed<M, H> {
    async fn handle(&self, incoming: Incoming) -> Outcome {
        let message = match incoming.decode::<M>() {
            Ok(message) => message,
            Err(error) => return error.outcome(),
        };
        outcome_of(self.handler.handle(message, &incoming).await)
    }
}

/// Does a message's effect inside a transaction that [`exactly_once`] begins and commits.
pub trait EffectHandler<M: Message, Db: sqlx::Database>: Send + Sync + 'static {
    /// Applies the effect of `message` in `tx`. An error rolls everything back: nothing of the
    /// effect and no inbox record remain.
    fn handle(
        &self,
        tx: &mut sqlx::Transaction<'static, Db>,
        message: M,
        incoming: &Incoming,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Called instead of `handle` for a message handled before (the inbox recognised its id),
    /// in a transaction of its own that is committed after: for counting or auditing the
    /// duplicates absorbed. Does nothing by default.
    fn on_duplicate(
        &self,
        tx: &mut sqlx::Transaction<'static, Db>,
        incoming: &Incoming,
    ) -> impl Future<Output = Result<(), HandleError>> + Send {
        let _ = (tx, incoming);
        async { Ok(()) }
    }
}

/// A [`Handler`] that applies `handler`'s effect exactly once per message id, however often the
/// message is delivered:
/// - no `message-id`, or a body that is not an `M`: rejected with the reason, never retried;
/// - begin; the inbox records the id (already there: nothing is done, the message is
///   acknowledged); the effect; commit; acknowledge;
/// - `Transient` or a database error: rolled back and requeued; `Permanent`: rolled back and
///   rejected with the reason. Nothing is recorded, so a message re-driven from the dead-letter
///   queue after a fix is processed.
pub fn exactly_once<M, I, H>(inbox: I, handler: H) -> ExactlyOnce<M, I, H>
where
    M: Message,
    I: Inbox,
    H: EffectHandler<M, I::Db>,
{
    ExactlyOnce { inbox, handler, message: PhantomData }
}

/// See [`exactly_once`].
pub struct ExactlyOnce<M, I, H> {
    inbox: I,
    handler: H,
    message: PhantomData<fn() -> M>,
}

impl<M, I: std::fmt::Debug, H> std::fmt::Debug for ExactlyOnce<M, I, H> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ExactlyOnce")
            .field("message", &std::any::type_name::<M>())
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

impl<M, I, H> ExactlyOnce<M, I, H>
where
    M: Message,
    I: Inbox,
    H: EffectHandler<M, I::Db>,
{
    async fn run(&self, incoming: &Incoming) -> Result<(), HandleError> {
        let id = incoming.id()?;
        let message = incoming.decode::<M>()?;
        let mut tx = self.inbox.pool().begin().await?;
        if self.inbox.handle(&mut tx, id).await? == Seen::Again {
            tracing::debug!(%id, "already handled; acknowledged without a second effect");
            self.handler.on_duplicate(&mut tx, incoming).await?;
            tx.commit().await?;
            return Ok(());
        }
        self.handler.handle(&mut tx, message, incoming).await?;
        tx.commit().await?;
        Ok(())
    }
}

impl<M, I, H> Handler for ExactlyOnce<M, I, H>
where
    M: Message,
    I: Inbox,
    H: EffectHandler<M, I::Db>,
{
    async fn handle(&self, incoming: Incoming) -> Outcome {
        outcome_of(self.run(&incoming).await)
    }
}
