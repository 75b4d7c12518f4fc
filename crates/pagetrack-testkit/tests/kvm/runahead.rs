//! The `rep` completion must not run ahead of the CPU (issue 10 item 4): pagetrack completes
//! the rest of a tracked page of a `rep stos`/`rep movs` in userspace only where the CPU would
//! run those elements itself. Each test runs the same guest twice in fresh VMs, with the
//! tracked frame untracked (native) and tracked, and compares the exception the guest's stub
//! reports, the registers and the data frame; the tracked run must report exactly the bytes
//! that changed.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::Exit;
use pagetrack_testkit::assemble;
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GUEST_EXIT_PORT, GuestException};
use vm_memory::{Bytes, GuestAddress};

use crate::common::{ENTRY, T, boot, read, recorder};

const RAM: u64 = 16 << 20;
const NX: u64 = 1 << 63;
const USER: u64 = 1 << 2;

/// How a run ended: the exception (or None for a clean exit), RCX, RDI, RSI, the frame at
/// `T` and the number of events.
type Outcome = (Option<GuestException>, [u64; 3], Vec<u8>, usize);

/// Runs `code` (entered at `ENTRY` at CPL3) with `pde_bits(i, pde)` applied to the 2 MiB page
/// directory entries, `T` tracked or not.
fn run(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
    pde: &dyn Fn(u64, u64) -> u64,
    tracked: bool,
) -> Option<Outcome> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let prog = assemble(ENTRY, |a| {
        code(a)?;
        pagetrack_testkit::exit_with(a, 0)
    });
    let mut g = boot(kvm, RAM, 1, &prog);
    {
        let mem = g.vm.untracked_memory();
        for (at, bytes) in extra {
            mem.write_slice(bytes, GuestAddress(*at)).unwrap();
        }
        let pd = g.layout.pml4() + 0x2000;
        for i in 0..8u64 {
            let e: u64 = mem.read_obj(GuestAddress(pd + 8 * i)).unwrap();
            mem.write_obj(pde(i, e), GuestAddress(pd + 8 * i)).unwrap();
        }
    }
    let (rec, _h) = recorder(&g.vm);
    if tracked {
        g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    }
    let exit = g.vcpus[0].run().unwrap();
    let regs = g.vcpus[0].fd().get_regs().unwrap();
    let ex = match exit {
        Exit::IoOut {
            port: EXCEPTION_PORT,
            ..
        } => Some(
            x86::decode_exception(g.vcpus[0].fd(), &*g.vm.untracked_memory(), &g.layout).unwrap(),
        ),
        Exit::IoOut {
            port: GUEST_EXIT_PORT,
            ..
        } => None,
        other => panic!("unexpected exit {other:?}"),
    };
    let events = rec.take();
    for e in &events {
        assert!(e.gpa >> 12 == T >> 12, "event {e:?} outside T");
    }
    Some((
        ex,
        [regs.rcx, regs.rdi, regs.rsi],
        read(&g.vm, T, 4096),
        events.len(),
    ))
}

fn compare(
    code: &dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>,
    extra: &[(u64, Vec<u8>)],
    pde: &dyn Fn(u64, u64) -> u64,
) -> Option<Outcome> {
    let native = run(code, extra, pde, false)?;
    let tracked = run(code, extra, pde, true)?;
    assert_eq!(
        format!("{:?}", tracked.0),
        format!("{:?}", native.0),
        "exception tracked vs native"
    );
    assert_eq!(tracked.1, native.1, "rcx, rdi, rsi tracked vs native");
    assert!(tracked.2 == native.2, "frame T tracked vs native");
    Some(native)
}

/// A store at the end of an executable page, followed by `rep stosb` bytes on an NX page:
/// the CPU faults fetching them after the store, and pagetrack must not execute them (it
/// used to complete 255 elements from the bytes after RIP: invented events).
#[test]
fn rep_stos_on_an_nx_page_is_not_run_by_pagetrack() {
    // The store ends exactly at 2 MiB; the 2 MiB page above is NX.
    const STORE: u64 = 0x20_0000 - 3;
    let store = assemble(STORE, |a| a.mov(byte_ptr(rdi - 1), al));
    assert_eq!(store.len(), 3);
    let mut bytes = vec![0x90]; // nop, so the store ends at 2 MiB
    bytes.extend_from_slice(&store);
    bytes.extend_from_slice(&[0xf3, 0xaa]); // rep stosb at 2 MiB
    let code = |a: &mut CodeAssembler| {
        a.mov(rdi, T + 1)?;
        a.mov(ecx, 255)?;
        a.mov(al, 0x77)?;
        a.mov(rbx, STORE)?;
        a.jmp(rbx)
    };
    let Some((ex, _, frame, _)) = compare(&code, &[(STORE - 1, bytes)], &|i, e| {
        if i == 1 { e | NX } else { e }
    }) else {
        return;
    };
    let ex = ex.expect("the fetch on the NX page faults");
    assert_eq!(
        (ex.vector, ex.rip, ex.cr2),
        (14, 0x20_0000, Some(0x20_0000))
    );
    assert_eq!(frame[0], 0x77);
    assert_ne!(frame[1], 0x77, "no element of the rep ran");
}

/// `rep movsb` at CPL3 whose source runs from a user page into a supervisor page: the
/// element reading the supervisor byte faults natively (#PF, user read); pagetrack's
/// completion must not copy it (it used to copy the supervisor bytes without a fault).
#[test]
fn rep_movs_from_a_supervisor_page_faults_as_natively() {
    const SUPER: u64 = 0x40_0000;
    let code = |a: &mut CodeAssembler| {
        a.mov(rsi, SUPER - 1)?;
        a.mov(rdi, T)?;
        a.mov(ecx, 16)?;
        a.rep().movsb()
    };
    let secret = vec![0x5e; 64];
    let Some((ex, regs, frame, events)) = compare(
        &code,
        &[(SUPER - 1, vec![0x11]), (SUPER, secret)],
        &|i, e| if i == 2 { e & !USER } else { e },
    ) else {
        return;
    };
    let ex = ex.expect("the supervisor read faults");
    assert_eq!(
        (ex.vector, ex.error_code, ex.cr2),
        (14, Some(5), Some(SUPER))
    );
    assert_eq!(regs[0], 15, "one element done");
    assert_eq!(frame[0], 0x11);
    assert!(!frame[1..16].contains(&0x5e), "no supervisor byte copied");
    let _ = events;
}
