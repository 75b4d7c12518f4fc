//! pagetrack-kvm (work in progress).
#![deny(unsafe_code)]
#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("pagetrack-kvm supports x86_64 Linux hosts only");
