//! Resizing a semaphore that bounds work in flight (the global request bound, a provider's
//! slots and claims) when a reload changes its size, without forgetting the permits held:
//! what is in flight keeps counting against the new size.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::sync::Semaphore;

/// Resizes `sem`, which has `from` permits in all (free and held), to `to`. Growing adds
/// permits at once. Shrinking forgets the free ones and takes the rest as their holders give
/// them back: until then nothing new gets a permit (the semaphore is fair, and the waiter is
/// queued here, before any permit can come back). Needs a tokio runtime when it shrinks
/// below what is held.
pub fn resize(sem: &Arc<Semaphore>, from: usize, to: usize) {
    if to >= from {
        sem.add_permits(to - from);
        return;
    }
    let excess = from - to;
    let rest = excess - sem.forget_permits(excess);
    if rest == 0 {
        return;
    }
    let rest = u32::try_from(rest).unwrap_or(u32::MAX);
    let mut take = Box::pin(sem.clone().acquire_many_owned(rest));
    // Polled once here so the waiter is in the queue now: a permit given back before the
    // task's first turn goes to it, not to a new request.
    if let Poll::Ready(taken) = take.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        taken.map(|p| p.forget()).ok();
        return;
    }
    tokio::spawn(async move {
        // Err only if the semaphore was closed: nothing is left to bound then.
        take.await.map(|p| p.forget()).ok();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn growing_adds_permits_beside_those_held() {
        let sem = Arc::new(Semaphore::new(2));
        let _held = sem.clone().acquire_owned().await.unwrap();
        resize(&sem, 2, 5);
        assert_eq!(sem.available_permits(), 4);
    }

    #[tokio::test]
    async fn shrinking_below_what_is_held_lets_nothing_new_in_until_enough_came_back() {
        let sem = Arc::new(Semaphore::new(4));
        let mut held: Vec<_> = (0..3)
            .map(|_| sem.clone().try_acquire_owned().unwrap())
            .collect();
        resize(&sem, 4, 2);
        assert_eq!(sem.available_permits(), 0);
        assert!(sem.clone().try_acquire_owned().is_err());
        // One of the three comes back: two are still held, the new size.
        held.pop();
        assert_eq!(sem.available_permits(), 0);
        assert!(sem.clone().try_acquire_owned().is_err());
        held.pop();
        assert_eq!(sem.available_permits(), 1, "one held, of two");
        tokio::task::yield_now().await;
        held.pop();
        assert_eq!(sem.available_permits(), 2);
    }

    #[tokio::test]
    async fn shrinking_with_enough_free_takes_them_at_once() {
        let sem = Arc::new(Semaphore::new(4));
        let _held = sem.clone().try_acquire_owned().unwrap();
        resize(&sem, 4, 2);
        assert_eq!(sem.available_permits(), 1);
        drop(_held);
        assert_eq!(sem.available_permits(), 2);
    }
}
