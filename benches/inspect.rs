//! Placeholder: the inspect bench is being written.
#![allow(missing_docs)]

fn main() {}
