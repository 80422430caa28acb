//! The command line's own parts.

pub mod table;
