//! KVM integration tests.
