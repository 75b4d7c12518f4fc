//! Real-mode guests on tracked frames (issue 10 items 3, 5 and 9): instructions KVM's
//! emulator stores more than once for (`pusha`, `int n`, `call far`), userspace completion
//! in the vCPU's own mode, and exception delivery onto a tracked stack.
//!
//! Each guest runs twice in fresh VMs, with the stack and data frames untracked (native) and
//! tracked, from the same initial memory. The tracked run must end exactly as the native
//! one (registers, flags, memory) with events that replay to the final memory, or stop with
//! a typed error naming RIP and the bytes; never a silent difference.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::{Error, Exit, Vm, VmConfig};
use pagetrack_testkit::assemble16;
use pagetrack_vmm::x86::{GUEST_EXIT_PORT, setup_real_mode};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{Ev, read, recorder, replay};

/// Code is loaded and entered here (CS = 0).
const CODE: u64 = 0x1000;
/// The stack frame: SS = 0, SP starts at its top.
const STACK: u64 = 0x7000;
/// A data frame.
const DATA: u64 = 0x9000;
/// Guest RAM.
const RAM: u64 = 1 << 20;

/// How a run ended.
pub enum End {
    /// The guest wrote 0 to the exit port: registers, stack and data frames, events.
    Done(Box<Finished>),
    /// `Vcpu::run` failed.
    Error(Error),
    /// Another exit.
    Other(String),
}

impl std::fmt::Debug for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Done(d) => write!(f, "Done(rip {:#x}, {} events)", d.regs.rip, d.events.len()),
            End::Error(e) => write!(f, "Error({e:?})"),
            End::Other(s) => write!(f, "Other({s})"),
        }
    }
}

pub struct Finished {
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub stack: Vec<u8>,
    pub data: Vec<u8>,
    pub events: Vec<Ev>,
}

/// Initial memory of both runs: a pattern in the stack and data frames, the IVT, `extra`.
fn initial() -> Vec<u8> {
    (0..4096u32)
        .map(|i| u8::try_from((i * 29 + 7) % 251).unwrap())
        .collect()
}

/// Runs `code` (16-bit, at `CODE`) in real mode with SP = `STACK + 0x800`, the frames at
/// `tracked` tracked, and `extra` memory written first.
pub fn run(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
    tracked: &[u64],
) -> Option<End> {
    run_in(16, code, extra, tracked)
}

/// As [`run`], in 16-bit real mode or (`bits` = 32) 32-bit flat protected mode at CPL0
/// without paging (segments loaded directly with KVM_SET_SREGS).
pub fn run_in(
    bits: u32,
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
    tracked: &[u64],
) -> Option<End> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let body = |a: &mut CodeAssembler| {
        code(a)?;
        a.mov(al, 0)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)
    };
    let prog = if bits == 32 {
        let mut a = CodeAssembler::new(32).unwrap();
        body(&mut a).unwrap();
        a.assemble(CODE).unwrap()
    } else {
        assemble16(CODE, body)
    };
    let vm = Vm::with_kvm(kvm, VmConfig::default().with_ram(RAM)).unwrap();
    vm.add_ram(0, RAM).unwrap();
    {
        let mem = vm.raw_memory();
        mem.write_slice(&initial(), GuestAddress(STACK)).unwrap();
        mem.write_slice(&initial(), GuestAddress(DATA)).unwrap();
        for (at, bytes) in extra {
            mem.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        mem.write_slice(&prog, GuestAddress(CODE)).unwrap();
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    setup_real_mode(vcpu.fd(), u16::try_from(CODE).unwrap()).unwrap();
    if bits == 32 {
        let mut s = vcpu.fd().get_sregs().unwrap();
        let flat = |type_, selector| kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            s: 1,
            db: 1,
            g: 1,
            ..Default::default()
        };
        s.cs = flat(0xb, 0x8);
        for seg in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
            *seg = flat(0x3, 0x10);
        }
        s.cr0 |= 1;
        vcpu.fd().set_sregs(&s).unwrap();
    }
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rsp = STACK + 0x800;
    vcpu.fd().set_regs(&regs).unwrap();
    let (rec, _h) = recorder(&vm);
    for &f in tracked {
        vm.tracker().add_gfn(Gfn(f >> 12)).unwrap();
    }
    let end = pagetrack_testkit::with_watchdog(std::time::Duration::from_secs(60), move || {
        match vcpu.run() {
            Ok(Exit::IoOut {
                port: GUEST_EXIT_PORT,
                data,
            }) if data.first() == 0 => End::Done(Box::new(Finished {
                regs: vcpu.fd().get_regs().unwrap(),
                sregs: vcpu.fd().get_sregs().unwrap(),
                stack: read(&vm, STACK, 4096),
                data: read(&vm, DATA, 4096),
                events: rec.take(),
            })),
            Ok(other) => End::Other(format!(
                "{other:?} at {:#x}",
                vcpu.fd().get_regs().unwrap().rip
            )),
            Err(e) => End::Error(e),
        }
    });
    Some(end)
}

/// Runs natively and tracked (stack and data frames) and asserts the tracked run is exact.
/// Returns the tracked run's result.
pub fn exact(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
) -> Option<Box<Finished>> {
    exact_in(16, code, extra)
}

/// As [`exact`], in the mode of [`run_in`].
pub fn exact_in(
    bits: u32,
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
) -> Option<Box<Finished>> {
    let native = run_in(bits, code, extra, &[])?;
    let End::Done(native) = native else {
        panic!("the native run did not finish: {native:?}");
    };
    let tracked = run_in(bits, code, extra, &[STACK, DATA])?;
    let End::Done(t) = tracked else {
        panic!("the tracked run did not finish: {tracked:?}");
    };
    let n = &native.regs;
    let r = &t.regs;
    assert_eq!(
        [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.rip, r.rflags
        ],
        [
            n.rax, n.rbx, n.rcx, n.rdx, n.rsi, n.rdi, n.rbp, n.rsp, n.rip, n.rflags
        ],
        "registers tracked vs native"
    );
    assert_eq!(t.sregs.cs.selector, native.sregs.cs.selector, "cs");
    assert!(t.stack == native.stack, "stack frame tracked vs native");
    assert!(t.data == native.data, "data frame tracked vs native");
    let stack_events: Vec<Ev> = t
        .events
        .iter()
        .filter(|e| e.gpa >> 12 == STACK >> 12)
        .cloned()
        .collect();
    let data_events: Vec<Ev> = t
        .events
        .iter()
        .filter(|e| e.gpa >> 12 == DATA >> 12)
        .cloned()
        .collect();
    assert_eq!(
        stack_events.len() + data_events.len(),
        t.events.len(),
        "events outside the tracked frames: {:?}",
        t.events
    );
    replay(STACK, &initial(), &stack_events, &t.stack);
    replay(DATA, &initial(), &data_events, &t.data);
    Some(t)
}

/// The tracked run's typed error: `Error::StoresLost`, with nothing of the instruction
/// applied to the tracked frames (no event for it).
fn stores_lost(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
) -> Option<(u64, Vec<u8>)> {
    let native = run(code, extra, &[])?;
    assert!(
        matches!(native, End::Done(_)),
        "the native run did not finish: {native:?}"
    );
    match run(code, extra, &[STACK, DATA])? {
        End::Error(Error::StoresLost {
            vcpu, rip, bytes, ..
        }) => {
            assert_eq!(vcpu, 0);
            Some((rip, bytes))
        }
        other => panic!("expected Error::StoresLost, got {other:?}"),
    }
}

fn set_registers(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, 0x1111_aaaa)?;
    a.mov(ecx, 0x2222_bbbb)?;
    a.mov(edx, 0x3333_cccc)?;
    a.mov(ebx, 0x4444_dddd)?;
    a.mov(ebp, 0x5555_eeee)?;
    a.mov(esi, 0x6666_ffff)?;
    a.mov(edi, 0x7777_0101)
}

fn ivt(vector: u64, ip: u16) -> (u64, Vec<u8>) {
    (4 * vector, [ip.to_le_bytes(), [0, 0]].concat())
}

/// `pusha` with a tracked stack: KVM passes on only the DI push; pagetrack completes the
/// other seven (all determined by the registers after it), each with its event.
#[test]
fn real_mode_pusha_stores_all_eight_pushes() {
    let Some(t) = exact(
        &|a| {
            set_registers(a)?;
            a.pusha()
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(t.events.len(), 8, "{:?}", t.events);
    assert_eq!(t.events[0].new, [0xaa, 0xaa], "AX is pushed first");
    assert_eq!(
        t.events[4].new,
        0x7800u16.to_le_bytes(),
        "the SP before pusha"
    );
}

/// `pushad` (operand-size prefix): eight 4-byte pushes, ESP before the instruction.
#[test]
fn real_mode_pushad_stores_all_eight_pushes() {
    let Some(t) = exact(
        &|a| {
            set_registers(a)?;
            a.pushad()
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(t.events.len(), 8, "{:?}", t.events);
    assert_eq!(t.events[7].new, 0x7777_0101u32.to_le_bytes());
}

/// A `pusha` whose last pushes land on the untracked frame below the stack frame: KVM
/// writes those itself; pagetrack completes only the dropped pushes on the tracked frame.
#[test]
fn real_mode_pusha_straddling_an_untracked_frame() {
    let Some(t) = exact(
        &|a| {
            set_registers(a)?;
            a.mov(sp, 0x7008)?;
            a.pusha()
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(
        t.events.len(),
        4,
        "AX, CX, DX, BX lie on the tracked frame: {:?}",
        t.events
    );
}

/// Ordinary stack code (push, pushf, near call and ret, enter/leave, push imm and memory)
/// on a tracked stack: single-store instructions are never refused or completed.
#[test]
fn real_mode_ordinary_stack_code_is_exact() {
    let Some(t) = exact(
        &|a| {
            let mut f = a.create_label();
            let mut over = a.create_label();
            set_registers(a)?;
            a.push(ax)?;
            a.pushf()?;
            a.push(0x1234)?;
            a.push(word_ptr(0x9010))?;
            a.call(f)?;
            a.jmp(over)?;
            a.set_label(&mut f)?;
            a.enter(8, 0)?;
            a.mov(word_ptr(bp - 2), si)?;
            a.leave()?;
            a.ret()?;
            a.set_label(&mut over)?;
            a.pop(cx)?;
            a.pop(dx)?;
            a.popf()?;
            a.pop(bx)
        },
        &[],
    ) else {
        return;
    };
    assert!(t.events.len() >= 6, "{:?}", t.events);
}

/// Hostile: the byte before RIP spells `pusha` (the disp8 of `mov [bp+0x60], si`), but the
/// store does not match a pusha push: applied as reported, nothing completed.
#[test]
fn real_mode_pusha_spelled_by_a_displacement_is_not_completed() {
    let Some(t) = exact(
        &|a| {
            set_registers(a)?;
            a.mov(bp, 0x7800 - 2 - 0x60)?;
            a.sub(sp, 2)?;
            a.db(&[0x89, 0x76, 0x60]) // mov [bp+0x60], si: the slot at SP
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(t.events.len(), 1, "{:?}", t.events);
}

/// Hostile and ambiguous: the store is exactly the DI push of a `pusha` spelled by the
/// displacement of `mov [bp+0x60], di`: pagetrack cannot tell which ran and stops with a
/// typed error rather than complete seven stores that may never have happened.
#[test]
fn real_mode_ambiguous_pusha_is_a_typed_error() {
    let Some((rip, bytes)) = stores_lost(
        &|a| {
            set_registers(a)?;
            a.mov(bp, 0x7800 - 2 - 0x60)?;
            a.sub(sp, 2)?;
            a.db(&[0x89, 0x7e, 0x60]) // mov [bp+0x60], di
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(bytes, [0x60]);
    assert_eq!(rip, CODE + 7 * 6 + 3 + 3 + 2, "the byte 0x60: {rip:#x}");
}

/// `int 0x40` with a tracked stack: KVM keeps only the IP push; the FLAGS and CS pushes are
/// not determined by the handler's state: a typed error (it used to run on with a frame
/// of stale bytes, and `iret` went astray).
#[test]
fn real_mode_int_n_with_a_tracked_stack_is_a_typed_error() {
    let handler = assemble16(0x2000, |a| a.iret());
    let Some((rip, _)) = stores_lost(
        &|a| {
            a.mov(ax, 0x1234)?;
            a.int(0x40)?;
            a.mov(bx, 0x5678)
        },
        &[ivt(0x40, 0x2000), (0x2000, handler)],
    ) else {
        return;
    };
    assert_eq!(rip, 0x2000, "the handler's entry");
}

fn far_target() -> (u64, Vec<u8>) {
    (0x2100, assemble16(0x2100, |a| a.retf()))
}

/// `call far [mem]` (ff /3): the CS push is dropped and the caller's CS is not determined.
#[test]
fn real_mode_call_far_indirect_is_a_typed_error() {
    let Some((rip, bytes)) = stores_lost(
        &|a| {
            a.mov(word_ptr(0x9100), 0x2100)?;
            a.mov(word_ptr(0x9102), 0)?;
            a.call(dword_ptr(0x9100))
        },
        &[far_target()],
    ) else {
        return;
    };
    assert_eq!((rip, bytes), (CODE + 12, vec![0xff, 0x1e, 0x00, 0x91]));
}

/// `call far ptr16:16` (9a).
#[test]
fn real_mode_call_far_direct_is_a_typed_error() {
    let Some((rip, bytes)) =
        stores_lost(&|a| a.db(&[0x9a, 0x00, 0x21, 0x00, 0x00]), &[far_target()])
    else {
        return;
    };
    assert_eq!((rip, bytes[0]), (CODE, 0x9a));
}

/// Hostile: a near indirect call (`ff 17`) preceded by `ff 1e`, so that the bytes before the
/// return address spell `call far [0x17ff]`, whose memory does not hold the target: the push
/// is the near call's, applied exactly.
#[test]
fn real_mode_near_call_after_far_call_bytes_is_exact() {
    let Some(t) = exact(
        &|a| {
            let mut over = a.create_label();
            let mut call = a.create_label();
            a.mov(bx, 0x9200)?;
            a.mov(word_ptr(0x9200), 0x2100)?;
            a.jmp(call)?;
            a.db(&[0xff, 0x1e])?;
            a.set_label(&mut call)?;
            a.db(&[0xff, 0x17])?; // call [bx]
            a.jmp(over)?;
            a.set_label(&mut over)?;
            a.nop()
        },
        &[(0x2100, assemble16(0x2100, |a| a.ret()))],
    ) else {
        return;
    };
    assert_eq!(
        t.events.len(),
        2,
        "the call's push and the store: {:?}",
        t.events
    );
}

/// Item 9 in real mode: a divide error with a tracked stack cannot be delivered (KVM's frame
/// write fails and the vCPU shuts down): a typed error naming the `div`, never a hang or a
/// bare shutdown. Natively the handler runs and sees the frame.
#[test]
fn real_mode_divide_error_with_a_tracked_stack_is_a_typed_error() {
    let handler = assemble16(0x2200, |a| {
        a.pop(si)?;
        a.pop(di)?;
        a.pop(bp)?;
        a.mov(al, 0)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)
    });
    let code = |a: &mut CodeAssembler| {
        a.xor(cx, cx)?;
        a.mov(ax, 1)?;
        a.div(cx)
    };
    let extra = [ivt(0, 0x2200), (0x2200, handler)];
    let Some(native) = run(&code, &extra, &[]) else {
        return;
    };
    let End::Done(n) = native else {
        panic!("native: {native:?}");
    };
    assert_eq!(
        (n.regs.rsi, n.regs.rdi),
        (CODE + 5, 0),
        "the #DE frame: IP, CS"
    );
    match run(&code, &extra, &[STACK]) {
        Some(End::Error(Error::EventDeliveryToTracked { rip, gfn, .. })) => {
            assert_eq!((rip, gfn), (CODE + 5, STACK >> 12));
        }
        other => panic!("expected Error::EventDeliveryToTracked, got {other:?}"),
    }
}

/// Item 5: `movss [bx+si], xmm0` in real mode with DS = 0x900 and BX + SI wrapping at 16
/// bits: KVM cannot emulate it, pagetrack completes it decoded as 16-bit code, at
/// DS.base + ((BX + SI) & 0xffff), and advances IP by its 16-bit length. It used to be
/// decoded as 64-bit code (another store, another length).
#[test]
fn real_mode_movss_is_completed_in_16_bit_mode() {
    let Some(t) = exact(
        &|a| {
            a.mov(eax, cr4)?;
            a.or(eax, 0x600)?; // OSFXSR, OSXMMEXCPT
            a.mov(cr4, eax)?;
            a.mov(eax, 0x4142_4344)?;
            a.mov(word_ptr(0x9400), ax)?;
            a.shr(eax, 16)?;
            a.mov(word_ptr(0x9402), ax)?;
            a.movups(xmm0, xmmword_ptr(0x9400))?;
            a.mov(ax, 0x900)?;
            a.mov(ds, ax)?;
            a.mov(bx, 0xfff0)?;
            a.mov(si, 0x130)?;
            a.movss(dword_ptr(bx + si), xmm0)?;
            a.mov(dx, 0x77)?;
            a.xor(ax, ax)?;
            a.mov(ds, ax)
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(&t.data[0x120..0x124], &0x4142_4344u32.to_le_bytes());
    assert_eq!(t.regs.rdx & 0xffff, 0x77, "the next instruction ran");
}

/// `pushad` in 32-bit flat protected mode (paging off): eight 4-byte pushes, all completed.
#[test]
fn protected_mode_pushad_stores_all_eight_pushes() {
    let Some(t) = exact_in(
        32,
        &|a| {
            set_registers(a)?;
            a.pushad()
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(t.events.len(), 8, "{:?}", t.events);
    assert_eq!(
        t.events[4].new,
        0x7800u32.to_le_bytes(),
        "the ESP before pushad"
    );
}

/// Item 5 in 32-bit protected mode: `movss [ebx + esi], xmm0` with a 32-bit address
/// completed as 32-bit code (a 64-bit decode reads other operands and lengths).
#[test]
fn protected_mode_movss_is_completed_in_32_bit_mode() {
    let Some(t) = exact_in(
        32,
        &|a| {
            a.mov(eax, cr4)?;
            a.or(eax, 0x600)?;
            a.mov(cr4, eax)?;
            a.mov(dword_ptr(0x9400), 0x4142_4344)?;
            a.movups(xmm0, xmmword_ptr(0x9400))?;
            a.mov(ebx, 0x9000)?;
            a.mov(esi, 0x124)?;
            a.movss(dword_ptr(ebx + esi), xmm0)?;
            a.mov(edx, 0x77)
        },
        &[],
    ) else {
        return;
    };
    assert_eq!(&t.data[0x124..0x128], &0x4142_4344u32.to_le_bytes());
    assert_eq!(t.regs.rdx, 0x77, "the next instruction ran");
}
