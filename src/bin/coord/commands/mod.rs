//! One module per subcommand: each turns its arguments into library calls.

pub mod abort;
pub mod catch_up;
pub mod migrate;
pub mod replay;
pub mod status;
