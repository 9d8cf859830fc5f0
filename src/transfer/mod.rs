//! Transfers: moving a bundle into a second account. `plan` decides (pure), `run` executes.

pub mod plan;
