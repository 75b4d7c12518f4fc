//! pagetrack-vmm (work in progress).
#![forbid(unsafe_code)]
