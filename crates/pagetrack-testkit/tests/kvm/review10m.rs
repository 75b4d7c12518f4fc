//! Review of issue 10 items 3, 5 and 9 (multi-store instructions, completion in the vCPU's
//! mode): hostile real-mode guests that try to make pagetrack complete `pusha` pushes that
//! never ran, or lose a push of a far call or interrupt frame silently.
//!
//! Each guest runs natively (nothing tracked) and tracked, from the same memory. The tracked
//! run must either end exactly as the native one (registers, flags, the stack and data
//! frames, events replaying to the final memory) or stop with `Error::StoresLost`. Anything
//! else is a silent difference: a lost, invented or wrong store.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack_kvm::Error;
use pagetrack_testkit::assemble16;
use pagetrack_vmm::x86::GUEST_EXIT_PORT;

use crate::common::{Ev, replay};
use crate::realmode::{End, run};

/// The realmode harness's stack frame (SS = 0, SP starts at 0x7800).
const STACK: u64 = 0x7000;
/// Its data frame.
const DATA: u64 = 0x9000;

type Body = dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// The realmode harness's initial pattern of the stack and data frames.
fn initial() -> Vec<u8> {
    (0..4096u32)
        .map(|i| u8::try_from((i * 29 + 7) % 251).unwrap())
        .collect()
}

fn ivt(vector: u64, seg: u16, ip: u16) -> (u64, Vec<u8>) {
    (4 * vector, [ip.to_le_bytes(), seg.to_le_bytes()].concat())
}

/// Code at `ip` (assembled for that IP) that records the frame at SP (AX = [SP], BX =
/// [SP+2], CX = [SP+4], DX = [SP+6], SI = [SP+8], DI = [SP+14]) and ends the run.
fn frame_reader(ip: u64) -> Vec<u8> {
    assemble16(ip, |a| {
        a.mov(bp, sp)?;
        a.mov(ax, word_ptr(bp))?;
        a.mov(bx, word_ptr(bp + 2))?;
        a.mov(cx, word_ptr(bp + 4))?;
        a.mov(dx, word_ptr(bp + 6))?;
        a.mov(si, word_ptr(bp + 8))?;
        a.mov(di, word_ptr(bp + 14))?;
        a.mov(al, 0)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)
    })
}

/// How the tracked run ended when it did not stop with `Error::StoresLost`.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Exact,
    Refused,
}

/// Runs `code` natively and with `tracked` frames tracked; asserts the tracked run is exact
/// or stopped with `Error::StoresLost` (or `Error::EventDeliveryToTracked`, item 9).
fn exact_or_refused(code: &Body, extra: &[(u64, Vec<u8>)], tracked: &[u64]) -> Option<Verdict> {
    let native = run(code, extra, &[])?;
    let End::Done(n) = native else {
        panic!("the native run did not finish: {native:?}");
    };
    let t = match run(code, extra, tracked)? {
        End::Done(t) => t,
        End::Error(Error::StoresLost { .. } | Error::EventDeliveryToTracked { .. }) => {
            return Some(Verdict::Refused);
        }
        other => panic!("tracked run: neither exact nor Error::StoresLost: {other:?}"),
    };
    let (nr, r) = (&n.regs, &t.regs);
    assert_eq!(
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.rip, r.rflags
        ],
        [
            nr.rax, nr.rbx, nr.rcx, nr.rdx, nr.rsi, nr.rdi, nr.rbp, nr.rsp, nr.rip, nr.rflags
        ],
        "registers tracked vs native (ax..di, bp, sp, ip, flags)"
    );
    let diff: Vec<usize> = (0..4096usize)
        .filter(|&i| t.stack[i] != n.stack[i])
        .collect();
    assert!(
        diff.is_empty(),
        "stack frame tracked vs native differs at offsets {diff:x?}"
    );
    assert!(t.data == n.data, "data frame tracked vs native");
    let within = |base: u64| -> Vec<Ev> {
        t.events
            .iter()
            .filter(|e| e.gpa >> 12 == base >> 12)
            .cloned()
            .collect()
    };
    replay(STACK, &initial(), &within(STACK), &t.stack);
    replay(DATA, &initial(), &within(DATA), &t.data);
    Some(Verdict::Exact)
}

/// Hostile: `int 0x40` whose handler starts right after a 0x60 byte, with DI equal to the
/// return IP. The IP push (the only one KVM passes on) is then also the DI push of a
/// `pusha` ending at the handler's entry; pagetrack's pusha check runs before its interrupt
/// check, so it may "complete" seven pushes that never ran (and lose the FLAGS and CS
/// pushes). Exact or `Error::StoresLost`, never invented stores.
#[test]
fn review10m_int_handler_after_a_pusha_byte_invents_no_stores() {
    let mut handler = vec![0x60];
    handler.extend(frame_reader(0x2001));
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(di, 0x1005)?; // bf 05 10: the IP after `int 0x40`
            a.int(0x40) // cd 40 at 0x1003
        },
        &[ivt(0x40, 0, 0x2001), (0x2000, handler)],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// Hostile: `call far 0:0x2101` (9a) whose target follows a 0x60 byte, with DI equal to the
/// return IP: the return-IP push is also the DI push of a `pusha` at 0x2100.
#[test]
fn review10m_far_call_target_after_a_pusha_byte_invents_no_stores() {
    let mut target = vec![0x60];
    target.extend(frame_reader(0x2101));
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(di, 0x1008)?; // the IP after the far call
            a.db(&[0x9a, 0x01, 0x21, 0x00, 0x00]) // call far 0x0000:0x2101
        },
        &[(0x2100, target)],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// Hostile: `call far 0x0200:0x0101` into another code segment whose target follows a
/// `push ax` byte. pagetrack looks for the far call in the *current* code segment (the
/// callee's), does not find it, and the fallback accepts `push ax` as the explanation: the
/// dropped push of the caller's CS must not be lost silently.
#[test]
fn review10m_far_call_into_another_segment_after_a_push_byte_loses_no_store() {
    let mut target = vec![0x50]; // push ax
    target.extend(frame_reader(0x0101));
    let Some(_) = exact_or_refused(
        &|a| a.db(&[0x9a, 0x01, 0x01, 0x00, 0x02]), // call far 0x0200:0x0101
        &[(0x2100, target)],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// The same far call into another segment with nothing spelled before the target: the
/// fallback (no single-store explanation, paging off) refuses it. Held.
#[test]
fn review10m_far_call_into_another_segment_is_refused() {
    let mut target = vec![0x90];
    target.extend(frame_reader(0x0101));
    let v = exact_or_refused(
        &|a| a.db(&[0x9a, 0x01, 0x01, 0x00, 0x02]),
        &[(0x2100, target)],
        &[STACK, DATA],
    );
    if let Some(v) = v {
        assert_eq!(v, Verdict::Refused);
    }
}

/// Hostile: `int 0x40` with SP = 0x7004 so that FLAGS (0x7002) and CS (0x7000) land on the
/// tracked stack frame and IP (0x6ffe) on the untracked frame below. KVM writes the IP push
/// itself and passes on only the CS push, which is not at SP: the FLAGS push must not be
/// lost silently.
#[test]
fn review10m_int_frame_straddling_into_an_untracked_frame_loses_no_store() {
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(sp, 0x7004)?;
            a.stc()?;
            a.int(0x40)
        },
        &[ivt(0x40, 0, 0x2000), (0x2000, frame_reader(0x2000))],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// `call far` with SP = 0x7002: CS lands on the tracked frame, the IP push on the untracked
/// frame below (written by KVM). Exact (nothing dropped) or refused.
#[test]
fn review10m_far_call_straddling_into_an_untracked_frame() {
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(sp, 0x7002)?;
            a.db(&[0x9a, 0x00, 0x21, 0x00, 0x00])
        },
        &[(0x2100, frame_reader(0x2100))],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// `int3` and `into` (OF set) with a tracked stack: interrupt frames, refused. (`int1`,
/// f1, is not emulated by KVM in real mode: the native run cannot run it.)
#[test]
fn review10m_int3_and_into_are_refused() {
    for (vector, bytes) in [
        (3u64, vec![0xccu8]),
        (4, vec![0xb0, 0x7f, 0x04, 0x01, 0xce]), // mov al, 0x7f; add al, 1 (OF); into
    ] {
        let bytes = bytes.clone();
        let v = exact_or_refused(
            &move |a| a.db(&bytes),
            &[ivt(vector, 0, 0x2000), (0x2000, frame_reader(0x2000))],
            &[STACK, DATA],
        );
        if let Some(v) = v {
            assert_eq!(v, Verdict::Refused, "vector {vector}");
        }
    }
}

/// `pushad` with SS base 0x7000 and SP = 6: the pushes wrap at 16 bits from SS:0 to
/// SS:0xfffe (linear 0x16ffe, untracked). Exact.
#[test]
fn review10m_pusha_wrapping_sp_with_ss_base_is_exact() {
    let Some(v) = exact_or_refused(
        &|a| {
            a.mov(eax, 0x1111_aaaa)?;
            a.mov(ecx, 0x2222_bbbb)?;
            a.mov(edx, 0x3333_cccc)?;
            a.mov(bx, 0x700)?;
            a.mov(ss, bx)?;
            a.mov(sp, 6)?;
            a.mov(ebx, 0x4444_dddd)?;
            a.pusha()?;
            a.xor(bx, bx)?;
            a.mov(ss, bx)?;
            a.mov(sp, 0x7800)
        },
        &[],
        &[STACK, DATA],
    ) else {
        return;
    };
    assert_eq!(v, Verdict::Exact);
}

/// `call far` with an operand-size prefix in real mode (`66 9a` ptr16:32): 4-byte pushes.
#[test]
fn review10m_far_call_o32_is_refused() {
    let v = exact_or_refused(
        &|a| a.db(&[0x66, 0x9a, 0x00, 0x21, 0x00, 0x00, 0x00, 0x00]),
        &[(0x2100, frame_reader(0x2100))],
        &[STACK, DATA],
    );
    if let Some(v) = v {
        assert_eq!(v, Verdict::Refused);
    }
}

/// A CPL3 32-bit (compatibility-mode) code segment written into the harness GDT's unused
/// slot 0x38 (vCPU 1's TSS descriptor; the harness runs one vCPU): selector 0x3b.
const COMPAT_CS: u16 = 0x3b;

fn compat_segment(vm: &pagetrack_kvm::Vm) {
    use vm_memory::{Bytes, GuestAddress};
    let layout = pagetrack_vmm::x86::LongModeLayout::new(pagetrack_testkit::twopass::RAM).unwrap();
    // Base 0, limit 0xfffff (G), D = 1, L = 0, P, DPL 3, code execute/read.
    let desc: u64 = 0x00cf_fa00_0000_ffff;
    vm.untracked_memory()
        .write_obj(desc, GuestAddress(layout.gdt() + 0x38))
        .unwrap();
}

/// Hostile (64-bit): `call far m16:64` (48 ff 9f) onto a tracked stack into a 32-bit
/// compatibility-mode code segment. After the exit the vCPU is in compatibility mode:
/// pagetrack checks the (8-byte) return-offset push with its legacy-mode rules, which only
/// look at 2- and 4-byte pushes, so the dropped CS push must not be lost silently. The
/// target reads the pushed CS ([esp+8]) into EBX and jumps back to 64-bit code.
#[test]
fn review10m_far_call_m16_64_into_compat_mode_loses_no_store() {
    far_call_into_compat(true);
}

/// The same with `call far m16:32` (ff 9f): 4-byte pushes, found and refused. Held.
#[test]
fn review10m_far_call_m16_32_into_compat_mode_is_refused() {
    far_call_into_compat(false);
}

fn far_call_into_compat(rex_w: bool) {
    use pagetrack_testkit::twopass::Ending;
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let body = |a: &mut CodeAssembler| {
        let mut target = a.create_label();
        let mut back = a.create_label();
        let mut after = a.create_label();
        a.lea(rax, ptr(target))?;
        a.mov(qword_ptr(rdi + 0x800), rax)?;
        let sel = if rex_w { 0x808 } else { 0x804 };
        a.mov(word_ptr(rdi + sel), u32::from(COMPAT_CS))?;
        // The far pointer back to 64-bit code, for the compat code's `jmp far [esi]`.
        a.lea(rax, ptr(back))?;
        a.mov(dword_ptr(rdi + 0x900), eax)?;
        a.mov(
            word_ptr(rdi + 0x904),
            u32::from(pagetrack_vmm::x86::USER_CS),
        )?;
        a.lea(rsi, ptr(rdi + 0x900))?;
        a.xor(ebx, ebx)?;
        a.mov(rbp, rsp)?;
        a.lea(rsp, ptr(rdi + 0xf00))?;
        if rex_w {
            a.db(&[0x48])?;
        }
        a.db(&[0xff, 0x9f, 0x00, 0x08, 0x00, 0x00])?;
        a.jmp(after)?;
        a.set_label(&mut target)?;
        // 32-bit code: mov ebx, [esp + 8 or 4] (the pushed CS); jmp far [esi].
        a.db(&[
            0x8b,
            0x5c,
            0x24,
            if rex_w { 0x08 } else { 0x04 },
            0xff,
            0x2e,
        ])?;
        a.set_label(&mut back)?;
        a.mov(rsp, rbp)?;
        a.set_label(&mut after)?;
        a.nop()
    };
    let run = pagetrack_testkit::TwoPass::new(&body).run_with(kvm, compat_segment);
    match &run.ending {
        Ending::Error(Error::StoresLost { .. }) => {
            assert_ne!(run.native, run.initial, "the untracked pass stored");
        }
        _ if rex_w => run.assert_exact(),
        other => panic!("expected Error::StoresLost, got {other:?}"),
    }
}

/// `pushad` whose last push (EDI, 4 bytes) straddles the boundary of two tracked frames
/// (0x6ffd..0x7000, split 3 + 1): KVM splits it into two MMIO fragments and exits twice.
/// pagetrack must complete the seven other pushes once: exactly one event per stored piece
/// (seven pushes on the upper frame, EDI's two pieces), no duplicates, and the memory as
/// natively. (Splits 2 + 2 and 1 + 3 are refused: their first piece is also the DI push of
/// the `pusha` that the `60` alone spells.)
#[test]
fn review10m_pushad_last_push_straddling_two_tracked_frames_is_stored_once() {
    let code = |a: &mut CodeAssembler| {
        a.mov(eax, 0x1111_aaaa)?;
        a.mov(ecx, 0x2222_bbbb)?;
        a.mov(edx, 0x3333_cccc)?;
        a.mov(ebx, 0x4444_dddd)?;
        a.mov(ebp, 0x5555_eeee)?;
        a.mov(esi, 0x6666_ffff)?;
        a.mov(edi, 0x7777_0101)?;
        a.mov(sp, 0x701d)?;
        a.pushad()?;
        a.mov(sp, 0x7800)
    };
    let Some(native) = run(&code, &[], &[]) else {
        return;
    };
    let End::Done(n) = native else {
        panic!("native: {native:?}");
    };
    let tracked = run(&code, &[], &[0x6000, STACK, DATA]).unwrap();
    let t = match tracked {
        End::Done(t) => t,
        End::Error(e @ Error::StoresLost { .. }) => {
            eprintln!("review10m: pushad straddling two tracked frames refused: {e}");
            return;
        }
        other => panic!("tracked: {other:?}"),
    };
    assert!(t.stack == n.stack, "stack frame tracked vs native");
    let got: Vec<(u64, usize)> = t.events.iter().map(|e| (e.gpa, e.new.len())).collect();
    let mut want: Vec<(u64, usize)> = (0..7).map(|i| (0x7019 - 4 * i, 4)).collect();
    want.extend([(0x6ffd, 3), (0x7000, 1)]);
    let mut sorted = got.clone();
    sorted.sort_unstable();
    want.sort_unstable();
    assert_eq!(
        sorted, want,
        "one event per stored piece, in order: {got:x?}"
    );
}

/// Item 5: `movss` completed in real mode with a non-zero CS base (entered by a far jump to
/// 0x0080:0x0805, the same bytes), an ES override, a 32-bit address-size prefix whose
/// offset wraps at 32 bits, and a BP-based operand (SS). Each lands where the native run
/// stores it, and IP advances by each 16-bit length.
#[test]
fn review10m_movss_in_real_mode_segments_and_address_size_is_exact() {
    let Some(v) = exact_or_refused(
        &|a| {
            a.db(&[0xea, 0x05, 0x08, 0x80, 0x00])?; // jmp far 0x0080:0x0805 (= CODE + 5)
            a.mov(eax, cr4)?;
            a.or(eax, 0x600)?;
            a.mov(cr4, eax)?;
            a.mov(eax, 0x4142_4344)?;
            a.mov(word_ptr(0x9400), ax)?;
            a.shr(eax, 16)?;
            a.mov(word_ptr(0x9402), ax)?;
            a.movups(xmm0, xmmword_ptr(0x9400))?;
            a.mov(ax, 0x900)?;
            a.mov(ds, ax)?;
            a.mov(ax, 0x980)?;
            a.mov(es, ax)?;
            a.mov(di, 0x10)?;
            a.movss(dword_ptr(di).es(), xmm0)?; // 0x9810
            a.mov(ebx, 0x1_0000)?;
            a.mov(esi, 0xffff_0130u32)?;
            a.movss(dword_ptr(ebx + esi), xmm0)?; // DS:0x130 = 0x9130
            a.mov(bp, 0x7100)?;
            a.movss(dword_ptr(bp + di), xmm0)?; // SS:0x7110
            a.mov(dx, 0x77)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)?;
            a.mov(es, ax)?;
            a.mov(ebx, 0)?;
            a.mov(esi, 0)
        },
        &[],
        &[STACK, DATA],
    ) else {
        return;
    };
    assert_eq!(v, Verdict::Exact);
}

/// Hostile: the IVT moved by `lidt` to 0xffe00 (limit 0x3ff, so its 1 KiB would run past
/// the end of the 1 MiB of RAM; vector 0x40 at 0xfff00 is inside) and `int 0x40` whose
/// handler follows a `push ax` byte. pagetrack reads the whole 1 KiB IVT to recognise an
/// interrupt entry; when that read fails, the fallback accepts `push ax` and the FLAGS and
/// CS pushes must still not be lost silently.
#[test]
fn review10m_int_with_the_ivt_at_the_end_of_ram_loses_no_store() {
    let mut handler = vec![0x50]; // push ax
    handler.extend(frame_reader(0x2001));
    let idtr = [0xff, 0x03, 0x00, 0xfe, 0x0f, 0x00]; // limit 0x3ff, base 0xffe00
    let Some(_) = exact_or_refused(
        &|a| {
            a.lidt(ptr(0x9f00))?;
            a.stc()?;
            a.int(0x40)
        },
        &[
            (0x9f00, idtr.to_vec()),
            (0xffe00 + 4 * 0x40, [0x01u8, 0x20, 0, 0].to_vec()),
            (0x2000, handler),
        ],
        &[STACK, DATA],
    ) else {
        return;
    };
}

/// Item 9: real-mode exceptions (`ud2` #UD, `div` #DE; `bound` is not emulated by KVM in real mode) whose frame lies on the
/// tracked stack, wholly or only its IP slot (SP = 0x8004: FLAGS and CS on the untracked
/// frame above): exact or a typed error, never a bare shutdown or a lost push.
#[test]
fn review10m_real_mode_exceptions_on_tracked_stacks() {
    for (vector, bytes) in [
        (6u64, vec![0x0fu8, 0x0b]),                          // ud2
        (0, vec![0x31, 0xc9, 0xb8, 0x01, 0x00, 0xf7, 0xf1]), // xor cx,cx; mov ax,1; div cx
    ] {
        for top in [0x7800u16, 0x8004] {
            let bytes = bytes.clone();
            let v = exact_or_refused(
                &move |a| {
                    a.mov(sp, u32::from(top))?;
                    a.db(&bytes)
                },
                &[ivt(vector, 0, 0x2000), (0x2000, frame_reader(0x2000))],
                &[STACK, DATA],
            );
            eprintln!("review10m: vector {vector} sp {top:#x}: {v:?}");
            assert!(
                v.is_none_or(|v| v == Verdict::Refused),
                "tracked delivery is refused"
            );
        }
    }
}

/// 32-bit code at 0x2000 for [`review10m_movss_beyond_a_page_granular_limit_is_not_stored`]:
/// DS = 0x18 (limit 0x8fff), `movss [0x9100], xmm0`, DS = 0x10, exit.
fn pm32_movss_beyond_limit() -> Vec<u8> {
    let build = || -> Result<Vec<u8>, IcedError> {
        let mut a = CodeAssembler::new(32)?;
        a.mov(ax, 0x10)?;
        a.mov(ss, ax)?;
        a.mov(es, ax)?;
        a.mov(ds, ax)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x600)?;
        a.mov(cr4, eax)?;
        a.mov(dword_ptr(0x9400), 0x4142_4344)?;
        a.movups(xmm0, xmmword_ptr(0x9400))?;
        a.mov(ax, 0x18)?;
        a.mov(ds, ax)?;
        a.movss(dword_ptr(0x9100), xmm0)?;
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(al, 0)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        a.assemble(0x2000)
    };
    build().unwrap()
}

/// Item 5, segment limits: 32-bit protected mode with paging off, DS a data segment with
/// G = 1 and limit field 8, so its byte limit is 0x8fff (KVM_GET_SREGS reports limits in
/// bytes, granularity already applied). `movss [0x9100], xmm0` lies beyond it: the CPU
/// raises #GP (here, with no IDT, a shutdown) and stores nothing. pagetrack's completion
/// must not store it (a typed error or the fault are fine); scaling the byte limit by 4 KiB
/// again would let it through.
#[test]
fn review10m_movss_beyond_a_page_granular_limit_is_not_stored() {
    // GDT at 0x3000: null, 0x08 code32 flat, 0x10 data32 flat, 0x18 data32 limit 0x8fff.
    let gdt: Vec<u8> = [
        0u64,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00c0_9200_0000_0008,
    ]
    .iter()
    .flat_map(|d| d.to_le_bytes())
    .collect();
    let gdtr = vec![0x1f, 0x00, 0x00, 0x30, 0x00, 0x00];
    let extra = [
        (0x3000, gdt),
        (0x3100, gdtr),
        (0x2000, pm32_movss_beyond_limit()),
    ];
    let code = |a: &mut CodeAssembler| {
        a.cli()?;
        a.lgdt(ptr(0x3100))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        a.db(&[0x66, 0xea, 0x00, 0x20, 0x00, 0x00, 0x08, 0x00]) // jmp far 0x08:0x2000
    };
    for tracked in [&[][..], &[STACK, DATA][..]] {
        let Some(end) = run(&code, &extra, tracked) else {
            return;
        };
        eprintln!("review10m: tracked {tracked:x?}: {end:?}");
        if let End::Done(t) = &end {
            assert_ne!(
                &t.data[0x100..0x104],
                &0x4142_4344u32.to_le_bytes(),
                "stored beyond DS's limit (0x8fff), tracked frames {tracked:x?}"
            );
        }
    }
}

/// Hostile spellings that hold: a near call to a routine that follows a 0x60 byte with DI =
/// the return IP, and `push word [bx+0x60]` (ff 77 60) pushing a word equal to DI. Each
/// store is exactly a `pusha`'s DI push; pagetrack must not complete a `pusha` (exact or
/// refused as ambiguous).
#[test]
fn review10m_near_call_and_push_mem_spelling_pusha_are_not_completed() {
    let mut target = vec![0x60];
    target.extend(frame_reader(0x2101));
    let near_call = |a: &mut CodeAssembler| {
        a.mov(di, 0x1006)?;
        a.db(&[0xe8, 0xfb, 0x10]) // call 0x2101 (from 0x1003, next 0x1006)
    };
    let Some(v) = exact_or_refused(&near_call, &[(0x2100, target)], &[STACK, DATA]) else {
        return;
    };
    eprintln!("review10m: near call: {v:?}");
    let push_mem = |a: &mut CodeAssembler| {
        a.mov(di, 0x7777)?;
        a.mov(word_ptr(0x9160), di)?;
        a.mov(bx, 0x9100)?;
        a.db(&[0xff, 0x77, 0x60]) // push word [bx+0x60]
    };
    let Some(v) = exact_or_refused(&push_mem, &[], &[STACK, DATA]) else {
        return;
    };
    eprintln!("review10m: push word [bx+0x60]: {v:?}");
}

/// (Added with the fixes.) `int 0x40` with SP = 0x7005: the IP push (post SP = 0x6fff)
/// straddles the tracked frames 0x6000 and 0x7000 (1 + 1 bytes, two exits of one byte).
/// The 1-byte pieces used to be applied as reported: FLAGS and CS lost silently.
#[test]
fn review10m_int_frame_with_its_ip_slot_straddling_two_tracked_frames_loses_no_store() {
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(sp, 0x7005)?;
            a.stc()?;
            a.int(0x40)
        },
        &[ivt(0x40, 0, 0x2000), (0x2000, frame_reader(0x2000))],
        &[0x6000, STACK, DATA],
    ) else {
        return;
    };
}

/// (Added with the fixes.) `call far 0:0x2100` with SP = 0x7003: the return-offset push
/// (post SP = 0x6fff) straddles the tracked frames 0x6000 and 0x7000, the CS push at 0x7001
/// is dropped: exact or refused, never a lost CS.
#[test]
fn review10m_far_call_with_its_offset_slot_straddling_two_tracked_frames_loses_no_store() {
    let Some(_) = exact_or_refused(
        &|a| {
            a.mov(sp, 0x7003)?;
            a.db(&[0x9a, 0x00, 0x21, 0x00, 0x00])
        },
        &[(0x2100, frame_reader(0x2100))],
        &[0x6000, STACK, DATA],
    ) else {
        return;
    };
}

/// (Added with the fixes.) Ordinary `push ax` with SP = 0x7001 (the slot straddles the
/// tracked frames 0x6000 and 0x7000): no far transfer fits, so it is applied exactly, both
/// pieces.
#[test]
fn review10m_push_straddling_two_tracked_frames_is_exact() {
    let v = exact_or_refused(
        &|a| {
            a.mov(ax, 0x1234)?;
            a.mov(sp, 0x7001)?;
            a.push(ax)?;
            a.pop(bx)?;
            a.mov(sp, 0x7800)
        },
        &[],
        &[0x6000, STACK, DATA],
    );
    if let Some(v) = v {
        assert_eq!(v, Verdict::Exact);
    }
}
