//! Guest stores to tracked frames: exact events; untracked frames: none.

use iced_x86::code_asm::*;
use pagetrack::{Gfn, Source};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

#[test]
fn store_sizes_to_tracked_frame_each_reported_once_with_old_and_new() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?; // rdi = tracked frame
        a.mov(rsi, U)?; // rsi = untracked frame
        a.mov(rax, 0x1122_3344_5566_7788u64)?; // value to store
        a.mov(byte_ptr(rdi), al)?; // 1-byte store, tracked
        a.mov(word_ptr(rdi + 0x10), ax)?; // 2-byte store, tracked
        a.mov(dword_ptr(rdi + 0x20), eax)?; // 4-byte store, tracked
        a.mov(qword_ptr(rdi + 0x30), rax)?; // 8-byte store, tracked
        a.mov(qword_ptr(rdi + 0x30), rax)?; // same value again: still a store, still reported
        a.mov(qword_ptr(rsi), rax)?; // untracked: no event
        exit_with(a, 7)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let initial = read(&g.vm, T, 4096);

    let code = run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    assert_eq!(code, 7);
    let ev = rec.take();
    let got: Vec<(u64, Vec<u8>)> = ev.iter().map(|e| (e.gpa, e.new.clone())).collect();
    assert_eq!(
        got,
        vec![
            (T, vec![0x88]),
            (T + 0x10, vec![0x88, 0x77]),
            (T + 0x20, vec![0x88, 0x77, 0x66, 0x55]),
            (T + 0x30, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
            (T + 0x30, 0x1122_3344_5566_7788u64.to_le_bytes().to_vec()),
        ]
    );
    assert!(ev.iter().all(|e| e.source == Source::Vcpu(0)));
    assert_eq!(
        ev[4].old.as_deref(),
        Some(&0x1122_3344_5566_7788u64.to_le_bytes()[..])
    );
    replay(T, &initial, &ev, &read(&g.vm, T, 4096));
    assert_eq!(read(&g.vm, U, 8), 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(g.vm.stats().trapped_writes, 5);
}

#[test]
fn untracked_after_remove_runs_without_exits_or_events() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?; // tracked, then untracked frame
        a.mov(ecx, 1000)?; // 1000 stores
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // store the counter
        a.dec(ecx)?;
        a.jnz(top)?;
        exit_with(a, 1)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    g.vm.tracker().remove_gfn(Gfn(T >> 12)).unwrap();

    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    assert!(rec.take().is_empty());
    assert_eq!(g.vm.stats().trapped_writes, 0);
    assert_eq!(read(&g.vm, T, 8), 1u64.to_le_bytes());
}

#[test]
fn device_write_to_tracked_frame_reported_with_device_source() {
    let kvm = kvm_or_skip!();
    let g = boot(kvm, 16 << 20, 1, &[0xf4]);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();

    // 6 bytes straddling from the untracked frame below into T, then 4 bytes into U.
    g.vm.memory()
        .write_slice(&[1, 2, 3, 4, 5, 6], GuestAddress(T - 2))
        .unwrap();
    g.vm.memory().write_slice(&[9; 4], GuestAddress(U)).unwrap();

    let ev = rec.take();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].gpa, T);
    assert_eq!(ev[0].new, vec![3, 4, 5, 6]);
    assert_eq!(ev[0].old.as_deref(), Some(&[0u8; 4][..]));
    assert_eq!(ev[0].source, Source::Device);
    assert!(
        g.vm.memory()
            .write_slice(&[1], GuestAddress(1 << 40))
            .is_err()
    );
}
