//! Criterion benches live beside this crate as `[[bench]]` targets.
