//! Review of issue 10 item 6 (split locked operations), as a hostile guest would try it:
//! each test is exact against an untracked control, or expects the typed refusal.

use iced_x86::code_asm::*;

use crate::splitlock::{SPLIT, Tracked, two_vcpus};

/// vCPU 0: one failing `lock cmpxchg [rax], rcx` on the split word per pass (RAX = the
/// address, never the word's value); on its last pass it sets the flag at U + 8. vCPU 1,
/// on its first pass: `lock inc dword` on the half of the split word at `half(rdi)` (an
/// untracked frame in the configuration it is run in, so natively; adds of 256) until the flag is set,
/// then stores its count at U and ends its loop.
fn failing_cmpxchg_against_native_half(
    a: &mut CodeAssembler,
    upper: bool,
) -> Result<(), iced_x86::IcedError> {
    let mut other = a.create_label();
    let mut end = a.create_label();
    a.test(r12, r12)?;
    a.jnz(other)?;
    a.mov(rax, rdi)?;
    a.mov(ecx, 7)?;
    a.lock().cmpxchg(qword_ptr(rax), rcx)?;
    a.cmp(r15d, 1)?;
    a.jne(end)?;
    a.mov(qword_ptr(rsi + 8), 1)?;
    a.jmp(end)?;
    a.set_label(&mut other)?;
    a.xor(r9d, r9d)?;
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    if upper {
        a.lock().add(dword_ptr(rdi + 4), 256)?;
    } else {
        a.lock().add(dword_ptr(rdi), 256)?;
    }
    a.inc(r9)?;
    a.cmp(qword_ptr(rsi + 8), 0)?;
    a.je(spin)?;
    a.mov(qword_ptr(rsi), r9)?;
    a.mov(r15d, 1)?;
    a.set_label(&mut end)?;
    a.nop()
}

/// A failing `lock cmpxchg [rax]` on a split word with only one of its frames tracked: KVM
/// writes the stale old value back into the untracked half itself, so the other vCPU's
/// native `lock add` on that half is lost unless pagetrack refuses. The rule (DESIGN-kvm,
/// item 6) is exact, or the typed error naming the untracked frame; a silent loss fails.
#[test]
fn review10s_failing_cmpxchg_rax_split_one_frame_tracked_is_exact_or_refused() {
    // (tracked frame, the other vCPU increments the upper half?)
    let configs: [(Tracked, bool, u32); 3] = [
        (Tracked::Neither, true, 10),
        (Tracked::First, true, 200),
        (Tracked::Second, false, 200),
    ];
    for (tracked, upper, iters) in configs {
        let body: crate::splitlock::Body = if upper {
            |a| failing_cmpxchg_against_native_half(a, true)
        } else {
            |a| failing_cmpxchg_against_native_half(a, false)
        };
        let Some(run) = two_vcpus(SPLIT, tracked, 0, body, iters) else {
            return;
        };
        let half = if upper {
            run.word >> 32
        } else {
            run.word & 0xffff_ffff
        };
        // Adds of 256 keep the low byte 0: the word never equals the comparand.
        let want = run.counter.wrapping_mul(256) & 0xffff_ffff;
        match run.error {
            Some(e) => assert!(e.contains("untracked frame"), "{tracked:?}: {e}"),
            None => assert_eq!(
                half, want,
                "{tracked:?}: silently lost native adds ({} of them)",
                run.counter
            ),
        }
    }
}
