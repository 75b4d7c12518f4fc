//! # pagetrack-x86: the pure x86-64 logic of pagetrack
//!
//! No KVM ioctls and no `unsafe`.
#![forbid(unsafe_code)]

mod alu;
mod bytes;
mod classify;
pub mod emulate;
mod plan;
mod regs;
mod simd;
pub mod walk;
mod x87;
mod xsave;
