//! One module per subcommand: each turns its arguments into library calls.

pub mod abort;
pub mod activate;
pub mod catch_up;
pub mod check;
pub mod completions;
pub mod init;
pub mod migrate;
pub mod plan;
pub mod publish;
pub mod replay;
pub mod run;
pub mod serve;
pub mod status;
pub mod wait;
