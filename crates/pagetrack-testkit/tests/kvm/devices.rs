//! Device models written against vm-memory's `Bytes<GuestAddress>`, as device crates are,
//! write guest memory through `TrackedMemory` unchanged: every write to a tracked frame
//! (slices, objects, volatile transfers from a backing source, atomic stores) is reported
//! with its old and new bytes and `Source::Device`, and the guest then reads what they wrote.

use std::sync::atomic::Ordering;

use iced_x86::code_asm::*;
use pagetrack::{Gfn, Source};
use pagetrack_kvm::Error;
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

/// A toy block device with a used ring, generic over its guest memory (it knows nothing of
/// pagetrack).
struct Disk<'a> {
    backing: &'a [u8],
}

impl Disk<'_> {
    /// Completes a read request: the data from the backing store into the guest buffer,
    /// the status byte, the used element's length, then the used index (release).
    fn complete_read<M: Bytes<GuestAddress>>(
        &self,
        mem: &M,
        buf: GuestAddress,
        status: GuestAddress,
        used: GuestAddress,
        idx: u16,
    ) -> Result<(), M::E> {
        let mut src = self.backing;
        mem.read_exact_volatile_from(buf, &mut src, self.backing.len())?;
        mem.write_slice(&[0], status)?;
        let len = u32::try_from(self.backing.len()).expect("small");
        mem.write_obj(len, GuestAddress(used.0 + 4))?;
        mem.store(idx, used, Ordering::Release)
    }

    /// A write request: the guest buffer out to a host sink.
    fn submit_write<M: Bytes<GuestAddress>>(
        mem: &M,
        buf: GuestAddress,
        len: usize,
    ) -> Result<Vec<u8>, M::E> {
        let mut sink = Vec::new();
        mem.write_all_volatile_to(buf, &mut sink, len)?;
        Ok(sink)
    }
}

fn ev(gpa: u64, old: &[u8], new: &[u8], source: Source) -> Ev {
    Ev {
        gpa,
        new: new.to_vec(),
        old: Some(old.to_vec()),
        source,
        coalesced: None,
        first_writer: None,
    }
}

#[test]
fn device_model_generic_over_bytes_writes_through_tracking_with_old_and_new() {
    let kvm = kvm_or_skip!();
    // The guest copies what the device put at T + 0x200 to T + 0x300 (a tracked store).
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?; // rdi = tracked frame
        a.mov(rax, qword_ptr(rdi + 0x200))?; // load the device's data
        a.mov(qword_ptr(rdi + 0x300), rax)?; // store it: trapped, reported
        exit_with(a, 5)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    g.vm.tracker().add_gfn(Gfn((T >> 12) + 1)).unwrap();
    // Known, non-zero old contents, written before tracking could see them.
    let initial: Vec<u8> = (0..0x2000u32).map(|i| (i % 251).to_le_bytes()[0]).collect();
    g.vm.untracked_memory()
        .write_slice(&initial, GuestAddress(T))
        .unwrap();
    let old = |gpa: u64, len: usize| {
        let off = usize::try_from(gpa - T).unwrap();
        initial[off..off + len].to_vec()
    };
    let mem = g.vm.memory();
    let backing = *b"\x11\x22\x33\x44\x55\x66\x77\x88";
    let disk = Disk { backing: &backing };

    // Act: a request completed through the generic device model, then the other methods.
    disk.complete_read(
        &mem,
        GuestAddress(T + 0x200),
        GuestAddress(T + 0x40),
        GuestAddress(T + 0x80),
        7,
    )
    .unwrap();
    let big: Vec<u8> = (0..0x200u32).map(|i| (i * 7).to_le_bytes()[0]).collect();
    let moved = mem
        .read_volatile_from(GuestAddress(T + 0x1f00), &mut &big[..], big.len())
        .unwrap();
    let wrote = mem.write(&[0xaa; 32], GuestAddress(T + 0x90)).unwrap();
    mem.write_slice(&[5; 8], GuestAddress(U)).unwrap(); // untracked: no event
    let sink = Disk::submit_write(&mem, GuestAddress(T + 0x200), 8).unwrap();
    let idx: u16 = mem.load(GuestAddress(T + 0x80), Ordering::Acquire).unwrap();
    // Refused, changing nothing: a misaligned atomic, a range that is not RAM.
    let misaligned = mem.store(1u32, GuestAddress(T + 0x81), Ordering::SeqCst);
    let not_ram = mem.write_slice(&[1], GuestAddress(1 << 40));
    let device = rec.take();
    let exit = run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    // Assert
    assert_eq!((moved, wrote, idx, exit), (0x200, 32, 7, 5));
    assert_eq!(sink, backing);
    assert!(
        matches!(misaligned, Err(Error::GuestAccess { .. })),
        "{misaligned:?}"
    );
    assert!(matches!(not_ram, Err(Error::NotRam { .. })), "{not_ram:?}");
    let d = Source::Device;
    assert_eq!(
        device,
        vec![
            ev(T + 0x200, &old(T + 0x200, 8), &backing, d),
            ev(T + 0x40, &old(T + 0x40, 1), &[0], d),
            ev(T + 0x84, &old(T + 0x84, 4), &8u32.to_le_bytes(), d),
            ev(T + 0x80, &old(T + 0x80, 2), &7u16.to_le_bytes(), d),
            ev(T + 0x1f00, &old(T + 0x1f00, 0x100), &big[..0x100], d),
            ev(T + 0x90, &old(T + 0x90, 32), &[0xaa; 32], d),
        ]
    );
    let guest = rec.take();
    assert_eq!(
        guest,
        vec![ev(T + 0x300, &old(T + 0x300, 8), &backing, Source::Vcpu(0))]
    );
    let all: Vec<Ev> = device.into_iter().chain(guest).collect();
    replay(T, &initial, &all, &read(&g.vm, T, 0x2000));
    assert_eq!(read(&g.vm, T + 0x2000, 0x100), big[0x100..]);
    assert_eq!(read(&g.vm, U, 8), [5; 8]);
    assert_eq!(g.vm.stats().device_writes, 7);
}
