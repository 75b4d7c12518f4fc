//! Page-table updates against stores completed in userspace (issue 13): while two vCPUs hammer
//! stores into a tracked page, the host remaps that page to a fresh frame again and again
//! inside [`pagetrack_kvm::Vm::page_table_update`] and repurposes the old frame (zeroes it).
//! No store may be completed while an update is in progress, and a frame retired by an
//! update never receives a guest store again: it stays zero.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use pagetrack::{Gfn, Source, TrackNotifier, WriteEvent};
use pagetrack_kvm::walk::pte;
use pagetrack_kvm::{Exit, Vm};
use pagetrack_testkit::{assemble, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

/// The virtual page the guest stores to, mapped with a 4 KiB page table at [`PT`].
const W: u64 = 0x80_0000;
/// The page table of `[W, W + 2 MiB)` (entry 0 only).
const PT: u64 = 0x70_0000;
/// The frames `W` is mapped to in turn: frame `k` at `POOL + k * 4096`.
const POOL: u64 = 0x100_0000;
/// Remaps.
const ROUNDS: u64 = 400;
const LEAF: u64 = pte::PRESENT | pte::WRITABLE | pte::USER | pte::ACCESSED | pte::DIRTY;

/// Checks every vCPU event against the updates.
#[derive(Debug, Default)]
struct Checker {
    /// An update is in progress (set and cleared under the guard).
    updating: AtomicBool,
    /// Frames `POOL..POOL + retired * 4096` were retired by an update.
    retired: AtomicU64,
    /// vCPU events per pool frame.
    stores: Vec<AtomicU64>,
    violations: Mutex<Vec<String>>,
}

impl TrackNotifier for Checker {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if !matches!(e.source, Source::Vcpu(_)) {
            return; // the host's own writes (zeroing a retired frame)
        }
        let k = (e.gpa.0 - POOL) >> 12;
        let mut bad = Vec::new();
        if self.updating.load(Ordering::SeqCst) {
            bad.push(format!("store to frame {k} completed during an update"));
        }
        if k < self.retired.load(Ordering::SeqCst) {
            bad.push(format!("store into frame {k} after an update retired it"));
        }
        if let Some(c) = self.stores.get(usize::try_from(k).unwrap()) {
            c.fetch_add(1, Ordering::SeqCst);
        }
        if !bad.is_empty() {
            self.violations.lock().unwrap().extend(bad);
        }
    }
}

fn read_u64(vm: &Vm, gpa: u64) -> u64 {
    u64::from_le_bytes(read(vm, gpa, 8).try_into().unwrap())
}

/// Polls until `f` holds; a liveness bound, not a timing assertion.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn stores_completed_in_userspace_never_overlap_a_page_table_update() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(ecx, 1)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // [W] = k: trapped, completed in userspace
        a.inc(rcx)?;
        a.jmp(top)
    });
    let mut g = boot(kvm, 64 << 20, 2, &code);
    // [W, W + 2 MiB) through a 4 KiB page table whose entry 0 maps frame 0 of the pool.
    let pml4 = g.layout.pml4();
    let pdpt = read_u64(&g.vm, pml4) & pte::ADDR_MASK;
    let pd = read_u64(&g.vm, pdpt) & pte::ADDR_MASK;
    let mem = g.vm.untracked_memory();
    mem.write_slice(&[0u8; 4096], GuestAddress(PT)).unwrap();
    mem.write_obj(POOL | LEAF, GuestAddress(PT)).unwrap();
    let pde = pd + 8 * (W >> 21);
    mem.write_obj(
        PT | pte::PRESENT | pte::WRITABLE | pte::USER | pte::ACCESSED,
        GuestAddress(pde),
    )
    .unwrap();
    drop(mem);
    let checker = std::sync::Arc::new(Checker {
        stores: (0..=ROUNDS).map(|_| AtomicU64::new(0)).collect(),
        ..Checker::default()
    });
    let _h =
        g.vm.tracker()
            .register(checker.clone(), pagetrack::NotifierClass::Ordinary)
            .unwrap();
    let pool: Vec<Gfn> = (0..=ROUNDS).map(|k| Gfn((POOL >> 12) + k)).collect();
    g.vm.tracker()
        .add_gfns(pagetrack::AsId::NORMAL, &pool)
        .unwrap();
    for v in &g.vcpus {
        let mut regs = v.fd().get_regs().unwrap();
        regs.rdi = W;
        v.fd().set_regs(&regs).unwrap();
    }
    let stoppers: Vec<_> = g.vcpus.iter().map(|v| v.stopper()).collect();
    let threads: Vec<_> = g
        .vcpus
        .drain(..)
        .map(|mut v| std::thread::spawn(move || v.run().unwrap()))
        .collect();

    let zero = [0u8; 4096];
    for k in 0..ROUNDS {
        // Both vCPUs are storing into frame k (a liveness wait, not a timing assertion).
        wait_until("stores into the current frame", || {
            checker.stores[usize::try_from(k).unwrap()].load(Ordering::SeqCst) >= 4
        });
        let update = g.vm.page_table_update();
        checker.updating.store(true, Ordering::SeqCst);
        g.vm.memory()
            .write_obj((POOL + (k + 1) * 4096) | LEAF, GuestAddress(PT))
            .unwrap();
        g.vm.invalidate_translations(&[Gfn(PT >> 12)]).unwrap();
        // Frame k is no longer mapped: repurpose it.
        g.vm.memory()
            .write_slice(&zero, GuestAddress(POOL + k * 4096))
            .unwrap();
        checker.retired.store(k + 1, Ordering::SeqCst);
        checker.updating.store(false, Ordering::SeqCst);
        drop(update);
    }
    // The vCPUs go on through the last mapping.
    wait_until("stores into the last frame", || {
        checker.stores[usize::try_from(ROUNDS).unwrap()].load(Ordering::SeqCst) >= 1
    });
    for s in &stoppers {
        s.stop();
    }
    for t in threads {
        assert_eq!(t.join().unwrap(), Exit::Stopped);
    }
    let violations = checker.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "{} violations in {ROUNDS} updates, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    for k in 0..ROUNDS {
        assert_eq!(
            read(&g.vm, POOL + k * 4096, 4096),
            zero,
            "retired frame {k} was written after its update"
        );
    }
    // The current frame holds the guest's latest store.
    assert_ne!(read_u64(&g.vm, POOL + ROUNDS * 4096), 0);
}
