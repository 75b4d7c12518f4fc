//! Guest memory access that keeps tracking exact: every write applied here (a guest store that
//! exited, or a device write) reaches the tracker with its old bytes.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use pagetrack::Source;
use std::sync::atomic::Ordering as AtomicOrdering;

use vm_memory::{
    AtomicAccess, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap,
    GuestMemoryRegion, Permissions, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use crate::error::{Error, Result};
use crate::vm::VmInner;

/// Applies `data` at `gpa` if the whole range is guest RAM, then reports it; false if not RAM.
pub(crate) fn apply_write(vm: &VmInner, gpa: u64, data: &[u8], source: Source) -> bool {
    match vm.ram.write(vm, gpa, data, source) {
        Some(stale) => {
            vm.invalidate_stale(stale);
            true
        }
        None => false,
    }
}

/// [`apply_write`] with `store` doing the store (an atomic store of the same bytes):
/// `None` if the range is not RAM; `store`'s error, with nothing reported, if it failed.
pub(crate) fn apply_with<E>(
    vm: &VmInner,
    gpa: u64,
    data: &[u8],
    source: Source,
    store: impl FnOnce(&GuestMemoryMmap) -> std::result::Result<(), E>,
) -> Option<std::result::Result<(), E>> {
    let res = vm.ram.write_with(vm, gpa, data, source, store)?;
    Some(res.map(|stale| vm.invalidate_stale(stale)))
}

/// [`apply_write`] of a restore (`checkpoint.rs`): the bytes are the checkpoint's, so the
/// page is not marked written since the checkpoint (only in the VMM's dirty log).
pub(crate) fn apply_restore(vm: &VmInner, gpa: u64, data: &[u8]) -> bool {
    match vm
        .ram
        .write_logged(vm, gpa, data, Source::Device, false, |mem| {
            mem.write_slice(data, GuestAddress(gpa))
        }) {
        Some(res) => {
            let stale = res.expect("the range was checked, and `mem` holds its regions");
            vm.invalidate_stale(stale);
            true
        }
        None => false,
    }
}

/// Reads guest RAM into `buf`; false if the range is not RAM.
pub(crate) fn read_ram(vm: &VmInner, gpa: u64, buf: &mut [u8]) -> bool {
    let mem = vm.mem.memory();
    mem.check_range(GuestAddress(gpa), buf.len(), Permissions::Read)
        && mem.read_slice(buf, GuestAddress(gpa)).is_ok()
}

/// Bytes moved per bounce-buffer step of [`Bytes::read_volatile_from`] and
/// [`Bytes::write_volatile_to`].
const BOUNCE: usize = 64 << 10;

/// Guest memory for device models (DMA) and the VMM: it implements vm-memory's
/// [`Bytes<GuestAddress>`], so a device model written against that trait writes through
/// tracking unchanged. Every write (slices, objects, [`Bytes::read_volatile_from`] from a file
/// or socket, atomic [`Bytes::store`]) goes through one path: under the frame locks, the old
/// bytes of tracked frames are read, the write is applied, and tracked frames get their
/// [`WriteEvent`](pagetrack::WriteEvent) with old and new bytes and [`Source::Device`], exactly like guest stores
/// (and the dirty log, when on, gets the pages).
///
/// Whole-range operations (`write_slice`, `read_slice`, objects, the `*_exact`/`*_all`
/// volatile transfers, `store`, `load`) check that every byte is guest RAM first and change
/// nothing otherwise ([`Error::NotRam`]); `write` and `read` move the RAM prefix of the range,
/// as vm-memory's do. Volatile transfers go through a bounce buffer: the data is read from the
/// source first, then written as one tracked write per step of at most 64 KiB.
///
/// It deliberately does not implement [`vm_memory::GuestMemory`]: that trait hands out its
/// regions and `VolatileSlice`s, whose writes (and raw pointers) reach guest memory directly,
/// without the frame locks, without old bytes and without events, and vm-memory's blanket
/// `Bytes` for every `GuestMemory` is built on them. Crates that require `M: GuestMemory`
/// (virtio-queue's `Queue`) therefore cannot write through tracking; see the crate docs
/// ("Device writes") for the supported route.
#[derive(Debug, Clone)]
pub struct TrackedMemory {
    vm: Arc<VmInner>,
}

impl TrackedMemory {
    /// Moves `count` bytes at `addr` in steps of at most [`BOUNCE`] bytes through one buffer:
    /// `step(gpa, buf)` transfers the step at `gpa` and returns how many bytes it moved; a
    /// short step ends the transfer. Refuses, moving nothing, when the range is not all RAM.
    /// Returns the bytes moved.
    fn bounce(
        &self,
        addr: GuestAddress,
        count: usize,
        mut step: impl FnMut(u64, &mut [u8]) -> Result<usize>,
    ) -> Result<usize> {
        if count == 0 {
            return Ok(0);
        }
        if !self.is_ram(addr.0, count) {
            return Err(Self::not_ram(addr.0, count));
        }
        let mut buf = vec![0u8; count.min(BOUNCE)];
        let mut done = 0;
        while done < count {
            let want = (count - done).min(BOUNCE);
            let n = step(addr.0 + done as u64, &mut buf[..want])?;
            done += n;
            if n < want {
                break;
            }
        }
        Ok(done)
    }

    pub(crate) fn new(vm: Arc<VmInner>) -> TrackedMemory {
        TrackedMemory { vm }
    }

    /// True if every byte of the range is guest RAM.
    pub fn is_ram(&self, gpa: u64, len: usize) -> bool {
        self.vm
            .mem
            .memory()
            .check_range(GuestAddress(gpa), len, Permissions::ReadWrite)
    }

    /// How many bytes from `gpa` on (at most `len`) are guest RAM without a gap.
    fn ram_prefix(&self, gpa: u64, len: usize) -> usize {
        use vm_memory::GuestMemoryBackend as _;
        let mem = self.vm.mem.memory();
        let mut done = 0usize;
        while done < len {
            let at = GuestAddress(gpa.wrapping_add(done as u64));
            let Some(region) = mem.find_region(at) else {
                break;
            };
            let left = region.len() - (at.0 - region.start_addr().0);
            done += usize::try_from(left).unwrap_or(usize::MAX).min(len - done);
        }
        done
    }

    /// The tracked write of `data` at `gpa` (the whole range is RAM, or nothing happens).
    fn apply(&self, gpa: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !apply_write(&self.vm, gpa, data, Source::Device) {
            return Err(Error::NotRam {
                gpa,
                len: data.len(),
            });
        }
        self.count_device_write();
        Ok(())
    }

    fn count_device_write(&self) {
        self.vm
            .backend
            .counters
            .device_writes
            .fetch_add(1, Ordering::Relaxed);
    }

    fn not_ram(gpa: u64, len: usize) -> Error {
        Error::NotRam { gpa, len }
    }
}

/// A volatile transfer's call, retried on `EINTR` as vm-memory's own are.
fn retry_eintr(
    mut f: impl FnMut() -> std::result::Result<usize, VolatileMemoryError>,
) -> std::result::Result<usize, VolatileMemoryError> {
    loop {
        match f() {
            Err(VolatileMemoryError::IOError(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
            }
            other => return other,
        }
    }
}

impl Bytes<GuestAddress> for TrackedMemory {
    type E = Error;

    /// Writes the RAM prefix of `[addr, addr + buf.len())` (one tracked write); returns its
    /// length.
    ///
    /// # Errors
    /// [`Error::NotRam`] if `addr` itself is not RAM (and `buf` is not empty).
    fn write(&self, buf: &[u8], addr: GuestAddress) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.ram_prefix(addr.0, buf.len());
        if n == 0 {
            return Err(Self::not_ram(addr.0, buf.len()));
        }
        self.apply(addr.0, &buf[..n])?;
        Ok(n)
    }

    /// Reads the RAM prefix of `[addr, addr + buf.len())`; returns its length.
    ///
    /// # Errors
    /// [`Error::NotRam`] if `addr` itself is not RAM (and `buf` is not empty).
    fn read(&self, buf: &mut [u8], addr: GuestAddress) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.ram_prefix(addr.0, buf.len());
        if n == 0 || !read_ram(&self.vm, addr.0, &mut buf[..n]) {
            return Err(Self::not_ram(addr.0, buf.len()));
        }
        Ok(n)
    }

    /// Writes all of `buf` at `addr` (one tracked write).
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of the range is not guest RAM; nothing is written then.
    fn write_slice(&self, buf: &[u8], addr: GuestAddress) -> Result<()> {
        self.apply(addr.0, buf)
    }

    /// Reads `[addr, addr + buf.len())` into `buf`.
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of the range is not guest RAM.
    fn read_slice(&self, buf: &mut [u8], addr: GuestAddress) -> Result<()> {
        if buf.is_empty() || read_ram(&self.vm, addr.0, buf) {
            Ok(())
        } else {
            Err(Self::not_ram(addr.0, buf.len()))
        }
    }

    /// Reads up to `count` bytes from `src` into guest memory at `addr`, through a bounce
    /// buffer, one tracked write per step; stops at a short read. Returns the bytes written.
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of `[addr, addr + count)` is not RAM (nothing is read
    /// then); [`Error::DeviceIo`] if `src` fails (the steps before stay written and
    /// reported).
    fn read_volatile_from<F>(&self, addr: GuestAddress, src: &mut F, count: usize) -> Result<usize>
    where
        F: ReadVolatile,
    {
        self.bounce(addr, count, |at, buf| {
            let n = retry_eintr(|| src.read_volatile(&mut VolatileSlice::from(&mut *buf)))
                .map_err(|source| Error::DeviceIo { gpa: at, source })?;
            self.apply(at, &buf[..n])?;
            Ok(n)
        })
    }

    /// Reads exactly `count` bytes from `src` into guest memory at `addr`.
    ///
    /// # Errors
    /// As [`Bytes::read_volatile_from`], and [`Error::ShortTransfer`] if `src` ends early
    /// (what was read stays written and reported).
    fn read_exact_volatile_from<F>(
        &self,
        addr: GuestAddress,
        src: &mut F,
        count: usize,
    ) -> Result<()>
    where
        F: ReadVolatile,
    {
        let completed = self.read_volatile_from(addr, src, count)?;
        if completed != count {
            return Err(Error::ShortTransfer {
                gpa: addr.0,
                expected: count,
                completed,
            });
        }
        Ok(())
    }

    /// Writes `count` bytes of guest memory at `addr` to `dst`, through a bounce buffer;
    /// stops at a short write. Returns the bytes written.
    ///
    /// # Errors
    /// [`Error::NotRam`] if any byte of the range is not RAM; [`Error::DeviceIo`] if `dst`
    /// fails.
    fn write_volatile_to<F>(&self, addr: GuestAddress, dst: &mut F, count: usize) -> Result<usize>
    where
        F: WriteVolatile,
    {
        self.bounce(addr, count, |at, buf| {
            self.read_slice(buf, GuestAddress(at))?;
            let mut sent = 0;
            while sent < buf.len() {
                let n = retry_eintr(|| dst.write_volatile(&VolatileSlice::from(&mut buf[sent..])))
                    .map_err(|source| Error::DeviceIo { gpa: at, source })?;
                if n == 0 {
                    break;
                }
                sent += n;
            }
            Ok(sent)
        })
    }

    /// Writes exactly `count` bytes of guest memory at `addr` to `dst`.
    ///
    /// # Errors
    /// As [`Bytes::write_volatile_to`], and [`Error::ShortTransfer`] if `dst` takes fewer.
    fn write_all_volatile_to<F>(&self, addr: GuestAddress, dst: &mut F, count: usize) -> Result<()>
    where
        F: WriteVolatile,
    {
        let completed = self.write_volatile_to(addr, dst, count)?;
        if completed != count {
            return Err(Error::ShortTransfer {
                gpa: addr.0,
                expected: count,
                completed,
            });
        }
        Ok(())
    }

    /// Atomically stores `val` at `addr` (naturally aligned), through the tracked path: a
    /// tracked frame gets its event with the old and new bytes.
    ///
    /// # Errors
    /// [`Error::NotRam`] if the range is not RAM; [`Error::GuestAccess`] if vm-memory refuses
    /// the atomic access (misaligned); nothing is written or reported then.
    fn store<T: AtomicAccess>(
        &self,
        val: T,
        addr: GuestAddress,
        order: AtomicOrdering,
    ) -> Result<()> {
        let bytes = val.as_slice();
        match apply_with(&self.vm, addr.0, bytes, Source::Device, |mem| {
            mem.store(val, addr, order)
        }) {
            None => Err(Self::not_ram(addr.0, size_of::<T>())),
            Some(Err(source)) => Err(Error::GuestAccess {
                gpa: addr.0,
                source,
            }),
            Some(Ok(())) => {
                self.count_device_write();
                Ok(())
            }
        }
    }

    /// Atomically loads a value at `addr` (naturally aligned).
    ///
    /// # Errors
    /// [`Error::NotRam`] if the range is not RAM; [`Error::GuestAccess`] if vm-memory refuses
    /// the atomic access (misaligned).
    fn load<T: AtomicAccess>(&self, addr: GuestAddress, order: AtomicOrdering) -> Result<T> {
        let mem = self.vm.mem.memory();
        if !mem.check_range(addr, size_of::<T>(), Permissions::Read) {
            return Err(Self::not_ram(addr.0, size_of::<T>()));
        }
        mem.load(addr, order).map_err(|source| Error::GuestAccess {
            gpa: addr.0,
            source,
        })
    }
}
