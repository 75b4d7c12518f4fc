//! Running flat guest images: load at an address, enter in real or long mode on N vCPUs, run
//! until the guest writes its exit code to port 0xf4 (or halts in real mode), an error, a
//! timeout or an exit limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagetrack::Gfn;
use pagetrack_kvm::{Exit, ExitBudget, Vcpu, Vm, VmConfig};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{ConfigProblem, Error, ImageProblem, Result};
use crate::x86::{
    self, EXCEPTION_PORT, GUEST_EXIT_PORT, LongModeLayout, MIN_RAM_SIZE, USER_STACK_SIZE,
};

/// The CPU mode a flat image starts in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// 16-bit real mode at CPL0 (emulated by KVM on software-KVM hosts): CS=DS=ES=SS=0.
    Real,
    /// 64-bit long mode at CPL3 with the first 4 GiB identity-mapped (see [`LongModeLayout`]).
    #[default]
    Long,
}

/// How to run a flat image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlatConfig {
    /// Guest RAM in bytes (at guest-physical 0).
    pub mem: u64,
    /// Load and entry address.
    pub load: u64,
    /// Start mode.
    pub mode: Mode,
    /// vCPUs, all entering at `load`.
    pub vcpus: u32,
    /// Wall-clock limit of the run.
    pub timeout: Option<Duration>,
    /// Limit on KVM exits (trapped stores and every exit pagetrack handles itself included),
    /// exact: the run ends with [`EndReason::ExitLimit`] after at most this many.
    pub max_exits: Option<u64>,
    /// Relaxed mode of tracked frames (off by default: one exact event per store).
    pub relaxed: pagetrack_kvm::RelaxedConfig,
    /// The VM's dirty ring instead of the dirty bitmaps (`None`, the default: bitmaps).
    pub dirty_ring: Option<pagetrack_kvm::DirtyRing>,
}

impl Default for FlatConfig {
    fn default() -> FlatConfig {
        FlatConfig {
            mem: 64 << 20,
            load: 0x1000,
            mode: Mode::Long,
            vcpus: 1,
            timeout: None,
            max_exits: None,
            relaxed: pagetrack_kvm::RelaxedConfig::default(),
            dirty_ring: None,
        }
    }
}

impl FlatConfig {
    /// A default configuration (64 MiB, load at 0x1000, long mode, one vCPU).
    pub fn new() -> FlatConfig {
        FlatConfig::default()
    }
    /// With `bytes` of RAM.
    pub fn mem(mut self, bytes: u64) -> FlatConfig {
        self.mem = bytes;
        self
    }
    /// Loaded and entered at `addr`.
    pub fn load(mut self, addr: u64) -> FlatConfig {
        self.load = addr;
        self
    }
    /// In `mode`.
    pub fn mode(mut self, mode: Mode) -> FlatConfig {
        self.mode = mode;
        self
    }
    /// With `n` vCPUs.
    pub fn vcpus(mut self, n: u32) -> FlatConfig {
        self.vcpus = n;
        self
    }
    /// Ending after `t`.
    pub fn timeout(mut self, t: Option<Duration>) -> FlatConfig {
        self.timeout = t;
        self
    }
    /// Ending after `n` exits.
    pub fn max_exits(mut self, n: Option<u64>) -> FlatConfig {
        self.max_exits = n;
        self
    }
    /// With relaxed mode set up as `relaxed`.
    pub fn relaxed(mut self, relaxed: pagetrack_kvm::RelaxedConfig) -> FlatConfig {
        self.relaxed = relaxed;
        self
    }

    /// With the VM's dirty ring of `ring` (see [`pagetrack_kvm::DirtyRing`]), or without.
    pub fn dirty_ring(mut self, ring: Option<pagetrack_kvm::DirtyRing>) -> FlatConfig {
        self.dirty_ring = ring;
        self
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EndReason {
    /// The guest wrote its exit code to port 0xf4.
    DebugExit,
    /// `hlt` (real mode).
    Hlt,
    /// A guest exception, emulation failure or unexpected exit.
    Error,
    /// The timeout passed.
    Timeout,
    /// The exit limit was reached.
    ExitLimit,
}

impl EndReason {
    /// The name used in the JSON event stream.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::DebugExit => "debug-exit",
            EndReason::Hlt => "hlt",
            EndReason::Error => "error",
            EndReason::Timeout => "timeout",
            EndReason::ExitLimit => "error",
        }
    }

    /// True when the guest ended the run itself.
    pub fn is_guest_exit(self) -> bool {
        matches!(self, EndReason::DebugExit | EndReason::Hlt)
    }
}

/// The result of [`FlatGuest::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOutcome {
    /// Why it ended.
    pub reason: EndReason,
    /// The guest's exit code (port 0xf4), if it gave one.
    pub code: Option<u8>,
    /// What happened, in words.
    pub detail: String,
    /// The vCPU that ended the run.
    pub vcpu: u32,
    /// KVM exits (returns from `KVM_RUN` other than interruptions), all vCPUs.
    pub exits: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// A flat image loaded into a fresh VM, ready to run.
#[derive(Debug)]
pub struct FlatGuest {
    vm: Vm,
    layout: Option<Arc<LongModeLayout>>,
    vcpus: Vec<Vcpu>,
    config: FlatConfig,
}

impl FlatGuest {
    /// Creates the VM, loads `image` at `config.load` and prepares every vCPU.
    ///
    /// # Errors
    /// Empty image, image beyond RAM or over the long-mode tables and stacks, RAM too small,
    /// zero or too many vCPUs, a real-mode load address above 64 KiB, KVM failures.
    pub fn new(config: FlatConfig, image: &[u8]) -> Result<FlatGuest> {
        Self::validate(&config, image)?;
        let vm = Vm::new(
            VmConfig::default()
                .with_ram(config.mem)
                .with_relaxed(config.relaxed)
                .with_dirty_ring_if(config.dirty_ring),
        )?;
        Self::with_vm(vm, config, image)
    }

    fn validate(config: &FlatConfig, image: &[u8]) -> Result<()> {
        let bad = |reason| {
            Err(Error::InvalidGuestImage {
                program: None,
                reason,
                source: None,
            })
        };
        let cfg = |reason| {
            Err(Error::InvalidConfig {
                reason,
                source: None,
            })
        };
        if config.mem < MIN_RAM_SIZE || !config.mem.is_multiple_of(4096) {
            return cfg(ConfigProblem::FlatMemory {
                mem: config.mem,
                min: MIN_RAM_SIZE,
            });
        }
        if config.vcpus == 0 || config.vcpus > x86::MAX_VCPUS {
            return cfg(ConfigProblem::VcpuCount {
                vcpus: config.vcpus,
                max: x86::MAX_VCPUS,
            });
        }
        if image.is_empty() {
            return bad(ImageProblem::Empty);
        }
        let end = config.load.checked_add(image.len() as u64);
        if end.is_none_or(|e| e > config.mem) {
            return bad(ImageProblem::DoesNotFit {
                len: image.len() as u64,
                load: config.load,
                mem: config.mem,
            });
        }
        let end = end.unwrap_or(u64::MAX);
        match config.mode {
            Mode::Long => {
                let layout = LongModeLayout::new(config.mem)?;
                let (res, _) = layout.reserved_range();
                let Some(low) = res.checked_sub(u64::from(config.vcpus) * USER_STACK_SIZE) else {
                    return cfg(ConfigProblem::StacksDoNotFit {
                        vcpus: config.vcpus,
                        stack: USER_STACK_SIZE,
                        mem: config.mem,
                    });
                };
                if end > layout.identity_map_size() {
                    return bad(ImageProblem::BeyondIdentityMap {
                        end,
                        limit: layout.identity_map_size(),
                    });
                }
                if end > low && config.load < layout.reserved_range().1 {
                    return bad(ImageProblem::OverlapsSystem {
                        start: config.load,
                        end,
                        low,
                        high: layout.reserved_range().1,
                    });
                }
            }
            Mode::Real => {
                if end > 0x10_0000 || config.load > 0xffff {
                    return bad(ImageProblem::RealModePlacement);
                }
            }
        }
        Ok(())
    }

    /// As [`FlatGuest::new`] on a VM the caller created (and may already track).
    ///
    /// # Errors
    /// As [`FlatGuest::new`].
    pub fn with_vm(vm: Vm, config: FlatConfig, image: &[u8]) -> Result<FlatGuest> {
        Self::validate(&config, image)?;
        vm.add_ram(0, config.mem)?;
        vm.untracked_memory()
            .write_slice(image, GuestAddress(config.load))
            .map_err(|source| Error::GuestMemory {
                what: "guest image",
                addr: config.load,
                source,
            })?;
        let layout = match config.mode {
            Mode::Long => Some(Arc::new(LongModeLayout::new(config.mem)?)),
            Mode::Real => None,
        };
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let vcpu = vm.create_vcpu(i)?;
            match &layout {
                Some(l) => x86::setup_long_mode(
                    vm.kvm(),
                    vcpu.fd(),
                    &*vm.untracked_memory(),
                    l,
                    config.load,
                    i,
                )?,
                None => x86::setup_real_mode(
                    vcpu.fd(),
                    u16::try_from(config.load).map_err(|_| Error::InvalidGuestImage {
                        program: None,
                        reason: ImageProblem::RealModePlacement,
                        source: None,
                    })?,
                )?,
            }
            vcpus.push(vcpu);
        }
        if let Some(l) = &layout {
            // The guest's page tables may be tracked (`--track` over them): stores pagetrack
            // applies to them bypass KVM's shadow MMU on shadow-paging hosts, so they are
            // marked, and KVM drops stale shadows after a changed entry.
            vm.mark_page_table_tree(Gfn(l.pml4() >> 12));
        }
        Ok(FlatGuest {
            vm,
            layout,
            vcpus,
            config,
        })
    }

    /// The VM: register notifiers and add tracks through `vm().tracker()` before running.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The long-mode layout (None in real mode).
    pub fn layout(&self) -> Option<&LongModeLayout> {
        self.layout.as_deref()
    }

    /// The vCPUs (for register set-up before the run).
    pub fn vcpus_mut(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }

    /// Runs every vCPU on its own thread until the first one ends the run; the others are
    /// stopped then.
    pub fn run(self) -> RunOutcome {
        let FlatGuest {
            vm,
            layout,
            vcpus,
            config,
        } = self;
        let start = Instant::now();
        let visible = Arc::new(AtomicU64::new(0));
        let stoppers: Vec<_> = vcpus.iter().map(Vcpu::stopper).collect();
        let ending = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<RunOutcome>();
        let mut threads = Vec::new();
        // Every KVM exit counts, those pagetrack handles inside `run` included; the limit is
        // enforced before each entry into the guest, so it is exact.
        let budget = ExitBudget::new(config.max_exits.unwrap_or(u64::MAX));
        for mut vcpu in vcpus {
            vcpu.set_exit_budget(Some(budget.clone()));
            let (vm, layout, visible, tx, ending) = (
                vm.clone(),
                layout.clone(),
                Arc::clone(&visible),
                tx.clone(),
                Arc::clone(&ending),
            );
            let limit = config.max_exits.unwrap_or_default();
            threads.push(std::thread::spawn(move || {
                let out = drive(&vm, layout.as_deref(), &mut vcpu, &visible, limit);
                if let Some((reason, code, detail)) = out
                    && !ending.swap(true, Ordering::SeqCst)
                {
                    tx.send(RunOutcome {
                        reason,
                        code,
                        detail,
                        vcpu: vcpu.index(),
                        exits: 0,
                        elapsed: Duration::ZERO,
                    })
                    .expect("the receiver lives until every vCPU thread is joined");
                }
            }));
        }
        drop(tx);
        let exits = |_: &Vm| budget.used();
        let mut outcome = loop {
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(o) => break o,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break end(EndReason::Error, "every vCPU ended without a result".into());
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if config.timeout.is_some_and(|t| start.elapsed() >= t)
                && !ending.swap(true, Ordering::SeqCst)
            {
                let t = config.timeout.unwrap_or_default();
                break end(
                    EndReason::Timeout,
                    format!("the guest did not finish within {t:?}"),
                );
            }
        };
        for s in &stoppers {
            s.stop();
        }
        let panicked = threads
            .into_iter()
            .map(std::thread::JoinHandle::join)
            .filter(Result::is_err)
            .count();
        if panicked > 0 && outcome.reason != EndReason::Error {
            // A vCPU thread that panicked (a bug) gave no result of its own: the run cannot
            // be reported as the guest's normal end.
            outcome.reason = EndReason::Error;
            outcome.detail = format!("{panicked} vcpu thread(s) panicked; {}", outcome.detail);
        }
        outcome.exits = exits(&vm);
        outcome.elapsed = start.elapsed();
        outcome
    }
}

fn end(reason: EndReason, detail: String) -> RunOutcome {
    RunOutcome {
        reason,
        code: None,
        detail,
        vcpu: 0,
        exits: 0,
        elapsed: Duration::ZERO,
    }
}

/// Runs one vCPU until it ends the run (Some) or is stopped (None).
fn drive(
    vm: &Vm,
    layout: Option<&LongModeLayout>,
    vcpu: &mut Vcpu,
    visible: &AtomicU64,
    limit: u64,
) -> Option<(EndReason, Option<u8>, String)> {
    loop {
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => {
                return Some((
                    EndReason::Error,
                    None,
                    format!("vcpu {}: {e}", vcpu.index()),
                ));
            }
        };
        visible.fetch_add(1, Ordering::Relaxed);
        match exit {
            Exit::IoOut {
                port: GUEST_EXIT_PORT,
                data,
            } => {
                let code = data.first();
                return Some((
                    EndReason::DebugExit,
                    Some(code),
                    format!(
                        "vcpu {} wrote {code} to port {GUEST_EXIT_PORT:#x}",
                        vcpu.index()
                    ),
                ));
            }
            Exit::IoOut {
                port: EXCEPTION_PORT,
                ..
            } if layout.is_some() => {
                let detail = match layout
                    .map(|l| x86::decode_exception(vcpu.fd(), &*vm.untracked_memory(), l))
                {
                    Some(Ok(ex)) => format!("vcpu {}: guest exception {ex}", vcpu.index()),
                    Some(Err(e)) => format!("vcpu {}: {e}", vcpu.index()),
                    None => "exception".into(),
                };
                return Some((EndReason::Error, None, detail));
            }
            Exit::IoOut { .. } | Exit::MmioWrite { .. } => {}
            Exit::Hlt => {
                return Some((
                    EndReason::Hlt,
                    None,
                    format!("vcpu {} halted", vcpu.index()),
                ));
            }
            Exit::Stopped => return None,
            Exit::ExitLimit => {
                return Some((
                    EndReason::ExitLimit,
                    None,
                    format!("exit limit of {limit} reached"),
                ));
            }
            other => {
                let rip = vcpu.fd().get_regs().map(|r| r.rip).unwrap_or_default();
                return Some((
                    EndReason::Error,
                    None,
                    format!(
                        "vcpu {}: unexpected exit {other:?} at rip {rip:#x}",
                        vcpu.index()
                    ),
                ));
            }
        }
    }
}
