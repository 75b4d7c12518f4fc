//! Every `unsafe` operation of pagetrack-kvm, each behind a small safe wrapper.
//!
//! JUSTIFICATION: kvm-ioctls marks `KVM_SET_USER_MEMORY_REGION` unsafe (the kernel keeps the
//! host address), reading the `kvm_run` exit union is unsafe, signalling a vCPU thread
//! needs raw pthread calls, kvm-ioctls has no `KVM_CLEAR_DIRTY_LOG` (a raw ioctl with a
//! bitmap pointer) and no dirty-ring API (`mmap` of a vCPU's ring, its entries read and
//! released as atomics, `KVM_RESET_DIRTY_RINGS`), and word-consistent loads of guest frames at full speed need an atomic
//! view of the mapping. Nothing else in the crate uses unsafe.
#![allow(unsafe_code)]

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

/// One KVM memslot that maps part of an mmap'd guest RAM region.
///
/// Holds an `Arc` of the mapping, so the host memory outlives the slot: the `Arc` is released
/// only once [`KvmSlot::remove`] deleted the slot from KVM (or the VM fd is closing, see
/// [`KvmSlot::forget_region_for_drop`]). A slot dropped while still registered leaks its
/// `Arc`, so the mapping stays alive for as long as KVM may map it.
#[derive(Debug)]
pub(crate) struct KvmSlot {
    id: u32,
    gpa: u64,
    size: u64,
    readonly: bool,
    log_dirty: bool,
    /// Keeps the host mapping alive for as long as KVM may use it.
    /// `None` only during drop.
    mapping: Option<Arc<GuestRegionMmap>>,
    removed: bool,
}

impl KvmSlot {
    /// Creates KVM slot `id` for `[gpa, gpa + size)` inside `region` (which starts at its guest address).
    ///
    /// Errors are those of `KVM_SET_USER_MEMORY_REGION` (EEXIST on overlap, EINVAL on bad ids).
    pub(crate) fn create(
        vm: &VmFd,
        id: u32,
        region: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        readonly: bool,
        log_dirty: bool,
    ) -> Result<KvmSlot, kvm_ioctls::Error> {
        let start = region.start_addr().0;
        let inside = gpa >= start
            && size > 0
            && gpa
                .checked_add(size)
                .is_some_and(|end| end <= start + region.len());
        if !inside || !gpa.is_multiple_of(4096) || !size.is_multiple_of(4096) {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let hva = region.as_ptr() as u64 + (gpa - start);
        let desc = kvm_userspace_memory_region {
            slot: id,
            flags: if readonly { KVM_MEM_READONLY } else { 0 }
                | if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: `hva..hva+size` lies inside `region`'s live mmap (checked above), and the
        // returned KvmSlot holds an Arc of that region and deletes the slot before releasing
        // it (remove/Drop), so KVM never keeps an address of unmapped memory.
        unsafe { vm.set_user_memory_region(desc) }?;
        Ok(KvmSlot {
            id,
            gpa,
            size,
            readonly,
            log_dirty,
            mapping: Some(Arc::clone(region)),
            removed: false,
        })
    }

    /// Deletes the slot from KVM. On failure KVM may still map it: the slot comes back, so
    /// that its owner keeps it (and its mapping) in its table.
    pub(crate) fn remove(mut self, vm: &VmFd) -> Result<(), (KvmSlot, kvm_ioctls::Error)> {
        match self.delete(vm) {
            Ok(()) => Ok(()),
            Err(e) => Err((self, e)),
        }
    }

    /// Takes KVM's dirty log of the slot: bit i is page i of the slot, and every page
    /// returned is write-protected again (logged anew at its next write) before this returns.
    /// Without manual protect (`manual` false) `KVM_GET_DIRTY_LOG` does both in one step; with
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled on the VM (`manual`) it only copies the
    /// log, and `KVM_CLEAR_DIRTY_LOG` then clears and re-protects exactly the bits copied
    /// (a bit KVM sets between the two stays set for the next harvest). If the clear fails
    /// the bits stay set in KVM and the error is returned: the next harvest reports them.
    ///
    /// `keep` (manual protect only; bit i = page i of the slot): pages whose bits are left
    /// set in KVM, so they stay writable and every later `KVM_GET_DIRTY_LOG` reports them
    /// again (relaxed mode's hot frames, `relaxed.rs`). With no other bit to clear no
    /// `KVM_CLEAR_DIRTY_LOG` is made (nor its TLB flush).
    pub(crate) fn take_dirty_log(
        &self,
        vm: &VmFd,
        manual: bool,
        keep: Option<&[u64]>,
    ) -> Result<Vec<u64>, kvm_ioctls::Error> {
        let size = usize::try_from(self.size).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        let bits = vm.get_dirty_log(self.id, size)?;
        if manual {
            match keep {
                Some(keep) => {
                    let clear: Vec<u64> = bits
                        .iter()
                        .enumerate()
                        .map(|(i, &b)| b & !keep.get(i).copied().unwrap_or(0))
                        .collect();
                    clear_dirty_log(vm, self.id, self.size / 4096, &clear)?;
                }
                None => clear_dirty_log(vm, self.id, self.size / 4096, &bits)?,
            }
        }
        Ok(bits)
    }

    fn delete(&mut self, vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
        if self.removed {
            return Ok(());
        }
        let desc = kvm_userspace_memory_region {
            slot: self.id,
            flags: 0,
            guest_phys_addr: self.gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-size region deletes slot `id`; KVM then holds no host address of it.
        unsafe { vm.set_user_memory_region(desc) }?;
        self.removed = true;
        Ok(())
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn gpa(&self) -> u64 {
        self.gpa
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn readonly(&self) -> bool {
        self.readonly
    }

    pub(crate) fn log_dirty(&self) -> bool {
        self.log_dirty
    }

    /// A slot as [`KvmSlot::create`] returns it, without the ioctl: for the fake KVM of the
    /// fragment table's unit tests, which must mark it gone
    /// ([`KvmSlot::forget_region_for_drop`]) when it deletes it.
    #[cfg(test)]
    pub(crate) fn unregistered(
        id: u32,
        region: &Arc<GuestRegionMmap>,
        gpa: u64,
        size: u64,
        readonly: bool,
        log_dirty: bool,
    ) -> KvmSlot {
        KvmSlot {
            id,
            gpa,
            size,
            readonly,
            log_dirty,
            mapping: Some(Arc::clone(region)),
            removed: false,
        }
    }

    pub(crate) fn forget_region_for_drop(&mut self) {
        // Marks the slot as already gone when the whole VM fd is closing: closing the VM fd
        // drops every slot with it, so no ioctl is needed (or possible) then.
        self.removed = true;
    }
}

/// A slot that is still registered when dropped can only be deleted with the VM fd; the owner
/// (the fragment table) always removes or forgets its slots first. Should one be dropped
/// registered all the same, its mapping is leaked rather than released under KVM.
impl Drop for KvmSlot {
    fn drop(&mut self) {
        debug_assert!(
            self.removed,
            "KVM slot {} dropped while still registered; the VM fd must close first",
            self.id
        );
        if !self.removed {
            std::mem::forget(self.mapping.take());
        }
    }
}

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_bindings::kvm_clear_dirty_log
);

/// The window of `bits` (bit i = page i of a slot of `pages` pages) that `KVM_CLEAR_DIRTY_LOG`
/// is given: from the first non-zero word to the last, as `(first word, words, pages)`.
/// KVM wants the first page a multiple of 64 (a word boundary) and the page count a
/// multiple of 64 unless the window runs to the end of the slot. `None`: nothing to clear.
fn clear_window(pages: u64, bits: &[u64]) -> Option<(usize, usize, u64)> {
    let first = bits.iter().position(|&w| w != 0)?;
    let last = bits.iter().rposition(|&w| w != 0)?;
    let first_page = first as u64 * 64;
    let end_page = ((last as u64 + 1) * 64).min(pages);
    (first_page < end_page).then(|| (first, last + 1 - first, end_page - first_page))
}

/// `KVM_CLEAR_DIRTY_LOG` of slot `slot` (`pages` pages): clears and write-protects again
/// exactly the pages set in `bits` (bit i = page i of the slot), then flushes the TLBs.
/// Needs `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled on the VM ([`enable_manual_protect`]).
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    pages: u64,
    bits: &[u64],
) -> Result<(), kvm_ioctls::Error> {
    let Some((first, words, num_pages)) = clear_window(pages, bits) else {
        return Ok(());
    };
    let window: Vec<u64> = bits[first..first + words].to_vec();
    let mut log = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: u32::try_from(num_pages).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?,
        first_page: first as u64 * 64,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = window.as_ptr().cast_mut().cast();
    // SAFETY: `vm` is a VM fd; the kernel reads `log` and `ALIGN(num_pages, 64) / 8` bytes of
    // the bitmap, which `window` (`words` u64s, `num_pages <= words * 64`) holds and which
    // stays alive until the ioctl returns; it writes nothing back.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if rc == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` on the VM with
/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` only (not `INITIALLY_SET`: a new logged fragment
/// starts clean and write-protected, as without manual protect, so the VMM's dirty log
/// stays the written set).
pub(crate) fn enable_manual_protect(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    vm.enable_cap(&cap)
}

/// The words of `slice` (guest memory) as atomics, for word-consistent loads that compile to
/// plain aligned moves (vm-memory's `Bytes::load` costs a call and bounds checks per word,
/// about 2 µs per 4 KiB frame here). `None` if the slice is not 8-byte aligned or sized.
pub(crate) fn slice_words<'s, B: vm_memory::bitmap::BitmapSlice>(
    slice: &'s vm_memory::VolatileSlice<'_, B>,
) -> Option<&'s [std::sync::atomic::AtomicU64]> {
    let guard = slice.ptr_guard();
    let ptr = guard.as_ptr();
    if !slice.len().is_multiple_of(8) || !ptr.addr().is_multiple_of(8) {
        return None;
    }
    // SAFETY: a VolatileSlice's memory is mapped, `len` bytes long, for its whole lifetime,
    // which outlives 's (vm-memory's invariant; without its xen feature the pointer guard is
    // the plain address and unmaps nothing); the pointer is 8-byte aligned and the length a
    // multiple of 8 (checked above), so it holds `len / 8` AtomicU64s. Concurrent writers
    // (the guest, other vCPU threads) are outside Rust's memory model or atomic themselves,
    // as for vm-memory's own `get_atomic_ref`; only shared (atomic) access is given out.
    Some(unsafe {
        std::slice::from_raw_parts(ptr.cast::<std::sync::atomic::AtomicU64>(), slice.len() / 8)
    })
}

/// How the gate kicks one vCPU out of `KVM_RUN`: by KVM's documented protocol, set
/// `kvm_run.immediate_exit`, then signal the vCPU's thread (see [`crate::gate`]).
#[derive(Debug)]
pub(crate) struct VcpuKick {
    thread: libc::pthread_t,
    immediate_exit: std::ptr::NonNull<u8>,
    /// The kick signal (`VmConfig::kick`), checked when the VM was set up: a real-time
    /// signal with a handler installed (pagetrack's no-op one, or the VMM's own).
    signal: libc::c_int,
}

// SAFETY: a VcpuKick is only created by the vCPU thread in `ExitHandler::run` for one pass
// through the gate, and the gate drops it (in `leave`) before that `run` returns; the thread
// and the `kvm_run` mapping of its VcpuFd (borrowed by that `run`) are alive all that time, so using
// both from a pausing thread is sound. `immediate_exit` is written through an atomic; the
// kernel reads it concurrently by design, and kvm-ioctls' exit decoding on the vCPU thread
// never reads or writes that byte.
unsafe impl Send for VcpuKick {}

impl VcpuKick {
    /// The kick handle of the calling thread, which is about to run `fd`; kicks send
    /// `signal`.
    pub(crate) fn current(fd: &mut VcpuFd, signal: libc::c_int) -> VcpuKick {
        // A pointer (not a reference) kept past this borrow: see `unsafe impl Send` for why it
        // stays valid while the kick handle exists.
        let immediate_exit = std::ptr::NonNull::from(&mut fd.get_kvm_run().immediate_exit);
        // SAFETY: pthread_self has no preconditions and always succeeds.
        let thread = unsafe { libc::pthread_self() };
        VcpuKick {
            thread,
            immediate_exit,
            signal,
        }
    }

    /// Sets `immediate_exit` before entering: KVM completes a pending MMIO or PIO exit, then
    /// returns EINTR without running the guest (used to regain control right after a
    /// trapped instruction completes, see `Vcpu::run`).
    pub(crate) fn arm(&self) {
        self.flag().store(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn flag(&self) -> &std::sync::atomic::AtomicU8 {
        // SAFETY: `immediate_exit` points into the vCPU's live kvm_run (see `unsafe impl
        // Send`); a u8 is always aligned for AtomicU8, and every concurrent userspace access
        // to it goes through this atomic (the vCPU's own reset included).
        unsafe { std::sync::atomic::AtomicU8::from_ptr(self.immediate_exit.as_ptr()) }
    }
}

impl crate::gate::Kick for VcpuKick {
    fn kick(&self) {
        // SeqCst: the store is visible before the signal is sent; the kernel reads the field
        // on entry to KVM_RUN and the signal covers a KVM_RUN already past that check.
        self.flag().store(1, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the thread is alive (see `unsafe impl Send`); the signal has a handler (the
        // no-op one `install_kick_handler` installed, or the VMM's, checked by
        // `has_handler`), so delivery only interrupts KVM_RUN with EINTR.
        let rc = unsafe { libc::pthread_kill(self.thread, self.signal) };
        // ESRCH/EINVAL are impossible: a live thread and a valid real-time signal.
        debug_assert_eq!(rc, 0, "pthread_kill of a live vCPU thread");
    }

    fn reset(&self) {
        // SeqCst: ordered after the kicker's store by the gate lock both hold.
        self.flag().store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The first real-time signal (glibc's `SIGRTMIN`, which reserves the kernel's first ones).
pub(crate) fn sigrtmin() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// The last real-time signal.
pub(crate) fn sigrtmax() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMAX()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op kick handler on real-time signal `signal`, once per process and
/// signal (a failed installation is retried by the next VM).
pub(crate) fn install_kick_handler(signal: libc::c_int) -> Result<(), vmm_sys_util::errno::Error> {
    static DONE: std::sync::Mutex<Vec<libc::c_int>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&signal) {
        return Ok(());
    }
    vmm_sys_util::signal::register_signal_handler(signal, on_kick)?;
    done.push(signal);
    Ok(())
}

/// True if `signal` has a handler installed: neither the default action (which ends the
/// process for a real-time signal) nor "ignore" (which does not interrupt `KVM_RUN`).
pub(crate) fn has_handler(signal: libc::c_int) -> Result<bool, vmm_sys_util::errno::Error> {
    // SAFETY: all-zero is a valid `sigaction` (no handler, empty mask), only written below.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries; `old` is a valid, writable sigaction.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
    if rc != 0 {
        return Err(vmm_sys_util::errno::Error::last());
    }
    Ok(old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN)
}

/// The `suberror` of the last `KVM_EXIT_INTERNAL_ERROR`.
pub(crate) fn internal_error_suberror(vcpu: &mut VcpuFd) -> u32 {
    let run = vcpu.get_kvm_run();
    // SAFETY: only called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which the
    // kernel fills the `internal` member of the exit union.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// `KVM_SET_XSAVE` with the 4 KiB `kvm_xsave` buffer.
pub(crate) fn set_xsave(
    vcpu: &VcpuFd,
    xsave: &kvm_bindings::kvm_xsave,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the kernel reads at most sizeof(kvm_xsave) bytes for KVM_SET_XSAVE unless the
    // VM enabled KVM_CAP_XSAVE2, which pagetrack never does; `xsave` is a whole kvm_xsave.
    unsafe { vcpu.set_xsave(xsave) }
}

/// Answers the pending `KVM_EXIT_X86_WRMSR`/`RDMSR`: with `failed`, KVM injects #GP(0) into
/// the guest at the next `KVM_RUN`; otherwise the instruction completes.
pub(crate) fn set_msr_exit_error(vcpu: &mut VcpuFd, failed: bool) {
    // Writing a union field is safe; the kernel filled the `msr` member for this exit and
    // reads `error` back at the next KVM_RUN.
    vcpu.get_kvm_run().__bindgen_anon_1.msr.error = u8::from(failed);
}

/// A second handle on the `/dev/kvm` fd of `kvm` (a `dup`), so that pagetrack keeps one
/// while the VMM keeps its own.
pub(crate) fn dup_kvm(kvm: &kvm_ioctls::Kvm) -> Result<kvm_ioctls::Kvm, kvm_ioctls::Error> {
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
    // SAFETY: `kvm` owns this fd and stays alive (borrowed) while the BorrowedFd is used.
    let borrowed = unsafe { BorrowedFd::borrow_raw(kvm.as_raw_fd()) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(|e| kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)))?;
    // SAFETY: `owned` is a fresh fd (a dup of an open /dev/kvm) whose ownership moves into
    // the Kvm, which closes it on drop.
    Ok(unsafe { kvm_ioctls::Kvm::from_raw_fd(owned.into_raw_fd()) })
}

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// `kvm_dirty_gfn.flags`: KVM published the entry.
const DIRTY_GFN_DIRTY: u32 = 1;
/// `kvm_dirty_gfn.flags`: userspace harvested the entry (KVM zeroes it at the next reset).
const DIRTY_GFN_RESET: u32 = 2;

/// Enables the dirty ring on the VM (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL` if `acq_rel`, else
/// `KVM_CAP_DIRTY_LOG_RING`), `bytes` per vCPU. KVM refuses it (EINVAL) once a vCPU exists.
pub(crate) fn enable_dirty_ring(
    vm: &VmFd,
    acq_rel: bool,
    bytes: u32,
) -> Result<(), kvm_ioctls::Error> {
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: if acq_rel {
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        } else {
            kvm_bindings::KVM_CAP_DIRTY_LOG_RING
        },
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap)
}

/// `KVM_RESET_DIRTY_RINGS`: KVM zeroes every harvested entry of every vCPU's ring and
/// write-protects their pages again (then flushes TLBs), so a later store is logged anew.
/// Retried on EINTR (a pending kick signal). Returns the entries reset.
pub(crate) fn reset_dirty_rings(vm: &VmFd) -> Result<u32, kvm_ioctls::Error> {
    loop {
        // SAFETY: `vm` is a VM fd; KVM_RESET_DIRTY_RINGS takes no argument and touches no
        // userspace memory (it reads the rings KVM itself mapped).
        let rc = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
        if rc >= 0 {
            return Ok(u32::try_from(rc).unwrap_or(u32::MAX));
        }
        let e = kvm_ioctls::Error::last();
        if e.errno() != libc::EINTR {
            return Err(e);
        }
    }
}

/// One vCPU's dirty ring, mapped from its fd at `KVM_DIRTY_LOG_PAGE_OFFSET`: `entries`
/// `kvm_dirty_gfn`s KVM fills in order and userspace harvests in order from `fetch`.
#[derive(Debug)]
pub(crate) struct DirtyRingMap {
    base: std::ptr::NonNull<kvm_bindings::kvm_dirty_gfn>,
    entries: u32,
    /// The next entry to harvest (modulo `entries`).
    fetch: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value (unmapped on drop); every
// access goes through `harvest` (`&mut self`), with the entry flags read and written as
// atomics by the acquire/release protocol KVM documents, so the value may move to and be
// used from any thread.
unsafe impl Send for DirtyRingMap {}

impl DirtyRingMap {
    /// Maps the ring of vCPU `fd`, `bytes` long (the size the VM enabled).
    pub(crate) fn map(fd: &VcpuFd, bytes: u32) -> Result<DirtyRingMap, kvm_ioctls::Error> {
        use std::os::fd::AsRawFd;
        let entry = std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>();
        let len = usize::try_from(bytes).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        if len == 0 || !len.is_multiple_of(entry) {
            return Err(kvm_ioctls::Error::new(libc::EINVAL));
        }
        let offset = libc::off_t::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * 4096;
        // SAFETY: a fresh shared mapping of `len` bytes of the vCPU fd at KVM's dirty-ring
        // offset; no existing memory is affected, and the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(kvm_ioctls::Error::last());
        }
        let base = std::ptr::NonNull::new(ptr.cast::<kvm_bindings::kvm_dirty_gfn>())
            .ok_or_else(|| kvm_ioctls::Error::new(libc::ENOMEM))?;
        Ok(DirtyRingMap {
            base,
            entries: u32::try_from(len / entry)
                .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?,
            fetch: 0,
        })
    }

    /// Harvests every entry KVM published since the last harvest, in ring order: calls
    /// `each(slot, offset)` (slot = `as_id << 16 | id`, offset = page index in the slot) and
    /// marks the entry harvested. The pages stay writable until `KVM_RESET_DIRTY_RINGS`
    /// ([`reset_dirty_rings`]). Safe while the vCPU runs (KVM_CAP_DIRTY_LOG_RING_ACQ_REL's
    /// protocol: KVM writes slot and offset, then publishes DIRTY with a release store;
    /// this reads DIRTY with an acquire load, then slot and offset, then stores RESET with
    /// release, which KVM reads with acquire before reusing the entry). Returns the count.
    pub(crate) fn harvest(&mut self, mut each: impl FnMut(u32, u64)) -> u32 {
        use std::sync::atomic::{AtomicU32, Ordering};
        let mut n = 0;
        // At most one lap: a full ring holds `entries` published entries.
        while n < self.entries {
            let i = usize::try_from(self.fetch % self.entries).expect("u32 fits usize");
            // Field addresses by offset (no dereference): `i < entries` keeps the entry
            // inside the live mapping (`map`), page-aligned base and 16-byte entries keep
            // each field naturally aligned.
            let gfn = self.base.as_ptr().wrapping_add(i).cast::<u8>();
            let field = |at: usize| gfn.wrapping_add(at);
            let flags_at = field(std::mem::offset_of!(kvm_bindings::kvm_dirty_gfn, flags));
            let slot_at = field(std::mem::offset_of!(kvm_bindings::kvm_dirty_gfn, slot));
            let offset_at = field(std::mem::offset_of!(kvm_bindings::kvm_dirty_gfn, offset));
            // SAFETY: `flags_at` is an aligned u32 inside the live entry (above); KVM and this
            // thread access it concurrently, every userspace access through this atomic.
            let flags = unsafe { AtomicU32::from_ptr(flags_at.cast::<u32>()) };
            // Acquire: pairs with KVM's release of DIRTY, so slot and offset are complete.
            if flags.load(Ordering::Acquire) & DIRTY_GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: an aligned u32 inside the live entry; KVM does not write it again until
            // this entry is harvested (RESET below) and reset, so the read is not torn.
            let slot = unsafe { slot_at.cast::<u32>().read_volatile() };
            // SAFETY: as for `slot`, an aligned u64 of the same entry.
            let offset = unsafe { offset_at.cast::<u64>().read_volatile() };
            // Release: the reads above happen before KVM may reuse the entry.
            flags.store(DIRTY_GFN_RESET, Ordering::Release);
            each(slot, offset);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRingMap {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_bindings::kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the mapping `map` made, which nothing else references (the
        // value owns it and `harvest` borrows it mutably).
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), len) };
        debug_assert_eq!(rc, 0, "munmap of a dirty ring");
    }
}

#[cfg(test)]
mod tests {
    use super::clear_window;

    #[test]
    fn clear_window_spans_the_set_words_only() {
        assert_eq!(clear_window(512, &[0; 8]), None);
        // Word 2 alone: pages 128..192.
        assert_eq!(
            clear_window(512, &[0, 0, 1 << 5, 0, 0, 0, 0, 0]),
            Some((2, 1, 64))
        );
        // Words 1 to 3.
        assert_eq!(
            clear_window(512, &[0, 1, 0, 1 << 63, 0, 0, 0, 0]),
            Some((1, 3, 192))
        );
    }

    #[test]
    fn clear_window_stops_at_the_end_of_a_short_slot() {
        // 100 pages: the second word holds pages 64..100, and the window ends at the slot's end.
        assert_eq!(clear_window(100, &[0, 1 << 35]), Some((1, 1, 36)));
        assert_eq!(clear_window(100, &[1, 1]), Some((0, 2, 100)));
        // A slot of 10 pages.
        assert_eq!(clear_window(10, &[1 << 9]), Some((0, 1, 10)));
    }
}
