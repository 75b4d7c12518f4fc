//! How dirty logs are harvested (issue 12 item 2): plain `KVM_GET_DIRTY_LOG`, or manual
//! protect (`KVM_GET_DIRTY_LOG` then `KVM_CLEAR_DIRTY_LOG` of exactly the harvested bits).
//! Either way every harvest returns exactly the pages written since the previous one, shared
//! between the VMM's dirty log and relaxed syncs, and relaxed events replay exactly.

use std::collections::BTreeSet;
use std::sync::Arc;

use iced_x86::code_asm::*;
use pagetrack::{AsId, Delivery, Gfn, NotifierClass, RegisterOptions, SlotId};
use pagetrack_kvm::{DirtyProtect, Error, HostCaps, RelaxedConfig, RelaxedMode, Vm, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::LONG_MODE_RFLAGS;

use crate::common::*;

const RAM: u64 = 16 << 20;
/// The data area: 256 pages from 4 MiB; its first 64 are tracked (relaxed).
const DATA: u64 = 0x40_0000;
const DATA_PAGES: u64 = 256;
const TRACKED_PAGES: u64 = 64;

fn manual_offered(kvm: &kvm_ioctls::Kvm) -> bool {
    HostCaps::probe(kvm).manual_dirty_protect & 1 != 0
}

/// Data-area pages set in a region bitmap (page numbers from the region start, gpa 0).
fn data_pages(bitmap: &[u64]) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (i, w) in bitmap.iter().enumerate() {
        for b in 0..64 {
            let page = i as u64 * 64 + b;
            if w & (1 << b) != 0 && (DATA >> 12..(DATA >> 12) + DATA_PAGES).contains(&page) {
                out.insert(page);
            }
        }
    }
    out
}

#[test]
fn the_default_harvest_is_manual_protect_where_kvm_offers_it_and_plain_on_a_vmms_vm() {
    let kvm = kvm_or_skip!();
    let offered = manual_offered(&kvm);
    let vm = Vm::new(VmConfig::default().with_ram(RAM)).unwrap();
    assert_eq!(vm.manual_dirty_protect(), offered);
    let plain = Vm::new(
        VmConfig::default()
            .with_ram(RAM)
            .with_dirty_protect(DirtyProtect::Plain),
    )
    .unwrap();
    assert!(!plain.manual_dirty_protect());
    let manual = Vm::new(
        VmConfig::default()
            .with_ram(RAM)
            .with_dirty_protect(DirtyProtect::Manual),
    );
    match manual {
        Ok(vm) => assert!(offered && vm.manual_dirty_protect()),
        Err(e) => assert!(
            !offered && matches!(e, Error::MissingCapability { .. }),
            "{e:?}"
        ),
    }
    // A VM the VMM brought: the VM-wide capability is left alone unless asked for.
    let caps = HostCaps::probe(&kvm);
    let fd = Arc::new(kvm.create_vm().unwrap());
    let theirs = Vm::from_vm_fd(
        &kvm,
        Arc::clone(&fd),
        caps.clone(),
        VmConfig::default().with_kvm_slots(100..200),
    )
    .unwrap();
    assert!(!theirs.manual_dirty_protect());
    if offered {
        let fd = Arc::new(kvm.create_vm().unwrap());
        let asked = Vm::from_vm_fd(
            &kvm,
            fd,
            caps,
            VmConfig::default()
                .with_kvm_slots(100..200)
                .with_dirty_protect(DirtyProtect::Manual),
        )
        .unwrap();
        assert!(asked.manual_dirty_protect());
    }
}

/// Rounds of guest stores over the data area (tracked relaxed frames and untracked ones),
/// each round a different set of pages, with the VMM's log taken after every round: each
/// take must be exactly that round's pages. With manual protect a harvest that did not
/// `CLEAR` would return earlier rounds' pages again; one that cleared before reading, or
/// that re-protected nothing, would lose pages (KVM would not log a second write). Relaxed
/// syncs harvest the same fragments at every exit, and the coalesced events replay exactly.
fn every_take_is_the_written_set(how: DirtyProtect) {
    let kvm = kvm_or_skip!();
    if how == DirtyProtect::Manual && !manual_offered(&kvm) {
        eprintln!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered: manual case not run");
        return;
    }
    // rcx 8-byte stores of rcx at rdi, rdi + rdx, ...; then exit.
    let code = assemble(ENTRY, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // store into this page
        a.add(rdi, rdx)?; // next page
        a.dec(rcx)?;
        a.jnz(top)?;
        exit_with(a, 3)
    });
    // No hot frames (`hot.rs`): with them the log is the changed frames, a subset of the
    // written ones, and this test is about the written set.
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Always);
    relaxed.hot_after_syncs = 0;
    let config = VmConfig::default()
        .with_ram(RAM)
        .with_dirty_log()
        .with_dirty_protect(how)
        .with_relaxed(relaxed);
    let mut g = boot_with(kvm, config, RAM, 1, &code);
    assert_eq!(g.vm.manual_dirty_protect(), how == DirtyProtect::Manual);
    let rec = Arc::new(Recorder::default());
    let _h =
        g.vm.tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
    let slot = SlotId(0);
    let len = usize::try_from(TRACKED_PAGES * 4096).unwrap();
    let initial = read(&g.vm, DATA, len);
    g.vm.tracker()
        .add_range(AsId::NORMAL, Gfn(DATA >> 12), TRACKED_PAGES)
        .unwrap();
    assert!(g.vm.is_relaxed(Gfn(DATA >> 12)));
    let _ = g.vm.take_dirty_log(slot).unwrap();
    for round in 0..24u64 {
        let stride = 1 + round % 5;
        let first = (round * 29) % (DATA_PAGES / 2);
        let count = (DATA_PAGES - first).div_ceil(stride).min(40 + round);
        let fd = g.vcpus[0].fd();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rsp = g.layout.user_stack_top(0).unwrap();
        regs.rflags = LONG_MODE_RFLAGS;
        regs.rdi = DATA + first * 4096;
        regs.rcx = count;
        regs.rdx = stride * 4096;
        fd.set_regs(&regs).unwrap();
        assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
        let written: BTreeSet<u64> = (0..count)
            .map(|k| (DATA >> 12) + first + k * stride)
            .collect();
        assert_eq!(
            data_pages(&g.vm.take_dirty_log(slot).unwrap()),
            written,
            "round {round} ({how:?})"
        );
    }
    g.vm.sync().unwrap();
    let events = rec.take();
    assert!(events.iter().any(|e| e.coalesced.is_some()));
    replay(DATA, &initial, &events, &read(&g.vm, DATA, len));
}

#[test]
fn every_harvest_is_exactly_the_pages_written_since_the_last_with_plain_get() {
    every_take_is_the_written_set(DirtyProtect::Plain);
}

#[test]
fn every_harvest_is_exactly_the_pages_written_since_the_last_with_get_and_clear() {
    every_take_is_the_written_set(DirtyProtect::Manual);
}
