//! Unit tests of the core, one behaviour each, named `op_condition_outcome` with the spec's
//! behaviour (B), bug (K) or test (T) number. Shared fakes and the state snapshot live in
//! `support`.

mod support;

mod counts;
mod data;
mod errors;
mod fault;
mod hugepage;
#[cfg(feature = "notifiers")]
mod lifecycle;
#[cfg(feature = "notifiers")]
mod memslots;
#[cfg(not(feature = "notifiers"))]
mod no_notifiers;
#[cfg(feature = "notifiers")]
mod notifiers;
