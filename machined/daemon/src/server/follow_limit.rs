//! The cap on follow streams (`logs -f`, `dmesg -f`) per client identity: each holds a
//! task and a poll every few hundred milliseconds for as long as its client keeps it
//! open, so one certificate (a reader's, say) may hold at most
//! [`MAX_FOLLOWS_PER_IDENTITY`] at once and cannot starve the others (an admin's).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::Status;

/// How many follow streams one client identity (its certificate's common name) may hold
/// open at once; one more is refused with RESOURCE_EXHAUSTED.
pub const MAX_FOLLOWS_PER_IDENTITY: usize = 8;

/// The follow streams open, by identity.
#[derive(Debug, Clone, Default)]
pub struct FollowLimit {
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open follow stream; dropping it (the stream ended) gives its place back.
#[derive(Debug)]
pub struct FollowPermit {
    limit: FollowLimit,
    identity: String,
}

impl FollowLimit {
    /// A place for one more follow stream of `identity`, or RESOURCE_EXHAUSTED naming the
    /// limit.
    pub fn acquire(&self, identity: &str) -> Result<FollowPermit, Status> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(identity.to_owned()).or_default();
        if *count >= MAX_FOLLOWS_PER_IDENTITY {
            return Err(Status::resource_exhausted(format!(
                "{identity:?} already has {MAX_FOLLOWS_PER_IDENTITY} follow streams open (logs -f, dmesg -f; the limit per client certificate): end one first"
            )));
        }
        *count += 1;
        Ok(FollowPermit {
            limit: self.clone(),
            identity: identity.to_owned(),
        })
    }
}

impl Drop for FollowPermit {
    fn drop(&mut self) {
        let mut open = self
            .limit
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.identity) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn one_identity_is_capped_and_others_are_not() {
        let limit = FollowLimit::default();
        let mut held: Vec<_> = (0..MAX_FOLLOWS_PER_IDENTITY)
            .map(|_| limit.acquire("reader-user").unwrap())
            .collect();
        let refused = limit.acquire("reader-user").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("already has 8 follow streams open")
        );
        assert!(limit.acquire("admin-user").is_ok());
        held.pop();
        assert!(limit.acquire("reader-user").is_ok());
        held.clear();
        assert!(limit.open.lock().unwrap().is_empty());
    }
}
