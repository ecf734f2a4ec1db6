//! Confirms: [`Durable`], what a publish waits on before it counts as durable, and the
//! per-channel confirm queue and task that send `basic.ack`/`basic.nack` in order once the store
//! reports the covering `fdatasync`.

use crate::outbound::method_frame;
use crate::outbound::{Outbound, Outbox};
use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use wharf_store::{AppendReceipt, StoreError, Ticket, TicketFuture};
use wharf_wire::protocol::{AMQPClass, basic};

/// What a publish or a transfer waits on before it counts as durable: store appends, or a chain
/// (the appends, then the de-duplication keys they admitted).
#[derive(Debug)]
pub(crate) enum Durable {
    Append(TicketFuture<AppendReceipt>),
    Chain(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
    Sync(TicketFuture<()>),
    /// A copy in a quorum queue: its group's answer once the enqueue is committed.
    Replicated(ReplicatedEnqueue),
    /// Resolved: the outcome is kept, so polling again hands it out again.
    Done(Result<(), StoreError>),
}

impl Durable {
    pub fn append(ticket: Ticket<AppendReceipt>) -> Self {
        Durable::Append(ticket.into_future())
    }

    pub fn sync(ticket: Ticket<()>) -> Self {
        Durable::Sync(ticket.into_future())
    }

    /// Polls without giving the outcome away: a confirm queue polls a ticket once with its task's
    /// waker (so the store's completion wakes the task) and the task collects it later.
    pub fn poll_durable(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        let outcome = match self {
            Durable::Append(ticket) => std::task::ready!(Pin::new(ticket).poll(context)).map(|_| ()),
            Durable::Chain(receiver) => {
                std::task::ready!(Pin::new(receiver).poll(context)).unwrap_or(Err(StoreError::Closed))
            }
            Durable::Sync(ticket) => std::task::ready!(Pin::new(ticket).poll(context)),
            Durable::Replicated(receiver) => match std::task::ready!(Pin::new(receiver).poll(context)) {
                Ok(Ok(wharf_model::QuorumAnswer::Rejected)) => Err(not_replicated("the quorum queue is full")),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(text)) => Err(not_replicated(&text)),
                Err(_) => Err(not_replicated("the quorum queue's group stopped")),
            },
            Durable::Done(outcome) => return Poll::Ready(outcome.clone()),
        };
        *self = Durable::Done(outcome.clone());
        Poll::Ready(outcome)
    }

    pub async fn wait(mut self) -> Result<(), StoreError> {
        std::future::poll_fn(|context| self.poll_durable(context)).await
    }
}
/// What a publish into a quorum queue waits on: the group's answer to its enqueue.
pub(crate) type ReplicatedEnqueue = tokio::sync::oneshot::Receiver<Result<wharf_model::QuorumAnswer, String>>;

/// A copy a quorum queue's group did not take: the publisher is nacked; the store is fine, so
/// the error is not one that stops the broker.
fn not_replicated(text: &str) -> StoreError {
    let error = std::io::Error::other(format!("not replicated: {text}"));
    StoreError::Io { context: "a quorum queue".into(), source: Arc::new(error) }
}

/// A confirm waiting for the store.
pub(crate) struct PendingConfirm {
    pub tag: u64,
    pub tickets: Vec<Durable>,
    pub failed: bool,
    /// The `basic.return` of an unroutable mandatory publish: sent right before this publish's
    /// own (unbatched) ack, so a client can tell which publish came back (RabbitMQ's order:
    /// return, then ack).
    pub returned: Option<Outbound>,
}

/// The confirms of one channel waiting for the store, shared by the session (which queues them)
/// and the channel's confirm task (which sends them, in order).
///
/// Why not a channel: at a low publish rate the task is idle whenever a publish arrives, and
/// waking it per publish, only for it to find the store still writing, cost a task wake-up per
/// message. Worse, that wake-up came right after the delivery's and pushed the consumer's writer
/// task out of this worker's run-next slot, so the delivery waited for the other worker to be
/// woken and take it (`strace` at 100 msgs/s: every delivery was written by the other worker,
/// after a futex wake). Instead, a confirm queued while the task is idle lends the task's waker
/// to its first unresolved store ticket: the task wakes once, when the store completes.
#[derive(Default)]
pub(crate) struct ConfirmQueue {
    state: Mutex<ConfirmQueueState>,
}

#[derive(Default)]
struct ConfirmQueueState {
    pending: VecDeque<PendingConfirm>,
    /// The confirm task's waker while it has nothing to do.
    idle: Option<Waker>,
    /// The channel is gone: the task sends what it holds, then ends.
    ended: bool,
}

impl ConfirmQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConfirmQueueState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push(&self, mut confirm: PendingConfirm) {
        let wake_now = {
            let mut state = self.lock();
            let wake_now = state.idle.take().filter(|waker| {
                let mut context = Context::from_waker(waker);
                // Polling registers the waker with the first ticket still waiting; if every
                // ticket has resolved (or there is none), the task has work now.
                !confirm.tickets.iter_mut().any(|ticket| ticket.poll_durable(&mut context).is_pending())
            });
            state.pending.push_back(confirm);
            wake_now
        };
        if let Some(waker) = wake_now {
            waker.wake();
        }
    }

    pub fn end(&self) {
        let idle = {
            let mut state = self.lock();
            state.ended = true;
            state.idle.take()
        };
        if let Some(waker) = idle {
            waker.wake();
        }
    }
}

/// A confirm-mode channel's confirms: the last tag given out and the queue its task sends from.
pub(crate) struct Confirms {
    pub last_tag: u64,
    pub queue: Arc<ConfirmQueue>,
    /// Set when the channel closes, so late confirms are not sent on a closed channel. A mutex,
    /// not an atomic: the confirm task checks it and queues its frame under the lock, so a
    /// confirm is either queued before the channel's close-ok or not at all.
    pub closed: Arc<Mutex<bool>>,
}

impl Drop for Confirms {
    fn drop(&mut self) {
        self.queue.end();
    }
}

/// Marks a channel's confirms closed; returns once no confirm can be queued any more.
pub(crate) fn close_confirms(closed: &Mutex<bool>) {
    *closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
}

/// Sends each confirm once the store has synced every durable copy of its message, in order.
/// Consecutive successes are sent as one `basic.ack` with `multiple` once nothing more is waiting
/// (a batch the store synced together is usually confirmed in one frame), or before waiting for
/// a quorum queue's answer; a failure flushes the run, then gets its own `basic.nack`.
pub(crate) async fn confirm_loop(
    queue: Arc<ConfirmQueue>,
    outbound: Outbox,
    channel: u16,
    store_failed: impl Fn(&StoreError),
    closed: Arc<Mutex<bool>>,
) {
    // The highest tag of a run of confirmed messages not yet acknowledged to the client.
    let mut run_end: Option<u64> = None;
    let send = |method: AMQPClass| {
        let closed = closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !*closed {
            let _ = outbound.send(Outbound::Frames(method_frame(channel, &method)));
        }
    };
    let ack = |tag: u64| AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple: true }));
    loop {
        // The next confirm; else the open run's ack once nothing more is waiting; else sleep
        // until a confirm's store ticket (or the channel's end) wakes this task.
        let next = std::future::poll_fn(|context| {
            let mut state = queue.lock();
            if let Some(confirm) = state.pending.pop_front() {
                Poll::Ready(Some(confirm))
            } else if run_end.is_some() || state.ended {
                Poll::Ready(None)
            } else {
                state.idle = Some(context.waker().clone());
                Poll::Pending
            }
        })
        .await;
        let Some(confirm) = next else {
            match run_end.take() {
                Some(tag) => {
                    send(ack(tag));
                    continue;
                }
                None => return,
            }
        };
        let mut ok = !confirm.failed;
        let mut tickets = confirm.tickets;
        // Waiting for a quorum queue's answer must not hold back the ack of the confirms already
        // durable: its answers come one commit at a time with publishes in between, so under a
        // steady stream the queue is never empty and the run would wait for a lull (tens of ms
        // at 2,000 msgs/s). The store's tickets resolve a group commit at a time instead, and
        // the run's ack is sent once nothing more is waiting, which keeps a saturated publisher
        // to bursts that its broker drains (acking at every wait let S1's publisher keep its
        // whole window in flight: end-to-end p99 2.5x, measured).
        let replicated = tickets.iter().any(|ticket| matches!(ticket, Durable::Replicated(_)));
        if replicated && run_end.is_some() {
            let durable_now = std::future::poll_fn(|context| {
                Poll::Ready(tickets.iter_mut().all(|ticket| ticket.poll_durable(context).is_ready()))
            })
            .await;
            if !durable_now && let Some(tag) = run_end.take() {
                send(ack(tag));
            }
        }
        for ticket in tickets {
            if let Err(error) = ticket.wait().await {
                store_failed(&error);
                ok = false;
            }
        }
        if let Some(returned) = confirm.returned {
            // Acks before it go first, then the return, then its own ack alone.
            if let Some(tag) = run_end.take() {
                send(ack(tag));
            }
            {
                let closed = closed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if !*closed {
                    let _ = outbound.send(returned);
                }
            }
            if ok {
                send(AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: confirm.tag,
                    multiple: false,
                })));
                continue;
            }
        }
        if ok {
            run_end = Some(confirm.tag);
        } else {
            if let Some(tag) = run_end.take() {
                send(ack(tag));
            }
            send(AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: confirm.tag,
                multiple: false,
                requeue: false,
            })));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// Counts how often the confirm task would have been woken.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn confirm(tag: u64, tickets: Vec<Durable>) -> PendingConfirm {
        PendingConfirm { tag, tickets, failed: false, returned: None }
    }

    /// The queue with the task idle: its waker parked in the queue, as `confirm_loop` leaves it.
    fn idle_queue() -> (ConfirmQueue, Arc<CountingWaker>) {
        let queue = ConfirmQueue::default();
        let counter = Arc::new(CountingWaker::default());
        queue.lock().idle = Some(Waker::from(Arc::clone(&counter)));
        (queue, counter)
    }

    #[test]
    fn a_confirm_queued_while_the_task_is_idle_wakes_it_only_when_its_ticket_resolves() {
        let (queue, wakes) = idle_queue();
        let (store_done, receiver) = tokio::sync::oneshot::channel();
        queue.push(confirm(1, vec![Durable::Chain(receiver)]));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0, "woken before the store completed");
        // Queued behind it while the task is still asleep: no wake-up of its own.
        let (_later_done, later) = tokio::sync::oneshot::channel();
        queue.push(confirm(2, vec![Durable::Chain(later)]));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        let _ = store_done.send(Ok(()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the store's completion must wake the task");
        assert_eq!(queue.lock().pending.iter().map(|pending| pending.tag).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_confirm_with_nothing_left_to_wait_for_wakes_the_task_at_once() {
        let (queue, wakes) = idle_queue();
        queue.push(confirm(1, Vec::new()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);

        let (queue, wakes) = idle_queue();
        let (store_done, receiver) = tokio::sync::oneshot::channel();
        let _ = store_done.send(Ok(()));
        queue.push(confirm(1, vec![Durable::Chain(receiver)]));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // The outcome polled on the way in is kept for the task.
        let mut pending = queue.lock().pending.pop_front().map(|pending| pending.tickets);
        let ticket = pending.as_mut().and_then(|tickets| tickets.first_mut());
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        assert!(matches!(
            ticket.map(|ticket| ticket.poll_durable(&mut Context::from_waker(&waker))),
            Some(Poll::Ready(Ok(())))
        ));
    }

    #[test]
    fn the_end_of_the_channel_wakes_an_idle_task() {
        let (queue, wakes) = idle_queue();
        queue.end();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(queue.lock().ended);
    }

    /// The method of a frame the confirm task wrote.
    fn written_method(item: Outbound) -> AMQPClass {
        let Outbound::Frames(bytes) = item else { panic!("not a frame: {item:?}") };
        let mut buffer = bytes::BytesMut::from(&bytes[..]);
        let frame = wharf_wire::FrameDecoder::new(131_072).decode(&mut buffer).expect("a frame").expect("whole");
        let wharf_wire::Frame::Method { method, .. } = frame else { panic!("not a method: {frame:?}") };
        *method
    }

    fn ack_of(tag: u64) -> AMQPClass {
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack { delivery_tag: tag, multiple: true }))
    }

    /// A steady stream keeps the queue from ever being empty: the ack of the confirms already
    /// durable goes out as soon as a quorum queue's answer has to be waited for, not once a lull
    /// comes.
    #[tokio::test]
    async fn a_durable_run_is_acked_before_waiting_for_a_quorum_queues_answer() {
        let queue = Arc::new(ConfirmQueue::default());
        queue.push(confirm(1, Vec::new()));
        let (store_done, receiver) = tokio::sync::oneshot::channel();
        queue.push(confirm(2, vec![Durable::Replicated(receiver)]));
        let (sender, mut written) = tokio::sync::mpsc::unbounded_channel();
        let outbox = Outbox { sender, backlog: Arc::default() };
        tokio::spawn(confirm_loop(Arc::clone(&queue), outbox, 1, |_| {}, Arc::new(Mutex::new(false))));
        // A bound on the wait, not on the speed: without the ack the test would hang.
        let within = std::time::Duration::from_secs(30);
        let first = tokio::time::timeout(within, written.recv()).await.expect("tag 1 acked while 2 waits");
        assert_eq!(written_method(first.unwrap()), ack_of(1));
        let _ = store_done.send(Ok(wharf_model::QuorumAnswer::Done { id: Some(2) }));
        let second = tokio::time::timeout(within, written.recv()).await.expect("tag 2 acked once durable");
        assert_eq!(written_method(second.unwrap()), ack_of(2));
        queue.end();
    }
}
