//! # pagetrack-x86: the pure x86-64 logic of pagetrack
//!
//! No KVM ioctls and no `unsafe`.
#![forbid(unsafe_code)]

pub mod emulate;
mod simd;
pub mod walk;
mod x87;
