//! A model test of relaxed mode's state machine (issue 12's "model test of the mode state
//! machine against an oracle of memory contents"), on a real guest.
//!
//! proptest draws a script of steps over four frames, for one vCPU or two, harvesting with
//! manual protect, plain `KVM_GET_DIRTY_LOG` or (where KVM has it) the dirty ring. Each step is a
//! batch of guest stores per vCPU (qword, byte, `rep stosq`, often straddling frames; with two
//! vCPUs, each stores into its own half of the frames, at the same time) that the CPL3 guest
//! runs, ending with
//! a sync point (an exit) or not: then the guest spins on its mailbox inside `KVM_RUN`,
//! without an exit, and its stores to relaxed frames stay pending while the test thread
//! runs the step's host operations: device writes, track and untrack, strict pins and
//! unpins, an exact notifier registered and dropped, `sync`, `relax`, `make_strict`,
//! checkpoint and restore, and the typed refusals of the bad ones (untracking an untracked
//! frame, unpinning an unpinned one, restoring without a checkpoint). A model holds what
//! memory must contain and which frames must be strict. After every operation:
//! - guest memory equals the model;
//! - for every tracked frame with no pending guest stores, the contents it had when it was
//!   tracked plus every event delivered for it since (each event's old bytes checked)
//!   equal memory; a frame untracked, pinned or made strict must reach that at once: no
//!   change lost, invented or duplicated, whatever mode the frame ran in;
//! - no event arrives for a frame that is not tracked;
//! - a frame that must be strict (untracked, pinned, or while an exact notifier is
//!   registered) is not relaxed, and the exact notifier gets only exact events, from the
//!   first (review 12's U2: registering it demotes every relaxed frame first);
//! - the exact notifier gets the same events as the coalesced one while both are registered.

use std::sync::Arc;

use iced_x86::code_asm::*;
use pagetrack::{Delivery, Gfn, NotifierClass, RegisterOptions};
use pagetrack_kvm::{Error, RelaxedConfig, RelaxedMode, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;
use crate::relaxed::{SYNC_PORT, coalesced_recorder, run_syncing, set_regs};
use crate::ring::ring_offered;

const RAM: u64 = 16 << 20;
/// The frames the script works on.
const NF: usize = 4;
const BASE: u64 = T;
const LEN: usize = NF * 4096;
/// The untracked mailbox vCPU `i` reads its next batch from: sequence number, count, sync
/// flag, then count × (address, value, op).
fn mailbox(i: usize) -> u64 {
    0x30_0000 + 0x1000 * i as u64
}
/// Where, from its mailbox, the guest writes the sequence number of the batch it finished.
const DONE: u64 = 0x800;
const MAX_STORES: usize = 6;

#[derive(Clone, Copy, Debug)]
enum Store {
    Qword {
        off: usize,
        val: u64,
    },
    Byte {
        off: usize,
        val: u8,
    },
    /// `rep stosq` of 8 qwords.
    RepStosq {
        off: usize,
        val: u64,
    },
}

impl Store {
    fn op(self) -> (usize, u64, u64) {
        match self {
            Store::Qword { off, val } => (off, val, 0),
            Store::Byte { off, val } => (off, u64::from(val), 1),
            Store::RepStosq { off, val } => (off, val, 2),
        }
    }

    fn apply(self, mem: &mut [u8]) {
        match self {
            Store::Qword { off, val } => mem[off..off + 8].copy_from_slice(&val.to_le_bytes()),
            Store::Byte { off, val } => mem[off] = val,
            Store::RepStosq { off, val } => {
                for i in 0..8 {
                    mem[off + 8 * i..off + 8 * i + 8].copy_from_slice(&val.to_le_bytes());
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Host {
    Device { off: usize, len: usize, byte: u8 },
    Track(usize),
    Untrack(usize),
    Pin(usize),
    Unpin(usize),
    RegisterExact,
    UnregisterExact,
    Sync,
    Relax(usize),
    MakeStrict(usize),
    Checkpoint,
    Restore,
}

#[derive(Clone, Debug)]
struct Step {
    /// Each vCPU's batch; with two vCPUs, vCPU 0 stores into the first half of the frames
    /// and vCPU 1 into the second (the batches run at the same time).
    stores: Vec<Vec<Store>>,
    /// The batch ends with a sync point (an exit); otherwise its relaxed stores stay
    /// pending during the host operations.
    exit: bool,
    host: Vec<Host>,
}

/// Offsets in `[lo, hi - room]`; offsets near frame ends come often, so stores straddle
/// frames of different modes.
fn offset_in(lo: usize, hi: usize, room: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        lo..hi - room,
        (lo / 4096 + 1..hi / 4096 + 1, 0..room + 8)
            .prop_map(move |(f, d)| (f * 4096).saturating_sub(d).clamp(lo, hi - room)),
    ]
}

fn offset(room: usize) -> impl Strategy<Value = usize> {
    offset_in(0, LEN, room)
}

fn store_in(lo: usize, hi: usize) -> impl Strategy<Value = Store> {
    prop_oneof![
        (offset_in(lo, hi, 8), any::<u64>()).prop_map(|(off, val)| Store::Qword { off, val }),
        (offset_in(lo, hi, 1), any::<u8>()).prop_map(|(off, val)| Store::Byte { off, val }),
        (offset_in(lo, hi, 64), any::<u64>()).prop_map(|(off, val)| Store::RepStosq { off, val }),
    ]
}

fn host() -> impl Strategy<Value = Host> {
    let f = 0..NF;
    prop_oneof![
        3 => (offset(40), 1..=40usize, any::<u8>()).prop_map(|(off, len, byte)| Host::Device {
            off,
            len: len.min(LEN - off),
            byte
        }),
        3 => f.clone().prop_map(Host::Track),
        2 => f.clone().prop_map(Host::Untrack),
        2 => f.clone().prop_map(Host::Pin),
        2 => f.clone().prop_map(Host::Unpin),
        1 => Just(Host::RegisterExact),
        1 => Just(Host::UnregisterExact),
        1 => Just(Host::Sync),
        1 => f.clone().prop_map(Host::Relax),
        1 => f.prop_map(Host::MakeStrict),
        1 => Just(Host::Checkpoint),
        1 => Just(Host::Restore),
    ]
}

/// (relaxed mode `Always` rather than `Auto`, vCPUs, steps).
/// How dirty pages are harvested.
#[derive(Clone, Copy, Debug)]
enum Harvest {
    /// Manual protect (GET + CLEAR; hot frames), the default where KVM offers it.
    Manual,
    /// Plain `KVM_GET_DIRTY_LOG`.
    Plain,
    /// The dirty ring, where KVM has one (the default harvest otherwise).
    Ring,
}

/// (relaxed mode `Always` rather than `Auto`, vCPUs, the harvest, steps).
fn script() -> impl Strategy<Value = (bool, usize, Harvest, Vec<Step>)> {
    let harvest = prop_oneof![
        Just(Harvest::Manual),
        Just(Harvest::Plain),
        Just(Harvest::Ring)
    ];
    (any::<bool>(), 1..=2usize, harvest).prop_flat_map(|(always, vcpus, ring)| {
        let batches: Vec<_> = (0..vcpus)
            .map(|i| {
                let (lo, hi) = (i * LEN / vcpus, (i + 1) * LEN / vcpus);
                proptest::collection::vec(store_in(lo, hi), 0..=MAX_STORES)
            })
            .collect();
        let step = (
            batches,
            any::<bool>(),
            proptest::collection::vec(host(), 0..=4),
        )
            .prop_map(|(stores, exit, host)| Step { stores, exit, host });
        (
            Just(always),
            Just(vcpus),
            Just(ring),
            proptest::collection::vec(step, 1..16),
        )
    })
}

/// Guest: forever: wait for the next sequence number at its mailbox (rbx: [`mailbox`]), run
/// its batch (op 0
/// stores the qword, 1 the byte, 2 `rep stosq`s the value 8 times), take a sync point if the
/// batch asks, write the sequence number to [`DONE`] past the mailbox. A count of -1 ends
/// the run (exit 3).
/// Only the next number starts a batch: a restore puts the mailbox page (which the guest
/// dirtied with `DONE`) back to its state at the checkpoint, with an older number.
fn interpreter() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let mut top = a.create_label();
        let mut wait = a.create_label();
        let mut go = a.create_label();
        let mut each = a.create_label();
        let mut finished = a.create_label();
        let mut no_sync = a.create_label();
        let mut done = a.create_label();
        let mut not_qword = a.create_label();
        let mut not_byte = a.create_label();
        let mut next = a.create_label();
        a.xor(r9, r9)?; // the last sequence number
        a.set_label(&mut top)?;
        a.mov(rsi, rbx)?;
        a.set_label(&mut wait)?;
        a.cmp(qword_ptr(rsi + 8), -1)?;
        a.je(done)?;
        a.lea(rax, qword_ptr(r9 + 1))?;
        a.cmp(qword_ptr(rsi), rax)?;
        a.je(go)?;
        a.pause()?;
        a.jmp(wait)?;
        a.set_label(&mut go)?;
        a.mov(r9, rax)?;
        a.mov(rcx, qword_ptr(rsi + 8))?;
        a.mov(r10, qword_ptr(rsi + 16))?;
        a.add(rsi, 24)?;
        a.set_label(&mut each)?;
        a.test(rcx, rcx)?;
        a.jz(finished)?;
        a.mov(rdi, qword_ptr(rsi))?;
        a.mov(rax, qword_ptr(rsi + 8))?;
        a.mov(rdx, qword_ptr(rsi + 16))?;
        a.cmp(rdx, 0)?;
        a.jne(not_qword)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.jmp(next)?;
        a.set_label(&mut not_qword)?;
        a.cmp(rdx, 1)?;
        a.jne(not_byte)?;
        a.mov(byte_ptr(rdi), al)?;
        a.jmp(next)?;
        a.set_label(&mut not_byte)?;
        a.mov(r8, rcx)?;
        a.mov(ecx, 8u32)?;
        a.rep().stosq()?;
        a.mov(rcx, r8)?;
        a.set_label(&mut next)?;
        a.add(rsi, 24)?;
        a.dec(rcx)?;
        a.jmp(each)?;
        a.set_label(&mut finished)?;
        a.test(r10, r10)?;
        a.jz(no_sync)?;
        a.mov(al, 0u32)?;
        a.out(u32::from(SYNC_PORT), al)?;
        a.set_label(&mut no_sync)?;
        a.lea(rax, qword_ptr(rbx + DONE))?;
        a.mov(qword_ptr(rax), r9)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
        exit_with(a, 3)
    })
}

fn gfn(f: usize) -> Gfn {
    Gfn((BASE >> 12) + f as u64)
}

/// What the scripts exercised, over all cases: the test fails if they missed a path.
#[derive(Debug, Default)]
struct Seen {
    coalesced: usize,
    exact_guest: usize,
    device: usize,
    relaxed_frames: usize,
    restores: usize,
    refusals: usize,
    demotions: u64,
    ring_cases: usize,
}

static SEEN: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);

/// What the current case did; and the trace of the last case that failed (the smallest one
/// proptest found), printed when the test fails.
static TRACE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static FAILED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Keeps the trace of a case that panics.
struct KeepTrace;

impl Drop for KeepTrace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let t = std::mem::take(&mut *TRACE.lock().unwrap_or_else(|e| e.into_inner()));
            *FAILED.lock().unwrap_or_else(|e| e.into_inner()) = t;
        }
    }
}

fn trace(s: String) {
    TRACE.lock().unwrap().push(s);
}

fn seen(f: impl FnOnce(&mut Seen)) {
    f(SEEN.lock().unwrap().get_or_insert_with(Seen::default));
}

/// The model, and the per-frame replay of delivered events.
struct Model {
    mem: Vec<u8>,
    tracks: [u32; NF],
    pins: [u32; NF],
    /// Contents at tracking plus events since, for tracked frames.
    replay: [Option<Vec<u8>>; NF],
    checkpoint: Option<Vec<u8>>,
    /// The exact notifier: its recorder and handle.
    exact: Option<(Arc<Recorder>, pagetrack::NotifierHandle)>,
    /// Events the coalesced recorder got while the exact one was registered.
    mirror: Vec<Ev>,
    /// Frames the guest stored to since the last sync: if relaxed, their changes may be
    /// pending (not delivered yet).
    lag: [bool; NF],
}

impl Model {
    fn must_be_strict(&self, f: usize) -> bool {
        self.tracks[f] == 0 || self.pins[f] > 0 || self.exact.is_some()
    }
}

struct Run<'a> {
    vm: &'a pagetrack_kvm::Vm,
    rec: &'a Recorder,
    m: Model,
}

impl Run<'_> {
    /// Applies the delivered events to the replays, then checks memory, replays and modes.
    fn check(&mut self, what: &str) {
        self.drain(what);
        self.verify(what);
    }

    /// Applies the delivered events to the replays of the frames tracked now.
    fn drain(&mut self, what: &str) {
        let ev = self.rec.take();
        for e in &ev {
            trace(format!(
                "  event {:#x} +{} {:?} coalesced {:?} old {:02x?} new {:02x?}",
                e.gpa - BASE,
                e.new.len(),
                e.source,
                e.coalesced,
                e.old.as_deref().unwrap_or_default(),
                e.new
            ));
            assert!(
                e.gpa >= BASE && e.gpa + e.new.len() as u64 <= BASE + LEN as u64,
                "{what}: event outside the frames: {e:?}"
            );
            let f = usize::try_from((e.gpa - BASE) / 4096).unwrap();
            let off = usize::try_from(e.gpa - BASE).unwrap() - f * 4096;
            let Some(r) = self.m.replay[f].as_mut() else {
                panic!("{what}: event for untracked frame {f}: {e:?}")
            };
            let old = e
                .old
                .as_ref()
                .expect("pagetrack-kvm always gives old bytes");
            assert_eq!(
                &r[off..off + e.new.len()],
                &old[..],
                "{what}: old bytes of {e:?} do not chain"
            );
            r[off..off + e.new.len()].copy_from_slice(&e.new);
            seen(|s| match e.source {
                _ if e.coalesced.is_some() => s.coalesced += 1,
                pagetrack::Source::Device => s.device += 1,
                _ => s.exact_guest += 1,
            });
        }
        if self.m.exact.is_some() {
            self.m.mirror.extend(ev);
        }
    }

    /// Checks memory, the replays and the modes against the model.
    fn verify(&mut self, what: &str) {
        let now = read(self.vm, BASE, LEN);
        if let Some(i) = (0..LEN).find(|&i| now[i] != self.m.mem[i]) {
            let j = (i..LEN).rfind(|&j| now[j] != self.m.mem[j]).unwrap_or(i);
            panic!(
                "{what}: memory differs from the model at offsets {i:#x}..={j:#x}: {:02x?} \
                 instead of {:02x?}",
                &now[i..=j.min(i + 15)],
                &self.m.mem[i..=j.min(i + 15)]
            );
        }
        for f in 0..NF {
            let pending = self.m.lag[f] && self.vm.is_relaxed(gfn(f));
            if let (Some(r), false) = (&self.m.replay[f], pending) {
                assert!(
                    r[..] == now[f * 4096..(f + 1) * 4096],
                    "{what}: frame {f}'s events do not replay to its memory"
                );
            }
            if self.vm.is_relaxed(gfn(f)) {
                seen(|s| s.relaxed_frames += 1);
            }
            if self.m.must_be_strict(f) {
                assert!(
                    !self.vm.is_relaxed(gfn(f)),
                    "{what}: frame {f} must be strict"
                );
            }
        }
    }

    /// Checks the exact notifier's events: the coalesced recorder's, all exact.
    fn check_exact(&mut self, what: &str) {
        let Some((ex, _)) = &self.m.exact else {
            return;
        };
        let got = ex.take();
        // Two vCPUs deliver at the same time: the order is kept per frame, not across them.
        let by_frame = |v: &[Ev]| {
            let mut v = v.to_vec();
            v.sort_by_key(|e| e.gpa >> 12);
            v
        };
        assert_eq!(
            by_frame(&got),
            by_frame(&self.m.mirror),
            "{what}: the two notifiers saw different events"
        );
        assert!(
            got.iter().all(|e| e.coalesced.is_none()),
            "{what}: coalesced event to an exact notifier: {got:?}"
        );
        self.m.mirror.clear();
    }

    fn host(&mut self, op: Host) {
        let what = format!("{op:?}");
        let relaxed: Vec<bool> = (0..NF).map(|f| self.vm.is_relaxed(gfn(f))).collect();
        trace(format!("host {what} (relaxed {relaxed:?})"));
        let vm = self.vm;
        match op {
            Host::Device { off, len, byte } => {
                // A device write into a relaxed frame syncs every relaxed frame first.
                if (off / 4096..=(off + len - 1) / 4096).any(|f| vm.is_relaxed(gfn(f))) {
                    self.m.lag = [false; NF];
                }
                vm.memory()
                    .write_slice(&vec![byte; len], GuestAddress(BASE + off as u64))
                    .unwrap();
                self.m.mem[off..off + len].fill(byte);
            }
            Host::Track(f) => {
                vm.tracker().add_gfn(gfn(f)).unwrap();
                self.drain(&what);
                self.m.tracks[f] += 1;
                if self.m.tracks[f] == 1 {
                    self.m.replay[f] = Some(self.m.mem[f * 4096..(f + 1) * 4096].to_vec());
                }
            }
            Host::Untrack(f) => {
                let r = vm.tracker().remove_gfn(gfn(f));
                if self.m.tracks[f] == 0 {
                    assert!(r.is_err(), "{what}: untracked an untracked frame");
                    seen(|s| s.refusals += 1);
                } else {
                    r.unwrap();
                    self.drain(&what);
                    self.m.tracks[f] -= 1;
                    if self.m.tracks[f] == 0 {
                        // Its pending changes came before the untrack returned.
                        let r = self.m.replay[f].take().unwrap();
                        assert!(
                            r[..] == self.m.mem[f * 4096..(f + 1) * 4096],
                            "{what}: the untracked frame's events do not replay to its memory"
                        );
                        self.m.lag[f] = false;
                    }
                }
            }
            Host::Pin(f) => {
                vm.pin_strict(gfn(f)).unwrap();
                self.m.pins[f] += 1;
                self.m.lag[f] = false;
            }
            Host::Unpin(f) => {
                let r = vm.unpin_strict(gfn(f));
                if self.m.pins[f] == 0 {
                    assert!(
                        matches!(r, Err(Error::NotPinned { .. })),
                        "{what}: unpinned an unpinned frame: {r:?}"
                    );
                    seen(|s| s.refusals += 1);
                } else {
                    r.unwrap();
                    self.m.pins[f] -= 1;
                }
            }
            Host::RegisterExact => {
                if self.m.exact.is_none() {
                    self.check(&what);
                    let ex = Arc::new(Recorder::default());
                    let h = vm
                        .tracker()
                        .register(
                            ex.clone(),
                            RegisterOptions::new(NotifierClass::Ordinary)
                                .with_delivery(Delivery::EachWrite),
                        )
                        .unwrap();
                    // Registering demoted every relaxed frame after a final sync, whose
                    // events went to the notifiers registered before only.
                    self.m.lag = [false; NF];
                    self.drain(&what);
                    self.m.exact = Some((ex, h));
                }
            }
            Host::UnregisterExact => {
                if self.m.exact.is_some() {
                    self.check(&what);
                    self.check_exact(&what);
                    self.m.exact = None; // drops the handle: unregisters
                }
            }
            Host::Sync => {
                vm.sync().unwrap();
                self.m.lag = [false; NF];
            }
            Host::Relax(f) => {
                let n = vm.relax(&[gfn(f)]).unwrap();
                assert!(
                    n == 0 || !self.m.must_be_strict(f),
                    "{what}: relaxed a frame that must stay strict"
                );
            }
            Host::MakeStrict(f) => {
                vm.make_strict(&[gfn(f)]).unwrap();
                assert!(!vm.is_relaxed(gfn(f)), "{what}: still relaxed");
                self.m.lag[f] = false;
            }
            Host::Checkpoint => {
                vm.checkpoint().unwrap();
                self.m.checkpoint = Some(self.m.mem.clone());
            }
            Host::Restore => {
                let r = vm.restore();
                match &self.m.checkpoint {
                    None => assert!(
                        matches!(r, Err(Error::NoCheckpoint)),
                        "{what}: restored without a checkpoint: {r:?}"
                    ),
                    Some(image) => {
                        r.unwrap();
                        seen(|s| s.restores += 1);
                        // A restore syncs first; then it writes back.
                        self.m.lag = [false; NF];
                        self.m.mem = image.clone();
                    }
                }
            }
        }
        self.check(&what);
        self.check_exact(&what);
    }
}

/// Ends the guests' runs when dropped (also when the test thread panics, so a failing case
/// ends at once instead of at the vCPU watchdog).
struct EndGuest<'a>(&'a pagetrack_kvm::Vm, usize);

impl Drop for EndGuest<'_> {
    fn drop(&mut self) {
        for i in 0..self.1 {
            let _ = self
                .0
                .untracked_memory()
                .write_obj(u64::MAX, GuestAddress(mailbox(i) + 8));
        }
    }
}

impl Run<'_> {
    /// Hands `step`'s batches of stores to the vCPUs as batch `seq` and waits until they ran.
    fn batch(&mut self, step: &Step, seq: u64, vcpus: &[std::thread::ScopedJoinHandle<'_, u8>]) {
        trace(format!("batch {seq}: {:?} exit {}", step.stores, step.exit));
        let mem = self.vm.untracked_memory();
        for (i, stores) in step.stores.iter().enumerate() {
            let mut batch = vec![seq, stores.len() as u64, u64::from(step.exit)];
            for s in stores {
                let (off, val, op) = s.op();
                batch.extend([BASE + off as u64, val, op]);
                s.apply(&mut self.m.mem);
                let (first, len) = match s {
                    Store::Qword { .. } => (off, 8),
                    Store::Byte { .. } => (off, 1),
                    Store::RepStosq { .. } => (off, 64),
                };
                for f in first / 4096..=(first + len - 1) / 4096 {
                    self.m.lag[f] = true;
                }
            }
            // The sequence number last: the guest starts when it changes.
            let bytes: Vec<u8> = batch.iter().flat_map(|w| w.to_le_bytes()).collect();
            mem.write_slice(&bytes[8..], GuestAddress(mailbox(i) + 8))
                .unwrap();
            mem.write_obj(seq, GuestAddress(mailbox(i))).unwrap();
        }
        let deadline = std::time::Instant::now() + TIMEOUT;
        for (i, vcpu) in vcpus.iter().enumerate() {
            while mem
                .read_obj::<u64>(GuestAddress(mailbox(i) + DONE))
                .unwrap()
                != seq
            {
                assert!(
                    !vcpu.is_finished(),
                    "vCPU {i}'s thread ended before batch {seq}"
                );
                assert!(
                    std::time::Instant::now() < deadline,
                    "vCPU {i}'s batch {seq} did not finish"
                );
                std::thread::yield_now();
            }
        }
        drop(mem);
        let what = if step.exit {
            "a batch ending with a sync point"
        } else {
            "a batch without a sync point"
        };
        if step.exit {
            self.m.lag = [false; NF];
        }
        self.check(what);
        self.check_exact(what);
        for op in &step.host {
            self.host(*op);
        }
    }
}

fn run_script(always: bool, nvcpus: usize, harvest: Harvest, steps: &[Step]) {
    TRACE.lock().unwrap().clear();
    let _keep = KeepTrace;
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    // The ring where this KVM has one (the bitmaps otherwise: the case still runs).
    let ring = matches!(harvest, Harvest::Ring) && ring_offered(&kvm);
    trace(format!(
        "always {always}, {nvcpus} vCPUs, {harvest:?} harvest"
    ));
    let mode = if always {
        RelaxedMode::Always
    } else {
        RelaxedMode::Auto
    };
    let mut policy = RelaxedConfig::new(mode);
    // Demote after 2 clean syncs, so cold demotions happen inside a script too; no
    // periodic sync, so stores stay pending until a sync point the script chooses.
    policy.demote_after_syncs = 2;
    policy.demote_window = std::time::Duration::ZERO;
    policy.period = std::time::Duration::from_secs(3600);
    let mut config = VmConfig::default()
        .with_ram(RAM)
        .with_dirty_log()
        .with_relaxed(policy);
    if ring {
        // Small rings, so ring-full exits happen too.
        config = config.with_dirty_ring(pagetrack_kvm::DirtyRing::entries(256));
        seen(|s| s.ring_cases += 1);
    }
    if matches!(harvest, Harvest::Plain) {
        config = config.with_dirty_protect(pagetrack_kvm::DirtyProtect::Plain);
    }
    let mut g = boot_with(
        kvm,
        config,
        RAM,
        u32::try_from(nvcpus).unwrap(),
        &interpreter(),
    );
    for (i, v) in g.vcpus.iter().enumerate() {
        set_regs(v, |r| r.rbx = mailbox(i));
    }
    let (rec, _h) = coalesced_recorder(&g.vm);
    let mut run = Run {
        vm: &g.vm,
        rec: &rec,
        m: Model {
            mem: read(&g.vm, BASE, LEN),
            tracks: [0; NF],
            pins: [0; NF],
            replay: Default::default(),
            checkpoint: None,
            exact: None,
            mirror: Vec::new(),
            lag: [false; NF],
        },
    };
    let (vm, layout) = (&g.vm, &g.layout);
    std::thread::scope(|sc| {
        let guests: Vec<_> = g
            .vcpus
            .iter_mut()
            .map(|vcpu| sc.spawn(move || run_syncing(vm, layout, vcpu, |_| {})))
            .collect();
        {
            let _end = EndGuest(vm, nvcpus);
            for (i, step) in steps.iter().enumerate() {
                run.batch(step, i as u64 + 1, &guests);
            }
        }
        for guest in guests {
            assert_eq!(guest.join().unwrap(), 3);
        }
    });
    vm.sync().unwrap();
    run.m.lag = [false; NF];
    run.check("the end");
    run.check_exact("the end");
    seen(|s| s.demotions += vm.stats().relaxed.demotions);
}

#[test]
fn relaxed_mode_state_machine_matches_a_model_of_memory_and_modes() {
    let _kvm = kvm_or_skip!();
    let mut runner = TestRunner::new(Config {
        cases: 384,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    let result = runner.run(&script(), |(always, vcpus, ring, steps)| {
        run_script(always, vcpus, ring, &steps);
        Ok(())
    });
    if let Err(e) = result {
        eprintln!(
            "the smallest failing case ran:\n{}",
            FAILED.lock().unwrap().join("\n")
        );
        panic!("{e}");
    }
    let s = SEEN.lock().unwrap().take().unwrap_or_default();
    println!("modes: the scripts exercised {s:?}");
    assert!(
        s.coalesced > 0
            && s.exact_guest > 0
            && s.device > 0
            && s.relaxed_frames > 0
            && s.restores > 0
            && s.refusals > 0
            && s.demotions > 0,
        "the scripts missed a path: {s:?}"
    );
    assert!(
        s.ring_cases > 0 || !ring_offered(&kvm_ioctls::Kvm::new().unwrap()),
        "no case ran on the dirty ring this KVM offers"
    );
}
