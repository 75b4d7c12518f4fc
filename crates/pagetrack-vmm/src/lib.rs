//! # pagetrack-vmm: a small VMM to run guests on pagetrack-kvm
//!
//! It runs flat guest images in 64-bit long mode (at CPL3, behind minimal CPL0 exception
//! stubs) or in 16-bit real mode ([`flat`]), and unmodified static Linux programs whose system
//! calls it serves ([`process`]). The [`x86`] module prepares vCPUs and the guest-memory
//! structures they need (page tables, GDT, TSS, IDT) and decodes the exceptions a guest
//! reports; it works on any `vm_memory::Bytes` accessor, so it does not depend on how guest
//! memory is tracked. How the kernel's page-track names map to pagetrack's is in
//! [`pagetrack::kernel_names`].
//!
//! ## Walk-through
//!
//! Each step is a doc-test (`cargo test --doc -p pagetrack-vmm`). Steps 2 to 4 boot real
//! guests; without `/dev/kvm` they print `SKIPPED` and return, step 4 also without
//! `/bin/busybox` (Debian's `busybox-static`).
//!
//! 1. **Lay out a long-mode guest.** [`LongModeLayout`] computes where the page tables, GDT,
//!    TSSs, IDT, exception stubs and stacks go for a RAM size; it is pure data, checked
//!    before any VM exists.
//!
//! ```
//! use pagetrack_vmm::LongModeLayout;
//!
//! let layout = LongModeLayout::new(64 << 20)?;
//! let (start, end) = layout.reserved_range();
//! assert!(start < end && end <= 64 << 20); // the tables sit at the top of RAM
//! assert!(layout.user_stack_top(0)? <= start); // vCPU 0's stack lies below them
//! assert!(LongModeLayout::new(4096).is_err()); // too small: a typed error
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 2. **Run a flat image.** [`FlatGuest`] creates the VM, loads the image and prepares the
//!    vCPUs; the guest ends by writing its exit code to port `0xf4`
//!    ([`x86::GUEST_EXIT_PORT`]).
//!
//! ```
//! use pagetrack_vmm::{EndReason, FlatConfig, FlatGuest};
//!
//! if !std::path::Path::new("/dev/kvm").exists() {
//!     println!("SKIPPED: no /dev/kvm");
//!     return Ok(());
//! }
//! let image = [0xb0, 42, 0xe6, 0xf4]; // mov al, 42; out 0xf4, al
//! let outcome = FlatGuest::new(FlatConfig::new().mem(16 << 20), &image)?.run();
//! assert_eq!((outcome.reason, outcome.code), (EndReason::DebugExit, Some(42)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 3. **Track a frame and see the guest's store.** The VM's [`pagetrack::PageTracker`] is
//!    the core's: register a notifier, track a frame, run. The store traps, is completed by
//!    pagetrack and reaches the notifier with its address, bytes and vCPU.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use pagetrack::{Gfn, NotifierClass, Source, TrackNotifier, WriteEvent};
//! use pagetrack_vmm::{EndReason, FlatConfig, FlatGuest};
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<(u64, Vec<u8>, Source)>>);
//! impl TrackNotifier for Log {
//!     fn track_write(&self, e: &WriteEvent<'_>) {
//!         self.0.lock().expect("not poisoned").push((e.gpa.0, e.new.to_vec(), e.source));
//!     }
//! }
//!
//! if !std::path::Path::new("/dev/kvm").exists() {
//!     println!("SKIPPED: no /dev/kvm");
//!     return Ok(());
//! }
//! let image = [
//!     0xc6, 0x04, 0x25, 0x08, 0x00, 0x20, 0x00, 0x07, // mov byte [0x20_0008], 7
//!     0xc6, 0x04, 0x25, 0x00, 0x10, 0x20, 0x00, 0x09, // mov byte [0x20_1000], 9 (untracked)
//!     0xb0, 0x00, 0xe6, 0xf4, // mov al, 0; out 0xf4, al
//! ];
//! let guest = FlatGuest::new(FlatConfig::new().mem(16 << 20), &image)?;
//! let log = Arc::new(Log::default());
//! let _handle = guest.vm().tracker().register(log.clone(), NotifierClass::Ordinary)?;
//! guest.vm().tracker().add_gfn(Gfn(0x200))?;
//! let outcome = guest.run();
//! assert_eq!((outcome.reason, outcome.code), (EndReason::DebugExit, Some(0)));
//! assert_eq!(*log.0.lock().expect("not poisoned"), vec![(0x20_0008, vec![7], Source::Vcpu(0))]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! 4. **Run a static Linux program.** [`process::Process`] loads an unmodified static x86-64
//!    program, runs it at CPL3 and serves its system calls; [`process::Region`]s name the
//!    memory to track, and the statistics say what tracking saw.
//!
//! ```
//! use pagetrack_vmm::process::{Output, Process, ProcessConfig, ProcessEnd, Region};
//!
//! let busybox = std::path::Path::new("/bin/busybox");
//! if !std::path::Path::new("/dev/kvm").exists() || !busybox.exists() {
//!     println!("SKIPPED: no /dev/kvm or no /bin/busybox");
//!     return Ok(());
//! }
//! let config = ProcessConfig::new(busybox)
//!     .args(["echo", "hello"])
//!     .track([Region::Stack, Region::Heap])
//!     .stdout(Output::Capture);
//! let outcome = Process::new(config)?.run()?;
//! assert_eq!(outcome.end, ProcessEnd::Exited(0));
//! assert_eq!(outcome.stdout, b"hello\n");
//! assert!(outcome.stats.tracking.frames_tracked > 0); // its stack, at least
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod flat;
pub mod process;
pub mod x86;

pub use error::{
    ConfigProblem, ElfProblem, Error, ImageProblem, PageTableAccess, ProgramRefusal, RegionError,
    Result,
};
pub use flat::{EndReason, FlatConfig, FlatGuest, Mode, RunOutcome};
pub use x86::{GuestException, LongModeLayout, decode_exception, setup_long_mode, setup_real_mode};
