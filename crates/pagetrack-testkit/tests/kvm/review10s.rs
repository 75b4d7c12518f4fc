//! Review of issue 10 item 6 (split locked operations), as a hostile guest would try it:
//! each test is exact against an untracked control, or expects the typed refusal.

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_testkit::{assemble, exit_with};

use crate::common::*;
use crate::splitlock::{
    SPLIT, Tracked, compat_lock_inc_at, each_config, exact_sum, run_vcpus, two_vcpus,
};

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
        (Tracked::First, true, 600),
        (Tracked::Second, false, 600),
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

/// `lock inc dword` in compatibility mode on a word split 2 + 2 across two frames: the
/// design promises exact or the typed "compatibility mode" refusal. With both frames
/// tracked no fragment is held (`hold_split` is 64-bit only) and neither fragment alone is
/// the operand `compat_locked` checks, so each is applied as a plain store.
#[test]
fn review10s_compat_mode_split_lock_inc_is_exact_or_refused() {
    let addr = T + 4094;
    let (a, b) = (T >> 12, (T >> 12) + 1);
    // The control runs one vCPU: two racing natively on a page-crossing `lock inc`, with no
    // frame tracked (pagetrack takes no part), lose updates on this host by themselves once
    // it is quiet (6 of 40 in most runs; PVM logs a bus-lock trap for each such `lock inc`),
    // which says nothing about pagetrack.
    let Some((word, error)) = compat_lock_inc_at(addr, &[], 20, 1) else {
        return;
    };
    assert_eq!(error, None);
    assert_eq!(word & 0xffff_ffff, 20, "control");
    let mut lost = Vec::new();
    for gfns in [vec![a, b], vec![a], vec![b]] {
        let Some((word, error)) = compat_lock_inc_at(addr, &gfns, 500, 2) else {
            return;
        };
        match error {
            None if word & 0xffff_ffff != 1000 => lost.push((gfns, word & 0xffff_ffff)),
            None => {}
            Some(e) => assert!(e.contains("compatibility mode"), "frames {gfns:x?}: {e}"),
        }
    }
    assert!(
        lost.is_empty(),
        "silently lost updates (tracked frames, count of 1000): {lost:x?}"
    );
}

/// A plain `mov dword [rdi], imm32` straddling two tracked frames whose immediate spells a
/// locked read-modify-write ending at RIP (`lock add [rdi], eax`, `lock inc dword [rdi]`,
/// `xchg [rdi], eax`, `lock cmpxchg [rdi], eax`): the first fragment is held and joined with
/// the second, and the proof must still see the `mov` as an explanation. The word must hold
/// the immediate and EAX (a sentinel, stored at U after the loop) must be untouched.
#[test]
fn review10s_split_plain_store_whose_immediate_spells_a_lock_is_applied_as_is() {
    const SENTINEL: u32 = 0x1234_5678;
    let cases: [(u64, u32); 8] = [
        (T + 4094, u32::from_le_bytes([0x55, 0xf0, 0x01, 0x07])),
        (T + 4094, u32::from_le_bytes([0x55, 0xf0, 0xff, 0x07])),
        (T + 4094, u32::from_le_bytes([0x55, 0x66, 0x87, 0x07])),
        (T + 4094, u32::from_le_bytes([0xf0, 0x0f, 0xb1, 0x07])),
        (T + 4093, u32::from_le_bytes([0x55, 0xf0, 0x01, 0x07])),
        (T + 4095, u32::from_le_bytes([0x55, 0xf0, 0x01, 0x07])),
        (T + 4095, u32::from_le_bytes([0x55, 0x66, 0x87, 0x07])),
        (T + 4093, u32::from_le_bytes([0xf0, 0x0f, 0xb1, 0x07])),
    ];
    for (i, (addr, imm)) in cases.into_iter().enumerate() {
        // The body is a fn pointer: the immediate comes from a table indexed by a constant.
        let body: crate::splitlock::Body = match i {
            0 | 4 | 5 => |a| mov_imm(a, 0x07_01_f0_55),
            1 => |a| mov_imm(a, 0x07_ff_f0_55),
            2 | 6 => |a| mov_imm(a, 0x07_87_66_55),
            _ => |a| mov_imm(a, 0x07_b1_0f_f0),
        };
        let Some(run) = two_vcpus(addr, Tracked::Both, 0, body, 3) else {
            return;
        };
        assert_eq!(run.error, None, "case {i}");
        assert_eq!(run.word & 0xffff_ffff, u64::from(imm), "case {i}: word");
        assert_eq!(run.counter, u64::from(SENTINEL), "case {i}: eax clobbered");
        assert!(!run.events.is_empty(), "case {i}: no event");
    }
}

fn mov_imm(a: &mut CodeAssembler, imm: u32) -> Result<(), iced_x86::IcedError> {
    a.mov(eax, 0x1234_5678)?;
    a.mov(dword_ptr(rdi), imm)?;
    a.mov(qword_ptr(rsi), rax)
}

/// `lock cmpxchg8b` retry loop on the split word (carrying into the other frame), 2 vCPUs:
/// exact with both frames tracked, the typed error with one (as `splitlock`'s shapes).
#[test]
fn review10s_split_cmpxchg8b_retry_loop_exact() {
    each_config(
        SPLIT,
        0xffff_fff0,
        |a| {
            let mut retry = a.create_label();
            a.set_label(&mut retry)?;
            a.mov(eax, dword_ptr(rdi))?;
            a.mov(edx, dword_ptr(rdi + 4))?;
            a.mov(ebx, eax)?;
            a.mov(ecx, edx)?;
            a.add(ebx, 1)?;
            a.adc(ecx, 0)?;
            a.lock().cmpxchg8b(qword_ptr(rdi))?;
            a.jnz(retry)
        },
        exact_sum(0xffff_fff0, 1),
    );
}

/// `lock btc qword [rdi], rcx` (register bit offset) on the split word: vCPU 0 toggles bit 3
/// (first frame), vCPU 1 bit 35 (second frame), an even number of times each: the word ends
/// 0 unless a toggle is lost.
#[test]
fn review10s_split_lock_btc_register_offset_exact() {
    each_config(
        SPLIT,
        0,
        |a| {
            a.mov(ecx, r12d)?;
            a.shl(ecx, 5)?;
            a.add(ecx, 3)?;
            a.lock().btc(qword_ptr(rdi), rcx)
        },
        |run, iters, tracked| {
            assert_eq!(iters % 2, 0);
            assert_eq!(run.word, 0, "{tracked:?}: lost toggles");
        },
    );
}

/// `lock xadd word` split 1 + 1 at the last byte of a tracked frame, 2 vCPUs: exact.
#[test]
fn review10s_split_lock_xadd_word_one_plus_one_exact() {
    each_config(
        T + 4095,
        0,
        |a| {
            a.mov(eax, 1)?;
            a.lock().xadd(word_ptr(rdi), ax)
        },
        |run, iters, tracked| {
            assert_eq!(
                run.word & 0xffff,
                (2 * u64::from(iters)) & 0xffff,
                "{tracked:?}: lost updates"
            );
        },
    );
}

/// `lock btc qword [rdi], rcx` (base R8 = the split word - 800) whose bit offset moves the operand 100 qwords up, onto
/// the split word: the rebuilt operand must include the bit offset's displacement, or the
/// proof finds no candidate and the toggles are applied as plain stores (lost on 2 vCPUs).
#[test]
fn review10s_split_lock_btc_far_bit_offset_exact() {
    each_config(
        SPLIT,
        0,
        |a| {
            a.lea(r8, qword_ptr(rdi - 800))?;
            a.mov(ecx, r12d)?;
            a.shl(ecx, 5)?;
            a.add(ecx, 6400 + 3)?;
            a.lock().btc(qword_ptr(r8), rcx)
        },
        |run, iters, tracked| {
            assert_eq!(iters % 2, 0);
            assert_eq!(run.word, 0, "{tracked:?}: lost toggles");
        },
    );
}

/// A `push rax` whose slot straddles two tracked frames, preceded by bytes (the immediate
/// of a `mov rbx, imm64`) that make `lock add qword [rsp], 0x50` end at RIP too: with the
/// post-push RSP that decoding names exactly the pushed slot. The `push` is an explanation,
/// so the slot must hold RAX (not the old value + 0x50) and RAX, RSP stay right.
#[test]
fn review10s_split_push_whose_prefix_spells_lock_add_rsp_is_applied_as_is() {
    const SENTINEL: u64 = 0x1122_3344_5566_7788;
    for addr in [SPLIT, T + 4094, T + 64] {
        let Some(run) = two_vcpus(
            addr,
            Tracked::Both,
            0,
            |a| {
                a.mov(r14, rsp)?;
                a.lea(rsp, qword_ptr(rdi + 8))?;
                a.mov(rax, SENTINEL)?;
                // mov rbx, imm64 with the imm's last bytes f0 48 83 04 24, then push rax
                // (0x50): "f0 48 83 04 24 50" is lock add qword [rsp], 0x50.
                a.db(&[
                    0x48, 0xbb, 0x11, 0x22, 0x33, 0xf0, 0x48, 0x83, 0x04, 0x24, 0x50,
                ])?;
                a.lea(rcx, qword_ptr(rdi))?;
                a.sub(rcx, rsp)?; // 0 when RSP moved by exactly 8
                a.mov(rsp, r14)?;
                a.add(rcx, rax)?; // RAX intact and RSP right: SENTINEL
                a.mov(qword_ptr(rsi), rcx)
            },
            3,
        ) else {
            return;
        };
        assert_eq!(run.error, None, "{addr:#x}");
        assert_eq!(run.word, SENTINEL, "{addr:#x}: pushed slot");
        assert_eq!(run.counter, SENTINEL, "{addr:#x}: RAX or RSP wrong");
    }
}

/// Single-stepping (TF = 1) across held stores: a plain 2-byte store into a frame's last
/// bytes after lock bytes (held, then EINTR), a plain dword split 2 + 2 (held and joined),
/// `lock add` split 2 + 2 (joined, re-executed) and `xchg` split 4 + 4. The #DB frame RIPs
/// must be the native pass's, and memory and registers exact (two-pass harness).
#[test]
fn review10s_tf_across_held_and_joined_split_stores_is_exact() {
    use crate::singlestep::{LOG_COPY, MAX_LOG, install_handler, stepped};
    let kvm = pagetrack_testkit::kvm_or_skip!();
    let steps = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        a.mov(eax, 0xf0f0_f0f0_u32)?;
        a.mov(word_ptr(rdi + 0xffe), ax)?;
        a.nop()?;
        a.mov(eax, 0x1122_3344)?;
        a.mov(dword_ptr(rdi + 0xffe), eax)?;
        a.nop()?;
        a.lock().add(dword_ptr(rdi + 0xffe), 5)?;
        a.nop()?;
        a.mov(rax, 0x5566_7788_99aa_bbcc_u64)?;
        a.xchg(qword_ptr(rdi + 0xffc), rax)?;
        a.nop()
    };
    let body = |a: &mut CodeAssembler| stepped(a, &steps);
    let run = pagetrack_testkit::TwoPass::new(&body)
        .frames(2)
        .run_with(kvm, install_handler);
    let at = usize::try_from(LOG_COPY).unwrap();
    let native = u64::from_le_bytes(run.native[at..at + 8].try_into().unwrap());
    let tracked = u64::from_le_bytes(run.tracked[at..at + 8].try_into().unwrap());
    assert!(
        native >= 11,
        "the native pass single-stepped ({native} #DBs)"
    );
    let rips = |m: &[u8], n: u64| -> Vec<String> {
        (0..usize::try_from(n.min(MAX_LOG)).unwrap())
            .map(|i| {
                let o = at + 8 + 8 * i;
                format!("{:#x}", u64::from_le_bytes(m[o..o + 8].try_into().unwrap()))
            })
            .collect()
    };
    assert_eq!(
        rips(&run.tracked, tracked),
        rips(&run.native, native),
        "#DB frame RIPs tracked (left) vs untracked"
    );
    run.assert_exact();
}

/// The exit budget runs out at every point of a guest whose stores are held (a plain store
/// into a frame's last bytes after lock bytes), held and joined (a plain dword split 2 + 2)
/// and re-executed (`lock add` split 2 + 2): whenever the vCPU stops with `ExitLimit`, the
/// memory shows exactly the stores RIP has passed (a held store is never left unapplied
/// behind an advanced RIP); run on, the guest ends exact with events that replay.
#[test]
fn review10s_exit_limit_at_a_held_store_leaves_no_store_behind() {
    use pagetrack_kvm::{Exit, ExitBudget};
    let steps: [crate::splitlock::Body; 3] = [
        |a| {
            a.mov(eax, 0xf0f0_f0f0_u32)?;
            a.mov(word_ptr(rdi + 0xffe), ax)
        },
        |a| {
            a.mov(eax, 0xf0f0_1122_u32)?;
            a.mov(dword_ptr(rdi + 0xffe), eax)
        },
        |a| a.lock().add(dword_ptr(rdi + 0xffe), 5),
    ];
    let prefix = |n: usize| {
        assemble(ENTRY, |a| {
            a.mov(rdi, T)?;
            for s in &steps[..n] {
                s(a)?;
            }
            Ok(())
        })
        .len() as u64
    };
    let ends: Vec<u64> = (1..=3).map(|n| ENTRY + prefix(n)).collect();
    let states: [u32; 4] = [0, 0xf0f0, 0xf0f0_1122, 0xf0f0_1127];
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?;
        for s in &steps {
            s(a)?;
        }
        exit_with(a, 0)
    });
    for budget in 1..=8 {
        let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
            return;
        };
        let mut g = boot(kvm, 16 << 20, 1, &code);
        let (rec, _h) = recorder(&g.vm);
        g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
        g.vm.tracker().add_gfn(Gfn((T >> 12) + 1)).unwrap();
        let init = read(&g.vm, T, 8192);
        let mut v = g.vcpus.remove(0);
        v.set_exit_budget(Some(ExitBudget::new(budget)));
        match v.run().unwrap() {
            Exit::ExitLimit => {
                let rip = v.fd().get_regs().unwrap().rip;
                let passed = ends.iter().filter(|&&e| rip >= e).count();
                let word = u32::from_le_bytes(read(&g.vm, T + 0xffe, 4).try_into().unwrap());
                assert_eq!(
                    word, states[passed],
                    "budget {budget}: rip {rip:#x} passed {passed} stores"
                );
                v.set_exit_budget(None);
                assert_eq!(run_to_exit(&g.vm, &g.layout, &mut v, TIMEOUT), 0);
            }
            Exit::IoOut { .. } => {}
            other => panic!("budget {budget}: {other:?}"),
        }
        let word = u32::from_le_bytes(read(&g.vm, T + 0xffe, 4).try_into().unwrap());
        assert_eq!(word, states[3], "budget {budget}: final");
        replay(T, &init, &rec.take(), &read(&g.vm, T, 8192));
    }
}

/// `lock xadd` on a word straddling two KVM memslots (RAM added as `[0, 16 MiB)` and
/// `[16 MiB, 18 MiB)`), both frames tracked, 2 vCPUs: exact, with events that replay.
#[test]
fn review10s_split_lock_across_two_memslots_exact() {
    use pagetrack_kvm::{Vm, VmConfig};
    const LOW: u64 = 16 << 20;
    const RAM2: u64 = 18 << 20;
    const WORD: u64 = LOW - 4;
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let iters = 500u32;
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, WORD)?;
        a.mov(r15d, iters)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(rdi), rax)?;
        a.dec(r15d)?;
        a.jnz(top)?;
        exit_with(a, 0)
    });
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM2)).unwrap();
    vm.add_ram(0, LOW).unwrap();
    vm.add_ram(LOW, RAM2 - LOW).unwrap();
    let layout = pagetrack_vmm::x86::LongModeLayout::new(RAM2).unwrap();
    use vm_memory::Bytes;
    vm.untracked_memory()
        .write_slice(&code, vm_memory::GuestAddress(ENTRY))
        .unwrap();
    let mut vcpus = Vec::new();
    for i in 0..2 {
        let v = vm.create_vcpu(i).unwrap();
        pagetrack_vmm::x86::setup_long_mode(
            vm.kvm(),
            v.fd(),
            &*vm.untracked_memory(),
            &layout,
            ENTRY,
            i,
        )
        .unwrap();
        vcpus.push(v);
    }
    let (rec, _h) = recorder(&vm);
    vm.tracker().add_gfn(Gfn((LOW >> 12) - 1)).unwrap();
    vm.tracker().add_gfn(Gfn(LOW >> 12)).unwrap();
    let init = read(&vm, LOW - 4096, 8192);
    assert_eq!(run_vcpus(&vm, &layout, vcpus.into_iter()), None);
    let word = u64::from_le_bytes(read(&vm, WORD, 8).try_into().unwrap());
    assert_eq!(word, 2 * u64::from(iters), "lost updates");
    replay(LOW - 4096, &init, &rec.take(), &read(&vm, LOW - 4096, 8192));
}
