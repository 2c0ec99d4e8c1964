//! Authentication of each CONNECT. (SKELETON: being written.)
