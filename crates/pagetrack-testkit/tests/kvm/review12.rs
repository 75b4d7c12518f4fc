//! Adversarial review of relaxed mode (issue 12): a hostile guest racing syncs, promotions and
//! demotions; notifiers that write memory or register from the side. The oracle is the replay
//! one (initial memory + every event in order = final memory, each event's old bytes equal to
//! the replay so far, so a duplicated or invented event fails too), and a hang guard on every
//! scenario that could deadlock: the scenario runs on its own thread and the test fails if it
//! does not finish within [`TIMEOUT`] (the stuck threads are left behind, the VM with them).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use pagetrack::{Delivery, Gfn, NotifierClass, RegisterOptions, TrackNotifier, WriteEvent};
use pagetrack_kvm::{RelaxedConfig, RelaxedMode, TrackedMemory, Vm, VmConfig};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::{Bytes, GuestAddress};

use crate::common::*;

pub(crate) const RAM: u64 = 16 << 20;
/// 64 frames above [`T`]: the same frame-lock stripe as `T` (`store.rs`, 64 stripes).
pub(crate) const SAME_STRIPE: u64 = T + 64 * 0x1000;

/// Runs `scenario` on its own thread; fails the test if it does not return within
/// [`TIMEOUT`] (a deadlock: every thread of it blocked), or if it panics.
pub(crate) fn guarded<R: Send + 'static>(
    what: &str,
    scenario: impl FnOnce() -> R + Send + 'static,
) -> R {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = scenario();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no progress within {TIMEOUT:?} (deadlock)")
        }
    }
}

use crate::relaxed::spin_store;

pub(crate) fn set_regs(vcpu: &pagetrack_kvm::Vcpu, f: impl FnOnce(&mut kvm_bindings::kvm_regs)) {
    let mut regs = vcpu.fd().get_regs().unwrap();
    f(&mut regs);
    vcpu.fd().set_regs(&regs).unwrap();
}

pub(crate) fn coalesced_recorder(vm: &Vm) -> (Arc<Recorder>, pagetrack::NotifierHandle) {
    let rec = Arc::new(Recorder::default());
    let h = vm
        .tracker()
        .register(
            rec.clone(),
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
        )
        .unwrap();
    (rec, h)
}

pub(crate) fn word(vm: &Vm, gpa: u64) -> u64 {
    vm.untracked_memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .unwrap()
}

/// Waits (a hang guard, not a timing bound) until `cond`.
pub(crate) fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::yield_now();
    }
}

/// Spawns a thread per vCPU running it to the guest's exit.
pub(crate) fn spawn_vcpus(g: &mut Guest) -> Vec<std::thread::JoinHandle<u8>> {
    let layout = g.layout.clone();
    g.vcpus
        .drain(..)
        .map(|mut v| {
            let (vm, layout) = (g.vm.clone(), layout.clone());
            std::thread::spawn(move || run_to_exit(&vm, &layout, &mut v, TIMEOUT))
        })
        .collect()
}

/// vCPU 0 keeps trapping on a strict frame of the same frame-lock stripe as a frame that
/// vCPU 1's stores promote (auto, again after every `make_strict`). A promotion holds the
/// frames' stripe locks while it pauses, and the pause waits for vCPU 0's continuation (its
/// trapped store): vCPU 0, handling that store, waited for the same stripe lock.
#[test]
fn auto_promotions_while_another_vcpu_traps_on_the_same_lock_stripe_do_not_deadlock() {
    let kvm = kvm_or_skip!();
    let mut policy = RelaxedConfig::new(RelaxedMode::Auto);
    policy.group_frames = 1;
    let config = VmConfig::default().with_ram(RAM).with_relaxed(policy);
    let mut g = boot_with(kvm, config, RAM, 2, &spin_store());
    guarded("promotions against a trapping vCPU", move || {
        let (rec, _h) = coalesced_recorder(&g.vm);
        let (p, f) = (Gfn(T >> 12), Gfn(SAME_STRIPE >> 12));
        g.vm.pin_strict(f).unwrap();
        let len = 65 * 0x1000;
        let initial = read(&g.vm, T, len);
        g.vm.tracker().add_gfn(p).unwrap();
        g.vm.tracker().add_gfn(f).unwrap();
        for (i, gpa) in [SAME_STRIPE, T].into_iter().enumerate() {
            set_regs(&g.vcpus[i], |r| {
                r.rdi = gpa;
                r.rsi = U;
            });
        }
        let threads = spawn_vcpus(&mut g);
        for k in 0..100 {
            wait_for(&format!("promotion {k}"), || g.vm.is_relaxed(p));
            g.vm.make_strict(&[p]).unwrap();
        }
        g.vm.untracked_memory()
            .write_obj(1u64, GuestAddress(U))
            .unwrap();
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
        g.vm.sync().unwrap();
        let ev = rec.take();
        replay(T, &initial, &ev, &read(&g.vm, T, len));
        assert!(g.vm.stats().relaxed.promotions >= 100);
        assert!(
            ev.iter()
                .filter(|e| e.gpa >> 12 == f.0)
                .all(|e| e.coalesced.is_none())
        );
        g.vm.unpin_strict(f).unwrap();
    });
}

/// Whether the thread `tid` of this process sleeps (state `S`: blocked on a lock here).
pub(crate) fn sleeping(tid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('S')))
        .unwrap_or(false)
}

/// Records every event. At the first coalesced event it gets on the thread that armed it
/// (inside that sync's delivery, the sync lock held), it lets a device thread start a write
/// into a relaxed frame, waits until that thread blocks (on the sync lock), then itself
/// writes a strict frame of the same frame-lock stripe through [`TrackedMemory`].
#[derive(Debug, Default)]
struct Answerer {
    rec: Recorder,
    mem: Mutex<Option<TrackedMemory>>,
    at: u64,
    armed: Mutex<Option<std::thread::ThreadId>>,
    go: std::sync::atomic::AtomicBool,
    device_tid: Mutex<Option<String>>,
}

impl TrackNotifier for Answerer {
    fn track_write(&self, e: &WriteEvent<'_>) {
        self.rec.track_write(e);
        let me = std::thread::current().id();
        if e.coalesced.is_none() || *self.armed.lock().unwrap() != Some(me) {
            return;
        }
        *self.armed.lock().unwrap() = None;
        self.go.store(true, std::sync::atomic::Ordering::Release);
        // A hang guard: without it the answer below comes anyway, later.
        let deadline = std::time::Instant::now() + TIMEOUT / 4;
        while std::time::Instant::now() < deadline
            && !self
                .device_tid
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(sleeping)
        {
            std::thread::yield_now();
        }
        let mem = self.mem.lock().unwrap().clone();
        if let Some(mem) = mem {
            mem.write_obj(0x5a5a_u64, GuestAddress(self.at)).unwrap();
        }
    }
}

/// A device thread writes a relaxed frame while a sync delivers to a notifier that writes
/// another frame of the same frame-lock stripe: the device write took the frame lock, then
/// waited for the sync lock (its sync before the write); the delivering thread held the sync
/// lock and waited for the frame lock.
#[test]
fn a_notifier_writing_memory_inside_a_coalesced_delivery_does_not_deadlock_a_device_write() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        1,
        &spin_store(),
    );
    guarded("a device write against an answering notifier", move || {
        let n = Arc::new(Answerer {
            at: SAME_STRIPE,
            ..Answerer::default()
        });
        let _h = g
            .vm
            .tracker()
            .register(
                n.clone(),
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced),
            )
            .unwrap();
        *n.mem.lock().unwrap() = Some(g.vm.memory());
        let (r, q) = (Gfn(T >> 12), Gfn(SAME_STRIPE >> 12));
        g.vm.pin_strict(q).unwrap();
        let len = 65 * 0x1000;
        let initial = read(&g.vm, T, len);
        g.vm.tracker().add_gfn(r).unwrap();
        g.vm.tracker().add_gfn(q).unwrap();
        assert!(g.vm.is_relaxed(r) && !g.vm.is_relaxed(q));
        set_regs(&g.vcpus[0], |regs| {
            regs.rdi = T;
            regs.rsi = U;
        });
        let threads = spawn_vcpus(&mut g);
        wait_for("the guest runs", || word(&g.vm, T) != 0);
        let (vm, n2) = (g.vm.clone(), n.clone());
        let device = std::thread::spawn(move || {
            let me = std::fs::read_link("/proc/thread-self").unwrap();
            let tid = me.file_name().unwrap().to_string_lossy().into_owned();
            *n2.device_tid.lock().unwrap() = Some(tid);
            wait_for("the notifier's go", || {
                n2.go.load(std::sync::atomic::Ordering::Acquire)
            });
            vm.memory()
                .write_obj(0xd0d0_u64, GuestAddress(T + 0x800))
                .unwrap();
        });
        wait_for("the device thread's id", || {
            n.device_tid.lock().unwrap().is_some()
        });
        // The guest keeps the frame dirty: a sync soon delivers a coalesced event.
        *n.armed.lock().unwrap() = Some(std::thread::current().id());
        wait_for("a sync with a coalesced event", || {
            g.vm.sync().unwrap();
            n.go.load(std::sync::atomic::Ordering::Acquire)
        });
        device.join().unwrap();
        g.vm.untracked_memory()
            .write_obj(1u64, GuestAddress(U))
            .unwrap();
        for t in threads {
            assert_eq!(t.join().unwrap(), 3);
        }
        g.vm.sync().unwrap();
        n.mem.lock().unwrap().take();
        let ev = n.rec.take();
        replay(T, &initial, &ev, &read(&g.vm, T, len));
        assert_eq!(word(&g.vm, SAME_STRIPE), 0x5a5a);
        assert!(
            ev.iter()
                .any(|e| e.gpa == T + 0x800 && e.source == pagetrack::Source::Device)
        );
        g.vm.unpin_strict(q).unwrap();
    });
}

/// A notifier that needs exact events registers while a guest spins on a relaxed frame
/// without ever exiting to the VMM: the frame returns to strict mode at the next periodic
/// sync (the stall monitor's kicks reach the vCPU), not only at an exit that never comes.
#[test]
fn an_exact_notifier_registered_while_the_guest_never_exits_gets_exact_events() {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        1,
        &spin_store(),
    );
    let (_relaxed, _h1) = coalesced_recorder(&g.vm);
    let r = Gfn(T >> 12);
    g.vm.tracker().add_gfn(r).unwrap();
    assert!(g.vm.is_relaxed(r));
    set_regs(&g.vcpus[0], |regs| {
        regs.rdi = T;
        regs.rsi = U;
    });
    let threads = spawn_vcpus(&mut g);
    wait_for("the guest runs", || word(&g.vm, T) != 0);
    let (exact, _h2) = recorder(&g.vm);
    let got_exact = || {
        exact
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.coalesced.is_none())
    };
    let deadline = std::time::Instant::now() + TIMEOUT / 2;
    while !got_exact() && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    let relaxed_still = g.vm.is_relaxed(r);
    g.vm.untracked_memory()
        .write_obj(1u64, GuestAddress(U))
        .unwrap();
    for t in threads {
        assert_eq!(t.join().unwrap(), 3);
    }
    assert!(
        !relaxed_still && got_exact(),
        "the frame stayed relaxed under a notifier that needs exact events"
    );
    let ev = exact.take();
    let first = ev.iter().position(|e| e.coalesced.is_none()).unwrap();
    assert!(
        ev[first..].iter().all(|e| e.coalesced.is_none()),
        "once strict, only exact events"
    );
}

/// Guest: stores straddling a strict and a relaxed frame both ways (frames T, T + 0x2000
/// strict, T + 0x1000 relaxed): qwords, `rep movsb` and `rep stosb` of 64 bytes, then
/// (`rdx` non-zero) a `lock xadd` straddling strict → relaxed.
pub(crate) fn straddles() -> Vec<u8> {
    assemble(ENTRY, |a| {
        a.mov(r10, rdx)?;
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.mov(r8, T + 0xffc)?;
        a.mov(qword_ptr(r8), rax)?;
        a.mov(r8, T + 0x1ffc)?;
        a.not(rax)?;
        a.mov(qword_ptr(r8), rax)?;
        a.mov(rsi, U)?;
        a.mov(rdi, T + 0xfe0)?;
        a.mov(ecx, 64u32)?;
        a.rep().movsb()?;
        a.mov(rdi, T + 0x1fe0)?;
        a.mov(eax, 0x77u32)?;
        a.mov(ecx, 64u32)?;
        a.rep().stosb()?;
        let mut done = a.create_label();
        a.test(r10, r10)?;
        a.jz(done)?;
        a.mov(r8, T + 0xffc)?;
        a.mov(rdx, 0x0101_0101_0101_0101u64)?;
        a.lock().xadd(qword_ptr(r8), rdx)?;
        a.set_label(&mut done)?;
        exit_with(a, 3)
    })
}

fn straddle_run(locked: bool) {
    let kvm = kvm_or_skip!();
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        1,
        &straddles(),
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    g.vm.untracked_memory()
        .write_slice(
            &(0..64u8).map(|i| 0x80 | i).collect::<Vec<_>>(),
            GuestAddress(U),
        )
        .unwrap();
    let (a, b, c) = (Gfn(T >> 12), Gfn((T >> 12) + 1), Gfn((T >> 12) + 2));
    g.vm.pin_strict(a).unwrap();
    g.vm.pin_strict(c).unwrap();
    let initial = read(&g.vm, T, 0x3000);
    g.vm.tracker()
        .add_range(pagetrack::AsId::NORMAL, a, 3)
        .unwrap();
    assert!(!g.vm.is_relaxed(a) && g.vm.is_relaxed(b) && !g.vm.is_relaxed(c));
    set_regs(&g.vcpus[0], |r| r.rdx = u64::from(locked));
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    g.vm.sync().unwrap();
    let ev = rec.take();
    let fin = read(&g.vm, T, 0x3000);
    replay(T, &initial, &ev, &fin);
    // Strict frames get exact events only; the relaxed half of a locked read-modify-write
    // that pagetrack re-executes is exact too (its shadow takes the bytes: no duplicate).
    for e in ev.iter().filter(|e| e.gpa >> 12 != b.0) {
        assert!(
            e.coalesced.is_none(),
            "a coalesced event on a strict frame: {e:?}"
        );
    }
    let q = |at: usize| u64::from_le_bytes(fin[at..at + 8].try_into().unwrap());
    // What the CPU would have left.
    assert_eq!(q(0x1ffc), 0x7777_7777_7777_7777);
    let mut copied: Vec<u8> = (0..64u8).map(|i| 0x80 | i).collect();
    if locked {
        let at = 0xffc - 0xfe0;
        let v = u64::from_le_bytes(copied[at..at + 8].try_into().unwrap());
        copied[at..at + 8].copy_from_slice(&v.wrapping_add(0x0101_0101_0101_0101).to_le_bytes());
    }
    assert_eq!(&fin[0xfe0..0x1020], &copied[..]);
}

#[test]
fn stores_straddling_a_strict_and_a_relaxed_frame_replay_exactly() {
    straddle_run(false);
}

/// A word changed and changed back between two syncs: no coalesced event shows it (the
/// documented loss of intermediate values), the lasting change next to it is delivered, and
/// the replay holds.
#[test]
fn a_change_undone_before_the_sync_yields_no_event_and_the_replay_holds() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(r8, T)?;
        a.mov(qword_ptr(r8), 0x41)?;
        a.mov(qword_ptr(r8 + 16), 0x42)?;
        a.mov(qword_ptr(r8), 0)?;
        exit_with(a, 3)
    });
    let mut g = boot_with(
        kvm,
        VmConfig::default()
            .with_ram(RAM)
            .with_relaxed(RelaxedConfig::new(RelaxedMode::Always)),
        RAM,
        1,
        &code,
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    g.vm.untracked_memory()
        .write_slice(&[0u8; 0x1000], GuestAddress(T))
        .unwrap();
    let initial = read(&g.vm, T, 0x1000);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)));
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    g.vm.sync().unwrap();
    let ev = rec.take();
    replay(T, &initial, &ev, &read(&g.vm, T, 0x1000));
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].gpa, &ev[0].new[..], ev[0].coalesced.is_some()),
        (T + 16, &0x42u64.to_le_bytes()[..], true)
    );
}

/// The budget runs out: with `max_frames = 2` only two of four tracked frames run relaxed,
/// also after promotions are asked for again (`relax`, trapped stores under `Always`); the
/// others stay strict with one exact event per store, and the replay holds.
#[test]
fn the_relaxed_budget_keeps_frames_beyond_it_strict_and_exact() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.xor(r8, r8)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        for k in 0..4u64 {
            a.mov(qword_ptr(rdi + 0x1000 * k + 0x10), r8)?;
        }
        a.inc(r8)?;
        a.cmp(r8, 200)?;
        a.jne(top)?;
        exit_with(a, 3)
    });
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.max_frames = 2;
    let mut g = boot_with(
        kvm,
        VmConfig::default().with_ram(RAM).with_relaxed(policy),
        RAM,
        1,
        &code,
    );
    let (rec, _h) = coalesced_recorder(&g.vm);
    let initial = read(&g.vm, T, 0x4000);
    let frames: Vec<Gfn> = (0..4).map(|k| Gfn((T >> 12) + k)).collect();
    g.vm.tracker()
        .add_range(pagetrack::AsId::NORMAL, frames[0], 4)
        .unwrap();
    assert_eq!(g.vm.relax(&frames).unwrap(), 0, "the budget is spent");
    set_regs(&g.vcpus[0], |r| r.rdi = T);
    assert_eq!(run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT), 3);
    let relaxed: Vec<bool> = frames.iter().map(|&f| g.vm.is_relaxed(f)).collect();
    assert_eq!(relaxed.iter().filter(|&&r| r).count(), 2, "{relaxed:?}");
    assert_eq!(g.vm.stats().relaxed.relaxed_now, 2);
    let ev = rec.take();
    replay(T, &initial, &ev, &read(&g.vm, T, 0x4000));
    for (f, &r) in frames.iter().zip(&relaxed) {
        let mine: Vec<&Ev> = ev.iter().filter(|e| e.gpa >> 12 == f.0).collect();
        if r {
            assert!(mine.iter().all(|e| e.coalesced.is_some()));
        } else {
            assert_eq!(mine.len(), 200, "strict: one event per store");
            assert!(mine.iter().all(|e| e.coalesced.is_none()));
        }
    }
}

/// U1: a coalesced notifier that unregisters while a guest keeps storing to a relaxed frame
/// (no exit, no periodic sync due) gets the changes made before its unregistration began
/// (`Enforcement::before_unregister`); they went to nobody before.
#[test]
fn unregistering_a_coalesced_notifier_delivers_its_pending_changes_first() {
    let kvm = kvm_or_skip!();
    let mut policy = RelaxedConfig::new(RelaxedMode::Always);
    policy.period = std::time::Duration::from_secs(3600);
    let mut g = boot_with(
        kvm,
        VmConfig::default().with_ram(RAM).with_relaxed(policy),
        RAM,
        1,
        &spin_store(),
    );
    let (rec, h) = coalesced_recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    assert!(g.vm.is_relaxed(Gfn(T >> 12)));
    set_regs(&g.vcpus[0], |r| {
        r.rdi = T;
        r.rsi = U;
    });
    let threads = spawn_vcpus(&mut g);
    wait_for("the guest runs", || word(&g.vm, T) > 1000);
    let before = word(&g.vm, T);
    drop(h);
    let ev = rec.take();
    g.vm.untracked_memory()
        .write_obj(1u64, GuestAddress(U))
        .unwrap();
    for t in threads {
        assert_eq!(t.join().unwrap(), 3);
    }
    let last = ev
        .iter()
        .rev()
        .find(|e| e.gpa <= T && T < e.gpa + e.new.len() as u64)
        .unwrap_or_else(|| {
            panic!("no pending change delivered before unregister returned: {ev:?}")
        });
    assert!(last.coalesced.is_some(), "{last:?}");
    let at = usize::try_from(T - last.gpa).unwrap();
    let value = u64::from_le_bytes(last.new[at..at + 8].try_into().unwrap());
    assert!(
        value >= before,
        "the last change delivered ({value}) is older than the memory before unregister ({before})"
    );
}
