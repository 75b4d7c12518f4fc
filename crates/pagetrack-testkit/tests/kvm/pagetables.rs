//! Tracked frames that hold guest page tables: on shadow-paging hosts (this one: PVM) a store
//! that pagetrack applies bypasses KVM's shadow MMU; for frames marked as page tables,
//! pagetrack makes KVM drop the stale shadows (findings Q4).

use iced_x86::code_asm::*;
use pagetrack::Gfn;
use pagetrack_kvm::Exit;
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GUEST_EXIT_PORT};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

/// The 4 KiB page table that maps [0x600000, 0x800000) (identity, A/D as given).
const PT: u64 = 0x2_0000;
const VA: u64 = 0x60_0000;
const PAGE_B: u64 = 0x70_0000;

/// Points PD entry 3 (VA 0x600000) at a 4 KiB page table instead of a 2 MiB page.
fn install_page_table(g: &Guest, ad: u64) {
    let mem = g.vm.untracked_memory();
    for i in 0..512u64 {
        mem.write_obj((VA + i * 4096) | 0x7 | ad, GuestAddress(PT + i * 8))
            .unwrap();
    }
    let pd0 = g.layout.pml4() + 0x2000;
    mem.write_obj(PT | 0x7 | 0x20, GuestAddress(pd0 + 3 * 8))
        .unwrap();
    mem.write_obj(0xaaaa_u64, GuestAddress(VA + 5 * 4096))
        .unwrap();
    mem.write_obj(0xbbbb_u64, GuestAddress(PAGE_B)).unwrap();
    mem.write_obj(0xcccc_u64, GuestAddress(VA + 6 * 4096))
        .unwrap();
}

/// Guest: read VA page 5, remap PTE 5 to page B, read again, unmap PTE 6, read page 6.
fn remap_program() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(r8, qword_ptr(VA + 5 * 4096))?; // through the old mapping (fills KVM's shadow)
        a.mov(r10, qword_ptr(VA + 6 * 4096))?; // page 6 too
        a.mov(rax, PAGE_B | 0x67)?;
        a.mov(qword_ptr(PT + 5 * 8), rax)?; // PTE 5 := page B (present -> other page)
        a.mov(r9, qword_ptr(VA + 5 * 4096))?; // must read page B now
        a.mov(rbx, U)?;
        a.mov(qword_ptr(rbx), r8)?; // results to untracked memory
        a.mov(qword_ptr(rbx + 8), r9)?;
        a.mov(qword_ptr(PT + 6 * 8), 0)?; // PTE 6 := not present
        a.mov(r11, qword_ptr(VA + 6 * 4096))?; // must fault
        a.mov(qword_ptr(rbx + 16), r11)?;
        exit_with(a, 0)
    })
}

/// Runs to the exit or the exception; returns (exception vector and CR2, if any).
fn run(g: &mut Guest) -> Option<(u8, Option<u64>)> {
    match g.vcpus[0].run().unwrap() {
        Exit::IoOut {
            port: GUEST_EXIT_PORT,
            ..
        } => None,
        Exit::IoOut {
            port: EXCEPTION_PORT,
            ..
        } => {
            let ex = x86::decode_exception(g.vcpus[0].fd(), &*g.vm.untracked_memory(), &g.layout)
                .unwrap();
            Some((ex.vector, ex.cr2))
        }
        other => panic!("unexpected exit {other:?}"),
    }
}

#[test]
fn remap_and_unmap_in_a_tracked_page_table_reach_the_guest() {
    let kvm = kvm_or_skip!();
    let mut g = boot(kvm, 16 << 20, 1, &remap_program());
    install_page_table(&g, 0x60);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(PT >> 12)).unwrap();
    g.vm.mark_page_tables(&[Gfn(PT >> 12)], true);

    let fault = run(&mut g);

    assert_eq!(
        read(&g.vm, U, 8),
        0xaaaa_u64.to_le_bytes(),
        "old mapping before the store"
    );
    assert_eq!(
        read(&g.vm, U + 8, 8),
        0xbbbb_u64.to_le_bytes(),
        "new mapping after the store"
    );
    assert_eq!(
        fault,
        Some((14, Some(VA + 6 * 4096))),
        "the unmapped page faults"
    );
    assert_eq!(rec.take().len(), 2, "both page-table stores reported");
    if g.vm.caps().shadow_paging {
        assert_eq!(g.vm.stats().pt_invalidations, 2);
    }
}

#[test]
fn unmarked_tracked_page_table_goes_stale_on_shadow_paging_hosts() {
    let kvm = kvm_or_skip!();
    let mut g = boot(kvm, 16 << 20, 1, &remap_program());
    if !g.vm.caps().shadow_paging {
        return; // TDP: the guest's tables are not shadowed; nothing to show.
    }
    install_page_table(&g, 0x60);
    g.vm.tracker().enable_write_tracking().unwrap();
    g.vm.tracker().add_gfn(Gfn(PT >> 12)).unwrap();

    let _ = run(&mut g);

    // The control for the test above: without marking, KVM keeps the old translation.
    assert_eq!(
        read(&g.vm, U + 8, 8),
        0xaaaa_u64.to_le_bytes(),
        "stale translation expected"
    );
}

#[test]
fn not_present_to_present_and_accessed_dirty_changes_need_no_invalidation() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rax, qword_ptr(PT + 7 * 8))?;
        a.or(rax, 0x60)?;
        a.mov(qword_ptr(PT + 7 * 8), rax)?; // set A/D only on a present entry
        a.mov(rax, (VA + 8 * 4096) | 0x67)?;
        a.mov(qword_ptr(PT + 9 * 8), rax)?; // not present -> present (PTE 9 was cleared)
        a.mov(rax, qword_ptr(VA + 8 * 4096 + 0x1000))?; // use it
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    install_page_table(&g, 0);
    g.vm.untracked_memory()
        .write_obj(0u64, GuestAddress(PT + 9 * 8))
        .unwrap();
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(PT >> 12)).unwrap();
    g.vm.mark_page_tables(&[Gfn(PT >> 12)], true);

    assert_eq!(run(&mut g), None);

    assert_eq!(rec.take().len(), 2);
    assert_eq!(g.vm.stats().pt_invalidations, 0);
}

/// What a guest loses (documented on `Vm::mark_page_tables`): on a shadow-paging host the page
/// walk sets no accessed/dirty bits in a tracked page-table frame.
#[test]
fn accessed_dirty_bits_are_not_set_in_tracked_page_tables_on_shadow_paging_hosts() {
    let code = assemble(ENTRY, |a| {
        a.mov(rax, qword_ptr(VA + 3 * 4096))?; // read page 3 (A)
        a.mov(qword_ptr(VA + 4 * 4096), rax)?; // write page 4 (A and D)
        exit_with(a, 0)
    });
    for tracked in [false, true] {
        let kvm = kvm_or_skip!();
        let mut g = boot(kvm, 16 << 20, 1, &code);
        install_page_table(&g, 0);
        g.vm.tracker().enable_write_tracking().unwrap();
        if tracked {
            g.vm.tracker().add_gfn(Gfn(PT >> 12)).unwrap();
        }
        assert_eq!(run(&mut g), None);
        let pte = |i: u64| u64::from_le_bytes(read(&g.vm, PT + i * 8, 8).try_into().unwrap());
        let (a3, ad4) = (pte(3) & 0x20 != 0, pte(4) & 0x60 == 0x60);
        if !tracked {
            assert!(a3 && ad4, "untracked: the walk sets A and D");
        } else if g.vm.caps().shadow_paging {
            assert!(
                !a3 && !ad4,
                "tracked on a shadow-paging host: A/D stay clear"
            );
        }
    }
}
