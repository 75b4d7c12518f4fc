//! Exceptions whose frame lands on a tracked frame (issue 10 item 9): KVM cannot deliver
//! them (the frame write to the read-only memslot fails inside KVM and the vCPU shuts down
//! with a triple fault). pagetrack stops the vCPU with a typed error naming RIP and the
//! stack frame instead of a silent `Shutdown` that differs from the untracked run.

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::{Error, Exit};
use pagetrack_testkit::assemble;
use pagetrack_vmm::x86::EXCEPTION_PORT;

use crate::common::{ENTRY, boot, recorder};

const RAM: u64 = 16 << 20;

fn ud2_guest(track_stack: bool) -> Option<(Result<Exit, Error>, u64)> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let code = assemble(ENTRY, |a| {
        a.mov(eax, 1)?;
        a.ud2()?;
        pagetrack_testkit::exit_with(a, 0)
    });
    let mut g = boot(kvm, RAM, 1, &code);
    let (_rec, _h) = recorder(&g.vm);
    let stack = g.layout.kernel_stack_top(0).unwrap() - 8;
    if track_stack {
        g.vm.tracker().add_gfn(Gfn(stack >> 12)).unwrap();
    }
    Some((g.vcpus[0].run(), stack))
}

/// Natively the #UD reaches the guest's stub.
#[test]
fn ud2_with_untracked_stack_reaches_the_handler() {
    let Some((exit, _)) = ud2_guest(false) else {
        return;
    };
    assert!(
        matches!(
            exit,
            Ok(Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            })
        ),
        "{exit:?}"
    );
}

/// With the CPL0 stack tracked: a typed error naming RIP (the `ud2`) and the frame, never
/// a bare `Shutdown`.
#[test]
fn ud2_with_tracked_stack_stops_with_a_typed_error() {
    let Some((exit, stack)) = ud2_guest(true) else {
        return;
    };
    match exit {
        Ok(Exit::IoOut {
            port: EXCEPTION_PORT,
            ..
        }) => {} // delivered exactly: also fine
        Err(Error::EventDeliveryToTracked { vcpu, rip, gfn, .. }) => {
            assert_eq!((vcpu, rip, gfn), (0, ENTRY + 5, stack >> 12));
        }
        other => panic!("expected the #UD or a typed error, got {other:?}"),
    }
}
