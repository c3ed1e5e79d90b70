//! One module per subcommand: each turns its arguments into library calls.

pub mod migrate;
pub mod status;
