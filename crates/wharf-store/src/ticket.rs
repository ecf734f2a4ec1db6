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

/// Called on the writer thread with an operation's result, just before its ticket resolves.
pub type Observer<T> = Box<dyn FnOnce(&Result<T>) + Send>;

/// The sending half, held by the writer thread until the operation is complete.
pub(crate) struct Completer<T> {
    sender: Option<oneshot::Sender<Result<T>>>,
    observer: Option<Observer<T>>,
}

impl<T> std::fmt::Debug for Completer<T> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Completer").field("observed", &self.observer.is_some()).finish_non_exhaustive()
    }
}

pub(crate) fn ticket<T>() -> (Completer<T>, Ticket<T>) {
    let (sender, receiver) = oneshot::channel();
    (Completer { sender: Some(sender), observer: None }, Ticket { receiver })
}

/// A completer nobody waits on: completing it does nothing (no channel is allocated).
pub(crate) fn unawaited<T>() -> Completer<T> {
    Completer { sender: None, observer: None }
}

/// A ticket whose result is also handed to `observer` (on the writer thread, so it must not
/// block).
pub(crate) fn observed_ticket<T>(observer: Observer<T>) -> (Completer<T>, Ticket<T>) {
    let (sender, receiver) = oneshot::channel();
    (Completer { sender: Some(sender), observer: Some(observer) }, Ticket { receiver })
}

impl<T> Completer<T> {
    /// Resolves the ticket. A caller that dropped its ticket does not care; that is not an error.
    pub(crate) fn complete(mut self, result: Result<T>) {
        if let Some(observer) = self.observer.take() {
            observer(&result);
        }
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(result);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        // A completer dropped without an answer (the writer went away) tells its observer too.
        if let Some(observer) = self.observer.take() {
            observer(&Err(StoreError::Closed));
        }
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
    fn an_observer_sees_the_result_once() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let (completer, pending) = super::observed_ticket::<u32>(Box::new(move |result| {
            record.lock().unwrap().push(result.as_ref().ok().copied())
        }));
        completer.complete(Ok(5));
        assert_eq!(pending.wait().unwrap(), 5);
        let record = Arc::clone(&seen);
        let (completer, _pending) = super::observed_ticket::<u32>(Box::new(move |result| {
            record.lock().unwrap().push(result.as_ref().ok().copied())
        }));
        drop(completer);
        assert_eq!(*seen.lock().unwrap(), vec![Some(5), None]);
    }

    #[test]
    fn a_dropped_completer_means_closed() {
        let (completer, pending) = super::ticket::<u32>();
        drop(completer);
        assert!(matches!(pending.wait(), Err(StoreError::Closed)));
    }
}
