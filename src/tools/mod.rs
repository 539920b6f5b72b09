//! The CLI's jobs beyond running the operator: offline injection preview, key usage, and the
//! people-facing set/list/delete.

pub mod inject;
pub mod keys;
pub mod user;
