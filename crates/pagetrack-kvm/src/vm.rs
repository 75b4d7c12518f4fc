//! The VM: KVM VM fd, guest RAM, the core tracker and the fragment table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use kvm_bindings::{KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_SLOT_ZAP_ALL, kvm_enable_cap};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use pagetrack::{
    AsId, BackendError, Enforcement, FrameRun, Gfn, MemoryRegion, PAGE_SIZE, PageTracker, SlotId,
    TrackerConfig, Tracking,
};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::dirty::DirtyBits;
use crate::error::{Error, Result};
use crate::gate::{Gate, Pauser};
use crate::memory::TrackedMemory;
use crate::ram::{Stale, TrackedRam};
use crate::relaxed::{RelaxedConfig, RelaxedMode, RelaxedStats, SyncReport};
use crate::slots::{FragmentStats, Fragments};
use crate::update::PageTableUpdate;
use crate::vcpu::Vcpu;

/// How a [`Vm`] is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmConfig {
    /// Size of the KVM memslot chunks RAM is registered in; `None` picks one from the RAM size
    /// and the slot budget (at least 2 MiB).
    pub chunk_bytes: Option<u64>,
    /// KVM memslots left for the VMM's own use when pagetrack picks its ids from 0 up; must
    /// be 0 with [`VmConfig::kvm_slots`] (refused otherwise: it would have no effect).
    pub reserved_slots: usize,
    /// Disable `KVM_X86_QUIRK_SLOT_ZAP_ALL` where KVM offers it, so that re-cutting one chunk
    /// does not make the guest refault all of its memory.
    pub disable_slot_zap_all: bool,
    /// Expected total RAM, used to choose the chunk size when [`VmConfig::chunk_bytes`] is
    /// `None` (a sizing hint: RAM beyond it is accepted, in chunks chosen for this size).
    pub expected_ram: u64,
    /// Core configuration. Its [`TrackerConfig::address_spaces`] must be 1 (the default
    /// here): this backend enforces address space 0 only, and refuses more.
    pub tracker: TrackerConfig,
    /// Log dirty pages (for live migration or diff snapshots): every KVM memslot fragment
    /// carries `KVM_MEM_LOG_DIRTY_PAGES`, and [`Vm::take_dirty_log`] returns the pages written
    /// per RAM region, stores pagetrack applies itself included.
    pub dirty_log: bool,
    /// The KVM memslot ids pagetrack may use for its fragments, when the VMM hands it a range
    /// (its own memslots use the others); `None` uses ids from 0 up, at most
    /// [`HostCaps::nr_memslots`] minus [`VmConfig::reserved_slots`] of them.
    pub kvm_slots: Option<KvmSlotIds>,
    /// Relaxed mode (`docs/RELAXED.md`): off by default.
    pub relaxed: RelaxedConfig,
    /// The signal that kicks vCPU threads out of `KVM_RUN` (with `immediate_exit`).
    pub kick: KickSignal,
    /// How dirty logs are harvested and re-protected (relaxed syncs and
    /// [`Vm::take_dirty_log`] alike).
    pub dirty_protect: DirtyProtect,
    /// The dirty ring instead of the bitmaps ([`VmConfig::with_dirty_ring`]); `None` (the
    /// default) harvests bitmaps as [`VmConfig::dirty_protect`] says.
    pub dirty_ring: Option<DirtyRing>,
}

/// A per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`, else `KVM_CAP_DIRTY_LOG_RING`;
/// [`VmConfig::with_dirty_ring`]): every harvest (relaxed syncs, [`Vm::take_dirty_log`],
/// re-cuts, checkpoints) reads the vCPUs' rings and resets them with one
/// `KVM_RESET_DIRTY_RINGS`, and coalesced events carry their frame's first writer
/// ([`pagetrack::WriteEvent::first_writer`]). On x86 the ring replaces KVM's dirty bitmaps
/// for the whole VM (the VMM's own `KVM_GET_DIRTY_LOG` fails too). KVM accepts it only
/// before the VM's first vCPU exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct DirtyRing {
    /// Entries per vCPU (16 bytes each): a power of two, at least a page's worth (256),
    /// at most what KVM offers ([`HostCaps::dirty_ring_bytes`] / 16).
    pub entries: u32,
}

impl DirtyRing {
    /// A ring of `entries` entries per vCPU (checked when the VM is set up).
    pub fn entries(entries: u32) -> DirtyRing {
        DirtyRing { entries }
    }

    /// The smallest ring KVM accepts here: a page (4 KiB, 256 entries). Hosts with PML
    /// reserve 512 entries more (KVM then refuses below 1,024: [`Error::DirtyRingRefused`]).
    pub const MIN_ENTRIES: u32 = 256;
}

/// How a VM harvests dirty pages ([`Vm::dirty_harvester`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DirtyHarvester {
    /// The dirty ring, `entries` per vCPU; `acq_rel` if `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
    Ring {
        /// Entries per vCPU.
        entries: u32,
        /// The acquire/release variant of the capability is enabled.
        acq_rel: bool,
    },
    /// The bitmap with manual protect (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`).
    ManualProtect,
    /// The bitmap with plain `KVM_GET_DIRTY_LOG`.
    Plain,
}

impl std::fmt::Display for DirtyHarvester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DirtyHarvester::Ring { acq_rel: true, .. } => f.write_str("ring-acq-rel"),
            DirtyHarvester::Ring { acq_rel: false, .. } => f.write_str("ring"),
            DirtyHarvester::ManualProtect => f.write_str("manual-protect"),
            DirtyHarvester::Plain => f.write_str("get-dirty-log"),
        }
    }
}

/// How pagetrack harvests KVM's dirty logs ([`VmConfig::dirty_protect`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DirtyProtect {
    /// Manual protect when the host offers it and pagetrack created the VM ([`Vm::new`],
    /// [`Vm::with_kvm`]); plain `KVM_GET_DIRTY_LOG` on a VM the VMM brought
    /// ([`Vm::from_vm_fd`]), where enabling the VM-wide capability would change what the
    /// VMM's own `KVM_GET_DIRTY_LOG` calls do.
    #[default]
    Auto,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: a harvest is `KVM_GET_DIRTY_LOG` (a copy) then
    /// `KVM_CLEAR_DIRTY_LOG` of exactly the bits copied (which re-protects those pages).
    /// Refused ([`Error::MissingCapability`]) where KVM lacks it. On a VM the VMM brought,
    /// say this only if the VMM's own dirty logging (if any) expects it.
    Manual,
    /// Plain `KVM_GET_DIRTY_LOG`, which copies, clears and re-protects in one step.
    Plain,
}

/// The signal pagetrack sends a vCPU thread to kick it out of `KVM_RUN`, after setting
/// `kvm_run.immediate_exit` (KVM's documented protocol; see "Pausing vCPUs" in the crate
/// docs). The vCPU threads must not block it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KickSignal {
    /// `SIGRTMIN + offset`, with a no-op handler pagetrack installs once per process (the
    /// default: offset 5). A VM refuses an offset past `SIGRTMAX`.
    Own {
        /// Offset from `SIGRTMIN`.
        offset: i32,
    },
    /// The VMM's own vCPU kick signal, whose handler the VMM installed: pagetrack only sends
    /// it (as Firecracker and Cloud Hypervisor send theirs) and installs nothing, so a VMM
    /// with one kick signal keeps one. A VM refuses a signal without a handler (a real-time
    /// signal's default action ends the process; an ignored signal does not interrupt
    /// `KVM_RUN`), or one outside `SIGRTMIN..=SIGRTMAX`. The VMM's handler runs on pagetrack's
    /// kicks too and must return (a no-op, or setting a flag its loop checks).
    Vmm {
        /// The signal number.
        signal: i32,
    },
}

impl Default for KickSignal {
    fn default() -> KickSignal {
        KickSignal::Own { offset: 5 }
    }
}

impl KickSignal {
    /// Checks the signal and installs pagetrack's handler if it is [`KickSignal::Own`];
    /// returns the signal number.
    fn prepare(self) -> Result<i32> {
        let (rtmin, rtmax) = (crate::sys::sigrtmin(), crate::sys::sigrtmax());
        match self {
            KickSignal::Own { offset } => {
                let signal = rtmin
                    .checked_add(offset)
                    .filter(|s| (rtmin..=rtmax).contains(s));
                let Some(signal) = signal else {
                    return Err(Error::InvalidConfig {
                        reason: "the kick signal offset is negative or past SIGRTMAX",
                    });
                };
                crate::sys::install_kick_handler(signal)
                    .map_err(|source| Error::KickSignal { source })?;
                Ok(signal)
            }
            KickSignal::Vmm { signal } => {
                if !(rtmin..=rtmax).contains(&signal) {
                    return Err(Error::InvalidConfig {
                        reason: "the VMM's kick signal is not a real-time signal \
                                 (SIGRTMIN..=SIGRTMAX)",
                    });
                }
                match crate::sys::has_handler(signal) {
                    Ok(true) => Ok(signal),
                    Ok(false) => Err(Error::KickSignalUnhandled { signal }),
                    Err(source) => Err(Error::KickSignal { source }),
                }
            }
        }
    }
}

/// A range of KVM memslot ids a VMM leaves to pagetrack ([`VmConfig::with_kvm_slots`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmSlotIds {
    /// The first id.
    pub first: u32,
    /// How many ids, from `first` up: the most KVM memslots pagetrack's fragments use at once.
    pub count: u32,
}

impl Default for VmConfig {
    fn default() -> VmConfig {
        VmConfig {
            chunk_bytes: None,
            reserved_slots: 8,
            disable_slot_zap_all: true,
            expected_ram: 1 << 30,
            tracker: TrackerConfig::default().with_address_spaces(1),
            dirty_log: false,
            kvm_slots: None,
            relaxed: RelaxedConfig::default(),
            kick: KickSignal::default(),
            dirty_protect: DirtyProtect::Auto,
            dirty_ring: None,
        }
    }
}

impl VmConfig {
    /// The same configuration sized for `bytes` of RAM.
    pub fn with_ram(mut self, bytes: u64) -> VmConfig {
        self.expected_ram = bytes;
        self
    }

    /// The same configuration with a fixed chunk size (a multiple of 4 KiB).
    pub fn with_chunk_bytes(mut self, bytes: u64) -> VmConfig {
        self.chunk_bytes = Some(bytes);
        self
    }

    /// The same configuration with dirty-page logging on (see [`VmConfig::dirty_log`]).
    pub fn with_dirty_log(mut self) -> VmConfig {
        self.dirty_log = true;
        self
    }

    /// The same configuration with pagetrack's fragments confined to KVM memslot ids
    /// `range` (see [`VmConfig::kvm_slots`]); [`VmConfig::reserved_slots`] becomes 0, and a
    /// VM refuses any other value with it (it would have no effect).
    pub fn with_kvm_slots(mut self, range: std::ops::Range<u32>) -> VmConfig {
        self.reserved_slots = 0;
        self.kvm_slots = Some(KvmSlotIds {
            first: range.start,
            count: range.end.saturating_sub(range.start),
        });
        self
    }

    /// Refuses settings pagetrack would accept and then ignore (or not honour), so that
    /// none is silently without effect.
    fn check(&self, caps: &HostCaps) -> Result<()> {
        let bad = |reason| Err(Error::InvalidConfig { reason });
        if self.tracker.address_spaces != 1 {
            // Tracks in another address space would be counted by the core and enforced by
            // nobody (this backend serves address space 0: no SMM memslots).
            return bad("pagetrack-kvm enforces address space 0 only: \
                        the tracker needs TrackerConfig::with_address_spaces(1)");
        }
        if let Some(ids) = self.kvm_slots {
            let end = u64::from(ids.first) + u64::from(ids.count);
            if ids.count == 0 || end > u64::try_from(caps.nr_memslots).unwrap_or(u64::MAX) {
                return bad("the KVM slot id range is empty or beyond KVM_CAP_NR_MEMSLOTS");
            }
            if self.reserved_slots != 0 {
                return bad("reserved_slots has no effect with a KVM slot id range \
                            (the VMM's memslots use the ids outside it): leave it 0");
            }
        }
        Ok(())
    }

    /// The same configuration with relaxed mode set up as `relaxed` (see
    /// [`VmConfig::relaxed`]).
    pub fn with_relaxed(mut self, relaxed: RelaxedConfig) -> VmConfig {
        self.relaxed = relaxed;
        self
    }

    /// The same configuration with `kick` as the vCPU kick signal (see [`KickSignal`]).
    pub fn with_kick_signal(mut self, kick: KickSignal) -> VmConfig {
        self.kick = kick;
        self
    }

    /// The same configuration with dirty logs harvested as `how` says (see
    /// [`VmConfig::dirty_protect`]).
    pub fn with_dirty_protect(mut self, how: DirtyProtect) -> VmConfig {
        self.dirty_protect = how;
        self
    }

    /// The same configuration with a dirty ring of `ring` (see [`DirtyRing`]) instead of the
    /// bitmaps. Refused at set-up ([`Error::DirtyRingSize`], [`Error::DirtyRingUnsupported`],
    /// [`Error::DirtyRingRefused`]) rather than ignored, as is `DirtyProtect::Manual`
    /// with it ([`Error::InvalidConfig`]).
    pub fn with_dirty_ring(mut self, ring: DirtyRing) -> VmConfig {
        self.dirty_ring = Some(ring);
        self
    }

    /// [`VmConfig::with_dirty_ring`] if `ring` is `Some`, else the same configuration
    /// without a ring (for VMMs that pass an optional setting through).
    pub fn with_dirty_ring_if(mut self, ring: Option<DirtyRing>) -> VmConfig {
        self.dirty_ring = ring;
        self
    }

    /// The same configuration with the zap-all quirk left as KVM has it.
    pub fn keep_slot_zap_all(mut self) -> VmConfig {
        self.disable_slot_zap_all = false;
        self
    }
}

/// Checks a requested dirty ring against the host: returns its size in bytes and whether
/// the acquire/release capability is used (preferred where KVM offers it).
fn ring_setup(caps: &HostCaps, ring: DirtyRing, protect: DirtyProtect) -> Result<(u32, bool)> {
    if protect == DirtyProtect::Manual {
        return Err(Error::InvalidConfig {
            reason: "DirtyProtect::Manual has no effect with the dirty ring (it replaces the \
                     bitmaps): leave it Auto",
        });
    }
    let acq_rel = caps.dirty_ring_acq_rel_bytes > 0;
    let max_bytes = if acq_rel {
        caps.dirty_ring_acq_rel_bytes
    } else {
        caps.dirty_ring_bytes
    };
    if max_bytes == 0 {
        return Err(Error::DirtyRingUnsupported {
            entries: ring.entries,
        });
    }
    let max_entries = max_bytes / 16;
    if !ring.entries.is_power_of_two()
        || ring.entries < DirtyRing::MIN_ENTRIES
        || ring.entries > max_entries
    {
        return Err(Error::DirtyRingSize {
            entries: ring.entries,
            min: DirtyRing::MIN_ENTRIES,
            max: max_entries,
        });
    }
    Ok((ring.entries * 16, acq_rel))
}

/// What this host's KVM offers that pagetrack uses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostCaps {
    /// `KVM_CAP_READONLY_MEM`.
    pub readonly_mem: bool,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub nr_memslots: usize,
    /// Quirks that `KVM_CAP_DISABLE_QUIRKS2` can disable (bit mask).
    pub disable_quirks2: u64,
    /// `KVM_CAP_SYNC_REGS` register sets.
    pub sync_regs: u32,
    /// `KVM_CAP_DIRTY_LOG_RING` size in bytes (0 if absent).
    pub dirty_ring_bytes: u32,
    /// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` size in bytes (0 if absent): the ring whose
    /// harvest from another thread while vCPUs run is ordered by acquire/release.
    pub dirty_ring_acq_rel_bytes: u32,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` flags (0 if absent; bit 0 manual protect, bit 1
    /// initially-set).
    pub manual_dirty_protect: u32,
    /// True when KVM runs without hardware virtualization (PVM): the host CPU has no vmx/svm
    /// flag, or the kvm_pvm module is loaded. Guest CPL0 code is then emulated.
    pub software_kvm: bool,
    /// True when KVM uses shadow paging (no EPT/NPT), so guest page-table writes must be
    /// made visible to KVM's shadow MMU.
    pub shadow_paging: bool,
    /// `KVM_CAP_X86_USER_SPACE_MSR` and `KVM_CAP_X86_MSR_FILTER`: guest writes of the MSRs
    /// that make KVM write guest memory itself (kvmclock and the like) can be intercepted, so
    /// that they never name a tracked frame (see `docs/DESIGN-kvm.md`).
    pub msr_filter: bool,
    /// The module that provides `/dev/kvm` (kvm_intel, kvm_amd, kvm_pvm...), if known.
    pub module: Option<String>,
}

impl HostCaps {
    /// Reads the capabilities of `kvm` and what `/proc` and `/sys` say about the module.
    pub fn probe(kvm: &Kvm) -> HostCaps {
        let module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
            .into_iter()
            .find(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
            .map(str::to_owned);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let software_kvm = module.as_deref() == Some("kvm_pvm") || !hw;
        let tdp = |m: &str, p: &str| {
            std::fs::read_to_string(format!("/sys/module/{m}/parameters/{p}"))
                .map(|v| matches!(v.trim(), "Y" | "1"))
                .unwrap_or(false)
        };
        let shadow_paging = match module.as_deref() {
            Some("kvm_intel") => !tdp("kvm_intel", "ept"),
            Some("kvm_amd") => !tdp("kvm_amd", "npt"),
            _ => true,
        };
        HostCaps {
            module,
            ..HostCaps::from_kvm(kvm, software_kvm, shadow_paging)
        }
    }

    /// The capabilities of `kvm` from its ioctls alone (`KVM_CHECK_EXTENSION`), with the two
    /// facts only `/proc` and `/sys` tell given by the VMM: whether KVM runs without
    /// hardware virtualization ([`HostCaps::software_kvm`]) and whether it uses shadow
    /// paging ([`HostCaps::shadow_paging`]; `true` is always safe, at some cost on TDP hosts).
    /// For a jailed VMM that has neither file system.
    pub fn from_kvm(kvm: &Kvm, software_kvm: bool, shadow_paging: bool) -> HostCaps {
        let raw = |c: u32| kvm.check_extension_raw(u64::from(c));
        HostCaps {
            readonly_mem: raw(kvm_bindings::KVM_CAP_READONLY_MEM) > 0,
            nr_memslots: kvm.get_nr_memslots(),
            disable_quirks2: u64::try_from(raw(KVM_CAP_DISABLE_QUIRKS2)).unwrap_or(0),
            sync_regs: u32::try_from(raw(kvm_bindings::KVM_CAP_SYNC_REGS)).unwrap_or(0),
            dirty_ring_bytes: u32::try_from(raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING)).unwrap_or(0),
            dirty_ring_acq_rel_bytes: u32::try_from(raw(
                kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            ))
            .unwrap_or(0),
            manual_dirty_protect: u32::try_from(raw(
                kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ))
            .unwrap_or(0),
            msr_filter: raw(kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR) > 0
                && raw(kvm_bindings::KVM_CAP_X86_MSR_FILTER) > 0,
            software_kvm,
            shadow_paging,
            module: None,
        }
    }
}

/// Counters of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VmStats {
    /// Guest stores that exited to userspace and were applied (tracked or not).
    pub trapped_writes: u64,
    /// Bytes of those stores.
    pub trapped_bytes: u64,
    /// Stores pagetrack emulated itself (the hard cases).
    pub emulated_stores: u64,
    /// Locked read-modify-writes re-executed atomically (failed compare-exchanges included).
    pub atomic_rmws: u64,
    /// Elements of `rep stos`/`rep movs` into tracked frames completed in userspace after a
    /// trapped element (each applied and reported like a trapped store, without an exit).
    pub string_elements: u64,
    /// Stores to marked page-table frames that changed a present translation, after which
    /// KVM's shadows of the frame were dropped.
    pub pt_invalidations: u64,
    /// Guest reads of RAM served in userspace (during slot changes).
    pub ram_reads_served: u64,
    /// Device writes through [`TrackedMemory`].
    pub device_writes: u64,
    /// Fragment table counters.
    pub fragments: FragmentStats,
    /// Times every vCPU was paused for slot changes.
    pub pauses: u64,
    /// Time spent pausing vCPUs, nanoseconds.
    pub pause_ns: u64,
    /// Failed re-cuts whose undo failed too (the layout is then stricter than the tracked
    /// set: writes to some untracked frames exit and are applied silently).
    pub restore_errors: u64,
    /// Relaxed-mode counters.
    pub relaxed: RelaxedStats,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) trapped_writes: AtomicU64,
    pub(crate) trapped_bytes: AtomicU64,
    pub(crate) emulated_stores: AtomicU64,
    pub(crate) atomic_rmws: AtomicU64,
    pub(crate) string_elements: AtomicU64,
    pub(crate) pt_invalidations: AtomicU64,
    pub(crate) pt_invalidation_errors: AtomicU64,
    pub(crate) ram_reads_served: AtomicU64,
    pub(crate) device_writes: AtomicU64,
    pauses: AtomicU64,
    pause_ns: AtomicU64,
    restore_errors: AtomicU64,
}

/// The core's enforcement backend: protected frames live in read-only fragments.
#[derive(Debug)]
pub(crate) struct Backend {
    /// Shared with the VMM when it brought its own ([`Vm::from_vm_fd`]).
    pub(crate) vm_fd: Arc<VmFd>,
    /// The vCPUs' dirty rings, when the VM enabled them ([`VmConfig::with_dirty_ring`]).
    pub(crate) rings: Option<Arc<crate::ring::DirtyRings>>,
    pub(crate) gate: Gate,
    /// The address-space lock: completions against page-table updates (`update.rs`).
    pub(crate) updates: crate::update::Updates,
    frags: Mutex<Fragments>,
    pub(crate) counters: Counters,
    /// Structures KVM writes itself (named by the guest through MSRs): never tracked.
    pub(crate) kvm_written: crate::pvmsr::KvmWritten,
    /// Relaxed mode (`relaxed.rs`).
    pub(crate) relaxed: crate::relaxed::Relaxed,
}

impl Backend {
    /// The fragment table. A promotion holds it while it pauses, and a pause waits for
    /// vCPUs with a continuation: a vCPU thread that finds it taken (a sync or a demotion at
    /// a trapped store's periodic check) parks its continuation before blocking, as for the
    /// sync lock and the frame locks (review 13: an exact registration racing a promotion
    /// left such a vCPU blocked here and the promotion's pause waiting for it).
    pub(crate) fn frags(&self) -> MutexGuard<'_, Fragments> {
        match self.frags.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.gate.park_here();
                self.frags.lock().unwrap_or_else(|e| e.into_inner())
            }
        }
    }

    pub(crate) fn count_restore_error(&self) {
        self.counters.restore_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn change(&self, runs: &[FrameRun], protect: bool) -> Result<()> {
        // This backend serves address space 0 only (`VmConfig` builds a one-space tracker).
        let gpas = || FrameRun::pairs(runs).map(|(_, g)| g.gpa().0);
        if protect {
            // Checked after the core raised its counts: see `crate::pvmsr`.
            self.kvm_written
                .check_protect(FrameRun::pairs(runs).map(|(_, g)| g))?;
        }
        let mut frags = self.frags();
        // Relaxed frames being untracked: their shadows go (see `Vm::sync`).
        let unrelaxed: Vec<u64> = if !protect && self.relaxed.active() > 0 {
            gpas().filter(|&g| frags.is_relaxed(g)).collect()
        } else {
            Vec::new()
        };
        let relaxed_mode = protect && self.relaxed.config.mode == RelaxedMode::Always;
        // Auto: frames tracked again that were relaxed when untracked, and still lie in
        // their logged fragment (`Fragments::mark`), are relaxed again at once: making them
        // strict would re-cut the chunk read-only, and their first trapped store would
        // promote them back (another re-cut: `malloc` after `free`, docs/RELAXED.md).
        let lingering: Vec<u64> = if protect && self.relaxed.config.mode == RelaxedMode::Auto {
            gpas().filter(|&g| frags.is_lingering(g)).collect()
        } else {
            Vec::new()
        };
        let Some(recut) = recut(
            &mut frags,
            &self.vm_fd,
            &self.gate,
            gpas,
            protect,
            |frags| {
                if !relaxed_mode {
                    if lingering.is_empty() {
                        return (Vec::new(), Vec::new());
                    }
                    return self.relaxed.relax_paused(frags, lingering.iter().copied());
                }
                // Tracked and relaxed at once: the fragment is created writable and logged,
                // with the shadow taken now, while paused (`relaxed.rs`).
                self.relaxed.relax_paused(frags, gpas())
            },
            |frags, relaxed_now, failed| {
                // Untracked relaxed frames are plain writable now (or, after a failed re-cut,
                // strict again): either way no longer relaxed.
                self.relaxed.forget(&unrelaxed);
                if failed {
                    // Frames relaxed above go back to plain tracking with the undo.
                    let (frames, _) = frags.set_relaxed(relaxed_now.iter().copied(), false);
                    self.relaxed.forget(&frames);
                }
            },
        ) else {
            return Ok(());
        };
        if recut.restore_failed {
            self.counters.restore_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.counters.pauses.fetch_add(1, Ordering::Relaxed);
        self.counters.pause_ns.fetch_add(
            u64::try_from(recut.paused_for.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        recut.res
    }
}

/// What [`recut`] did.
#[derive(Debug)]
struct Recut {
    /// The re-cut's result (its first error).
    res: Result<()>,
    /// The re-cut failed and so did its undo (`VmStats::restore_errors`).
    restore_failed: bool,
    /// How long the vCPUs were paused.
    paused_for: std::time::Duration,
}

/// The enforcer's memslot change for a tracking change of the frames `gpas()`: marks their
/// bits, and when a chunk's layout changes, pauses the vCPUs through `pauser` and re-cuts the
/// chunks through `slots`. `while_paused` runs first under the pause and returns what it did
/// and more chunks to re-cut; `after(frags, what, failed)` runs after the re-cut. A failed re-cut is undone: the
/// previous bits and layout are restored as far as KVM allows. If that fails too, the first
/// error is the one returned, and what KVM is left with is safe: a failed re-cut keeps the
/// fragments it could not delete and leaves ranges it could not create without a slot,
/// where every access exits (stricter than the counts, never weaker). `None`: no layout
/// changed, nothing was paused.
fn recut<S, P, I, T>(
    frags: &mut Fragments,
    slots: &S,
    pauser: &P,
    gpas: impl Fn() -> I,
    protect: bool,
    while_paused: impl FnOnce(&mut Fragments) -> (T, Vec<(usize, usize)>),
    after: impl FnOnce(&mut Fragments, T, bool),
) -> Option<Recut>
where
    S: crate::slots::SlotOps + ?Sized,
    P: Pauser,
    I: Iterator<Item = u64>,
{
    let mut dirty = frags.mark(gpas(), protect);
    if dirty.is_empty() {
        return None;
    }
    let start = Instant::now();
    let paused = pauser.pause();
    let (done, more) = while_paused(frags);
    if !more.is_empty() {
        dirty.extend(more);
        dirty.sort_unstable();
        dirty.dedup();
    }
    let res = frags.relayout(slots, &dirty);
    after(frags, done, res.is_err());
    let mut restore_failed = false;
    if res.is_err() {
        let back = frags.mark(gpas(), !protect);
        restore_failed = frags.relayout(slots, &back).is_err();
    }
    drop(paused);
    Some(Recut {
        res,
        restore_failed,
        paused_for: start.elapsed(),
    })
}

impl Enforcement for Backend {
    fn protect(&self, runs: &[FrameRun]) -> std::result::Result<(), BackendError> {
        self.change(runs, true).map_err(BackendError::new)
    }

    fn unprotect(&self, runs: &[FrameRun]) -> std::result::Result<(), BackendError> {
        self.change(runs, false).map_err(BackendError::new)
    }

    fn before_untrack(&self, runs: &[FrameRun]) {
        crate::relaxed::before_untrack(self, runs);
    }

    fn after_untrack(&self, runs: &[FrameRun]) {
        crate::relaxed::after_untrack(self, runs);
    }

    fn before_unregister(&self) {
        crate::relaxed::before_unregister(self);
    }

    fn before_register(&self, delivery: pagetrack::Delivery) {
        crate::relaxed::before_register(self, delivery);
    }

    fn after_register(&self, delivery: pagetrack::Delivery) {
        crate::relaxed::after_register(self, delivery);
    }
}

impl Drop for VmInner {
    fn drop(&mut self) {
        // The VM goes away while notifiers may still be registered: relaxed frames' changes
        // since the last sync are delivered, as an untrack would (`relaxed.rs`). A harvest
        // that fails here has no caller to report to: counted in the backend's
        // `restore_errors` (it may outlive the VM in a notifier's handle).
        if crate::relaxed::sync(self).is_err() {
            self.backend.count_restore_error();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if Arc::strong_count(&self.vm_fd) > 1 {
            // The VMM keeps its VM: pagetrack's fragments go, its own memslots stay.
            let vm_fd = Arc::clone(&self.vm_fd);
            self.frags().delete_all(&vm_fd);
        } else {
            // The VM fd closes right after this and takes every memslot with it.
            self.frags().forget_all();
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RamInfo {
    pub(crate) slot: SlotId,
    pub(crate) gpa: u64,
    pub(crate) size: u64,
    pub(crate) dirty: Option<Arc<DirtyBits>>,
}

#[derive(Debug)]
pub(crate) struct VmInner {
    pub(crate) kvm: Kvm,
    pub(crate) backend: Arc<Backend>,
    pub(crate) tracker: Arc<PageTracker>,
    /// The consumer view of `tracker` ([`Vm::tracker`]).
    view: Tracking,
    pub(crate) mem: GuestMemoryAtomic<GuestMemoryMmap>,
    rams: Mutex<Vec<RamInfo>>,
    vcpus: Mutex<Vec<u32>>,
    pub(crate) caps: HostCaps,
    config: VmConfig,
    /// Guest memory as pagetrack writes it (`ram.rs`): frame locks, page-table coherence,
    /// the dirty log of its own stores.
    pub(crate) ram: TrackedRam,
    xsave_layout: std::sync::OnceLock<(crate::emulate::XsaveLayout, u64)>,
    stall_monitor: std::sync::Once,
    /// The signal number of [`VmConfig::kick`], checked (and its handler installed).
    pub(crate) kick_signal: i32,
    /// The checkpoint ([`Vm::checkpoint`], `checkpoint.rs`).
    pub(crate) checkpoint: Mutex<Option<crate::checkpoint::Image>>,
}

/// How often the stall monitor looks at the vCPUs: a vCPU inside one `KVM_RUN` for two
/// periods is kicked out and checked ([`crate::Vcpu::run`]).
pub(crate) const STALL_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

/// The stall monitor: while the VM lives, kicks vCPUs that stay inside one `KVM_RUN` for a
/// whole [`STALL_PERIOD`] (a kick costs about one exit), so that a guest KVM keeps busy
/// without exits (an `sgdt` into a tracked frame, which KVM retries forever) is noticed.
fn stall_monitor(vm: std::sync::Weak<VmInner>) {
    let mut seen = Vec::new();
    loop {
        std::thread::sleep(STALL_PERIOD);
        let Some(vm) = vm.upgrade() else {
            return;
        };
        vm.backend.gate.kick_unchanged(&mut seen);
    }
}

impl VmInner {
    /// The RAM regions, locked (no region is added or removed until the guard drops).
    pub(crate) fn rams(&self) -> MutexGuard<'_, Vec<RamInfo>> {
        self.rams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True if the VM logs dirty pages ([`VmConfig::dirty_log`]).
    pub(crate) fn dirty_log(&self) -> bool {
        self.config.dirty_log
    }

    /// Locks the frames of `gpas` ([`TrackedRam::lock`]); a vCPU thread that finds one held
    /// parks its continuation first (`Gate::park_here`, `FrameLocks::lock`).
    pub(crate) fn lock_frames(&self, gpas: impl Iterator<Item = u64>) -> crate::store::Held<'_> {
        self.ram.lock(&|| self.backend.gate.park_here(), gpas)
    }

    /// For a store pagetrack emulates into the ranges `spans` (`(gpa, len)`): the frames'
    /// stripe locks, and first the sync lock if a range touches a relaxed frame, held until
    /// the store's events are delivered (lock order, `relaxed::lock_for_write`).
    pub(crate) fn lock_for_store(&self, spans: &[(u64, u64)]) -> StoreLocks<'_> {
        let gpas = || {
            spans
                .iter()
                .flat_map(|&(gpa, len)| crate::ram::pages(gpa, len))
        };
        let (sync, frames) =
            crate::relaxed::lock_for_write_spans(self, spans, || self.lock_frames(gpas()));
        StoreLocks {
            frames,
            _sync: sync,
        }
    }
}

/// The locks of a store pagetrack emulates ([`VmInner::lock_for_store`]).
pub(crate) struct StoreLocks<'a> {
    /// The frames' stripe locks (released first).
    pub(crate) frames: crate::store::Held<'a>,
    /// The relaxed-mode sync lock, when a target is relaxed.
    _sync: Option<crate::relaxed::SyncHeld<'a>>,
}

impl std::fmt::Debug for StoreLocks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLocks")
            .field("sync", &self._sync.is_some())
            .finish_non_exhaustive()
    }
}

/// Relaxed frames' shadows, kept by `relaxed.rs`, around the writes [`TrackedRam`] commits.
impl crate::ram::Shadows for VmInner {
    fn lock_for_copy<'a>(
        &'a self,
        ram: &'a TrackedRam,
        gpa: u64,
        len: u64,
    ) -> (crate::ram::ShadowLock<'a>, crate::store::Held<'a>) {
        crate::relaxed::lock_for_write(self, gpa, len, || {
            ram.lock(
                &|| self.backend.gate.park_here(),
                crate::ram::pages(gpa, len),
            )
        })
    }

    fn before_copy(&self, gpa: u64, len: u64) -> crate::ram::ShadowLock<'_> {
        crate::relaxed::before_apply(self, gpa, len)
    }

    fn after_copy(&self, lock: &mut crate::ram::ShadowLock<'_>, gpa: u64, old: &[u8], new: &[u8]) {
        crate::relaxed::after_apply(self, lock, gpa, old, new);
    }

    fn applied(&self, gpa: u64, old: &[u8], new: &[u8]) -> crate::ram::ShadowLock<'_> {
        crate::relaxed::applied(self, gpa, old, new)
    }
}

impl VmInner {
    /// True if guest stores to the frame of `gpa` trap (it is write-tracked and strict): KVM
    /// cannot write it, so a store it emulates there reaches userspace or is dropped. A
    /// relaxed frame is tracked but writable (`relaxed.rs`).
    pub(crate) fn traps_stores(&self, gpa: u64) -> bool {
        self.tracker
            .is_write_tracked(pagetrack::AsId::NORMAL, pagetrack::Gfn(gpa >> 12))
            && !self.backend.relaxed.is_shadowed(gpa)
    }

    /// Makes KVM drop its shadows of the page-table frames a commit left stale ([`Stale`])
    /// before any vCPU runs on.
    pub(crate) fn invalidate_stale(&self, stale: Stale) {
        if stale.0.is_empty() {
            return;
        }
        self.backend
            .counters
            .pt_invalidations
            .fetch_add(1, Ordering::Relaxed);
        let gpas: Vec<u64> = stale.0.iter().map(|g| g.gpa().0).collect();
        let mut frags = self.backend.frags();
        let _paused = self.backend.gate.pause();
        // A failure leaves a stale shadow; nothing better can be done here than to count it.
        if frags.recreate(&self.backend.vm_fd, &gpas).is_err() {
            self.backend
                .counters
                .pt_invalidation_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Where XSAVE components live, and the XCR0 bits KVM supports, from KVM's supported
    /// CPUID (computed once).
    fn xsave_info(&self) -> (crate::emulate::XsaveLayout, u64) {
        *self.xsave_layout.get_or_init(|| {
            match self
                .kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            {
                Ok(c) => {
                    let xcr0 = c
                        .as_slice()
                        .iter()
                        .find(|e| e.function == 0xd && e.index == 0)
                        .map_or(3, |e| u64::from(e.eax) | (u64::from(e.edx) << 32));
                    (crate::emulate::XsaveLayout::from_cpuid(c.as_slice()), xcr0)
                }
                Err(_) => (crate::emulate::XsaveLayout::typical(), 3),
            }
        })
    }

    pub(crate) fn xsave_layout(&self) -> crate::emulate::XsaveLayout {
        self.xsave_info().0
    }

    pub(crate) fn supported_xcr0(&self) -> u64 {
        self.xsave_info().1
    }
}

/// A KVM VM with exact write tracking. Cheap to clone (shared).
///
/// ```no_run
/// use std::sync::Arc;
/// use pagetrack::{Gfn, NotifierClass, TrackNotifier, WriteEvent};
/// use pagetrack_kvm::{Vm, VmConfig};
/// use vm_memory::{Bytes, GuestAddress};
///
/// struct Print;
/// impl TrackNotifier for Print {
///     fn track_write(&self, e: &WriteEvent<'_>) {
///         println!("{} wrote {:02x?} at {:#x} (was {:02x?})", e.source, e.new, e.gpa.0, e.old);
///     }
/// }
///
/// let vm = Vm::new(VmConfig::default().with_ram(64 << 20))?;
/// vm.add_ram(0, 64 << 20)?;
/// let _handle = vm.tracker().register(Arc::new(Print), NotifierClass::Ordinary)?;
/// vm.tracker().add_gfn(Gfn(0x5))?; // guest stores to 0x5000..0x6000 now reach Print
/// vm.memory().write_slice(&[1, 2, 3], GuestAddress(0x5000))?; // and so do device writes
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Vm {
    pub(crate) inner: Arc<VmInner>,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM.
    ///
    /// # Errors
    /// KVM is missing or lacks read-only memslots, or an ioctl failed.
    pub fn new(config: VmConfig) -> Result<Vm> {
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        Vm::with_kvm(kvm, config)
    }

    /// Creates a VM on an open `/dev/kvm`.
    ///
    /// # Errors
    /// As [`Vm::new`].
    pub fn with_kvm(kvm: Kvm, config: VmConfig) -> Result<Vm> {
        let caps = HostCaps::probe(&kvm);
        if !caps.readonly_mem {
            return Err(Error::MissingCapability {
                what: "KVM_CAP_READONLY_MEM",
            });
        }
        let vm_fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        Vm::assemble(kvm, Arc::new(vm_fd), caps, config, true)
    }

    /// Adds write tracking to a VM the VMM created and keeps: its `VmFd` (shared), the host
    /// capabilities it determined ([`HostCaps::from_kvm`] needs no `/proc` or `/sys`;
    /// [`HostCaps::probe`] reads them), and the KVM memslot ids pagetrack may use ([`VmConfig::with_kvm_slots`]:
    /// ids outside the range are never touched). pagetrack creates no memory of its own: the
    /// VMM registers its guest memory regions with [`Vm::add_region`] and runs its vCPUs
    /// through an [`ExitHandler`](crate::ExitHandler) each (see the crate docs for the whole
    /// contract). `kvm` is used for KVM's supported CPUID (its fd is duplicated, the VMM
    /// keeps its own). When the returned `Vm` and every clone are gone, pagetrack's memslots
    /// are deleted and the VMM's are left as they are.
    ///
    /// # Errors
    /// `caps` lacks read-only memslots; `config` has no slot range, or one beyond
    /// [`HostCaps::nr_memslots`]; an ioctl failed.
    pub fn from_vm_fd(kvm: &Kvm, vm_fd: Arc<VmFd>, caps: HostCaps, config: VmConfig) -> Result<Vm> {
        if !caps.readonly_mem {
            return Err(Error::MissingCapability {
                what: "KVM_CAP_READONLY_MEM",
            });
        }
        if config.kvm_slots.is_none() {
            return Err(Error::InvalidConfig {
                reason: "a VM brought by the VMM needs the KVM slot ids pagetrack may use \
                         (VmConfig::with_kvm_slots)",
            });
        }
        let kvm = crate::sys::dup_kvm(kvm).map_err(Error::kvm("dup /dev/kvm"))?;
        Vm::assemble(kvm, vm_fd, caps, config, false)
    }

    fn assemble(
        kvm: Kvm,
        vm_fd: Arc<VmFd>,
        caps: HostCaps,
        config: VmConfig,
        own_vm: bool,
    ) -> Result<Vm> {
        // Everything is checked before anything is done to the VM (a VMM's VM included).
        config.check(&caps)?;
        let offered =
            caps.manual_dirty_protect & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        let ring = match config.dirty_ring {
            Some(ring) => Some(ring_setup(&caps, ring, config.dirty_protect)?),
            None => None,
        };
        let manual = match config.dirty_protect {
            _ if ring.is_some() => false,
            DirtyProtect::Auto => offered && own_vm,
            DirtyProtect::Manual if !offered => {
                return Err(Error::MissingCapability {
                    what: "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
                });
            }
            DirtyProtect::Manual => true,
            DirtyProtect::Plain => false,
        };
        let kick_signal = config.kick.prepare()?;
        let zap_all = u64::from(KVM_X86_QUIRK_SLOT_ZAP_ALL);
        if config.disable_slot_zap_all && caps.disable_quirks2 & zap_all != 0 {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_DISABLE_QUIRKS2,
                ..Default::default()
            };
            cap.args[0] = zap_all;
            vm_fd
                .enable_cap(&cap)
                .map_err(Error::kvm("KVM_ENABLE_CAP(DISABLE_QUIRKS2)"))?;
        }
        if manual {
            crate::sys::enable_manual_protect(&vm_fd)
                .map_err(Error::kvm("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)"))?;
        }
        let rings = match ring {
            Some((bytes, acq_rel)) => {
                crate::sys::enable_dirty_ring(&vm_fd, acq_rel, bytes).map_err(|source| {
                    Error::DirtyRingRefused {
                        entries: bytes / 16,
                        source,
                    }
                })?;
                Some(Arc::new(crate::ring::DirtyRings::new(bytes, acq_rel)))
            }
            None => None,
        };
        let (first_id, budget) = match config.kvm_slots {
            Some(ids) => (ids.first, usize::try_from(ids.count).unwrap_or(usize::MAX)),
            None => (
                0,
                caps.nr_memslots
                    .saturating_sub(config.reserved_slots)
                    .max(1),
            ),
        };
        let chunk = config.chunk_bytes.unwrap_or_else(|| {
            // Spend at most an eighth of the budget on the initial chunks.
            let per = config.expected_ram / (u64::try_from(budget / 8).unwrap_or(1).max(1));
            per.next_power_of_two().max(2 << 20)
        });
        if chunk == 0 || !chunk.is_multiple_of(PAGE_SIZE) {
            return Err(Error::InvalidRam {
                gpa: 0,
                size: chunk,
                reason: "chunk size must be a non-zero multiple of 4 KiB",
            });
        }
        let mut frags = Fragments::new(first_id, budget, chunk, config.dirty_log);
        frags.set_manual_protect(manual);
        if let Some(rings) = &rings {
            frags.set_rings(Arc::clone(rings));
        }
        let backend = Arc::new(Backend {
            rings,
            vm_fd,
            gate: Gate::default(),
            updates: crate::update::Updates::default(),
            frags: Mutex::new(frags),
            counters: Counters::default(),
            kvm_written: crate::pvmsr::KvmWritten::default(),
            relaxed: crate::relaxed::Relaxed::new(config.relaxed),
        });
        crate::pvmsr::install(&backend.vm_fd, caps.msr_filter)?;
        let tracker =
            PageTracker::new(config.tracker, Arc::clone(&backend) as Arc<dyn Enforcement>);
        backend.relaxed.set_tracker(Arc::downgrade(&tracker));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let ram = TrackedRam::new(mem.clone(), Arc::clone(&tracker), config.dirty_log);
        let vm = Vm {
            inner: Arc::new(VmInner {
                kvm,
                backend,
                view: Tracking::new(Arc::clone(&tracker)),
                tracker,
                mem,
                rams: Mutex::new(Vec::new()),
                vcpus: Mutex::new(Vec::new()),
                caps,
                config,
                ram,
                xsave_layout: std::sync::OnceLock::new(),
                stall_monitor: std::sync::Once::new(),
                kick_signal,
                checkpoint: Mutex::new(None),
            }),
        };
        vm.inner.backend.relaxed.set_vm(Arc::downgrade(&vm.inner));
        Ok(vm)
    }

    /// The write tracker, as its consumers see it: register notifiers, add and remove
    /// tracked frames, query. Memslots are this VM's to change ([`Vm::add_ram`],
    /// [`Vm::add_region`], [`Vm::remove_ram`]) and writes its to report, so the owner's half
    /// of the core ([`PageTracker::set_memory_region`], [`PageTracker::report_write`]) is not
    /// reachable through it: the core cannot be desynchronised from KVM's memslots.
    ///
    /// ```compile_fail,E0599
    /// use pagetrack::{Gfn, MemoryRegion, SlotId};
    /// fn desynchronise(vm: &pagetrack_kvm::Vm) {
    ///     // No such method on the consumer view: memslots are the VM's.
    ///     let _ = vm.tracker().set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16));
    /// }
    /// ```
    pub fn tracker(&self) -> &Tracking {
        &self.inner.view
    }

    /// Guest memory through which device models read and write: writes to tracked frames
    /// produce events with [`Source::Device`](pagetrack::Source::Device).
    pub fn memory(&self) -> TrackedMemory {
        TrackedMemory::new(Arc::clone(&self.inner))
    }

    /// Guest memory **bypassing tracking**: writes through it (or through its regions and
    /// `VolatileSlice`s) reach no notifier, take no frame lock and are not in the dirty log.
    /// For loading images before anything is tracked, for reads, and for code that needs a
    /// [`vm_memory::GuestMemory`] (page-table walks, boot set-up). Device writes go through
    /// [`Vm::memory`] instead. (It was `raw_memory`; the name now says what it does.)
    pub fn untracked_memory(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap> {
        self.inner.mem.memory()
    }

    /// The KVM VM fd (for irqchips, ioeventfds and other VMM set-up).
    pub fn vm_fd(&self) -> &VmFd {
        &self.inner.backend.vm_fd
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.inner.kvm
    }

    /// What the host offers.
    pub fn caps(&self) -> &HostCaps {
        &self.inner.caps
    }

    /// The configuration.
    pub fn config(&self) -> VmConfig {
        self.inner.config
    }

    /// True if dirty logs are harvested with manual protect (`KVM_GET_DIRTY_LOG` then
    /// `KVM_CLEAR_DIRTY_LOG` of exactly the harvested bits, see [`DirtyProtect`]), false if
    /// with plain `KVM_GET_DIRTY_LOG`.
    pub fn manual_dirty_protect(&self) -> bool {
        self.inner.backend.frags().manual_protect()
    }

    /// Which harvester reads KVM's dirty log: the ring, manual protect or plain
    /// `KVM_GET_DIRTY_LOG` ([`VmConfig::with_dirty_ring`], [`VmConfig::with_dirty_protect`]).
    pub fn dirty_harvester(&self) -> DirtyHarvester {
        if let Some(r) = &self.inner.backend.rings {
            return DirtyHarvester::Ring {
                entries: r.entries(),
                acq_rel: r.acq_rel(),
            };
        }
        if self.manual_dirty_protect() {
            DirtyHarvester::ManualProtect
        } else {
            DirtyHarvester::Plain
        }
    }

    /// With the dirty ring on a VM the VMM brought ([`Vm::from_vm_fd`]): the pages of the
    /// VMM's own memslots the rings logged since the last call, as (memslot id, page index
    /// in the slot), ascending, each once. The ring is the VM's only dirty log (KVM keeps no
    /// bitmap with it), so pagetrack's harvests keep these for the VMM rather than drop
    /// them. Empty without the ring.
    ///
    /// # Errors
    /// A failed ring harvest or `KVM_RESET_DIRTY_RINGS`.
    pub fn take_vmm_ring_dirty(&self) -> Result<Vec<(u32, u64)>> {
        self.inner
            .backend
            .frags()
            .take_foreign(&self.inner.backend.vm_fd)
    }

    /// Dirty-ring counters (`None` without the ring).
    pub fn ring_stats(&self) -> Option<crate::ring::RingStats> {
        self.inner.backend.rings.as_ref().map(|r| r.stats())
    }

    /// Size of the KVM memslot chunks RAM is registered in.
    pub fn chunk_bytes(&self) -> u64 {
        self.inner.backend.frags().chunk_bytes()
    }

    /// Adds `size` bytes of anonymous guest RAM at guest-physical `gpa`; returns its memslot
    /// id in the tracker.
    ///
    /// # Errors
    /// Unaligned or empty range, overlap with existing RAM, mmap failure, slot budget.
    pub fn add_ram(&self, gpa: u64, size: u64) -> Result<SlotId> {
        let bad = |reason| Error::InvalidRam { gpa, size, reason };
        if size == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(bad("address and size must be non-zero multiples of 4 KiB"));
        }
        if gpa.checked_add(size).is_none() {
            return Err(bad("range wraps"));
        }
        // Refused before taking `rams`: the core's memslot change would refuse it anyway, and
        // waiting for `rams` here could wait for a DELETE that waits for this callback.
        if self.inner.tracker.in_callback() {
            return Err(pagetrack::Error::InCallback { op: "add_ram" }.into());
        }
        let mut rams = self.inner.rams.lock().unwrap_or_else(|e| e.into_inner());
        if rams
            .iter()
            .any(|r| gpa < r.gpa + r.size && r.gpa < gpa + size)
        {
            return Err(bad("overlaps existing RAM"));
        }
        let len = usize::try_from(size).map_err(|_| bad("too large for this host"))?;
        let region = Arc::new(
            GuestRegionMmap::<()>::from_range(GuestAddress(gpa), len, None)
                .map_err(|source| Error::Mmap { gpa, size, source })?,
        );
        self.add_region_locked(&mut rams, region)
    }

    /// Registers guest memory the VMM mapped itself (memfd, hugetlbfs or a snapshot file:
    /// any [`GuestRegionMmap`]) as RAM at its guest address; returns its memslot id in the
    /// tracker. pagetrack maps nothing: KVM memslots point into `region`'s mapping, which
    /// the VMM keeps using (its own `GuestMemoryMmap` may hold the same `Arc`). Its stores
    /// through that mapping bypass tracking, as [`Vm::untracked_memory`]'s do; device writes that
    /// must be tracked go through [`Vm::memory`].
    ///
    /// # Errors
    /// As [`Vm::add_ram`] (but for the mmap).
    pub fn add_region(&self, region: Arc<GuestRegionMmap>) -> Result<SlotId> {
        let (gpa, size) = (region.start_addr().0, region.len());
        let bad = |reason| Error::InvalidRam { gpa, size, reason };
        if size == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(bad("address and size must be non-zero multiples of 4 KiB"));
        }
        if gpa.checked_add(size).is_none() {
            return Err(bad("range wraps"));
        }
        if !(region.as_ptr() as usize).is_multiple_of(4096) {
            return Err(bad("the host mapping is not page-aligned"));
        }
        // As in `add_ram`.
        if self.inner.tracker.in_callback() {
            return Err(pagetrack::Error::InCallback { op: "add_region" }.into());
        }
        let mut rams = self.inner.rams.lock().unwrap_or_else(|e| e.into_inner());
        if rams
            .iter()
            .any(|r| gpa < r.gpa + r.size && r.gpa < gpa + size)
        {
            return Err(bad("overlaps existing RAM"));
        }
        self.add_region_locked(&mut rams, region)
    }

    /// The common part of [`Vm::add_ram`] and [`Vm::add_region`]: `rams` is held and the
    /// range checked.
    fn add_region_locked(
        &self,
        rams: &mut Vec<RamInfo>,
        region: Arc<GuestRegionMmap>,
    ) -> Result<SlotId> {
        let (gpa, size) = (region.start_addr().0, region.len());
        let bad = |reason| Error::InvalidRam { gpa, size, reason };
        let slot = (0..u16::MAX)
            .map(SlotId)
            .find(|s| rams.iter().all(|r| r.slot != *s))
            .ok_or(bad("no free memslot id"))?;
        // The new guest memory is computed first (it changes nothing until published below),
        // so that no step after the KVM slots exist can fail.
        let guard = self.inner.mem.lock().unwrap_or_else(|e| e.into_inner());
        let next = self
            .inner
            .mem
            .memory()
            .insert_region(Arc::clone(&region))
            .map_err(|source| Error::GuestMemory {
                op: "insert",
                source,
            })?;
        let npages = size / PAGE_SIZE;
        self.inner.tracker.set_memory_region(MemoryRegion::new(
            slot,
            Gfn(gpa / PAGE_SIZE),
            npages,
        ))?;
        let dirty = self
            .inner
            .config
            .dirty_log
            .then(|| Arc::new(DirtyBits::new(gpa, size)));
        let res = self.inner.backend.frags().add_ram(
            &self.inner.backend.vm_fd,
            Arc::clone(&region),
            gpa,
            size,
            dirty.clone(),
        );
        if let Err(e) = res {
            self.inner
                .tracker
                .set_memory_region(MemoryRegion::delete(AsId::NORMAL, slot))
                .expect("deleting the slot just created cannot fail: not in a callback (checked)");
            return Err(e);
        }
        guard.replace(next);
        if let Some(d) = &dirty {
            self.inner.ram.add_dirty_log(Arc::clone(d));
        }
        rams.push(RamInfo {
            slot,
            gpa,
            size,
            dirty,
        });
        Ok(slot)
    }

    /// Removes the RAM region with memslot id `slot`: notifiers get `track_remove_region`
    /// once the removal is final, then its KVM fragments and mapping go.
    ///
    /// # Errors
    /// Unknown slot; a KVM failure deleting fragments.
    pub fn remove_ram(&self, slot: SlotId) -> Result<()> {
        // As in `add_ram`: refused before taking `rams`.
        if self.inner.tracker.in_callback() {
            return Err(pagetrack::Error::InCallback { op: "remove_ram" }.into());
        }
        let mut rams = self.inner.rams.lock().unwrap_or_else(|e| e.into_inner());
        let pos =
            rams.iter()
                .position(|r| r.slot == slot)
                .ok_or(pagetrack::Error::UnknownSlot {
                    as_id: AsId::NORMAL,
                    slot,
                })?;
        let info = rams[pos].clone();
        // The core first: it validates (it may refuse, e.g. from inside a callback) and
        // notifies only once the deletion is final; then the KVM fragments go.
        self.inner
            .tracker
            .set_memory_region(MemoryRegion::delete(AsId::NORMAL, slot))?;
        // A fragment whose delete fails stays registered with KVM together with its mapping
        // (see `Fragments::remove_ram`); the region is gone for pagetrack all the same, and
        // the error is returned once the bookkeeping is done.
        let frags_res = {
            let _paused = self.inner.backend.gate.pause();
            self.inner
                .backend
                .frags()
                .remove_ram(&self.inner.backend.vm_fd, info.gpa)
        };
        if let Some(d) = &info.dirty {
            self.inner.ram.remove_dirty_log(d);
        }
        let guard = self.inner.mem.lock().unwrap_or_else(|e| e.into_inner());
        let (next, _region) = self
            .inner
            .mem
            .memory()
            .remove_region(GuestAddress(info.gpa), info.size)
            .map_err(|source| Error::GuestMemory {
                op: "remove",
                source,
            })?;
        guard.replace(next);
        rams.remove(pos);
        frags_res
    }

    /// The dirty log of the RAM region with memslot id `slot`: bit `i` of the result (word
    /// `i / 64`, bit `i % 64`) is set if page `i` of the region was written since the previous
    /// call (or since [`Vm::add_ram`]), and the log is cleared. It holds guest stores KVM
    /// logged (harvested from every fragment, and from fragments a re-cut deleted) and the
    /// stores pagetrack applied itself: trapped stores to tracked frames, stores it completed
    /// for the guest, and device writes through [`TrackedMemory`]. Writes through
    /// [`Vm::untracked_memory`] bypass it, as they bypass tracking. A *hot* relaxed frame
    /// (manual protect, `docs/RELAXED.md`) is in it when its content changed, a subset of
    /// written: while any frame is hot this syncs relaxed frames first (coalesced events are
    /// delivered before it returns).
    ///
    /// # Errors
    /// [`Error::DirtyLogOff`] if the VM was not created with [`VmConfig::with_dirty_log`];
    /// an unknown slot; a failed `KVM_GET_DIRTY_LOG` (the pages harvested until then stay in
    /// the log for the next call).
    pub fn take_dirty_log(&self, slot: SlotId) -> Result<Vec<u64>> {
        if !self.inner.config.dirty_log {
            return Err(Error::DirtyLogOff);
        }
        // Hot relaxed frames reach the log from a sync's diff (`relaxed.rs`): one first, so
        // a change made since the last sync is in this take.
        let quiet = self.inner.backend.frags().quiet_count();
        if quiet > 0 {
            crate::relaxed::sync(&self.inner)?;
        }
        let rams = self.inner.rams.lock().unwrap_or_else(|e| e.into_inner());
        let info = rams
            .iter()
            .find(|r| r.slot == slot)
            .ok_or(pagetrack::Error::UnknownSlot {
                as_id: AsId::NORMAL,
                slot,
            })?;
        let log = info
            .dirty
            .as_ref()
            .expect("every region has a log when dirty logging is on");
        self.inner
            .backend
            .frags()
            .harvest(&self.inner.backend.vm_fd, info.gpa)?;
        Ok(log.take())
    }

    /// Creates vCPU `index` (each index once).
    ///
    /// # Errors
    /// Duplicate index or a KVM failure.
    pub fn create_vcpu(&self, index: u32) -> Result<Vcpu> {
        let fd = self.register_vcpu(index, || {
            let fd = self
                .inner
                .backend
                .vm_fd
                .create_vcpu(u64::from(index))
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            if let Some(rings) = &self.inner.backend.rings {
                rings.add_vcpu(index, &fd)?;
            }
            Ok(fd)
        })?;
        Ok(Vcpu::new(index, fd, Arc::clone(&self.inner)))
    }

    /// The [`ExitHandler`](crate::ExitHandler) of a vCPU the VMM created itself
    /// (`vm_fd.create_vcpu(index)`) and runs in its own loop; `index` (each once) is the
    /// vCPU's number in events ([`Source::Vcpu`](pagetrack::Source::Vcpu)) and in pauses.
    /// Asks KVM to sync the registers into `kvm_run` at every exit where it can
    /// (`kvm_valid_regs`), which pagetrack's completions read.
    ///
    /// # Errors
    /// Duplicate index; the stall monitor thread cannot be started.
    pub fn exit_handler(&self, index: u32, fd: &mut VcpuFd) -> Result<crate::ExitHandler> {
        self.register_vcpu(index, || match &self.inner.backend.rings {
            Some(rings) => rings.add_vcpu(index, fd),
            None => Ok(()),
        })?;
        Ok(crate::ExitHandler::new(
            index,
            fd,
            Arc::clone(&self.inner),
            false,
        ))
    }

    /// Claims vCPU `index` (refused if taken), makes what `make` makes, and starts the stall
    /// monitor with the first vCPU.
    fn register_vcpu<T>(&self, index: u32, make: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut vcpus = self.inner.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        if vcpus.contains(&index) {
            return Err(Error::Vcpu {
                index,
                reason: "already created",
            });
        }
        let made = make()?;
        vcpus.push(index);
        drop(vcpus);
        let weak = Arc::downgrade(&self.inner);
        let mut spawned = Ok(());
        self.inner.stall_monitor.call_once(|| {
            spawned = std::thread::Builder::new()
                .name("pagetrack-stall".into())
                .spawn(move || stall_monitor(weak))
                .map(drop);
        });
        spawned.map_err(|source| Error::Thread {
            what: "stall monitor",
            source,
        })?;
        Ok(made)
    }

    /// Makes KVM forget every translation it derived from guest page tables held in `frames`,
    /// before any vCPU runs again.
    ///
    /// On shadow-paging hosts (see [`HostCaps::shadow_paging`]) KVM shadows guest page tables
    /// and only learns of changes to them through its own write emulation: stores that
    /// pagetrack applies (trapped guest stores, device writes, a VMM editing page tables) are
    /// invisible to it. After such a store changes or removes a present translation, call this
    /// (not needed for not-present → present). It re-creates the KVM memslot fragment of each
    /// frame; with the slot-zap-all quirk disabled KVM then zaps the shadow pages of that
    /// fragment only. Returns the number of fragments re-created (0 on TDP hosts, where
    /// nothing is needed).
    ///
    /// # Errors
    /// A KVM failure re-creating a fragment.
    pub fn invalidate_translations(&self, frames: &[Gfn]) -> Result<usize> {
        if !self.inner.caps.shadow_paging || frames.is_empty() {
            return Ok(0);
        }
        let gpas: Vec<u64> = frames.iter().map(|g| g.gpa().0).collect();
        let mut frags = self.inner.backend.frags();
        let _paused = self.inner.backend.gate.pause();
        frags.recreate(&self.inner.backend.vm_fd, &gpas)
    }

    /// Starts a page-table update: pauses every vCPU (none is inside `KVM_RUN` until the
    /// guard drops) and waits until no vCPU is completing a store in userspace.
    ///
    /// pagetrack completes stores to tracked frames in userspace after `KVM_RUN` returned:
    /// it translates (KVM's walk, or a software walk of the guest page tables), then writes
    /// guest memory. A VMM that changes guest page tables from userspace, or frees or reuses
    /// frames a guest translation led to (a process VM's `munmap`, `mremap`, `mprotect`, a
    /// shrinking `brk`), does so while holding this guard: every completion then either
    /// finished before the update (the store landed through the old tables in a frame still
    /// behind them, as a native store before the unmap) or translates through the new tables
    /// after it (a #PF injected where nothing is mapped, as a native fault). Hold it from the
    /// first page-table edit until the freed frames are released for reuse, including the
    /// [`Vm::invalidate_translations`] in between (pausing again inside is fine).
    ///
    /// Lock order: a VMM may hold its own locks while it takes the guard, but notifiers
    /// (which run inside completions) must never take the guard, nor wait for a thread that
    /// is taking it, nor take a lock the VMM holds while it takes it. The guard is not
    /// re-entrant: do not take it twice on one thread.
    pub fn page_table_update(&self) -> PageTableUpdate<'_> {
        let b = &self.inner.backend;
        PageTableUpdate::new(b.updates.update(&b.gate))
    }

    /// Marks `frames` as holding guest page tables (or unmarks them). On shadow-paging hosts
    /// ([`HostCaps::shadow_paging`]), KVM shadows guest page tables and learns of changes only
    /// through its own emulator; stores that pagetrack applies (trapped guest stores to tracked
    /// frames, device writes, the VMM editing page tables through [`TrackedMemory`]) bypass it.
    /// For marked frames pagetrack checks every such store and, when a present entry changes
    /// other than in its accessed/dirty bits, makes KVM drop its shadows of the frame before
    /// any vCPU runs on. Not-present → present and accessed/dirty-only changes cost nothing.
    /// On TDP hosts nothing is shadowed and marking does nothing.
    ///
    /// What a guest still loses on a tracked page-table frame (shadow paging): the CPU's
    /// page walk does not set accessed/dirty bits in it (KVM skips those updates for
    /// read-only memslots), so software that relies on them (page aging, writeback of
    /// dirty file mappings) sees them clear unless the VMM sets them.
    pub fn mark_page_tables(&self, frames: &[Gfn], is_table: bool) {
        if !self.inner.caps.shadow_paging {
            return;
        }
        self.inner.ram.mark_page_tables(frames, is_table);
    }

    /// Marks the 4-level page tables rooted at `pml4` (see [`Vm::mark_page_tables`]): the
    /// PML4 and every table a present, non-leaf entry points to, read from guest memory now,
    /// each with its level. Tables that stores pagetrack applies to these later install
    /// (an entry made to point to a new table) are marked as they appear. Tables installed by
    /// stores pagetrack does not see (to untracked frames) are not: KVM sees those stores
    /// itself. Does nothing on TDP hosts.
    pub fn mark_page_table_tree(&self, pml4: Gfn) {
        if !self.inner.caps.shadow_paging {
            return;
        }
        self.inner.ram.mark_page_table_tree(pml4);
    }

    /// Counters so far.
    pub fn stats(&self) -> VmStats {
        let c = &self.inner.backend.counters;
        let (fragments, hot_now) = {
            let frags = self.inner.backend.frags();
            (frags.stats(), frags.hot_count())
        };
        let mut relaxed = self.inner.backend.relaxed.stats();
        relaxed.hot_now = hot_now;
        VmStats {
            trapped_writes: c.trapped_writes.load(Ordering::Relaxed),
            trapped_bytes: c.trapped_bytes.load(Ordering::Relaxed),
            emulated_stores: c.emulated_stores.load(Ordering::Relaxed),
            atomic_rmws: c.atomic_rmws.load(Ordering::Relaxed),
            string_elements: c.string_elements.load(Ordering::Relaxed),
            pt_invalidations: c.pt_invalidations.load(Ordering::Relaxed),
            ram_reads_served: c.ram_reads_served.load(Ordering::Relaxed),
            device_writes: c.device_writes.load(Ordering::Relaxed),
            fragments,
            pauses: c.pauses.load(Ordering::Relaxed),
            pause_ns: c.pause_ns.load(Ordering::Relaxed),
            restore_errors: c.restore_errors.load(Ordering::Relaxed),
            relaxed,
        }
    }

    /// Syncs every relaxed frame (`docs/RELAXED.md`): the changes guest stores made to them
    /// since the last sync are delivered as coalesced events before this returns, so every
    /// store that completed before the call is reported. vCPUs keep running. Does nothing when
    /// no frame is relaxed, and inside a notifier receiving a sync's events.
    ///
    /// # Errors
    /// A failed `KVM_GET_DIRTY_LOG` (the frames' changes stay pending for the next sync).
    pub fn sync(&self) -> Result<SyncReport> {
        crate::relaxed::sync(&self.inner)
    }

    /// A handle that asks for a sync from anywhere, a notifier's callback included (issue
    /// 12's "a notifier's request"): see [`SyncRequester`]. It does not keep the VM alive.
    pub fn sync_requester(&self) -> SyncRequester {
        SyncRequester {
            vm: Arc::downgrade(&self.inner),
        }
    }

    /// Makes the tracked frames among `frames` relaxed now (a consumer's "this is hot"), as
    /// far as the policy allows them (a mode other than [`RelaxedMode::Off`], every notifier
    /// accepting coalesced events, no strict pin, the budget). Returns how many became
    /// relaxed.
    ///
    /// # Errors
    /// A KVM failure re-cutting the fragments (the frames then stay strict).
    pub fn relax(&self, frames: &[Gfn]) -> Result<usize> {
        let gpas: Vec<u64> = frames.iter().map(|g| g.gpa().0).collect();
        crate::relaxed::promote(&self.inner, &gpas)
    }

    /// Returns the relaxed frames among `frames` to strict mode, after a final sync that
    /// delivers their last changes.
    ///
    /// # Errors
    /// A failed harvest or re-cut.
    pub fn make_strict(&self, frames: &[Gfn]) -> Result<()> {
        let gpas: Vec<u64> = frames.iter().map(|g| g.gpa().0).collect();
        crate::relaxed::demote(&self.inner, &gpas)
    }

    /// Pins `frame` strict (a consumer that needs exact events for it): it never runs relaxed
    /// while pinned, and a relaxed frame is made strict before this returns. Pins count.
    ///
    /// # Errors
    /// [`Error::PinOverflow`](crate::Error::PinOverflow) past `u32::MAX` pins (nothing
    /// changes); a failed harvest or re-cut while making it strict (the pin stays).
    pub fn pin_strict(&self, frame: Gfn) -> Result<()> {
        crate::relaxed::pin(&self.inner, frame.gpa().0, true)
    }

    /// Drops one strict pin of `frame`.
    ///
    /// # Errors
    /// [`Error::NotPinned`](crate::Error::NotPinned) if `frame` has no pin (nothing changes).
    pub fn unpin_strict(&self, frame: Gfn) -> Result<()> {
        crate::relaxed::pin(&self.inner, frame.gpa().0, false)
    }

    /// True if `frame` runs relaxed now.
    pub fn is_relaxed(&self, frame: Gfn) -> bool {
        self.inner.backend.frags().is_relaxed(frame.gpa().0)
    }
}

/// Asks for a sync of the relaxed frames ([`Vm::sync`]) without waiting for it, from any
/// thread, and from inside a notifier's callback, where [`Vm::sync`] would have to wait for
/// locks the delivering thread may hold. Made by [`Vm::sync_requester`]; holds the VM weakly,
/// so a notifier can keep one without a reference cycle.
///
/// The request kicks every vCPU inside `KVM_RUN`; the first vCPU thread to leave it (kicked,
/// or at an exit of its own) syncs, with no lock held, before it enters again, so the
/// changes guest stores made before the request are delivered even to a guest that never
/// exits. With no vCPU running, the next sync point serves it (an exit, [`Vm::sync`]).
#[derive(Clone, Debug)]
pub struct SyncRequester {
    vm: std::sync::Weak<VmInner>,
}

impl SyncRequester {
    /// Asks for a sync; returns false if the VM is gone. Takes no lock that events are
    /// delivered under and never blocks on one: safe inside any callback.
    pub fn request(&self) -> bool {
        let Some(vm) = self.vm.upgrade() else {
            return false;
        };
        crate::relaxed::request_sync(&vm);
        true
    }
}

#[cfg(test)]
mod tests {
    //! The enforcer's re-cut ([`recut`]) against the fake KVM of `slots.rs` and a pauser that
    //! records its pauses: no `/dev/kvm` needed.

    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;
    use crate::slots::seam::{
        FakeKvm, agree, bits, calls, check, first, layout, then, tracked_table,
    };

    /// Pauses by setting a flag the fake KVM checks at every call.
    #[derive(Debug, Default)]
    struct FlagPauser {
        paused: Rc<Cell<bool>>,
        pauses: Cell<usize>,
    }

    #[derive(Debug)]
    struct Flag<'a>(&'a Cell<bool>);

    impl Drop for Flag<'_> {
        fn drop(&mut self) {
            self.0.set(false);
        }
    }

    impl Pauser for FlagPauser {
        type Paused<'a> = Flag<'a>;

        fn pause(&self) -> Flag<'_> {
            assert!(!self.paused.get(), "paused twice");
            self.paused.set(true);
            self.pauses.set(self.pauses.get() + 1);
            Flag(&self.paused)
        }
    }

    /// A fake KVM whose calls must all come while `pauser` holds the vCPUs.
    fn paused_kvm(pauser: &FlagPauser) -> FakeKvm {
        FakeKvm::checking(Rc::clone(&pauser.paused))
    }

    /// [`recut`] for `gpas` with nothing done while paused; returns it and whether `after`
    /// saw a failure.
    fn run(
        f: &mut Fragments,
        kvm: &FakeKvm,
        pauser: &FlagPauser,
        gpas: &[u64],
        protect: bool,
    ) -> (Option<Recut>, Option<bool>) {
        let seen = Cell::new(None);
        let r = recut(
            f,
            kvm,
            pauser,
            || gpas.iter().copied(),
            protect,
            |_| ((), Vec::new()),
            |_, (), failed| seen.set(Some(failed)),
        );
        (r, seen.get())
    }

    /// Lays the table out while "paused" (the fake checks the flag from the first call).
    fn setup(pauser: &FlagPauser) -> (FakeKvm, Fragments, Arc<GuestRegionMmap>) {
        let kvm = paused_kvm(pauser);
        pauser.paused.set(true);
        let (f, mmap) = tracked_table(&kvm, false);
        pauser.paused.set(false);
        (kvm, f, mmap)
    }

    #[test]
    fn recut_pauses_once_and_makes_every_ioctl_while_paused() {
        let pauser = FlagPauser::default();
        let (kvm, mut f, _mmap) = setup(&pauser);
        let before = calls(&kvm);
        let (r, after) = run(&mut f, &kvm, &pauser, &then(), true);
        let r = r.expect("the layout changes");
        assert!(r.res.is_ok() && !r.restore_failed);
        assert_eq!(after, Some(false));
        assert_eq!(pauser.pauses.get(), 1);
        assert!(!pauser.paused.get(), "the pause outlived the re-cut");
        assert!(calls(&kvm) > before);
        check(&kvm, &f);
    }

    #[test]
    fn recut_of_frames_outside_ram_neither_pauses_nor_calls_kvm() {
        let pauser = FlagPauser::default();
        let (kvm, mut f, _mmap) = setup(&pauser);
        let before = calls(&kvm);
        let (r, after) = run(&mut f, &kvm, &pauser, &[0x1000, 1 << 40], true);
        assert!(r.is_none());
        assert_eq!(after, None);
        assert_eq!(pauser.pauses.get(), 0);
        assert_eq!(calls(&kvm), before);
    }

    #[test]
    fn recut_whose_chunks_keep_their_layout_pauses_but_calls_no_ioctl() {
        let pauser = FlagPauser::default();
        let (kvm, mut f, _mmap) = setup(&pauser);
        let before = calls(&kvm);
        // Already protected: the chunk is looked at under the pause, and left as it is.
        let (r, after) = run(&mut f, &kvm, &pauser, &first(), true);
        assert!(r.expect("a chunk was marked").res.is_ok());
        assert_eq!(after, Some(false));
        assert_eq!(pauser.pauses.get(), 1);
        assert_eq!(calls(&kvm), before);
    }

    #[test]
    fn a_recut_failing_at_any_ioctl_is_undone_to_the_previous_bits_and_layout() {
        let pauser = FlagPauser::default();
        let probe = {
            let (kvm, mut f, _mmap) = setup(&pauser);
            let before = calls(&kvm);
            run(&mut f, &kvm, &pauser, &then(), true);
            calls(&kvm) - before
        };
        for protect in [true, false] {
            for n in 0..probe {
                let pauser = FlagPauser::default();
                let (kvm, mut f, _mmap) = setup(&pauser);
                if !protect {
                    // Untracking `then` fails instead: track it first.
                    let (r, _) = run(&mut f, &kvm, &pauser, &then(), true);
                    assert!(r.expect("changed").res.is_ok());
                }
                let (was_layout, was_bits) = (layout(&f), bits(&f, &then()));
                kvm.fail_in(n);
                let (r, after) = run(&mut f, &kvm, &pauser, &then(), protect);
                kvm.heal();
                let r = r.expect("the layout changes");
                if r.res.is_ok() {
                    // Fewer calls than the probe (untracking): the failure was never reached.
                    assert!(!protect, "call {n} failed silently");
                    continue;
                }
                assert!(!r.restore_failed, "the undo failed with KVM healed");
                assert_eq!(after, Some(true));
                assert_eq!(bits(&f, &then()), was_bits, "the bits were not restored");
                assert_eq!(layout(&f), was_layout, "the layout was not restored");
                check(&kvm, &f);
            }
        }
    }

    #[test]
    fn a_recut_whose_undo_fails_too_reports_it_and_stays_never_weaker() {
        let mut reported = 0;
        for n in 0..6 {
            let pauser = FlagPauser::default();
            let (kvm, mut f, _mmap) = setup(&pauser);
            // Every call from the n-th on fails: the re-cut and its undo both.
            for i in 0..64 {
                kvm.fail_in(n + i);
            }
            let (r, _) = run(&mut f, &kvm, &pauser, &then(), true);
            kvm.heal();
            let r = r.expect("the layout changes");
            assert!(r.res.is_err());
            agree(&kvm, &f);
            // The previous bits are back whatever KVM did, and no protected page is writable.
            assert_eq!(bits(&f, &then()), vec![false; then().len()]);
            check(&kvm, &f);
            reported += usize::from(r.restore_failed);
        }
        // A failure at the very first call leaves nothing to undo; the later ones do.
        assert!(reported >= 5, "failed undos went unreported: {reported}");
    }
}
