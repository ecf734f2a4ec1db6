//! The four services, each runnable as its own binary (`order-service`, …) or as a subcommand of
//! `chaos` (which runs them as separate processes of itself, so a chaos run needs one binary).

pub mod email;
pub mod inventory;
pub mod order;
pub mod payment;
