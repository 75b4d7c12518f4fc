//! Shared set-up: boot a CPL3 long-mode guest on a pagetrack VM, record events, run bounded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pagetrack::{Source, TrackNotifier, WriteEvent};
use pagetrack_kvm::{Exit, Vcpu, Vm, VmConfig};
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GUEST_EXIT_PORT, LongModeLayout};
use vm_memory::{Bytes, GuestAddress};

/// Where test programs are loaded and entered.
pub const ENTRY: u64 = 0x1000;
/// A frame the tests track.
pub const T: u64 = 0x10_0000;
/// A frame the tests leave untracked.
pub const U: u64 = 0x20_0000;

/// One delivered event, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ev {
    pub gpa: u64,
    pub new: Vec<u8>,
    pub old: Option<Vec<u8>>,
    pub source: Source,
    /// The epoch of a coalesced event (relaxed frames), `None` for an exact one.
    pub coalesced: Option<u64>,
    /// A coalesced event's first-writer hint (the dirty ring's), `None` if unknown.
    pub first_writer: Option<u32>,
}

/// A notifier that records every event in order.
#[derive(Debug, Default)]
pub struct Recorder(pub Mutex<Vec<Ev>>);

impl TrackNotifier for Recorder {
    fn track_write(&self, e: &WriteEvent<'_>) {
        self.0.lock().unwrap().push(Ev {
            gpa: e.gpa.0,
            new: e.new.to_vec(),
            old: e.old.map(<[u8]>::to_vec),
            source: e.source,
            coalesced: e.coalesced,
            first_writer: e.first_writer,
        });
    }
}

impl Recorder {
    pub fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A booted guest: VM, layout, vCPUs set up to enter `code` at [`ENTRY`] at CPL3.
pub struct Guest {
    pub vm: Vm,
    pub layout: LongModeLayout,
    pub vcpus: Vec<Vcpu>,
}

pub fn boot(kvm: kvm_ioctls::Kvm, ram: u64, nvcpus: u32, code: &[u8]) -> Guest {
    boot_with(kvm, VmConfig::default().with_ram(ram), ram, nvcpus, code)
}

/// As [`boot`], with a VM configuration of the test's own.
pub fn boot_with(
    kvm: kvm_ioctls::Kvm,
    config: VmConfig,
    ram: u64,
    nvcpus: u32,
    code: &[u8],
) -> Guest {
    let vm = Vm::with_kvm(kvm, config).unwrap();
    vm.add_ram(0, ram).unwrap();
    let layout = LongModeLayout::new(ram).unwrap();
    vm.untracked_memory()
        .write_slice(code, GuestAddress(ENTRY))
        .unwrap();
    let mut vcpus = Vec::new();
    for i in 0..nvcpus {
        let vcpu = vm.create_vcpu(i).unwrap();
        x86::setup_long_mode(
            vm.kvm(),
            vcpu.fd(),
            &*vm.untracked_memory(),
            &layout,
            ENTRY,
            i,
        )
        .unwrap();
        vcpus.push(vcpu);
    }
    Guest { vm, layout, vcpus }
}

/// Runs a vCPU until the guest exits on port 0xf4 and returns its exit code. Panics on an
/// exception, any other exit, or after `timeout`.
pub fn run_to_exit(vm: &Vm, layout: &LongModeLayout, vcpu: &mut Vcpu, timeout: Duration) -> u8 {
    let stopper = vcpu.stopper();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            stopper.stop();
        }
    });
    let out = match vcpu.run().unwrap() {
        Exit::IoOut {
            port: GUEST_EXIT_PORT,
            data,
        } => Ok(data.first()),
        Exit::IoOut {
            port: EXCEPTION_PORT,
            ..
        } => {
            let ex = x86::decode_exception(vcpu.fd(), &*vm.untracked_memory(), layout).unwrap();
            Err(format!("guest exception: {ex}"))
        }
        Exit::Stopped => Err(format!("guest did not finish within {timeout:?}")),
        other => Err(format!("unexpected exit {other:?}")),
    };
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    out.unwrap()
}

/// Reads `len` bytes of guest memory.
pub fn read(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    vm.untracked_memory()
        .read_slice(&mut v, GuestAddress(gpa))
        .unwrap();
    v
}

/// The replay oracle: `initial` contents of `[base, base + initial.len())` plus the events in
/// order must give `fin`; every event must lie inside the range and its old bytes must match.
pub fn replay(base: u64, initial: &[u8], events: &[Ev], fin: &[u8]) {
    let mut mem = initial.to_vec();
    for e in events {
        let off = usize::try_from(e.gpa - base).unwrap();
        let end = off + e.new.len();
        assert!(end <= mem.len(), "event {e:?} outside the replayed range");
        if let Some(old) = &e.old {
            assert_eq!(
                &mem[off..end],
                &old[..],
                "old bytes of {e:?} do not match the replay"
            );
        }
        mem[off..end].copy_from_slice(&e.new);
    }
    assert_eq!(
        mem,
        fin,
        "replay of {} events does not give the final memory",
        events.len()
    );
}

/// The liveness bound of a guest run (a hang fails the test after it; a passing run ends far
/// sooner). Generous: a run that re-tracks frames from its notifier took over 20 s at a load
/// average of 15 on two cores without being stuck (review 12, U7).
pub const TIMEOUT: Duration = Duration::from_secs(120);

pub fn recorder(vm: &Vm) -> (Arc<Recorder>, pagetrack::NotifierHandle) {
    let rec = Arc::new(Recorder::default());
    let h = vm
        .tracker()
        .register(rec.clone(), pagetrack::NotifierClass::Ordinary)
        .unwrap();
    (rec, h)
}
