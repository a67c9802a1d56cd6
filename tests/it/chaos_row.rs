//! One row of the chaos table that `chaos.rs` prints: what a scenario put at risk and what
//! became of it, counted against the provider's own record.

/// What one chaos scenario did to rotated tokens.
#[derive(Debug, Clone, Default)]
pub struct ChaosRow {
    pub scenario: String,
    /// Rotations the provider made while the fault was on (answers exposed to it).
    pub at_risk: u64,
    /// Grants whose current refresh token refreshd does not hold, and that are not flagged.
    pub dropped: u64,
    /// Accounts flagged, by reason (e.g. ("refresh_interrupted", 3)).
    pub flagged: Vec<(String, u64)>,
    /// Used refresh tokens presented again (the provider's reuse counter).
    pub reuse: u64,
    /// Requests in flight at the kill -9 instant(s), where the scenario kills: the bound for
    /// `dropped`.
    pub in_flight_at_kill: Option<u64>,
}
