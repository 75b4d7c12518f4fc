//! The KVM test gate behind [`kvm_or_skip!`](crate::kvm_or_skip).

use std::io::Write;

use kvm_ioctls::Kvm;

/// The environment variable that turns a missing `/dev/kvm` into a failure.
pub const REQUIRE_KVM_ENV: &str = "PAGETRACK_REQUIRE_KVM";

/// Opens `/dev/kvm` for a test, or skips the test.
///
/// Evaluates to a [`kvm_ioctls::Kvm`]. If `/dev/kvm` does not exist (ENOENT) and
/// `PAGETRACK_REQUIRE_KVM` is not `1`, it writes `SKIPPED (no /dev/kvm): <module>::<test>` to
/// standard error (directly, because libtest hides `eprintln!` output of passing tests) and
/// `return`s from the calling function, which must return `()`.
///
/// # Panics
///
/// With `PAGETRACK_REQUIRE_KVM=1` and no `/dev/kvm`, or on any other error opening it (EACCES,
/// EPERM, ...): the message names the errno.
///
/// ```no_run
/// #[test]
/// fn guest_runs() {
///     let kvm = pagetrack_testkit::kvm_or_skip!();
///     // ... use `kvm` ...
/// #   let _ = kvm;
/// }
/// ```
#[macro_export]
macro_rules! kvm_or_skip {
    () => {
        match $crate::gate::open_kvm_or_skip(::std::module_path!()) {
            ::std::option::Option::Some(kvm) => kvm,
            ::std::option::Option::None => return,
        }
    };
}

/// The function behind [`kvm_or_skip!`](crate::kvm_or_skip): `Some(kvm)`, or `None` after
/// writing the SKIPPED line when the test should be skipped.
///
/// # Panics
///
/// As [`kvm_or_skip!`](crate::kvm_or_skip).
#[must_use]
pub fn open_kvm_or_skip(module_path: &str) -> Option<Kvm> {
    let required = std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1");
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) if e.errno() == libc::ENOENT && !required => {
            let line = format!("SKIPPED (no /dev/kvm): {}", test_path(module_path));
            // A failed write to stderr leaves nothing better to report it to.
            let _ignored = writeln!(std::io::stderr(), "{line}");
            None
        }
        Err(e) => {
            let errno = e.errno();
            let why = if required {
                format!(" and {REQUIRE_KVM_ENV}=1")
            } else {
                String::new()
            };
            panic!(
                "cannot open /dev/kvm{why}: errno {errno} ({}): {}",
                errno_name(errno),
                std::io::Error::from_raw_os_error(errno)
            );
        }
    }
}

/// `module_path` plus the test's name, which libtest gives the thread running the test.
fn test_path(module_path: &str) -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => {
            let test = name.rsplit("::").next().unwrap_or(name);
            format!("{module_path}::{test}")
        }
        _ => module_path.to_owned(),
    }
}

/// The symbolic name of the errnos opening `/dev/kvm` is likely to give.
fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ENXIO => "ENXIO",
        libc::ENODEV => "ENODEV",
        libc::EBUSY => "EBUSY",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        _ => "unlisted",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_name_names_eacces() {
        assert_eq!(errno_name(libc::EACCES), "EACCES");
        assert_eq!(errno_name(-1), "unlisted");
    }
}
