//! Exceptions raised by stores that pagetrack completes in userspace (issue 10 item 11): a
//! vector store from a tracked frame into an unmapped page must give the guest the #PF the
//! CPU gives on untracked memory (same RIP, error code and CR2, nothing stored, no event),
//! and a misaligned aligned-store the same #GP. The guest's exception stubs run at CPL0, so
//! the test compares what the stub reports in two VMs: frame untracked, then tracked.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::Exit;
use pagetrack_testkit::assemble;
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GuestException};

use crate::common::{ENTRY, boot, read, recorder};

const RAM: u64 = 16 << 20;
/// The last frame of RAM: the identity map ends at its end, so the next page is unmapped.
/// (It holds the CPL0 stacks of vCPUs 60-63, unused here.)
const LAST: u64 = RAM - 4096;

/// Runs `store` (with RDI = `at`) in a fresh VM, with `LAST` tracked or not; returns the
/// exception, the frame afterwards and the number of events.
fn fault(
    at: u64,
    tracked: bool,
    store: fn(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Option<(GuestException, Vec<u8>, usize)> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let code = assemble(ENTRY, |a| {
        a.mov(rax, 0x0807_0605_0403_0201u64)?;
        a.vpbroadcastq(zmm0, rax)?;
        a.mov(rdi, at)?;
        store(a)?;
        pagetrack_testkit::exit_with(a, 0)
    });
    let mut g = boot(kvm, RAM, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    if tracked {
        g.vm.tracker().add_gfn(Gfn(LAST >> 12)).unwrap();
    }
    let before = read(&g.vm, LAST, 4096);
    let exit = g.vcpus[0].run().unwrap();
    assert!(
        matches!(
            exit,
            Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            }
        ),
        "tracked {tracked}: expected an exception, got {exit:?}"
    );
    let ex = x86::decode_exception(g.vcpus[0].fd(), &*g.vm.untracked_memory(), &g.layout).unwrap();
    let after = read(&g.vm, LAST, 4096);
    assert_eq!(before, after, "tracked {tracked}: nothing stored");
    Some((ex, after, rec.take().len()))
}

fn same_fault(at: u64, store: fn(&mut CodeAssembler) -> Result<(), IcedError>) -> GuestException {
    let Some((native, _, _)) = fault(at, false, store) else {
        return GuestException {
            vector: 0,
            error_code: None,
            rip: 0,
            cs: 0,
            rflags: 0,
            rsp: 0,
            ss: 0,
            cr2: None,
        };
    };
    let (tracked, _, events) = fault(at, true, store).unwrap();
    assert_eq!(native, tracked, "the tracked run sees the native exception");
    assert_eq!(events, 0, "no event for a store that did not happen");
    native
}

#[test]
fn vector_store_straddling_into_an_unmapped_page_injects_the_native_page_fault() {
    let ex = same_fault(RAM - 8, |a| a.movdqu(xmmword_ptr(rdi), xmm0));
    if ex.vector != 0 {
        assert_eq!((ex.vector, ex.cr2), (14, Some(RAM)), "{ex}");
        assert_eq!(ex.error_code, Some(0x6), "not present, write, user: {ex}");
    }
    let ex = same_fault(RAM - 33, |a| a.vmovdqu64(zmmword_ptr(rdi), zmm0));
    if ex.vector != 0 {
        assert_eq!((ex.vector, ex.cr2), (14, Some(RAM)), "{ex}");
    }
}

#[test]
fn misaligned_aligned_store_into_a_tracked_frame_raises_the_native_gp() {
    // KVM's own emulator raises this #GP (a guard, not a regression test: it passed before);
    // pagetrack's completion injects the same for the stores it completes.
    let ex = same_fault(LAST + 8, |a| a.movaps(xmmword_ptr(rdi), xmm0));
    if ex.vector != 0 {
        assert_eq!((ex.vector, ex.error_code), (13, Some(0)), "{ex}");
    }
}

#[test]
fn clzero_on_a_cpu_without_it_raises_the_native_invalid_opcode() {
    // This host's CPU lacks CLZERO (CPUID 0x80000008 EBX[0] clear): natively #UD, no store.
    // On a tracked frame the guest must see the same #UD, nothing stored, no event.
    let ex = same_fault(LAST + 0x40, |a| a.db(&[0x0f, 0x01, 0xfc]));
    assert_eq!(ex.vector, 6, "{ex:?}");
}
