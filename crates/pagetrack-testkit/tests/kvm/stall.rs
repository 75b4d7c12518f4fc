//! No guest stalls a vCPU unnoticed (issue 10 item 7): KVM retries an `sgdt`/`sidt` into a
//! read-only slot forever without an exit; pagetrack notices (it kicks vCPUs that stay inside
//! one `KVM_RUN`) and completes the store or stops with a typed error.

use std::time::Duration;

use iced_x86::code_asm::*;
use pagetrack_testkit::{TwoPass, kvm_or_skip};

#[test]
fn sgdt_and_sidt_into_a_tracked_frame_do_not_stall() {
    for sidt in [false, true] {
        let kvm = kvm_or_skip!();
        let body = move |a: &mut CodeAssembler| {
            if sidt {
                a.sidt(ptr(rdi + 0x10))
            } else {
                a.sgdt(ptr(rdi + 0x10))
            }
        };
        let run = TwoPass::new(&body)
            .timeout(Duration::from_secs(30))
            .run(kvm);
        run.assert_exact();
        assert_eq!(run.events.len(), 1, "one 10-byte store: {:?}", run.events);
        assert_eq!(run.events[0].new.len(), 10);
        assert_eq!(run.stats.emulated_stores, 1, "completed by pagetrack");
    }
}

/// The other descriptor-register stores (`sldt`, `str`, `smsw` to memory) are exact too.
#[test]
fn sldt_str_smsw_into_a_tracked_frame_are_exact() {
    for which in 0..3 {
        let kvm = kvm_or_skip!();
        let body = move |a: &mut CodeAssembler| match which {
            0 => a.sldt(word_ptr(rdi + 0x10)),
            1 => a.str(word_ptr(rdi + 0x10)),
            _ => a.smsw(word_ptr(rdi + 0x10)),
        };
        let run = TwoPass::new(&body)
            .timeout(Duration::from_secs(30))
            .run(kvm);
        run.assert_exact();
    }
}
