//! Signals the program sends itself (`kill`, `tkill`, `tgkill`, `raise`), `SIGALRM` from
//! `alarm`/`setitimer(ITIMER_REAL)`, and `SIGPIPE` for a write to a closed pipe: actions,
//! the blocked mask, pending signals, and the Linux x86-64 signal frame (`rt_sigframe`:
//! return address, `ucontext` with the `sigcontext`, `siginfo`) that a handler runs on and
//! `rt_sigreturn` reads back.
//!
//! Signals are delivered when a system call returns. A timer that expires while the program
//! computes without system calls stops the vCPU (a kicker thread) and is delivered between
//! two instructions where `syscall` stays at CPL3 (PVM); on VT-x/SVM, whose return path is
//! `sysretq` (it cannot give back RCX and R11), it waits for the next system call. The
//! frame's `fpstate` is NULL: the VMM keeps the FPU state of each frame itself and restores
//! it at that frame's `rt_sigreturn`.

use kvm_bindings::kvm_regs;

/// `SIGKILL`.
pub const SIGKILL: u32 = 9;
/// `SIGPIPE`.
pub const SIGPIPE: u32 = 13;
/// `SIGALRM`.
pub const SIGALRM: u32 = 14;
/// `SIGSTOP`.
pub const SIGSTOP: u32 = 19;

/// `si_code` of a signal sent by `kill`.
pub const SI_USER: i32 = 0;
/// `si_code` of a signal sent by the kernel (timers, `SIGPIPE`).
pub const SI_KERNEL: i32 = 0x80;
/// `si_code` of a signal sent by `tkill`/`tgkill`.
pub const SI_TKILL: i32 = -6;

const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;
const SA_ONSTACK: u64 = 0x0800_0000;
/// `SA_RESTART`: a system call the handler's signal interrupted is restarted.
pub const SA_RESTART: u64 = 0x1000_0000;
const SA_NODEFER: u64 = 0x4000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
/// `SS_ONSTACK`, `SS_DISABLE`.
const SS_ONSTACK: u32 = 1;
const SS_DISABLE: u32 = 2;

/// `sizeof(struct rt_sigframe)` without the FPU state: return address (8), `ucontext`
/// (304), `siginfo` (128).
pub const FRAME_SIZE: u64 = 440;
const UC: usize = 8;
const MCONTEXT: usize = UC + 40;
const SIGMASK: usize = MCONTEXT + 256;
const INFO: usize = UC + 304;

/// RFLAGS bits `rt_sigreturn` takes from the frame (Linux's `FIX_EFLAGS`).
const FIX_EFLAGS: u64 =
    0x4_0000 | 0x800 | 0x400 | 0x100 | 0x80 | 0x40 | 0x10 | 0x4 | 0x1 | 0x1_0000;

/// Signals the kernel never lets a program catch, block or ignore.
const UNBLOCKABLE: u64 = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1));

/// One `struct sigaction` (the kernel's: handler, flags, restorer, mask).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Action {
    /// `SIG_DFL` (0), `SIG_IGN` (1) or the handler's address.
    pub handler: u64,
    /// `SA_*`.
    pub flags: u64,
    /// Where the handler returns to (the C library's `__restore_rt`).
    pub restorer: u64,
    /// Signals blocked while the handler runs.
    pub mask: u64,
}

impl Action {
    /// From the 32 bytes of a `struct sigaction`.
    pub fn from_bytes(b: &[u8; 32]) -> Action {
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Action {
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        }
    }

    /// As the 32 bytes of a `struct sigaction`.
    pub fn to_bytes(self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// What happens to a signal taken for delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Ignored (`SIG_IGN`, or a default of ignore).
    Ignore,
    /// The default action ends the program.
    Terminate,
    /// Run this handler.
    Handle(Action),
}

/// A signal to deliver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Its number.
    pub sig: u32,
    /// `si_code`.
    pub code: i32,
    /// What to do.
    pub disposition: Disposition,
}

/// The program's signal state.
#[derive(Clone, Debug)]
pub struct Signals {
    actions: [Action; 64],
    /// Blocked signals (bit `n - 1` for signal `n`).
    pub blocked: u64,
    pending: u64,
    codes: [i32; 64],
    /// The alternate stack: base, size, flags (`SS_DISABLE` when none).
    altstack: (u64, u64, u32),
    /// The mask `rt_sigsuspend` replaced, restored by the handler's `rt_sigreturn` (or at
    /// once if no handler runs).
    saved: Option<u64>,
    /// Signals sent to the running thread alone (`tgkill`, `tkill`), all with `SI_TKILL`.
    thread_pending: u64,
}

/// What Linux keeps per thread: the blocked mask, the alternate stack, the mask
/// `rt_sigsuspend` replaced and the signals sent to the thread alone. The thread that serves
/// a system call has its own swapped into [`Signals`] ([`Signals::swap_thread`]).
#[derive(Clone, Copy, Debug)]
pub struct ThreadSignals {
    blocked: u64,
    altstack: (u64, u64, u32),
    saved: Option<u64>,
    pending: u64,
}

impl ThreadSignals {
    /// A new thread's: the creator's blocked mask, no alternate stack, nothing pending.
    pub fn inherit(blocked: u64) -> ThreadSignals {
        ThreadSignals {
            blocked,
            altstack: (0, 0, SS_DISABLE),
            saved: None,
            pending: 0,
        }
    }
}

impl Default for Signals {
    fn default() -> Signals {
        Signals {
            actions: [Action::default(); 64],
            blocked: 0,
            pending: 0,
            codes: [0; 64],
            altstack: (0, 0, SS_DISABLE),
            saved: None,
            thread_pending: 0,
        }
    }
}

fn bit(sig: u32) -> u64 {
    1 << (sig - 1)
}

/// Signals whose default action is to do nothing: `SIGCHLD`, `SIGCONT`, `SIGURG`,
/// `SIGWINCH`; and the stop signals, as there is no one to continue a stopped program.
fn default_ignored(sig: u32) -> bool {
    matches!(sig, 17..=23 | 28) || sig > 31 && sig < 34
}

impl Signals {
    /// The action of `sig` (1–64).
    pub fn action(&self, sig: u32) -> Action {
        self.actions[usize::try_from(sig - 1).expect("1-64")]
    }

    /// Sets the action of `sig` (1–64); false for `SIGKILL` and `SIGSTOP`, which keep theirs.
    pub fn set_action(&mut self, sig: u32, act: Action) -> bool {
        if bit(sig) & UNBLOCKABLE != 0 {
            return false;
        }
        self.actions[usize::try_from(sig - 1).expect("1-64")] = act;
        // Setting SIG_IGN (or a default of ignore) discards a pending one, as Linux does.
        if act.handler == SIG_IGN || (act.handler == SIG_DFL && default_ignored(sig)) {
            self.pending &= !bit(sig);
        }
        true
    }

    /// `rt_sigsuspend`: blocks `mask` while waiting; the old mask comes back when the
    /// handler returns ([`Signals::end_suspend`] if none runs).
    pub fn suspend(&mut self, mask: u64) {
        self.saved = Some(self.blocked);
        self.set_blocked(mask);
    }

    /// As [`Signals::suspend`], for `ppoll`/`pselect6`'s mask: a call served again after a
    /// deferred wait keeps the mask saved the first time.
    pub fn suspend_keep(&mut self, mask: u64) {
        if self.saved.is_none() {
            self.saved = Some(self.blocked);
        }
        self.set_blocked(mask);
    }

    /// Puts back the mask `rt_sigsuspend` replaced, if no frame took it.
    pub fn end_suspend(&mut self) {
        if let Some(m) = self.saved.take() {
            self.set_blocked(m);
        }
    }

    /// `rt_sigpending`: the signals pending for the thread or the process that it blocks.
    pub fn pending_blocked(&self) -> u64 {
        (self.pending | self.thread_pending) & self.blocked
    }

    /// Sets the blocked mask (never `SIGKILL` or `SIGSTOP`).
    pub fn set_blocked(&mut self, mask: u64) {
        self.blocked = mask & !UNBLOCKABLE;
    }

    /// Marks `sig` (1–64) pending; a standard signal already pending stays one. An ignored
    /// signal that is not blocked is discarded at once, as Linux does.
    pub fn raise(&mut self, sig: u32, code: i32) {
        let act = self.action(sig);
        let ignored = act.handler == SIG_IGN || (act.handler == SIG_DFL && default_ignored(sig));
        if ignored && self.blocked & bit(sig) == 0 {
            return;
        }
        if self.pending & bit(sig) == 0 {
            self.codes[usize::try_from(sig - 1).expect("1-64")] = code;
        }
        self.pending |= bit(sig);
    }

    /// True if a signal is pending and not blocked (it would interrupt a wait).
    pub fn deliverable(&self) -> bool {
        (self.pending | self.thread_pending) & !self.blocked != 0
    }

    /// Exchanges the per-thread part with `t`: the serving thread's goes in, and comes back
    /// out when it is done.
    pub fn swap_thread(&mut self, t: &mut ThreadSignals) {
        std::mem::swap(&mut self.blocked, &mut t.blocked);
        std::mem::swap(&mut self.altstack, &mut t.altstack);
        std::mem::swap(&mut self.saved, &mut t.saved);
        std::mem::swap(&mut self.thread_pending, &mut t.pending);
    }

    /// True if `sig` would be discarded at once for a thread blocking `blocked`.
    fn discarded(&self, sig: u32, blocked: u64) -> bool {
        let act = self.action(sig);
        let ignored = act.handler == SIG_IGN || (act.handler == SIG_DFL && default_ignored(sig));
        ignored && blocked & bit(sig) == 0
    }

    /// Marks `sig` (1–64) pending for the running thread alone (`tgkill` to itself).
    pub fn raise_thread(&mut self, sig: u32) {
        if !self.discarded(sig, self.blocked) {
            self.thread_pending |= bit(sig);
        }
    }

    /// Marks `sig` (1–64) pending for another thread, whose state is `t`; true if it is
    /// pending and not blocked there (the thread should be woken).
    pub fn raise_other(&self, t: &mut ThreadSignals, sig: u32) -> bool {
        if self.discarded(sig, t.blocked) {
            return false;
        }
        t.pending |= bit(sig);
        t.blocked & bit(sig) == 0
    }

    /// True if a signal of `set` is pending for the running thread (blocked or not).
    pub fn pending_in(&self, set: u64) -> bool {
        (self.thread_pending | self.pending) & set != 0
    }

    /// Takes the lowest pending signal of `set`, blocked or not (`rt_sigtimedwait`), the
    /// thread's own first, with its `si_code`.
    pub fn take_in(&mut self, set: u64) -> Option<(u32, i32)> {
        let own = self.thread_pending & set;
        let ready = if own != 0 { own } else { self.pending & set };
        if ready == 0 {
            return None;
        }
        let sig = ready.trailing_zeros() + 1;
        if own != 0 {
            self.thread_pending &= !bit(sig);
            Some((sig, SI_TKILL))
        } else {
            self.pending &= !bit(sig);
            Some((sig, self.codes[usize::try_from(sig - 1).expect("1-64")]))
        }
    }

    /// Takes the lowest pending unblocked signal, with what to do about it. A handler with
    /// `SA_RESETHAND` is reset to the default here, as Linux does at delivery.
    pub fn take(&mut self) -> Option<Delivery> {
        // The thread's own first, as Linux's dequeue_signal.
        let own = self.thread_pending & !self.blocked;
        let ready = if own != 0 {
            own
        } else {
            self.pending & !self.blocked
        };
        if ready == 0 {
            return None;
        }
        let sig = ready.trailing_zeros() + 1;
        let code = if own != 0 {
            self.thread_pending &= !bit(sig);
            SI_TKILL
        } else {
            self.pending &= !bit(sig);
            self.codes[usize::try_from(sig - 1).expect("1-64")]
        };
        let act = self.action(sig);
        let disposition = match act.handler {
            SIG_IGN => Disposition::Ignore,
            SIG_DFL if default_ignored(sig) => Disposition::Ignore,
            SIG_DFL => Disposition::Terminate,
            _ => {
                if act.flags & SA_RESETHAND != 0 {
                    self.actions[usize::try_from(sig - 1).expect("1-64")] = Action::default();
                }
                Disposition::Handle(act)
            }
        };
        Some(Delivery {
            sig,
            code,
            disposition,
        })
    }

    /// `sigaltstack`'s old value: `stack_t` (sp, flags, size), `SS_ONSTACK` if `sp` is on it.
    pub fn altstack_bytes(&self, sp: u64) -> [u8; 24] {
        let (base, size, mut flags) = self.altstack;
        if flags & SS_DISABLE == 0 && sp.wrapping_sub(base) < size {
            flags |= SS_ONSTACK;
        }
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&base.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[16..].copy_from_slice(&size.to_le_bytes());
        b
    }

    /// Sets the alternate stack from a `stack_t`; `Err(())` for bad flags or a stack below
    /// `MINSIGSTKSZ` (2048).
    pub fn set_altstack(&mut self, b: &[u8; 24]) -> Result<(), ()> {
        let base = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let flags = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let size = u64::from_le_bytes(b[16..].try_into().expect("8 bytes"));
        if flags & SS_DISABLE != 0 {
            self.altstack = (0, 0, SS_DISABLE);
            return Ok(());
        }
        if flags & !(SS_ONSTACK | 0x8000_0000) != 0 || size < 2048 {
            return Err(());
        }
        self.altstack = (base, size, 0);
        Ok(())
    }

    /// The frame for delivering `d` (a handler) with the program's registers `regs` (RIP and
    /// RFLAGS where the program resumes): its address, its bytes, and the registers the
    /// handler starts with. The blocked mask becomes the handler's.
    pub fn frame(
        &mut self,
        d: Delivery,
        act: Action,
        regs: &kvm_regs,
        pid: u32,
        uid: u32,
    ) -> (u64, Vec<u8>, kvm_regs) {
        let (base, size, flags) = self.altstack;
        let on_alt = flags & SS_DISABLE == 0 && regs.rsp.wrapping_sub(base) < size;
        let top = if act.flags & SA_ONSTACK != 0 && flags & SS_DISABLE == 0 && !on_alt {
            base + size
        } else {
            // Below the red zone.
            regs.rsp.wrapping_sub(128)
        };
        let frame = (top.wrapping_sub(FRAME_SIZE) & !15).wrapping_sub(8);
        let mut b = vec![0u8; usize::try_from(FRAME_SIZE).expect("small")];
        let put = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut b, 0, act.restorer);
        // ucontext: flags 0, link NULL, the alternate stack, then the sigcontext.
        b[UC + 16..UC + 40].copy_from_slice(&self.altstack_bytes(regs.rsp));
        let gregs = [
            regs.r8,
            regs.r9,
            regs.r10,
            regs.r11,
            regs.r12,
            regs.r13,
            regs.r14,
            regs.r15,
            regs.rdi,
            regs.rsi,
            regs.rbp,
            regs.rbx,
            regs.rdx,
            regs.rax,
            regs.rcx,
            regs.rsp,
            regs.rip,
            regs.rflags,
        ];
        for (i, v) in gregs.into_iter().enumerate() {
            put(&mut b, MCONTEXT + i * 8, v);
        }
        // cs 0x33, ss 0x2b as Linux reports them; err, trapno, oldmask, cr2, fpstate 0.
        b[MCONTEXT + 144..MCONTEXT + 146].copy_from_slice(&0x33u16.to_le_bytes());
        b[MCONTEXT + 150..MCONTEXT + 152].copy_from_slice(&0x2bu16.to_le_bytes());
        // The mask rt_sigreturn restores: the one before rt_sigsuspend, if it replaced it.
        let restore = self.saved.take().unwrap_or(self.blocked);
        put(&mut b, MCONTEXT + 168, restore);
        put(&mut b, SIGMASK, restore);
        // siginfo: signo, errno, code, then the sender's pid and uid.
        b[INFO..INFO + 4].copy_from_slice(&d.sig.to_le_bytes());
        b[INFO + 8..INFO + 12].copy_from_slice(&d.code.to_le_bytes());
        if d.code != SI_KERNEL {
            b[INFO + 16..INFO + 20].copy_from_slice(&pid.to_le_bytes());
            b[INFO + 20..INFO + 24].copy_from_slice(&uid.to_le_bytes());
        }
        let mut mask = self.blocked | act.mask;
        if act.flags & SA_NODEFER == 0 {
            mask |= bit(d.sig);
        }
        self.set_blocked(mask);
        let handler = kvm_regs {
            rip: act.handler,
            rsp: frame,
            rdi: u64::from(d.sig),
            rsi: frame + INFO as u64,
            rdx: frame + UC as u64,
            rax: 0,
            // DF and TF cleared for the handler, as Linux does.
            rflags: regs.rflags & !(0x400 | 0x100),
            ..*regs
        };
        (frame, b, handler)
    }

    /// `rt_sigreturn`: the registers and blocked mask saved in the frame at `frame` (the
    /// handler's stack pointer minus 8, once it has returned). `bytes` are the frame's.
    pub fn restore(&mut self, bytes: &[u8], current: &kvm_regs) -> kvm_regs {
        let w = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let g = |i: usize| w(MCONTEXT + i * 8);
        self.set_blocked(w(SIGMASK));
        kvm_regs {
            r8: g(0),
            r9: g(1),
            r10: g(2),
            r11: g(3),
            r12: g(4),
            r13: g(5),
            r14: g(6),
            r15: g(7),
            rdi: g(8),
            rsi: g(9),
            rbp: g(10),
            rbx: g(11),
            rdx: g(12),
            rax: g(13),
            rcx: g(14),
            rsp: g(15),
            rip: g(16),
            rflags: (current.rflags & !FIX_EFLAGS) | (g(17) & FIX_EFLAGS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(addr: u64, flags: u64, mask: u64) -> Action {
        Action {
            handler: addr,
            flags,
            restorer: 0x4444,
            mask,
        }
    }

    #[test]
    fn dispositions_follow_the_action_and_the_default() {
        let mut s = Signals::default();
        s.raise(17, SI_USER); // SIGCHLD: default ignore, discarded
        s.raise(15, SI_USER);
        assert_eq!(s.take().unwrap().disposition, Disposition::Terminate);
        assert_eq!(s.take(), None);
        // Blocked, an ignored signal stays pending and is ignored once unblocked.
        s.set_blocked(bit(17));
        s.raise(17, SI_USER);
        assert_eq!(s.take(), None);
        s.set_blocked(0);
        assert_eq!(s.take().unwrap().disposition, Disposition::Ignore);
        assert!(s.set_action(10, handler(SIG_IGN, 0, 0)));
        s.raise(10, SI_USER);
        assert_eq!(
            s.take(),
            None,
            "setting SIG_IGN discards, raising an ignored one too"
        );
        assert!(!s.set_action(SIGKILL, handler(0x1000, 0, 0)));
    }

    #[test]
    fn blocked_signals_wait_and_the_handler_mask_applies() {
        let mut s = Signals::default();
        let act = handler(0x1000, SA_RESETHAND, bit(12));
        s.set_action(10, act);
        s.set_blocked(bit(10) | bit(SIGKILL));
        assert_eq!(s.blocked, bit(10), "SIGKILL cannot be blocked");
        s.raise(10, SI_TKILL);
        assert!(!s.deliverable());
        s.set_blocked(0);
        let d = s.take().unwrap();
        assert_eq!(d.disposition, Disposition::Handle(act));
        assert_eq!(s.action(10), Action::default(), "SA_RESETHAND");
        let regs = kvm_regs {
            rsp: 0x7000_1008,
            rip: 0x40_1234,
            rax: 7,
            rflags: 0x202 | 0x400,
            r15: 15,
            ..Default::default()
        };
        let (frame, bytes, h) = s.frame(d, act, &regs, 1, 0);
        assert_eq!((frame + 8) % 16, 0, "the handler starts as after a call");
        assert!(frame + FRAME_SIZE <= regs.rsp - 128, "below the red zone");
        assert_eq!((h.rip, h.rsp, h.rdi), (0x1000, frame, 10));
        assert_eq!(h.rflags & 0x400, 0);
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 0x4444);
        assert_eq!(s.blocked, bit(10) | bit(12));
        let back = s.restore(&bytes, &h);
        assert_eq!(back, regs);
        assert_eq!(s.blocked, 0);
    }

    #[test]
    fn thread_state_swaps_and_thread_signals_reach_only_their_thread() {
        let mut s = Signals::default();
        s.set_action(10, handler(0x1000, 0, 0));
        // Thread A runs (its state swapped in) and blocks SIGUSR1; thread B does not.
        let mut a = ThreadSignals::inherit(0);
        let mut b = ThreadSignals::inherit(0);
        s.swap_thread(&mut a);
        s.set_blocked(bit(10));
        assert!(
            s.raise_other(&mut b, 10),
            "B does not block it: B is to be woken"
        );
        s.raise_thread(10);
        assert!(!s.deliverable(), "blocked in A");
        s.swap_thread(&mut a);
        assert_eq!(a.blocked, bit(10), "A's mask went back out with it");
        assert_eq!(s.blocked, 0);
        // B runs: its own SIGUSR1 is delivered to it, as SI_TKILL.
        s.swap_thread(&mut b);
        let d = s.take().unwrap();
        assert_eq!((d.sig, d.code), (10, SI_TKILL));
        assert!(s.take().is_none(), "A's pending signal stays A's");
        s.swap_thread(&mut b);
        // A unblocks and gets its own.
        s.swap_thread(&mut a);
        s.set_blocked(0);
        assert_eq!(s.take().map(|d| d.sig), Some(10));
        // An ignored signal sent to a thread that does not block it is discarded.
        s.set_action(12, handler(SIG_IGN, 0, 0));
        assert!(!s.raise_other(&mut b, 12));
        assert_eq!(b.pending & bit(12), 0);
    }

    #[test]
    fn the_alternate_stack_takes_on_stack_handlers() {
        let mut s = Signals::default();
        let mut st = [0u8; 24];
        st[..8].copy_from_slice(&0x9000_0000u64.to_le_bytes());
        st[16..].copy_from_slice(&0x1000u64.to_le_bytes());
        s.set_altstack(&st).unwrap();
        let act = handler(0x1000, SA_ONSTACK, 0);
        s.set_action(14, act);
        s.raise(14, SI_KERNEL);
        let d = s.take().unwrap();
        let regs = kvm_regs {
            rsp: 0x7000_0000,
            ..Default::default()
        };
        let (frame, ..) = s.frame(d, act, &regs, 1, 0);
        assert!((0x9000_0000..0x9000_1000).contains(&frame));
        let mut small = st;
        small[16..].copy_from_slice(&100u64.to_le_bytes());
        assert_eq!(s.set_altstack(&small), Err(()));
    }
}
