//! `basic.*` and `confirm.select`: consumers, gets, acknowledgements (or their buffering in a
//! transaction), and switching a channel to confirm mode.

use super::content::Content;
use super::tx::{TX_OPS_MAX, TxOp};
use super::{MethodResult, Session};
use crate::access::{Resource, Right};
use crate::confirms::{ConfirmQueue, Confirms, confirm_loop};
use crate::outbound::Outbound;
use crate::outbound::method_frame;
use std::sync::{Arc, Mutex};
use wharf_model::ModelError;
use wharf_model::broker::DIRECT_REPLY_TO;
use wharf_model::trace::Refusal;
use wharf_wire::protocol::{AMQPClass, basic, confirm};

impl Session {
    pub(super) async fn basic_class(&mut self, channel: u16, method: basic::AMQPMethod) -> MethodResult {
        let key = self.key(channel);
        match method {
            basic::AMQPMethod::Qos(qos) => {
                self.send(channel, AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})));
                self.core.act(|model| Ok(((), model.qos(key, qos.prefetch_count, qos.global)?)))?;
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) if consume.queue.as_str() == DIRECT_REPLY_TO => {
                // Direct reply-to: no queue, so no read permission to check (as RabbitMQ).
                let tag = self.core.lock_model().consume_replies(key, consume.consumer_tag.as_str(), consume.no_ack)?;
                if !consume.nowait {
                    let consume_ok = basic::ConsumeOk { consumer_tag: tag.into() };
                    self.send(channel, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(consume_ok)));
                }
                Ok(())
            }
            basic::AMQPMethod::Consume(consume) => {
                let queue_name = self.queue_name(channel, consume.queue.as_str());
                self.allow(Right::Read, Resource::Queue, &queue_name)?;
                let priority = wharf_model::settings::consumer_priority(&consume.arguments)?;
                self.core.require_replica(&self.vhost, &queue_name)?;
                let mut model = self.core.lock_model();
                let (tag, mut effects) = model.consume_with_priority(
                    key,
                    &queue_name,
                    consume.consumer_tag.as_str(),
                    consume.no_ack,
                    consume.exclusive,
                    priority,
                )?;
                // Sent while the model is still locked: no other connection's publish can
                // dispatch to the new consumer (and get a deliver out) before this consume-ok.
                if !consume.nowait {
                    self.send(
                        channel,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk { consumer_tag: tag.into() })),
                    );
                }
                self.core.send(&mut effects);
                drop(model);
                self.core.apply(effects);
                Ok(())
            }
            basic::AMQPMethod::Cancel(cancel) => {
                let mut model = self.core.lock_model();
                let mut effects = model.cancel(key, cancel.consumer_tag.as_str())?;
                self.core.send(&mut effects);
                drop(model);
                if !cancel.nowait {
                    self.send(
                        channel,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag,
                        })),
                    );
                }
                crate::core::blocking(|| self.core.apply(effects));
                Ok(())
            }
            basic::AMQPMethod::Publish(publish) => {
                if publish.immediate {
                    return Err(ModelError::not_implemented("immediate=true"));
                }
                let exchange = publish.exchange.as_str();
                let cached = self.channels.get(&channel).and_then(|state| state.write_allowed.as_deref());
                if cached != Some(exchange) {
                    self.allow(Right::Write, Resource::Exchange, exchange)?;
                    self.allow_topic(Right::Write, exchange, publish.routing_key.as_str())?;
                }
                // A publish that is let through makes the connection a publisher (blocked while an
                // alarm is raised); a refused one does not.
                self.published = true;
                let cacheable = !self.grant.has_topic_rules(exchange);
                if let Some(state) = self.channels.get_mut(&channel) {
                    if cacheable && state.write_allowed.as_deref() != Some(exchange) {
                        state.write_allowed = Some(exchange.to_owned());
                    }
                    state.content = Some(Content::Header(publish));
                }
                Ok(())
            }
            basic::AMQPMethod::Get(get) => {
                let queue_name = self.queue_name(channel, get.queue.as_str());
                self.allow(Right::Read, Resource::Queue, &queue_name)?;
                if self.core.is_quorum_queue(&self.vhost, &queue_name) {
                    let got = self.core.get_from_quorum(key, &self.vhost, &queue_name, get.no_ack)?;
                    let outbound = self.outbound.clone();
                    let mut lost = None;
                    self.core.act(|model| {
                        let mut effects = wharf_model::Effects::default();
                        let empty = match got {
                            crate::cluster::QuorumGet::Message(got) => {
                                let (id, no_ack) = (got.id, got.no_ack);
                                match model.deliver_replicated_get(got) {
                                    Some(delivery) => effects.deliveries.push(delivery),
                                    None => lost = Some((id, no_ack)),
                                }
                                lost.is_some()
                            }
                            crate::cluster::QuorumGet::Empty => true,
                        };
                        if empty {
                            let method = AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}));
                            let _ = outbound.send(Outbound::Frames(method_frame(channel, &method)));
                        }
                        Ok(((), effects))
                    })?;
                    if let Some((id, no_ack)) = lost {
                        self.core.give_back_get(key, &self.vhost, &queue_name, id, no_ack);
                    }
                    return Ok(());
                }
                // Answered under the model lock, like every delivery, so the get-ok keeps its
                // tag's place among deliveries to this channel.
                let outbound = self.outbound.clone();
                self.core.act(|model| {
                    let (delivery, mut effects) = model.get(key, &queue_name, get.no_ack)?;
                    match delivery {
                        // `act` sends it with the rest of the effects, still under the lock.
                        Some(delivery) => effects.deliveries.push(delivery),
                        None => {
                            let method = AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {}));
                            let _ = outbound.send(Outbound::Frames(method_frame(channel, &method)));
                        }
                    }
                    Ok(((), effects))
                })
            }
            basic::AMQPMethod::Ack(ack) => {
                self.settle(channel, TxOp::Ack { delivery_tag: ack.delivery_tag, multiple: ack.multiple })
            }
            basic::AMQPMethod::Reject(reject) => self.settle(
                channel,
                TxOp::Reject {
                    delivery_tag: reject.delivery_tag,
                    multiple: false,
                    requeue: reject.requeue,
                    how: Refusal::Reject,
                },
            ),
            basic::AMQPMethod::Nack(nack) => self.settle(
                channel,
                TxOp::Reject {
                    delivery_tag: nack.delivery_tag,
                    multiple: nack.multiple,
                    requeue: nack.requeue,
                    how: Refusal::Nack,
                },
            ),
            basic::AMQPMethod::Recover(recover) => {
                // Refused before recover-ok is sent, as RabbitMQ (540 only).
                if !recover.requeue {
                    return Err(ModelError::not_implemented("requeue=false"));
                }
                self.send(channel, AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})));
                self.core.act(|model| Ok(((), model.recover(key, recover.requeue)?)))?;
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(recover) => {
                self.core.act(|model| Ok(((), model.recover(key, recover.requeue)?)))?;
                Ok(())
            }
            _ => Err(ModelError::command_invalid("this basic method is not valid from a client")),
        }
    }

    /// An acknowledgement: applied now, or at commit in a transaction.
    pub(super) fn settle(&mut self, channel: u16, op: TxOp) -> MethodResult {
        if let Some(buffer) = self.channels.get_mut(&channel).and_then(|state| state.tx.as_mut()) {
            if buffer.len() >= TX_OPS_MAX {
                return Err(ModelError::precondition_failed(format!(
                    "a transaction holds at most {TX_OPS_MAX} operations"
                )));
            }
            buffer.push(op);
            return Ok(());
        }
        self.apply_settle(channel, op)
    }

    pub(super) fn apply_settle(&mut self, channel: u16, op: TxOp) -> MethodResult {
        let key = self.key(channel);
        match op {
            TxOp::Ack { delivery_tag, multiple } => {
                self.core.act(|model| Ok(((), model.ack(key, delivery_tag, multiple)?)))
            }
            TxOp::Reject { delivery_tag, multiple, requeue, how } => {
                self.core.act(|model| Ok(((), model.refuse(key, delivery_tag, multiple, requeue, how)?)))
            }
            TxOp::Publish(_) => Ok(()),
        }
    }

    pub(super) fn confirm_select(&mut self, channel: u16, select: confirm::Select) -> MethodResult {
        let Some(state) = self.channels.get_mut(&channel) else { return Ok(()) };
        if state.tx.is_some() {
            return Err(ModelError::precondition_failed("cannot switch from tx to confirm mode"));
        }
        if state.confirms.is_none() {
            let queue = Arc::new(ConfirmQueue::default());
            let closed = Arc::new(Mutex::new(false));
            let core = Arc::clone(&self.core);
            tokio::spawn(confirm_loop(
                Arc::clone(&queue),
                self.outbound.clone(),
                channel,
                move |error| core.store_failed(error),
                Arc::clone(&closed),
            ));
            state.confirms = Some(Confirms { last_tag: 0, queue, closed });
        }
        if !select.nowait {
            self.send(channel, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})));
        }
        Ok(())
    }
}
