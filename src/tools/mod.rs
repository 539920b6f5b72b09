//! The CLI's jobs beyond running the operator: offline injection preview, key usage, the
//! people-facing set/list/delete, and what they share: kubectl's connection flags, output
//! formats, exit codes, the value prompt and shell completion.

pub mod cluster;
pub mod completion;
pub mod error;
pub mod inject;
pub mod keys;
pub mod output;
pub mod prompt;
pub mod user;
