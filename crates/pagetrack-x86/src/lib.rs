//! # pagetrack-x86: the pure x86-64 logic of pagetrack
//!
//! No KVM ioctls and no `unsafe`.
#![forbid(unsafe_code)]

mod alu;
pub mod atomic;
pub mod boot;
mod bytes;
mod classify;
pub mod emulate;
mod error;
pub mod guest;
mod plan;
mod regs;
pub mod rep;
mod simd;
pub mod sysregs;
#[cfg(test)]
mod testmem;
pub mod walk;
mod x87;
mod xsave;

pub use error::{Error, Result};
