//! Whether a provider as a whole refuses our configuration, told apart from one account's
//! odd answer. Pure: the engine feeds it each answer and announces the changes it returns.
//!
//! A definite client error (`invalid_client` and the like) is the provider's configuration at
//! once. An unexpected answer (a redirect, an error without an OAuth body) is one account's,
//! until several different accounts get one in a row: then the provider is what is wrong (a
//! token URL that redirects every request). A success clears both.

use std::collections::BTreeSet;

/// Different accounts that must get an unexpected answer in a row, with no proper OAuth
/// answer between, before the provider's configuration is blamed.
pub const UNEXPECTED_ACCOUNTS: usize = 3;

/// A change of the provider's state to announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The provider refuses our configuration (`provider_config_error`).
    Rejecting,
    /// It accepts it again (`provider_recovered`).
    Recovered,
}

#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    rejecting: bool,
    /// Accounts with an unexpected answer since the last proper one.
    unexpected: BTreeSet<i64>,
}

impl ConfigState {
    pub fn rejecting(&self) -> bool {
        self.rejecting
    }

    /// The provider refused our client (`invalid_client`, `unauthorized_client`, ...).
    pub fn config_error(&mut self) -> Option<Change> {
        self.unexpected.clear();
        (!std::mem::replace(&mut self.rejecting, true)).then_some(Change::Rejecting)
    }

    /// An answer that fits no rule, for `account`.
    pub fn unexpected(&mut self, account: i64) -> Option<Change> {
        self.unexpected.insert(account);
        if self.unexpected.len() >= UNEXPECTED_ACCOUNTS && !self.rejecting {
            self.rejecting = true;
            return Some(Change::Rejecting);
        }
        None
    }

    /// A proper OAuth answer about one account's grant (e.g. `invalid_grant`): the provider
    /// read our request, so the streak of unexpected answers ends; it proves nothing about
    /// our client credentials.
    pub fn answered(&mut self) {
        self.unexpected.clear();
    }

    /// New tokens: the provider takes our configuration.
    pub fn success(&mut self) -> Option<Change> {
        self.unexpected.clear();
        std::mem::replace(&mut self.rejecting, false).then_some(Change::Recovered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_accounts_redirects_never_flip_the_provider() {
        let mut s = ConfigState::default();
        // The run: a redirect for one account between successes of others.
        for _ in 0..10 {
            assert_eq!(s.unexpected(7), None);
            assert_eq!(s.success(), None);
        }
        // The same account again and again is still one account.
        for _ in 0..10 {
            assert_eq!(s.unexpected(7), None);
        }
        assert!(!s.rejecting());
    }

    #[test]
    fn every_account_redirected_is_the_providers_configuration() {
        let mut s = ConfigState::default();
        assert_eq!(s.unexpected(1), None);
        assert_eq!(s.unexpected(2), None);
        assert_eq!(s.unexpected(3), Some(Change::Rejecting));
        assert_eq!(s.unexpected(4), None, "announced once");
        assert_eq!(s.success(), Some(Change::Recovered));
        assert_eq!(s.success(), None);
    }

    #[test]
    fn a_proper_answer_ends_the_streak() {
        let mut s = ConfigState::default();
        s.unexpected(1);
        s.unexpected(2);
        s.answered();
        assert_eq!(s.unexpected(3), None);
    }

    #[test]
    fn invalid_client_is_the_providers_at_once_and_announced_once() {
        let mut s = ConfigState::default();
        assert_eq!(s.config_error(), Some(Change::Rejecting));
        assert_eq!(s.config_error(), None);
        s.answered();
        assert!(
            s.rejecting(),
            "an invalid_grant says nothing about our client"
        );
        assert_eq!(s.success(), Some(Change::Recovered));
    }
}
