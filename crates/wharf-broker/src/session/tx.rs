//! Transactions (`tx.*`): publishes and acknowledgements buffered until `tx.commit`, then applied
//! all or nothing (the store's space for every stored copy is taken first; on a full disk the
//! commit fails and nothing is applied), and `commit-ok` sent only once every append is synced
//! and every acknowledgement durable.

use super::{MethodResult, Session, missing_vhost};
use crate::publish::ReservationPool;
use wharf_model::{Message, ModelError};
use wharf_store::{LogId, Store, StoreError};
use wharf_wire::protocol::{AMQPClass, basic, tx};

/// A commit refused because the disk is full (channel error 406: the client learns the commit did
/// not take effect; nothing of it was applied).
fn no_space() -> ModelError {
    ModelError::precondition_failed("no space left on the disk for this transaction's messages; it was not applied")
}

/// Most publishes and acknowledgements one transaction may hold before its commit.
pub(super) const TX_OPS_MAX: usize = 65_536;

/// Something a transaction applies at commit.
#[derive(Debug)]
pub(super) enum TxOp {
    Publish(Box<(basic::Publish, Message)>),
    Ack { delivery_tag: u64, multiple: bool },
    Reject { delivery_tag: u64, multiple: bool, requeue: bool, how: wharf_model::trace::Refusal },
}

impl Session {
    pub(super) async fn tx_class(&mut self, channel: u16, method: tx::AMQPMethod) -> MethodResult {
        let Some(state) = self.channels.get_mut(&channel) else { return Ok(()) };
        match method {
            tx::AMQPMethod::Select(_) => {
                if state.confirms.is_some() {
                    return Err(ModelError::precondition_failed("cannot switch from confirm to tx mode"));
                }
                state.tx.get_or_insert_with(Vec::new);
                self.send(channel, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = state.tx.replace(Vec::new()) else {
                    return Err(ModelError::precondition_failed("channel is not transactional"));
                };
                state.tx_bytes = 0;
                // All or nothing: every publish must route, every ack must name a delivery, and
                // the store must have space for every stored copy before any of them takes effect.
                let mut wanted = Vec::new();
                {
                    let model = self.core.lock_model();
                    let vhost = model.vhost(&self.vhost).ok_or_else(missing_vhost)?;
                    let mut settles = Vec::new();
                    for op in &ops {
                        match op {
                            TxOp::Publish(publish) => {
                                let (publish, message) = publish.as_ref();
                                let queues = vhost.route(
                                    publish.exchange.as_str(),
                                    publish.routing_key.as_str(),
                                    message.headers(),
                                )?;
                                if message.persistent() {
                                    let meta_bytes = crate::persist::encode_message_meta(message).len();
                                    let bytes = Store::record_bytes(meta_bytes, message.body_bytes() as usize);
                                    let logs =
                                        queues.iter().filter_map(|queue| vhost.queue(queue)).filter_map(|queue| {
                                            queue.store_log.filter(|_| queue.durable).map(|log| (LogId(log), bytes))
                                        });
                                    wanted.extend(logs);
                                }
                            }
                            TxOp::Ack { delivery_tag, multiple } | TxOp::Reject { delivery_tag, multiple, .. } => {
                                settles.push((*delivery_tag, *multiple));
                            }
                        }
                    }
                    model.validate_settles(self.key(channel), &settles)?;
                }
                let mut pool = match self.core.store.reserve(&wanted) {
                    Ok(held) => ReservationPool(held),
                    Err(StoreError::NoSpace { .. }) => return Err(no_space()),
                    Err(error) => {
                        self.core.store_failed(&error);
                        return Err(crate::definitions::internal_error(&error));
                    }
                };
                let mut tickets = Vec::new();
                let mut failed = false;
                for op in ops {
                    match op {
                        TxOp::Publish(publish) => {
                            let (publish, message) = *publish;
                            let published = self.publish(channel, &publish, message, &mut pool)?;
                            // Only when routing changed since the space was taken, or the store
                            // stopped: never a commit-ok for a message that is not stored.
                            failed |= published.failed;
                            tickets.extend(published.durable);
                            if let Some(returned) = published.returned {
                                let _ = self.outbound.send(returned);
                            }
                        }
                        settle => self.apply_settle(channel, settle)?,
                    }
                }
                if failed {
                    return Err(ModelError::precondition_failed(
                        "a message of this transaction could not be stored (its routing changed since the commit \
                         began, or the store stopped); the rest of it was applied",
                    ));
                }
                // Every append of the transaction synced, and its acks made durable.
                let sync = self.core.store.sync().map_err(|error| {
                    self.core.store_failed(&error);
                    crate::definitions::internal_error(&error)
                })?;
                for ticket in tickets {
                    ticket.wait().await.map_err(|error| {
                        self.core.store_failed(&error);
                        crate::definitions::internal_error(&error)
                    })?;
                }
                sync.await.map_err(|error| {
                    self.core.store_failed(&error);
                    crate::definitions::internal_error(&error)
                })?;
                self.send(channel, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                if state.tx.replace(Vec::new()).is_none() {
                    return Err(ModelError::precondition_failed("channel is not transactional"));
                }
                state.tx_bytes = 0;
                self.send(channel, AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})));
                Ok(())
            }
            _ => Err(ModelError::command_invalid("this tx method is not valid from a client")),
        }
    }
}
