//! Backend measurements on this host's KVM: trapped-write round trip against a bare port-I/O
//! exit, untracked-store overhead, track/untrack latency, refault cost after a track, and a
//! 1,000-frame batch. Used by `pagetrack bench`; each figure is a median over repeated runs in
//! one process, so ratios compare like with like.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iced_x86::code_asm::{CodeAssembler, al, eax, qword_ptr, r8, rax, rcx, rdi, rdx};
use pagetrack::{AsId, Delivery, Gfn, NotifierClass, RegisterOptions, TrackNotifier, WriteEvent};
use pagetrack_kvm::{
    DirtyProtect, Exit, Invalidate, RelaxedConfig, RelaxedMode, Vcpu, Vm, VmConfig,
};
use vm_memory::{Bytes, GuestAddress};

use anyhow::{Context, Result, anyhow};
use pagetrack_vmm::x86::{self, GUEST_EXIT_PORT, LONG_MODE_RFLAGS, LongModeLayout};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BenchConfig {
    /// RAM of the large guest (track/untrack latency and refault), bytes.
    pub ram: u64,
    /// Exits per round-trip measurement.
    pub exits: u64,
    /// Repetitions of each measurement (the median is reported).
    pub reps: usize,
    /// Measure relaxed mode only (its rows, nothing else).
    pub relaxed_only: bool,
}

impl Default for BenchConfig {
    fn default() -> BenchConfig {
        BenchConfig {
            ram: 1 << 30,
            exits: 20_000,
            reps: 5,
            relaxed_only: false,
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct BenchRow {
    /// Stable key (for JSON).
    pub key: std::borrow::Cow<'static, str>,
    /// What it is, in words.
    pub what: String,
    /// The median.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
}

/// Everything measured.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct BenchReport {
    /// The figures in order.
    pub rows: Vec<BenchRow>,
}

impl BenchReport {
    fn push(
        &mut self,
        key: impl Into<std::borrow::Cow<'static, str>>,
        what: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) {
        self.rows.push(BenchRow {
            key: key.into(),
            what: what.into(),
            value,
            unit,
        });
    }
}

const CODE: u64 = 0x1000;
const TRACKED: u64 = 0x10_0000;
const BUF: u64 = 0x40_0000;
const BUF_BYTES: u64 = 4 << 20;
const PIO_PORT: u32 = 0x10;

/// Guest entry points, one program each, all in the code page.
struct Programs {
    pio: u64,
    store: u64,
    sweep: u64,
    touch: u64,
    stamp: u64,
    remap: u64,
    xadd: u64,
    spin: u64,
    stos: u64,
    bytes: Vec<u8>,
}

/// A 4 KiB page table for [PT_VA, PT_VA + 2 MiB), used by the page-table store measurement.
const PT: u64 = 0x2_0000;
const PT_VA: u64 = 0x200_0000;

fn asm_err(source: iced_x86::IcedError) -> anyhow::Error {
    anyhow::Error::new(source).context("assembling the benchmark programs")
}

fn programs() -> Result<Programs> {
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut pio = a.create_label();
    let mut store = a.create_label();
    let mut sweep = a.create_label();
    let mut touch = a.create_label();
    let mut stamp = a.create_label();
    let mut remap = a.create_label();
    let mut xadd = a.create_label();
    let mut spin = a.create_label();
    let mut stos = a.create_label();
    let mut build = || -> std::result::Result<(), iced_x86::IcedError> {
        // pio: rcx times `out PIO_PORT, al` (a bare exit each), then exit.
        a.set_label(&mut pio)?;
        a.out(PIO_PORT, al)?; // bare port-I/O exit
        a.dec(rcx)?;
        a.jnz(pio)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?; // done
        // store: rcx times `mov [rdi], rcx` (a trapped store each when [rdi] is tracked).
        a.set_label(&mut store)?;
        a.mov(qword_ptr(rdi), rcx)?; // 8-byte store
        a.dec(rcx)?;
        a.jnz(store)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // sweep: rcx 8-byte stores cycling over the 4 MiB buffer at rdi (untracked).
        a.set_label(&mut sweep)?;
        a.xor(rax, rax)?; // offset
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.mov(qword_ptr(rdi + rax), rcx)?; // store
        a.add(rax, 8)?;
        a.and(rax, i32::try_from(BUF_BYTES - 1).unwrap_or(i32::MAX))?; // wrap inside the buffer
        a.dec(rcx)?;
        a.jnz(l)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // touch: one store per 4 KiB page of [rdi, r8).
        a.set_label(&mut touch)?;
        a.mov(qword_ptr(rdi), rdi)?; // touch the page
        a.add(rdi, 4096)?;
        a.cmp(rdi, r8)?;
        a.jb(touch)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // stamp: `mov [rdi], rax` once per 4 KiB page of [rdi, r8) (a new value each run).
        a.set_label(&mut stamp)?;
        a.mov(qword_ptr(rdi), rax)?; // one store per page
        a.add(rdi, 4096)?;
        a.cmp(rdi, r8)?;
        a.jb(stamp)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // remap: rcx times, point PTE 5 at the other of two pages (rax ^= r8) and read through
        // it: a present-to-other store in a tracked page table, then a use of the mapping.
        a.set_label(&mut remap)?;
        a.mov(qword_ptr(PT + 5 * 8), rax)?; // PTE 5 := next page
        a.xor(rax, r8)?;
        a.mov(rdx, qword_ptr(PT_VA + 5 * 4096))?; // use the new mapping
        a.dec(rcx)?;
        a.jnz(remap)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // xadd: rcx times `lock xadd [rdi], rax` with rax = 1 each time.
        a.set_label(&mut xadd)?;
        a.mov(eax, 1)?;
        a.lock().xadd(qword_ptr(rdi), rax)?; // atomic fetch-and-add
        a.dec(rcx)?;
        a.jnz(xadd)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // stos: `rep stosb` of rcx bytes at rdi, then exit.
        a.set_label(&mut stos)?;
        a.rep().stosb()?;
        a.out(u32::from(GUEST_EXIT_PORT), al)?;
        // spin: rcx iterations of nothing (no exit), then exit.
        a.set_label(&mut spin)?;
        a.dec(rcx)?;
        a.jnz(spin)?;
        a.out(u32::from(GUEST_EXIT_PORT), al)
    };
    build().map_err(asm_err)?;
    let res = a
        .assemble_options(
            CODE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(asm_err)?;
    let at = |l: &iced_x86::code_asm::CodeLabel| res.label_ip(l).map_err(asm_err);
    Ok(Programs {
        pio: at(&pio)?,
        store: at(&store)?,
        sweep: at(&sweep)?,
        touch: at(&touch)?,
        stamp: at(&stamp)?,
        remap: at(&remap)?,
        xadd: at(&xadd)?,
        spin: at(&spin)?,
        stos: at(&stos)?,
        bytes: res.inner.code_buffer,
    })
}

struct Rig {
    vm: Vm,
    vcpu: Vcpu,
    vcpu2: Option<Vcpu>,
    layout: LongModeLayout,
    progs: Programs,
}

#[derive(Debug, Default)]
struct Count(AtomicU64);
impl TrackNotifier for Count {
    fn track_write(&self, _: &WriteEvent<'_>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl Rig {
    fn new(ram: u64, config: VmConfig) -> Result<Rig> {
        Rig::with_vcpus(ram, config, 1)
    }

    /// A rig with one or two vCPUs (KVM's memslot changes cost more with more vCPUs).
    fn with_vcpus(ram: u64, config: VmConfig, vcpus: u32) -> Result<Rig> {
        let vm = Vm::new(config.with_ram(ram))?;
        vm.add_ram(0, ram)?;
        let layout = LongModeLayout::new(ram)?;
        let progs = programs()?;
        vm.untracked_memory()
            .write_slice(&progs.bytes, GuestAddress(CODE))
            .with_context(|| format!("writing the benchmark programs at {CODE:#x}"))?;
        let vcpu = vm.create_vcpu(0)?;
        x86::setup_long_mode(
            vm.kvm(),
            vcpu.fd(),
            &*vm.untracked_memory(),
            &layout,
            CODE,
            0,
        )?;
        let vcpu2 = if vcpus > 1 {
            let v = vm.create_vcpu(1)?;
            x86::setup_long_mode(vm.kvm(), v.fd(), &*vm.untracked_memory(), &layout, CODE, 1)?;
            Some(v)
        } else {
            None
        };
        Ok(Rig {
            vm,
            vcpu,
            vcpu2,
            layout,
            progs,
        })
    }

    /// Runs the program at `entry` with rdi/rcx/r8 to its exit; returns the wall time.
    fn run(&mut self, entry: u64, rdi_v: u64, rcx_v: u64, r8_v: u64) -> Result<Duration> {
        self.run_rax(entry, rdi_v, rcx_v, r8_v, 0)
    }

    /// As [`Rig::run`], with rax set too.
    fn run_rax(
        &mut self,
        entry: u64,
        rdi_v: u64,
        rcx_v: u64,
        r8_v: u64,
        rax_v: u64,
    ) -> Result<Duration> {
        prepare(
            &self.vcpu,
            &self.layout,
            0,
            entry,
            [rdi_v, rcx_v, r8_v, rax_v],
        )?;
        let start = Instant::now();
        run_to_exit(&mut self.vcpu)?;
        Ok(start.elapsed())
    }

    /// Runs the program at `entry` on both vCPUs at once (same rdi/rcx/r8/rax); returns the
    /// wall time until both exited.
    fn run_both(&mut self, entry: u64, args: [u64; 4]) -> Result<Duration> {
        let Some(v2) = self.vcpu2.as_mut() else {
            return Err(anyhow!("benchmark rig has one vCPU"));
        };
        prepare(&self.vcpu, &self.layout, 0, entry, args)?;
        prepare(v2, &self.layout, 1, entry, args)?;
        let v1 = &mut self.vcpu;
        let start = Instant::now();
        std::thread::scope(|s| {
            let other = s.spawn(|| run_to_exit(v2));
            let mine = run_to_exit(v1);
            let theirs = other
                .join()
                .unwrap_or_else(|_| Err(anyhow!("benchmark vCPU thread panicked")));
            mine.and(theirs)
        })?;
        Ok(start.elapsed())
    }
}

impl Rig {
    /// Track and untrack latencies of one frame (100 of each, in µs) while both vCPUs run the
    /// program at `entry` with rcx = u64::MAX: every track pauses two running vCPUs.
    fn track_while_running(&mut self, entry: u64) -> Result<(Vec<f64>, Vec<f64>)> {
        let Some(v2) = self.vcpu2.as_mut() else {
            return Err(anyhow!("benchmark rig has one vCPU"));
        };
        let args = [0, u64::MAX, 0, 0];
        prepare(&self.vcpu, &self.layout, 0, entry, args)?;
        prepare(v2, &self.layout, 1, entry, args)?;
        let (s1, s2) = (self.vcpu.stopper(), v2.stopper());
        let v1 = &mut self.vcpu;
        let vm = &self.vm;
        let (started_tx, started) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let spin = |v: &mut Vcpu, started: std::sync::mpsc::Sender<()>| -> Result<()> {
                // Sent before the first KVM_RUN: the measurement waits for both.
                started
                    .send(())
                    .map_err(|_| anyhow!("benchmark thread gone"))?;
                loop {
                    match v.run()? {
                        Exit::Stopped => return Ok(()),
                        Exit::IoOut { port, .. } if u32::from(port) == PIO_PORT => {}
                        other => {
                            return Err(anyhow!("running guest stopped: {other:?}"));
                        }
                    }
                }
            };
            let tx2 = started_tx.clone();
            let a = s.spawn(move || spin(v1, started_tx));
            let b = s.spawn(move || spin(v2, tx2));
            let measure = || -> Result<(Vec<f64>, Vec<f64>)> {
                for _ in 0..2 {
                    started
                        .recv()
                        .map_err(|_| anyhow!("benchmark vCPU thread failed to start"))?;
                }
                let (mut t, mut u) = (Vec::new(), Vec::new());
                for i in 0..100u64 {
                    let f = Gfn(0x800 + i * 13);
                    let s = Instant::now();
                    vm.tracker().add_gfn(f)?;
                    t.push(us(s.elapsed()));
                    let s = Instant::now();
                    vm.tracker().remove_gfn(f)?;
                    u.push(us(s.elapsed()));
                }
                Ok((t, u))
            };
            let res = measure();
            s1.stop();
            s2.stop();
            let joined = |h: std::thread::ScopedJoinHandle<'_, Result<()>>| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("benchmark vCPU thread panicked")))
            };
            let (ra, rb) = (joined(a), joined(b));
            ra?;
            rb?;
            res
        })
    }
}

/// Sets a vCPU up to run `entry` with rdi, rcx, r8, rax = `args`.
fn prepare(
    vcpu: &Vcpu,
    layout: &LongModeLayout,
    index: u32,
    entry: u64,
    args: [u64; 4],
) -> Result<()> {
    let fd = vcpu.fd();
    let mut regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    regs.rip = entry;
    regs.rsp = layout.user_stack_top(index)?;
    regs.rflags = LONG_MODE_RFLAGS;
    [regs.rdi, regs.rcx, regs.r8, regs.rax] = args;
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// Runs until the program's exit on port 0xf4 (port PIO_PORT exits are the benchmark's own).
fn run_to_exit(vcpu: &mut Vcpu) -> Result<()> {
    loop {
        match vcpu.run()? {
            Exit::IoOut { port, .. } if port == GUEST_EXIT_PORT => return Ok(()),
            Exit::IoOut { port, .. } if u32::from(port) == PIO_PORT => {}
            other => {
                return Err(anyhow!("benchmark guest stopped unexpectedly: {other:?}"));
            }
        }
    }
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> anyhow::Error {
    move |source| anyhow::Error::new(source).context(op)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Runs every measurement.
///
/// # Errors
/// KVM failures, or a benchmark guest that does not behave.
pub fn run(cfg: BenchConfig, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    let mut rep = BenchReport::default();
    let n = cfg.exits.max(100);
    let reps = cfg.reps.max(1);
    if cfg.relaxed_only {
        relaxed(&mut rep, reps, &mut progress)?;
        return Ok(rep);
    }

    // 1–3: exits, in a 64 MiB guest.
    progress("exit round trips");
    let mut rig = Rig::with_vcpus(64 << 20, VmConfig::default(), 2)?;
    let count = Arc::new(Count::default());
    let _h = rig
        .vm
        .tracker()
        .register(count.clone(), NotifierClass::Ordinary)?;
    rig.vm.tracker().add_gfn(Gfn(TRACKED >> 12))?;
    let (mut pio, mut trapped) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        pio.push(us(rig.run(rig.progs.pio, 0, n, 0)?) / n as f64);
        trapped.push(us(rig.run(rig.progs.store, TRACKED, n, 0)?) / n as f64);
    }
    let (pio, trapped) = (median(pio), median(trapped));
    rep.push("pio_exit_us", "bare port-I/O exit round trip", pio, "µs");
    rep.push(
        "trapped_write_us",
        "trapped 8-byte store round trip (apply + event)",
        trapped,
        "µs",
    );
    rep.push(
        "trapped_vs_exit",
        "trapped store / bare exit",
        trapped / pio,
        "ratio",
    );

    // Locked read-modify-writes on a tracked word: 1 vCPU, then 2 vCPUs at once.
    progress("atomic read-modify-writes");
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        one.push(us(rig.run_rax(rig.progs.xadd, TRACKED, n, 0, 1)?) / n as f64);
        two.push(us(rig.run_both(rig.progs.xadd, [TRACKED, n / 2, 0, 1])?) / n as f64);
    }
    let (one, two) = (median(one), median(two));
    rep.push(
        "atomic_rmw_us",
        "tracked lock xadd, 1 vCPU (atomic re-execution)",
        one,
        "µs",
    );
    rep.push(
        "atomic_rmw_vs_store",
        "tracked lock xadd / plain tracked store, 1 vCPU",
        one / trapped,
        "ratio",
    );
    rep.push(
        "atomic_rmw_2vcpu_us",
        "tracked lock xadd, 2 vCPUs on one word (time per operation)",
        two,
        "µs",
    );

    // Track/untrack in this 2-vCPU guest: KVM's memslot changes cost more per vCPU.
    let (mut t2, mut u2) = (Vec::new(), Vec::new());
    for i in 0..100u64 {
        let f = Gfn(0x800 + i * 13);
        let s = Instant::now();
        rig.vm.tracker().add_gfn(f)?;
        t2.push(us(s.elapsed()));
        let s = Instant::now();
        rig.vm.tracker().remove_gfn(f)?;
        u2.push(us(s.elapsed()));
    }
    rep.push(
        "track_2vcpu_us",
        "track one frame, 64 MiB guest with 2 vCPUs (idle)",
        median(t2),
        "µs",
    );
    rep.push(
        "untrack_2vcpu_us",
        "untrack one frame, 64 MiB guest with 2 vCPUs (idle)",
        median(u2),
        "µs",
    );
    for (entry, key_t, key_u, what) in [
        (
            rig.progs.spin,
            "track_2vcpu_running_us",
            "untrack_2vcpu_running_us",
            "while 2 vCPUs run without exits",
        ),
        (
            rig.progs.pio,
            "track_2vcpu_exiting_us",
            "untrack_2vcpu_exiting_us",
            "while 2 vCPUs run a port-I/O exit loop",
        ),
    ] {
        progress(&format!("track/untrack {what}"));
        let (t, u) = rig.track_while_running(entry)?;
        rep.push(
            key_t,
            format!("track one frame, 64 MiB guest {what}"),
            median(t),
            "µs",
        );
        rep.push(
            key_u,
            format!("untrack one frame, 64 MiB guest {what}"),
            median(u),
            "µs",
        );
    }

    // Page-table stores: PTE remaps in a tracked, marked page-table frame (each one makes KVM
    // drop its shadows of the frame on shadow-paging hosts).
    progress("page-table stores");
    {
        let pd0 = rig.layout.pml4() + 0x2000;
        let mem = rig.vm.memory();
        for i in 0..512u64 {
            mem.write_obj((PT_VA + i * 4096) | 0x67, GuestAddress(PT + i * 8))?;
        }
        mem.write_obj(PT | 0x27, GuestAddress(pd0 + (PT_VA >> 21) * 8))?;
    }
    rig.vm.tracker().add_gfn(Gfn(PT >> 12))?;
    rig.vm.mark_page_tables(&[Gfn(PT >> 12)], true);
    let (a, b) = ((PT_VA + 5 * 4096) | 0x67, (PT_VA + 6 * 4096) | 0x67);
    let pt_n = (n / 4).max(100);
    let mut pt = Vec::new();
    for _ in 0..reps {
        pt.push(us(rig.run_rax(rig.progs.remap, 0, pt_n, a ^ b, b)?) / pt_n as f64);
    }
    rig.vm.mark_page_tables(&[Gfn(PT >> 12)], false);
    rig.vm.tracker().remove_gfn(Gfn(PT >> 12))?;
    rep.push(
        "pt_store_us",
        "page-table store that remaps a present entry (tracked, shadows dropped) + one use",
        median(pt),
        "µs",
    );

    // 4: untracked stores with 1,000 tracked frames elsewhere versus none.
    progress("untracked store overhead");
    rig.vm.tracker().remove_gfn(Gfn(TRACKED >> 12))?;
    let stores = 200_000_000u64;
    rig.run(rig.progs.sweep, BUF, BUF_BYTES / 8, 0)?; // warm: fault the buffer in
    let frames: Vec<Gfn> = (0..1000u64)
        .map(|i| Gfn(((BUF + BUF_BYTES) >> 12) + 1 + i * 3))
        .collect();
    // Interleaved, so that drift on a busy host hits both sides alike.
    let (mut base, mut with) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        base.push(rig.run(rig.progs.sweep, BUF, stores, 0)?.as_secs_f64());
        rig.vm.tracker().add_gfns(AsId::NORMAL, &frames)?;
        rig.run(rig.progs.sweep, BUF, BUF_BYTES / 8, 0)?; // settle after the slot changes
        with.push(rig.run(rig.progs.sweep, BUF, stores, 0)?.as_secs_f64());
        rig.vm.tracker().remove_gfns(AsId::NORMAL, &frames)?;
        rig.run(rig.progs.sweep, BUF, BUF_BYTES / 8, 0)?;
    }
    let (base, with) = (median(base), median(with));
    rep.push(
        "untracked_store_ns",
        "untracked 8-byte store, no tracking",
        base * 1e9 / stores as f64,
        "ns",
    );
    rep.push(
        "untracked_overhead",
        "untracked stores with 1,000 frames tracked elsewhere / with none",
        with / base,
        "ratio",
    );
    drop(rig);

    // 5–7: track/untrack latency, refault and batches in a 16 MiB and a large guest.
    for (ram, key_t, key_u) in [
        (16u64 << 20, "track_16m_us", "untrack_16m_us"),
        (cfg.ram, "track_large_us", "untrack_large_us"),
    ] {
        progress(&format!("track/untrack latency, {} MiB guest", ram >> 20));
        // Let the kernel finish tearing down the previous VMs (freeing thousands of memslots
        // runs deferred and slows the memslot changes measured here severalfold).
        std::thread::sleep(Duration::from_millis(500));
        let rig = Rig::new(ram, VmConfig::default())?;
        let _h = rig
            .vm
            .tracker()
            .register(count.clone(), NotifierClass::Ordinary)?;
        let (mut t, mut u) = (Vec::new(), Vec::new());
        for i in 0..200u64 {
            let f = Gfn((0x200 + i * 977) % ((ram >> 12) - 0x400) + 0x100);
            let s = Instant::now();
            rig.vm.tracker().add_gfn(f)?;
            t.push(us(s.elapsed()));
            let s = Instant::now();
            rig.vm.tracker().remove_gfn(f)?;
            u.push(us(s.elapsed()));
        }
        let mib = ram >> 20;
        rep.push(
            key_t,
            format!("track one frame, {mib} MiB guest (vCPU idle)"),
            median(t),
            "µs",
        );
        rep.push(
            key_u,
            format!("untrack one frame, {mib} MiB guest (vCPU idle)"),
            median(u),
            "µs",
        );
    }

    for (keep_quirk, key) in [(false, "refault_ms"), (true, "refault_zap_all_ms")] {
        progress(&format!(
            "refault after a track, {} MiB{}",
            cfg.ram >> 20,
            if keep_quirk { ", zap-all quirk on" } else { "" }
        ));
        let config = if keep_quirk {
            VmConfig::default().keep_slot_zap_all()
        } else {
            VmConfig::default()
        };
        let mut rig = Rig::new(cfg.ram, config)?;
        let _h = rig
            .vm
            .tracker()
            .register(count.clone(), NotifierClass::Ordinary)?;
        let (lo, hi) = (2u64 << 20, rig.layout.reserved_range().0 - (2 << 20));
        rig.run(rig.progs.touch, lo, 0, hi)?; // cold
        let mut extra = Vec::new();
        for i in 0..reps as u64 {
            let warm = rig.run(rig.progs.touch, lo, 0, hi)?;
            let f = Gfn((hi >> 12) + 1 + i);
            rig.vm.tracker().add_gfn(f)?;
            let after = rig.run(rig.progs.touch, lo, 0, hi)?;
            rig.vm.tracker().remove_gfn(f)?;
            rig.run(rig.progs.touch, lo, 0, hi)?; // settle after the untrack too
            extra.push((after.as_secs_f64() - warm.as_secs_f64()) * 1e3);
        }
        let what = format!(
            "extra time to re-touch {} MiB after one track{}",
            (hi - lo) >> 20,
            if keep_quirk {
                " (KVM_X86_QUIRK_SLOT_ZAP_ALL left on)"
            } else {
                ""
            }
        );
        rep.push(key, what, median(extra), "ms");
    }

    progress("1,000-frame batch");
    let rig = Rig::new(cfg.ram, VmConfig::default())?;
    let _h = rig.vm.tracker().register(count, NotifierClass::Ordinary)?;
    let span = (rig.layout.reserved_range().0 >> 12) - 0x200;
    let frames: Vec<Gfn> = (0..1000u64)
        .map(|i| Gfn(0x100 + (i * 7919) % span))
        .collect();
    let s = Instant::now();
    rig.vm.tracker().add_gfns(AsId::NORMAL, &frames)?;
    let took = us(s.elapsed());
    let st = rig.vm.stats().fragments;
    rep.push(
        "batch_1000_us",
        "track 1,000 scattered frames in one batch",
        took,
        "µs",
    );
    rep.push(
        "batch_1000_fragments",
        "KVM memslots in use after that batch",
        st.fragments as f64,
        "slots",
    );
    rep.push(
        "slot_budget",
        "KVM memslots available to pagetrack",
        st.budget as f64,
        "slots",
    );
    let s = Instant::now();
    rig.vm.tracker().remove_gfns(AsId::NORMAL, &frames)?;
    rep.push(
        "unbatch_1000_us",
        "untrack the same 1,000 frames in one batch",
        us(s.elapsed()),
        "µs",
    );
    relaxed(&mut rep, reps, &mut progress)?;
    checkpoint(&mut rep, reps, &mut progress)?;
    Ok(rep)
}

/// Relaxed mode's promotion before a `rep` completion: a `rep stosb` of N bytes into strict
/// tracked frames completed exactly (relaxed mode off: one event per byte) against the same
/// in auto mode with every length promoted, where the trapped `rep` promotes its frames first
/// (the run includes the
/// promotion and the sync at the exit; the frames are made strict again between runs,
/// timed apart as the demotion a promotion eventually costs).
fn rep_promotion(
    rep: &mut BenchReport,
    reps: usize,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    progress("relaxed mode: rep promotion against exact completion");
    let frames: Vec<Gfn> = (0..4).map(|f| Gfn((TRACKED >> 12) + f)).collect();
    let mut exact = Rig::new(64 << 20, VmConfig::default())?;
    let _he = exact
        .vm
        .tracker()
        .register(Arc::new(Count::default()), NotifierClass::Ordinary)?;
    exact.vm.tracker().add_gfns(AsId::NORMAL, &frames)?;
    // Every length promoted (the default threshold is what these rows are for).
    let mut relaxed = RelaxedConfig::new(RelaxedMode::Auto);
    relaxed.rep_promote_elements = 1;
    let mut auto = Rig::new(64 << 20, VmConfig::default().with_relaxed(relaxed))?;
    let options = RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced);
    let _ha = auto
        .vm
        .tracker()
        .register(Arc::new(Count::default()), options)?;
    auto.vm.tracker().add_gfns(AsId::NORMAL, &frames)?;
    let mut demote = Vec::new();
    for n in [64u64, 256, 1024, 4096, 16384] {
        let (mut e, mut p, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..reps.max(5) {
            let value = 0x10 + (i as u64 & 0x3f);
            e.push(us(exact.run_rax(exact.progs.stos, TRACKED, n, 0, value)?));
            let before = auto.vm.stats();
            p.push(us(auto.run_rax(auto.progs.stos, TRACKED, n, 0, value)?));
            let after = auto.vm.stats();
            let slot_ns = after.fragments.slot_change_ns - before.fragments.slot_change_ns;
            slots.push(slot_ns as f64 / 1e3);
            if after.relaxed.rep_promotions == before.relaxed.rep_promotions {
                return Err(anyhow!("a {n}-byte rep stosb was not promoted"));
            }
            let s = Instant::now();
            auto.vm.make_strict(&frames)?;
            demote.push(us(s.elapsed()));
        }
        rep.push(
            format!("rep_{n}_exact_us"),
            "rep stosb of N bytes into strict frames, completed exactly (one event per byte)",
            median(e),
            "µs",
        );
        rep.push(
            format!("rep_{n}_promoted_us"),
            "the same in auto mode: promoted before completion, run by the CPU, synced",
            median(p),
            "µs",
        );
        rep.push(
            format!("rep_{n}_promoted_slots_us"),
            "of which in KVM memslot changes (the promotion's re-cut)",
            median(slots),
            "µs",
        );
    }
    rep.push(
        "rep_demote_us",
        "making those frames strict again (pause, final sync, re-cut)",
        median(demote),
        "µs",
    );
    Ok(())
}

/// Relaxed mode: a 4 KiB `rep stosb` into a strict, a relaxed and an untracked frame (each
/// run ends with an exit, which syncs the relaxed frame), and the cost of one sync by the
/// number of dirty frames among 1,024 relaxed ones.
fn relaxed(rep: &mut BenchReport, reps: usize, progress: &mut impl FnMut(&str)) -> Result<()> {
    progress("relaxed mode: 4 KiB rep stosb");
    let mut strict = Rig::new(64 << 20, VmConfig::default())?;
    let _hs = strict
        .vm
        .tracker()
        .register(Arc::new(Count::default()), NotifierClass::Ordinary)?;
    strict.vm.tracker().add_gfn(Gfn(TRACKED >> 12))?;
    let mut v = Vec::new();
    for _ in 0..reps.min(3) {
        v.push(us(strict.run(strict.progs.stos, TRACKED, 4096, 0)?) / 1000.0);
    }
    let strict_ms = median(v);
    rep.push(
        "stosb_4k_strict_ms",
        "4 KiB rep stosb into a strict tracked frame (one event per byte)",
        strict_ms,
        "ms",
    );
    let config = VmConfig::default().with_relaxed(RelaxedConfig::new(RelaxedMode::Always));
    let mut rig = Rig::new(64 << 20, config)?;
    let options = RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced);
    let count = Arc::new(Count::default());
    let _h = rig.vm.tracker().register(count.clone(), options)?;
    rig.vm.tracker().add_gfn(Gfn(TRACKED >> 12))?;
    if !rig.vm.is_relaxed(Gfn(TRACKED >> 12)) {
        return Err(anyhow!("relaxed mode did not relax the tracked frame"));
    }
    let (mut relaxed, mut untracked) = (Vec::new(), Vec::new());
    let before = (count.0.load(Ordering::Relaxed), rig.vm.stats().relaxed);
    let mut runs = 0u32;
    for _ in 0..reps {
        for _ in 0..20 {
            runs += 2;
            relaxed.push(us(rig.run_rax(rig.progs.stos, TRACKED, 4096, 0, 0x5a)?));
            untracked.push(us(rig.run_rax(rig.progs.stos, BUF, 4096, 0, 0x5a)?));
            // A changing value, so every iteration has a change to deliver.
            relaxed.push(us(rig.run_rax(rig.progs.stos, TRACKED, 4096, 0, 0xa5)?));
        }
    }
    let after = (count.0.load(Ordering::Relaxed), rig.vm.stats().relaxed);
    let (relaxed, untracked) = (median(relaxed), median(untracked));
    rep.push(
        "stosb_4k_relaxed_frames",
        "frames that ran relaxed in those runs (the tracked one)",
        f64::from(u32::try_from(after.1.frames_relaxed).unwrap_or(u32::MAX)),
        "frames",
    );
    rep.push(
        "stosb_4k_coalesced",
        "coalesced events per relaxed 4 KiB rep stosb (strict: 4,096 exact ones)",
        (after.0 - before.0) as f64 / f64::from(runs.max(1)),
        "events",
    );
    rep.push(
        "stosb_4k_syncs",
        "syncs per relaxed run",
        (after.1.syncs - before.1.syncs) as f64 / f64::from(runs.max(1)),
        "syncs",
    );
    rep.push(
        "stosb_4k_relaxed_us",
        "4 KiB rep stosb into a relaxed frame, sync at the exit included",
        relaxed,
        "µs",
    );
    rep.push(
        "stosb_4k_untracked_us",
        "4 KiB rep stosb into an untracked frame",
        untracked,
        "µs",
    );
    rep.push(
        "stosb_4k_strict_vs_relaxed",
        "strict / relaxed",
        strict_ms * 1000.0 / relaxed,
        "ratio",
    );
    rep_promotion(rep, reps, progress)?;
    progress("relaxed mode: sync cost by dirty frames");
    rig.vm
        .tracker()
        .add_range(AsId::NORMAL, Gfn(BUF >> 12), 1024)?;
    for dirty in [1u64, 16, 256, 1024] {
        let mut per = Vec::new();
        for _ in 0..reps {
            let before = rig.vm.stats().relaxed;
            rig.run(rig.progs.touch, BUF, 0, BUF + dirty * 4096)?;
            let after = rig.vm.stats().relaxed;
            let syncs = after.syncs - before.syncs;
            if syncs > 0 {
                per.push((after.sync_ns - before.sync_ns) as f64 / 1000.0 / syncs as f64);
            }
        }
        rep.push(
            match dirty {
                1 => "sync_1_dirty_us",
                16 => "sync_16_dirty_us",
                256 => "sync_256_dirty_us",
                _ => "sync_1024_dirty_us",
            },
            format!("one sync with {dirty} dirty frames of 1,025 relaxed (harvest, diff, deliver)"),
            median(per),
            "µs",
        );
    }
    drop(rig);
    sync_sweep(rep, reps, progress)
}

/// The cost of one sync by dirty frames and by relaxed (tracked) frames, with the dirty log
/// harvested by plain `KVM_GET_DIRTY_LOG` and (where KVM offers it) by `KVM_GET_DIRTY_LOG` +
/// `KVM_CLEAR_DIRTY_LOG`, and (where KVM offers it) from a 16,384-entry dirty ring per vCPU
/// (every ring harvested, then `KVM_RESET_DIRTY_RINGS`): the harvest and the whole sync
/// (harvest, diff, deliver) apart.
/// Every run stores a new value into each of its frames, so each dirty frame is one event.
fn sync_sweep(rep: &mut BenchReport, reps: usize, progress: &mut impl FnMut(&str)) -> Result<()> {
    const AT: u64 = 0x80_0000;
    let modes = [
        (DirtyProtect::Plain, None, "get"),
        (DirtyProtect::Manual, None, "clear"),
        (
            DirtyProtect::Auto,
            Some(pagetrack_kvm::DirtyRing::entries(16_384)),
            "ring",
        ),
    ];
    for (how, ring, name) in modes {
        for relaxed in [1024u64, 8192] {
            progress(&format!(
                "relaxed mode: sync cost, {relaxed} relaxed frames, harvest {name}"
            ));
            // No periodic sync inside a run (a long run would split its dirty frames).
            let mut relaxed_config = RelaxedConfig::new(RelaxedMode::Always);
            relaxed_config.period = Duration::from_secs(3600);
            let config = VmConfig::default()
                .with_relaxed(relaxed_config)
                .with_dirty_protect(how)
                .with_dirty_ring_if(ring);
            let mut rig = match Rig::new(64 << 20, config) {
                Ok(rig) => rig,
                Err(e) if how == DirtyProtect::Manual || ring.is_some() => {
                    progress(&format!("harvest {name} not available: {e:#}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let options =
                RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced);
            let _h = rig
                .vm
                .tracker()
                .register(Arc::new(Count::default()), options)?;
            rig.vm
                .tracker()
                .add_range(AsId::NORMAL, Gfn(AT >> 12), relaxed)?;
            // Every frame written once, so that later runs find only what they write.
            rig.run_rax(rig.progs.stamp, AT, 0, AT + relaxed * 4096, 1)?;
            let mut value = 2u64;
            let dirties: &[u64] = if relaxed == 1024 {
                &[0, 1, 16, 64, 256, 512, 768, 1024]
            } else {
                &[0, 1, 64, 256, 1024, 4096, 8192]
            };
            for &dirty in dirties {
                let (mut whole, mut harvest) = (Vec::new(), Vec::new());
                for _ in 0..reps.max(3) {
                    let before = rig.vm.stats().relaxed;
                    if dirty == 0 {
                        // Nothing written since the exit's sync: a sync that finds nothing.
                        let t = Instant::now();
                        rig.vm.sync()?;
                        whole.push(us(t.elapsed()));
                        continue;
                    }
                    rig.run_rax(rig.progs.stamp, AT, 0, AT + dirty * 4096, value)?;
                    value += 1;
                    let after = rig.vm.stats().relaxed;
                    if after.syncs == before.syncs + 1 {
                        whole.push((after.sync_ns - before.sync_ns) as f64 / 1000.0);
                        harvest.push((after.harvest_ns - before.harvest_ns) as f64 / 1000.0);
                    }
                }
                let k = if relaxed == 1024 { "1k" } else { "8k" };
                rep.push(
                    format!("sync_{name}_{k}r_{dirty}d_us"),
                    format!(
                        "one sync, {dirty} dirty of {relaxed} relaxed frames, harvest {name} \
                         (harvest, diff, deliver)"
                    ),
                    median(whole),
                    "µs",
                );
                if dirty > 0 {
                    rep.push(
                        format!("harvest_{name}_{k}r_{dirty}d_us"),
                        format!("the harvest and re-protect of that sync ({name})"),
                        median(harvest),
                        "µs",
                    );
                }
            }
        }
    }
    Ok(())
}

/// Snapshot reset: the cost of [`Vm::checkpoint`] (a copy of all RAM) and of
/// [`Vm::restore`] after a run that wrote N pages (one store each, untracked; and 256
/// strict or relaxed tracked pages), against copying all of RAM back.
fn checkpoint(rep: &mut BenchReport, reps: usize, progress: &mut impl FnMut(&str)) -> Result<()> {
    progress("checkpoint and restore");
    const RAM: u64 = 64 << 20;
    let mut rig = Rig::new(RAM, VmConfig::default().with_dirty_log())?;
    let mut took = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        rig.vm.checkpoint()?;
        took.push(us(s.elapsed()) / 1000.0);
    }
    rep.push(
        "checkpoint_64m_ms",
        "Vm::checkpoint of a 64 MiB guest (copies all RAM)",
        median(took),
        "ms",
    );
    let mut image = vec![0u8; usize::try_from(RAM)?];
    rig.vm
        .untracked_memory()
        .read_slice(&mut image, GuestAddress(0))?;
    let mut full = Vec::new();
    for _ in 0..reps {
        let s = Instant::now();
        rig.vm
            .untracked_memory()
            .write_slice(&image, GuestAddress(0))?;
        full.push(us(s.elapsed()));
    }
    let full = median(full);
    rep.push(
        "restore_full_copy_64m_us",
        "copy all 64 MiB of RAM back (the restore a dirty log avoids)",
        full,
        "µs",
    );
    for invalidate in [Invalidate::Restored, Invalidate::MarkedTables] {
        for n in [1u64, 16, 256, 4096] {
            let mut per = Vec::new();
            for _ in 0..reps {
                rig.run(rig.progs.touch, BUF, 0, BUF + n * 4096)?;
                let s = Instant::now();
                let r = rig.vm.restore_with(invalidate)?;
                per.push(us(s.elapsed()));
                if r.restored_pages < n {
                    return Err(anyhow!("restore put back {r:?} after {n} pages written"));
                }
            }
            let (key, how) = match (invalidate, n) {
                (Invalidate::Restored, 1) => ("restore_1_page_us", ""),
                (Invalidate::Restored, 16) => ("restore_16_pages_us", ""),
                (Invalidate::Restored, 256) => ("restore_256_pages_us", ""),
                (Invalidate::Restored, _) => ("restore_4096_pages_us", ""),
                (_, 1) => ("restore_1_page_marked_us", ", marked tables only"),
                (_, 16) => ("restore_16_pages_marked_us", ", marked tables only"),
                (_, 256) => ("restore_256_pages_marked_us", ", marked tables only"),
                _ => ("restore_4096_pages_marked_us", ", marked tables only"),
            };
            rep.push(
                key,
                format!(
                    "Vm::restore after a run that wrote {n} untracked pages (64 MiB guest{how})"
                ),
                median(per),
                "µs",
            );
        }
    }
    for mode in [RelaxedMode::Off, RelaxedMode::Always] {
        let config = VmConfig::default()
            .with_dirty_log()
            .with_relaxed(RelaxedConfig::new(mode));
        let mut rig = Rig::new(RAM, config)?;
        let options =
            RegisterOptions::new(NotifierClass::Ordinary).with_delivery(Delivery::Coalesced);
        let _h = rig
            .vm
            .tracker()
            .register(Arc::new(Count::default()), options)?;
        rig.vm
            .tracker()
            .add_range(AsId::NORMAL, Gfn(BUF >> 12), 256)?;
        rig.vm.checkpoint()?;
        let mut per = Vec::new();
        for _ in 0..reps {
            rig.run(rig.progs.touch, BUF, 0, BUF + 256 * 4096)?;
            let s = Instant::now();
            rig.vm.restore()?;
            per.push(us(s.elapsed()));
        }
        let (key, what) = if mode == RelaxedMode::Off {
            ("restore_256_strict_us", "strict")
        } else {
            ("restore_256_relaxed_us", "relaxed")
        };
        rep.push(
            key,
            format!("Vm::restore after a run that wrote 256 {what} tracked pages (an event each)"),
            median(per),
            "µs",
        );
    }
    Ok(())
}
