//! [`Ticket`]: the completion of one store operation, awaitable from async code (`.await`) and
//! from plain threads ([`Ticket::wait`]) without the store depending on any async runtime.
//!
//! A ticket resolves once: with the operation's result when the writer thread has done what the
//! operation promises (for an append: written and `fdatasync`ed), or with
//! [`StoreError::Closed`] if the writer went away without answering.

use crate::error::{Result, StoreError};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

/// The pending result of a store operation.
#[derive(Debug)]
#[must_use = "a ticket says when the operation is durable; drop it only if you do not need to know"]
pub struct Ticket<T> {
    receiver: oneshot::Receiver<Result<T>>,
}

/// The sending half, held by the writer thread until the operation is complete.
#[derive(Debug)]
pub(crate) struct Completer<T> {
    sender: oneshot::Sender<Result<T>>,
}

pub(crate) fn ticket<T>() -> (Completer<T>, Ticket<T>) {
    let (sender, receiver) = oneshot::channel();
    (Completer { sender }, Ticket { receiver })
}

impl<T> Completer<T> {
    /// Resolves the ticket. A caller that dropped its ticket does not care; that is not an error.
    pub(crate) fn complete(self, result: Result<T>) {
        let _ = self.sender.send(result);
    }
}

impl<T> Ticket<T> {
    /// Blocks the current thread until the operation completes.
    pub fn wait(self) -> Result<T> {
        self.receiver.recv().unwrap_or(Err(StoreError::Closed))
    }

    /// Returns the result if the operation has completed, or the ticket back if not.
    pub fn try_wait(self) -> std::result::Result<Result<T>, Ticket<T>> {
        match self.receiver.try_recv() {
            Ok(result) => Ok(result),
            Err(oneshot::TryRecvError::Empty) => Err(self),
            Err(oneshot::TryRecvError::Disconnected) => Ok(Err(StoreError::Closed)),
        }
    }
}

/// The future behind `ticket.await`.
#[derive(Debug)]
pub struct TicketFuture<T> {
    receiver: oneshot::AsyncReceiver<Result<T>>,
}

impl<T> IntoFuture for Ticket<T> {
    type Output = Result<T>;
    type IntoFuture = TicketFuture<T>;

    fn into_future(self) -> Self::IntoFuture {
        TicketFuture { receiver: self.receiver.into_future() }
    }
}

impl<T> Future for TicketFuture<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver).poll(context).map(|received| received.unwrap_or(Err(StoreError::Closed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// A minimal executor: proves the future works without any async runtime.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
            std::thread::park();
        }
    }

    #[test]
    fn resolves_for_threads_and_futures() {
        let (completer, pending) = super::ticket::<u32>();
        let waiter = std::thread::spawn(move || pending.wait());
        completer.complete(Ok(7));
        assert_eq!(waiter.join().unwrap().unwrap(), 7);

        let (completer, pending) = super::ticket::<u32>();
        let finisher = std::thread::spawn(move || completer.complete(Ok(9)));
        assert_eq!(block_on(pending.into_future()).unwrap(), 9);
        finisher.join().unwrap();
    }

    #[test]
    fn a_dropped_completer_means_closed() {
        let (completer, pending) = super::ticket::<u32>();
        drop(completer);
        assert!(matches!(pending.wait(), Err(StoreError::Closed)));
    }
}
