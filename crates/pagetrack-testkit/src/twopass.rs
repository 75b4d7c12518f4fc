//! The two-pass harness: a guest runs the same body once on untracked memory and once on
//! tracked memory, in one VM, and the test compares the two and replays the events.
//!
//! The guest program (64-bit, CPL3, entered at [`ENTRY`]) does, for each pass:
//! 1. sets RFLAGS to [`INITIAL_RFLAGS`] and every GPR to [`initial_gpr`] (RDI = the pass's
//!    data region: [`UNTRACKED`] first, then [`TRACKED`]; RSP = the harness stack);
//! 2. jumps to the body, which is emitted **once** (both passes run the same code at the same
//!    addresses, so return addresses and RIP-relative values are equal);
//! 3. at the body's end, stores its 16 GPRs and RFLAGS, then copies the data region to a
//!    witness region (the guest's own view of the result) and the registers next to it.
//!
//! [`TwoPassRun::assert_exact`] then checks that the tracked pass behaved exactly as the
//! untracked one (memory, registers, flags) and that the events are true: every event lies
//! inside one tracked frame, its `old` bytes equal the replayed state, and replaying the events
//! over the initial contents gives the witness.
//!
//! A body may use every register and may move RSP (into the data region, say); it must end by
//! falling through (no `ret`). Registers that point into the data region differ between the
//! passes by `TRACKED - UNTRACKED` and are compared as offsets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack::{Delivery, Gfn, NotifierClass, RegisterOptions, Source, TrackNotifier, WriteEvent};
use pagetrack_kvm::{Exit, Vm, VmConfig, VmStats};
use pagetrack_vmm::x86::{self, EXCEPTION_PORT, GUEST_EXIT_PORT, LongModeLayout};
use vm_memory::{Bytes, GuestAddress};

/// Where the harness program starts.
pub const ENTRY: u64 = 0x1000;
/// The tracked data region (pass 2).
pub const TRACKED: u64 = 0x10_0000;
/// The untracked data region (pass 1).
pub const UNTRACKED: u64 = 0x20_0000;
/// The guest's copy of the tracked region after pass 2.
pub const TRACKED_WITNESS: u64 = 0x30_0000;
/// The guest's copy of the untracked region after pass 1.
pub const UNTRACKED_WITNESS: u64 = 0x40_0000;
/// Harness scratch: registers of the current pass, saved RSP, return slot, witness registers.
pub const SCRATCH: u64 = 0x50_0000;
/// RFLAGS at the start of each pass (IF and the always-one bit).
pub const INITIAL_RFLAGS: u64 = 0x202;
/// Guest RAM of the harness VM.
pub const RAM: u64 = 16 << 20;
/// The most data frames a body may use.
pub const MAX_FRAMES: usize = 64;

const REGS: u64 = SCRATCH;
const SAVED_RSP: u64 = SCRATCH + 0x100;
const RET_SLOT: u64 = SCRATCH + 0x108;
const WITNESS_REGS: [u64; 2] = [SCRATCH + 0x200, SCRATCH + 0x300];
/// 16 GPRs (KVM order: rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15) and RFLAGS.
pub const SAVED_WORDS: usize = 17;

/// GPRs in KVM's order.
const GPRS: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
const NAMES: [&str; SAVED_WORDS] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rflags",
];

/// The value GPR `i` (KVM order) holds at the start of a pass (RSP and RDI excepted).
#[must_use]
pub fn initial_gpr(i: usize) -> u64 {
    0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1) ^ 0x8000_0000_0000_0000
}

/// The body of a two-pass test: emits code that works on the data region at RDI.
pub type Body<'a> = &'a dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// One delivered event, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Address.
    pub gpa: u64,
    /// Stored bytes.
    pub new: Vec<u8>,
    /// Bytes before the store, when known.
    pub old: Option<Vec<u8>>,
    /// Who stored.
    pub source: Source,
    /// The epoch of a coalesced event (a relaxed frame's change), `None` for an exact one.
    pub coalesced: Option<u64>,
}

#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<Event>>);

impl TrackNotifier for Recorder {
    fn track_write(&self, e: &WriteEvent<'_>) {
        if let Ok(mut v) = self.0.lock() {
            v.push(Event {
                gpa: e.gpa.0,
                new: e.new.to_vec(),
                old: e.old.map(<[u8]>::to_vec),
                source: e.source,
                coalesced: e.coalesced,
            });
        }
    }
}

/// How the guest's run ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum Ending {
    /// Both passes ran and the guest exited with code 0.
    Finished,
    /// The guest exited with another code.
    ExitCode(u8),
    /// `Vcpu::run` failed (for example a store pagetrack refuses: `Error::Unemulatable`).
    Error(pagetrack_kvm::Error),
    /// The guest took an exception (its description).
    Exception(String),
    /// Another exit.
    Exit(Exit),
    /// The run did not end within the timeout (the watchdog stopped the vCPU).
    Timeout,
}

/// Called when the guest writes to a port other than the exit and exception ports; the
/// vCPU then resumes (a test's way to act from the host in the middle of a body).
pub type PortHook<'a> = &'a dyn Fn(u16, &pagetrack_kvm::Vcpu);

/// A two-pass test: a body, the number of data frames and their initial contents.
pub struct TwoPass<'a> {
    body: Body<'a>,
    frames: usize,
    init: Vec<u8>,
    timeout: Duration,
    port_hook: Option<PortHook<'a>>,
    config: VmConfig,
    delivery: Delivery,
}

impl std::fmt::Debug for TwoPass<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwoPass")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

/// The default initial contents of the data region: a non-zero pattern.
#[must_use]
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 29 + 7) % 251).unwrap_or(0))
        .collect()
}

impl<'a> TwoPass<'a> {
    /// A two-pass test of `body` over one data frame holding [`pattern`].
    #[must_use]
    pub fn new(body: Body<'a>) -> Self {
        Self {
            body,
            frames: 1,
            init: pattern(4096),
            timeout: Duration::from_secs(60),
            port_hook: None,
            config: VmConfig::default().with_ram(RAM),
            delivery: Delivery::EachWrite,
        }
    }

    /// Calls `hook` for each guest write to another port (see [`PortHook`]); without a hook
    /// such a write ends the run ([`Ending::Exit`]).
    #[must_use]
    pub fn on_port(mut self, hook: PortHook<'a>) -> Self {
        self.port_hook = Some(hook);
        self
    }

    /// Uses `n` data frames (1 to [`MAX_FRAMES`]), all tracked in the tracked pass, holding
    /// [`pattern`].
    ///
    /// # Panics
    /// If `n` is out of range (a test bug).
    #[must_use]
    pub fn frames(mut self, n: usize) -> Self {
        assert!((1..=MAX_FRAMES).contains(&n), "1 to {MAX_FRAMES} frames");
        self.frames = n;
        self.init = pattern(n * 4096);
        self
    }

    /// Initial contents of the data region (padded with the pattern to the region's size).
    ///
    /// # Panics
    /// If `init` is larger than the region.
    #[must_use]
    pub fn init(mut self, init: &[u8]) -> Self {
        assert!(init.len() <= self.init.len(), "initial contents too large");
        self.init[..init.len()].copy_from_slice(init);
        self
    }

    /// The VM's configuration (default: `VmConfig::default()` with [`RAM`]; its RAM size is
    /// always [`RAM`]), for example relaxed mode.
    #[must_use]
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config.with_ram(RAM);
        self
    }

    /// How the recording notifier takes events (default `EachWrite`; `Coalesced` lets
    /// tracked frames run relaxed, and the replay then takes coalesced events from
    /// `Source::Guest`).
    #[must_use]
    pub fn delivery(mut self, delivery: Delivery) -> Self {
        self.delivery = delivery;
        self
    }

    /// How long the run may take before the watchdog stops it (default 60 s).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn program(&self) -> Vec<u8> {
        let region = (self.frames * 4096) as u64;
        crate::assemble(ENTRY, |a| {
            let mut body = a.create_label();
            let mut returns = [a.create_label(), a.create_label()];
            for (pass, base) in [UNTRACKED, TRACKED].into_iter().enumerate() {
                a.lea(rax, ptr(returns[pass]))?;
                a.mov(qword_ptr(RET_SLOT), rax)?;
                a.mov(qword_ptr(SAVED_RSP), rsp)?;
                a.push(i32::try_from(INITIAL_RFLAGS).unwrap_or(0x202))?;
                a.popfq()?;
                for (i, r) in GPRS.iter().enumerate() {
                    match i {
                        4 => {}
                        7 => a.mov(*r, base)?,
                        _ => a.mov(*r, initial_gpr(i))?,
                    }
                }
                a.jmp(body)?;
                a.set_label(&mut returns[pass])?;
                a.cld()?;
                a.mov(rsi, REGS)?;
                a.mov(rdi, WITNESS_REGS[pass])?;
                a.mov(ecx, u32::try_from(SAVED_WORDS).unwrap_or(17))?;
                a.rep().movsq()?;
                a.mov(rsi, base)?;
                a.mov(rdi, [UNTRACKED_WITNESS, TRACKED_WITNESS][pass])?;
                a.mov(ecx, u32::try_from(region / 8).unwrap_or(0))?;
                a.rep().movsq()?;
            }
            crate::exit_with(a, 0)?;
            a.set_label(&mut body)?;
            a.nop()?;
            (self.body)(a)?;
            for (i, r) in GPRS.iter().enumerate() {
                a.mov(qword_ptr(REGS + 8 * i as u64), *r)?;
            }
            a.mov(rsp, qword_ptr(SAVED_RSP))?;
            a.pushfq()?;
            a.pop(rax)?;
            a.mov(qword_ptr(REGS + 8 * 16), rax)?;
            a.jmp(qword_ptr(RET_SLOT))
        })
    }

    /// Boots the guest on `kvm` and runs both passes.
    ///
    /// # Panics
    /// If the VM cannot be set up (a test bug or a broken host).
    #[must_use]
    pub fn run(&self, kvm: kvm_ioctls::Kvm) -> TwoPassRun {
        self.run_with(kvm, |_| {})
    }

    /// As [`run`](Self::run), calling `setup` on the VM after the data is in place and the
    /// frames are tracked, before the vCPU starts.
    ///
    /// # Panics
    /// As [`run`](Self::run).
    #[must_use]
    pub fn run_with(&self, kvm: kvm_ioctls::Kvm, setup: impl FnOnce(&Vm)) -> TwoPassRun {
        let code = self.program();
        let vm = Vm::with_kvm(kvm, self.config).expect("VM");
        vm.add_ram(0, RAM).expect("RAM");
        let layout = LongModeLayout::new(RAM).expect("layout");
        {
            let mem = vm.untracked_memory();
            mem.write_slice(&code, GuestAddress(ENTRY)).expect("code");
            for at in [UNTRACKED, TRACKED] {
                mem.write_slice(&self.init, GuestAddress(at)).expect("data");
            }
        }
        let mut vcpu = vm.create_vcpu(0).expect("vCPU");
        x86::setup_long_mode(
            vm.kvm(),
            vcpu.fd(),
            &*vm.untracked_memory(),
            &layout,
            ENTRY,
            0,
        )
        .expect("long mode");
        let rec = Arc::new(Recorder::default());
        let handle = vm
            .tracker()
            .register(
                rec.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(self.delivery),
            )
            .expect("register");
        for f in 0..self.frames as u64 {
            vm.tracker()
                .add_gfn(Gfn((TRACKED >> 12) + f))
                .expect("track");
        }
        setup(&vm);
        let ending = run_watched(&vm, &layout, &mut vcpu, self.timeout, self.port_hook);
        drop(handle);
        let len = self.init.len();
        let read = |gpa: u64, n: usize| {
            let mut v = vec![0; n];
            vm.untracked_memory()
                .read_slice(&mut v, GuestAddress(gpa))
                .expect("read");
            v
        };
        let regs = |at: u64| {
            let b = read(at, 8 * SAVED_WORDS);
            std::array::from_fn(|i| {
                u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]))
            })
        };
        let events = rec.0.lock().map(|v| v.clone()).unwrap_or_default();
        TwoPassRun {
            ending,
            initial: self.init.clone(),
            native: read(UNTRACKED_WITNESS, len),
            tracked: read(TRACKED_WITNESS, len),
            tracked_final: read(TRACKED, len),
            native_regs: regs(WITNESS_REGS[0]),
            tracked_regs: regs(WITNESS_REGS[1]),
            events,
            stats: vm.stats(),
        }
    }
}

fn run_watched(
    vm: &Vm,
    layout: &LongModeLayout,
    vcpu: &mut pagetrack_kvm::Vcpu,
    timeout: Duration,
    hook: Option<PortHook<'_>>,
) -> Ending {
    let stopper = vcpu.stopper();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            stopper.stop();
        }
    });
    let ending = loop {
        let exit = vcpu.run();
        if let (Ok(Exit::IoOut { port, .. }), Some(hook)) = (&exit, hook)
            && *port != GUEST_EXIT_PORT
            && *port != EXCEPTION_PORT
        {
            hook(*port, vcpu);
            continue;
        }
        break match exit {
            Ok(Exit::IoOut {
                port: GUEST_EXIT_PORT,
                data,
            }) if data.first() == 0 => Ending::Finished,
            Ok(Exit::IoOut {
                port: GUEST_EXIT_PORT,
                data,
            }) => Ending::ExitCode(data.first()),
            Ok(Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            }) => Ending::Exception(
                match x86::decode_exception(vcpu.fd(), &*vm.untracked_memory(), layout) {
                    Ok(e) => format!("{} {e:?}", e.mnemonic()),
                    Err(e) => format!("undecodable exception: {e}"),
                },
            ),
            Ok(Exit::Stopped) => Ending::Timeout,
            Ok(other) => Ending::Exit(other),
            Err(e) => Ending::Error(e),
        };
    };
    // The watchdog ends on its own once `done_tx` is sent or dropped.
    let _ignored = done_tx.send(());
    let _ignored = watchdog.join();
    ending
}

/// What a two-pass run produced.
#[derive(Debug)]
pub struct TwoPassRun {
    /// How the run ended.
    pub ending: Ending,
    /// The data region's initial contents (both passes).
    pub initial: Vec<u8>,
    /// The guest's copy of the untracked region after pass 1.
    pub native: Vec<u8>,
    /// The guest's copy of the tracked region after pass 2.
    pub tracked: Vec<u8>,
    /// The tracked region as the host reads it at the end.
    pub tracked_final: Vec<u8>,
    /// Registers and RFLAGS at the end of pass 1 (KVM order, RFLAGS last).
    pub native_regs: [u64; SAVED_WORDS],
    /// Registers and RFLAGS at the end of pass 2.
    pub tracked_regs: [u64; SAVED_WORDS],
    /// Every event, in delivery order.
    pub events: Vec<Event>,
    /// The VM's counters at the end.
    pub stats: VmStats,
}

impl TwoPassRun {
    /// Asserts the run finished, the tracked pass equals the untracked one (memory, registers,
    /// flags), and the events replay exactly (see the [module docs](self)).
    ///
    /// # Panics
    /// On the first difference, naming it.
    pub fn assert_exact(&self) {
        assert!(
            matches!(self.ending, Ending::Finished),
            "the guest did not finish: {:?}",
            self.ending
        );
        self.assert_same_memory();
        self.assert_same_registers();
        self.assert_replay();
    }

    /// Asserts the two witness copies are byte-identical.
    ///
    /// # Panics
    /// Listing the first differing offsets.
    pub fn assert_same_memory(&self) {
        let diff: Vec<String> = (0..self.native.len())
            .filter(|&i| self.native[i] != self.tracked[i])
            .take(16)
            .map(|i| {
                format!(
                    "+{i:#x}: untracked {:02x} tracked {:02x}",
                    self.native[i], self.tracked[i]
                )
            })
            .collect();
        assert!(
            diff.is_empty(),
            "tracked memory differs from untracked: {diff:?}"
        );
    }

    /// Asserts equal registers and flags (pointers into the data region as offsets).
    ///
    /// # Panics
    /// Naming the differing registers.
    pub fn assert_same_registers(&self) {
        let delta = TRACKED.wrapping_sub(UNTRACKED);
        let diff: Vec<String> = (0..SAVED_WORDS)
            .filter(|&i| {
                let (n, t) = (self.native_regs[i], self.tracked_regs[i]);
                let into_region = n.wrapping_sub(UNTRACKED) < TRACKED_WITNESS - UNTRACKED;
                n != t && !(i < 16 && into_region && n.wrapping_add(delta) == t)
            })
            .map(|i| {
                format!(
                    "{}: untracked {:#x} tracked {:#x}",
                    NAMES[i], self.native_regs[i], self.tracked_regs[i]
                )
            })
            .collect();
        assert!(
            diff.is_empty(),
            "tracked registers differ from untracked: {diff:?}"
        );
    }

    /// Asserts the replay oracle: each event inside one tracked frame, from vCPU 0 (a coalesced
    /// one from `Source::Guest`), with `old`
    /// equal to the replayed state; the replay equals the guest's witness and the final memory.
    ///
    /// # Panics
    /// On the first bad event or a replay difference.
    pub fn assert_replay(&self) {
        let mut mem = self.initial.clone();
        for (n, e) in self.events.iter().enumerate() {
            let off = e.gpa.wrapping_sub(TRACKED);
            let end = off + e.new.len() as u64;
            assert!(
                end <= mem.len() as u64 && !e.new.is_empty(),
                "event {n} {e:?} outside the tracked region"
            );
            assert_eq!(
                off >> 12,
                (end - 1) >> 12,
                "event {n} {e:?} crosses a frame"
            );
            let source = if e.coalesced.is_some() {
                Source::Guest
            } else {
                Source::Vcpu(0)
            };
            assert_eq!(e.source, source, "event {n} source");
            let (off, end) = (
                usize::try_from(off).unwrap_or(0),
                usize::try_from(end).unwrap_or(0),
            );
            let old = e.old.as_deref().expect("KVM stores carry their old bytes");
            assert_eq!(
                &mem[off..end],
                old,
                "event {n} {e:?}: old bytes differ from the replayed state"
            );
            mem[off..end].copy_from_slice(&e.new);
        }
        assert!(
            mem == self.tracked,
            "replay of {} events differs from the guest's witness",
            self.events.len()
        );
        assert!(
            mem == self.tracked_final,
            "replay of {} events differs from the final tracked memory",
            self.events.len()
        );
    }
}
