//! A minimal VMM written the way Firecracker and Cloud Hypervisor are, with pagetrack added:
//! the VMM opens `/dev/kvm`, creates the VM, maps its guest memory from a memfd, creates and
//! runs its vCPU on its own thread with its own `KVM_RUN` loop and device dispatch (a port-I/O
//! console), and logs dirty pages. The pagetrack glue is marked `// pagetrack:`.
//!
//! The guest (16-bit real mode, a handful of instructions) writes to a tracked page (0x5000)
//! and an untracked one (0x6000), prints "ok" on the console and halts. The example prints
//! the write events (the guest's two stores to 0x5000 and one device write), the console
//! output and the dirty pages.
//!
//! Run: `cargo run --release -p pagetrack-kvm --example embed`.
#![allow(unsafe_code)] // memfd_create only: a VMM's own business, not pagetrack's

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use iced_x86::code_asm::{CodeAssembler, al, byte_ptr, dx, word_ptr};
use kvm_ioctls::{Kvm, VcpuExit};
use pagetrack::{Gfn, NotifierClass, Source, TrackNotifier, WriteEvent};
use pagetrack_kvm::{Handled, HostCaps, KickSignal, Ran, Vm, VmConfig};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Guest RAM size.
const RAM: usize = 1 << 20;
/// Where the guest code runs.
const CODE: u16 = 0x1000;
/// The tracked page.
pub const TRACKED: u64 = 0x5000;
/// An untracked page the guest writes too.
pub const UNTRACKED: u64 = 0x6000;
/// The console port.
const CONSOLE: u16 = 0x3f8;
/// KVM memslot ids the VMM keeps for itself; pagetrack gets the 32 after them.
const VMM_SLOTS: u32 = 8;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One write event, as the notifier saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes written.
    pub new: Vec<u8>,
    /// Who wrote.
    pub source: Source,
}

/// What a run of the VMM produced.
#[derive(Debug)]
pub struct Outcome {
    /// Write events, in order.
    pub events: Vec<Event>,
    /// Console output.
    pub console: Vec<u8>,
    /// Pages of the RAM region written (the dirty log), by page number.
    pub dirty: Vec<u64>,
    /// The guest's bytes at the tracked and untracked pages afterwards.
    pub memory: [u8; 4],
}

#[derive(Debug, Default)]
struct Collect(Mutex<Vec<Event>>);

impl TrackNotifier for Collect {
    fn track_write(&self, e: &WriteEvent<'_>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                gpa: e.gpa.0,
                new: e.new.to_vec(),
                source: e.source,
            });
    }
}

/// The guest: two stores to the tracked page, one to the untracked page, "ok" on the
/// console, `hlt`.
fn guest() -> Result<Vec<u8>, BoxError> {
    let mut a = CodeAssembler::new(16)?;
    a.mov(byte_ptr(TRACKED), 0x11)?;
    a.mov(word_ptr(TRACKED + 0x10), 0x2233)?;
    a.mov(byte_ptr(UNTRACKED), 0x44)?;
    a.mov(dx, u32::from(CONSOLE))?;
    for c in *b"ok" {
        a.mov(al, u32::from(c))?;
        a.out(dx, al)?;
    }
    a.hlt()?;
    Ok(a.assemble(u64::from(CODE))?)
}

/// The VMM's guest memory: one region backed by a memfd (shared mapping, as for vhost-user
/// or snapshots).
fn guest_memory() -> Result<(Arc<GuestRegionMmap>, GuestMemoryMmap), BoxError> {
    // SAFETY: memfd_create with a NUL-terminated name and no flags has no preconditions.
    let fd = unsafe { libc::memfd_create(c"embed-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(RAM as u64)?;
    let region = Arc::new(GuestRegionMmap::from_range(
        GuestAddress(0),
        RAM,
        Some(FileOffset::new(file, 0)),
    )?);
    let mem = GuestMemoryMmap::from_arc_regions(vec![Arc::clone(&region)])?;
    Ok((region, mem))
}

/// The VMM's kick-signal handler.
extern "C" fn vmm_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs the VMM: returns what the guest did as pagetrack and the VMM saw it.
///
/// # Errors
/// KVM or memory set-up failures, or an exit the VMM does not expect.
pub fn run_vmm() -> Result<Outcome, BoxError> {
    // The VMM's own KVM set-up, with its own vCPU kick signal (as Firecracker's
    // `SIGRTMIN + 0`, whose handler does nothing: the kick only makes `KVM_RUN` return).
    let kick = vmm_sys_util::signal::SIGRTMIN();
    vmm_sys_util::signal::register_signal_handler(kick, vmm_kick)?;
    let kvm = Kvm::new()?;
    let vm_fd = Arc::new(kvm.create_vm()?);
    let (region, guest_mem) = guest_memory()?;
    guest_mem.write_slice(&guest()?, GuestAddress(u64::from(CODE)))?;

    // pagetrack: wrap the VMM's VM, hand it the memory and a slot-id range, track a page.
    let caps = HostCaps::probe(&kvm);
    let config = VmConfig::default()
        .with_ram(RAM as u64)
        .with_dirty_log()
        .with_kvm_slots(VMM_SLOTS..VMM_SLOTS + 32)
        .with_kick_signal(KickSignal::Vmm { signal: kick });
    let tracking = Vm::from_vm_fd(&kvm, Arc::clone(&vm_fd), caps, config)?;
    let ram_slot = tracking.add_region(Arc::clone(&region))?;
    let log = Arc::new(Collect::default());
    let _handle = tracking.tracker().register(
        Arc::clone(&log) as Arc<dyn TrackNotifier>,
        NotifierClass::Ordinary,
    )?;
    tracking.tracker().add_gfn(Gfn(TRACKED >> 12))?;

    // The VMM's vCPU and its thread.
    let mut vcpu = vm_fd.create_vcpu(0)?;
    let mut sregs = vcpu.get_sregs()?;
    pagetrack_x86::boot::load_real_mode_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&pagetrack_x86::boot::real_mode_regs(CODE))?;
    // pagetrack: one exit handler per vCPU.
    let mut handler = tracking.exit_handler(0, &mut vcpu)?;
    let console = std::thread::spawn(move || -> Result<Vec<u8>, BoxError> {
        let mut console = Vec::new();
        loop {
            // pagetrack: `handler.run(&mut vcpu)` in place of `vcpu.run()`.
            match handler.run(&mut vcpu)? {
                Ran::Tracked(exit) => match handler.handle(exit, &mut vcpu)? {
                    Handled::Done => {}
                    other => return Err(format!("unexpected {other:?}").into()),
                },
                // The VMM's own device dispatch.
                Ran::Exit(VcpuExit::IoOut(CONSOLE, data)) => console.extend_from_slice(data),
                Ran::Exit(VcpuExit::Hlt) => return Ok(console),
                Ran::Exit(other) => return Err(format!("unexpected exit {other:?}").into()),
                Ran::Stopped | Ran::ExitLimit => return Ok(console),
            }
        }
    })
    .join()
    .map_err(|_| "the vCPU thread panicked")??;

    // A device write (DMA) through pagetrack's tracked view is reported too.
    tracking
        .memory()
        .write_slice(&[0xaa], GuestAddress(TRACKED + 0x100))?;

    let bits = tracking.take_dirty_log(ram_slot)?;
    let dirty = (0..bits.len() as u64 * 64)
        .filter(|&p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    let mut memory = [0u8; 4];
    for (i, gpa) in [TRACKED, TRACKED + 0x10, TRACKED + 0x11, UNTRACKED]
        .into_iter()
        .enumerate()
    {
        memory[i] = guest_mem.read_obj(GuestAddress(gpa))?;
    }
    let events = std::mem::take(&mut *log.0.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Outcome {
        events,
        console,
        dirty,
        memory,
    })
}

fn main() -> Result<(), BoxError> {
    let out = run_vmm()?;
    for e in &out.events {
        println!("{} wrote {:02x?} at {:#x}", e.source, e.new, e.gpa);
    }
    println!("console: {:?}", String::from_utf8_lossy(&out.console));
    println!("dirty pages: {:x?}", out.dirty);
    Ok(())
}
