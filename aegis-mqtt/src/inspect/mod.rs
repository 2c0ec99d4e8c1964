//! Payload inspection. (SKELETON: being written.)
