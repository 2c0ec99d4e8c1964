//! Strict MQTT validation for Aegis.
//!
//! This crate is a placeholder in this release: the MQTT layer (strict 3.1 / 3.1.1 / 5.0
//! validation, per-packet policy and version-correct rejections) is tracked as its own
//! piece of work and lands in a later release. It is a workspace member now so that the
//! layout, the lints and CI cover it from the start.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
