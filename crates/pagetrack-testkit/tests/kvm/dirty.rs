//! Dirty logging under tracking: the dirty set is exactly the written set, across many
//! re-cuts (track/untrack) while the guest writes, trapped stores and device writes included.

use std::collections::BTreeSet;

use iced_x86::code_asm::*;
use pagetrack::{Gfn, SlotId};
use pagetrack_kvm::{Error, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::LONG_MODE_RFLAGS;
use vm_memory::Bytes;

use crate::common::*;

const RAM: u64 = 16 << 20;
/// The data area the guest writes: 256 pages from 4 MiB (one 2 MiB chunk and part of the next).
const DATA: u64 = 0x40_0000;
const DATA_PAGES: u64 = 768;

/// Pages set in a region bitmap (page numbers from the region start, which is gpa 0).
fn pages(bitmap: &[u64]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (i, w) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if w & (1 << b) != 0 {
                out.insert(i as u64 * 64 + b);
            }
        }
    }
    out
}

#[test]
fn dirty_log_under_track_untrack_cycles_is_exactly_the_written_set() {
    let kvm = kvm_or_skip!();
    // rcx 8-byte stores at rdi, rdi + rdx, rdi + 2 rdx, ...; then exit.
    let code = assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // store the counter into this page
        a.add(rdi, rdx)?; // next page
        a.dec(rcx)?;
        a.jnz(top)?;
        exit_with(a, 3)
    });
    let config = VmConfig::default().with_ram(RAM).with_dirty_log();
    let mut g = boot_with(kvm, config, RAM, 1, &code);
    let slot = SlotId(0);
    let (_rec, _h) = recorder(&g.vm);
    // One frame tracked throughout (round 0 writes it): its stores are applied in userspace
    // whatever the cycler's timing, and must be logged all the same.
    let always = Gfn((DATA >> 12) + 1);
    g.vm.tracker().add_gfn(always).unwrap();
    // Nothing written yet by the guest or through the tracked memory: clean.
    assert!(pages(&g.vm.take_dirty_log(slot).unwrap()).is_empty());

    let mut written = BTreeSet::new();
    let mut logged = BTreeSet::new();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        // Track/untrack cycles over the data area while the guest writes: each re-cuts a
        // chunk (deletes and creates KVM memslots) under the running vCPU. Five cycles per
        // round, started as the round starts (back-to-back pauses with no pacing would keep
        // the vCPU from ever entering the guest).
        let vm = g.vm.clone();
        let cycler = s.spawn(move || {
            let mut cycles = 0u64;
            for () in rx {
                for _ in 0..5 {
                    let f = Gfn((DATA >> 12) + (cycles * 37) % DATA_PAGES);
                    vm.tracker().add_gfn(f).unwrap();
                    let f2 = Gfn((DATA >> 12) + (cycles * 11 + 5) % DATA_PAGES);
                    if f2 != f {
                        vm.tracker().add_gfn(f2).unwrap();
                        vm.tracker().remove_gfn(f2).unwrap();
                    }
                    vm.tracker().remove_gfn(f).unwrap();
                    cycles += 1;
                }
            }
            cycles
        });
        for round in 0..60u64 {
            // Round r writes every stride-th page from a round-dependent start.
            let stride = 1 + round % 7;
            let first = (round * 13) % DATA_PAGES;
            let count = (DATA_PAGES - first).div_ceil(stride); // at least 1
            let fd = g.vcpus[0].fd();
            let mut regs = fd.get_regs().unwrap();
            regs.rip = ENTRY;
            regs.rsp = g.layout.user_stack_top(0).unwrap();
            regs.rflags = LONG_MODE_RFLAGS;
            regs.rdi = DATA + first * 4096;
            regs.rcx = count;
            regs.rdx = stride * 4096;
            fd.set_regs(&regs).unwrap();
            tx.send(()).unwrap();
            assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
            written.extend((0..count).map(|k| (DATA >> 12) + first + k * stride));
            // A device write every few rounds, through the tracked memory.
            if round % 5 == 0 {
                let page = (DATA >> 12) + DATA_PAGES + round;
                g.vm.memory()
                    .write_obj(round, vm_memory::GuestAddress(page << 12))
                    .unwrap();
                written.insert(page);
            }
            // Harvest now and then: bits must neither vanish nor come back.
            if round % 9 == 0 {
                logged.extend(pages(&g.vm.take_dirty_log(slot).unwrap()));
            }
        }
        drop(tx);
        let cycles = cycler.join().unwrap();
        assert_eq!(cycles, 300);
    });
    logged.extend(pages(&g.vm.take_dirty_log(slot).unwrap()));

    // Outside the data area (and the device-written pages past it) only pages the guest
    // touches at all may appear: the CPU's own page-table, descriptor and stack updates (all
    // in the layout's reserved range), and the code page, which KVM logs as it maps it
    // writable (the guest only fetches from it). Untouched pages never appear.
    let (rs, re) = g.layout.reserved_range();
    let area = (DATA >> 12)..(DATA >> 12) + DATA_PAGES + 60;
    let in_area: BTreeSet<u64> = logged
        .iter()
        .copied()
        .filter(|p| area.contains(p))
        .collect();
    let lost: Vec<_> = written.difference(&in_area).collect();
    let invented: Vec<_> = in_area.difference(&written).collect();
    assert!(lost.is_empty(), "written but not logged: {lost:?}");
    assert!(
        invented.is_empty(),
        "logged but never written: {invented:?}"
    );
    let elsewhere: Vec<_> = logged
        .iter()
        .filter(|p| {
            !area.contains(p) && **p != ENTRY >> 12 && !((rs >> 12)..(re >> 12)).contains(p)
        })
        .collect();
    assert!(
        elsewhere.is_empty(),
        "logged outside the data area: {elsewhere:?}"
    );
    let st = g.vm.stats();
    assert!(
        st.trapped_writes > 0,
        "some stores hit tracked frames: {st:?}"
    );
    assert!(st.fragments.relayouts >= 400, "re-cuts happened: {st:?}");
    // Everything was taken: the log is clean again.
    assert!(pages(&g.vm.take_dirty_log(slot).unwrap()).is_empty());
}

#[test]
fn take_dirty_log_without_dirty_logging_is_refused() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| exit_with(a, 0));
    let g = boot(kvm, RAM, 1, &code);

    let res = g.vm.take_dirty_log(SlotId(0));

    assert!(matches!(res, Err(Error::DirtyLogOff)), "{res:?}");
}

#[test]
fn take_dirty_log_of_unknown_slot_is_refused() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| exit_with(a, 0));
    let g = boot_with(
        kvm,
        VmConfig::default().with_ram(RAM).with_dirty_log(),
        RAM,
        1,
        &code,
    );

    let res = g.vm.take_dirty_log(SlotId(7));

    assert!(
        matches!(res, Err(Error::Track(pagetrack::Error::UnknownSlot { .. }))),
        "{res:?}"
    );
}
