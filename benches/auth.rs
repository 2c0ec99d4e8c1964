//! Placeholder: the auth bench is being written.
#![allow(missing_docs)]

fn main() {}
