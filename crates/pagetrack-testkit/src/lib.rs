//! pagetrack test support (work in progress).
#![forbid(unsafe_code)]
