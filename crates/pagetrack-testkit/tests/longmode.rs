//! Self-test of the guest environment on real KVM, without pagetrack-kvm: one writable memslot
//! over plain guest memory, vCPUs set up by `pagetrack_vmm::x86`, guests assembled with
//! iced-x86 and run with the testkit's bounded runner.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use iced_x86::code_asm::{
    byte_ptr, qword_ptr, rax, rcx, rdi, rsi, xmm0, xmmword_ptr, ymm1, ymmword_ptr,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use pagetrack_testkit::{Stop, assemble, assemble16, exit_with, run_bounded, with_watchdog};
use pagetrack_vmm::x86::{
    GuestException, LongModeLayout, SYSCALL_TRAP_RIP, USER_CS, USER_DS, decode_exception,
    setup_long_mode, setup_real_mode,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const RAM_SIZE: u64 = 64 << 20;
/// Where every guest program is loaded.
const LOAD: u64 = 0x1000;
/// Scratch data the guests store to.
const DATA: u64 = 0x20_0000;
/// Bytes the host prepares for the guests to load.
const SOURCE: u64 = 0x30_0000;
const MAX_EXITS: usize = 1000;
const TIMEOUT: Duration = Duration::from_secs(60);

/// A VM with one writable memslot over all of `mem`.
///
/// Field order matters: `vm` is dropped (the VM fd closed) before `mem` is unmapped.
#[derive(Debug)]
struct TestVm {
    vm: VmFd,
    mem: GuestMemoryMmap,
    layout: LongModeLayout,
}

impl TestVm {
    fn new(kvm: &Kvm) -> Self {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let size = usize::try_from(RAM_SIZE).expect("64 MiB fits usize");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("mmap RAM");
        let host = mem
            .get_host_address(GuestAddress(0))
            .expect("RAM starts at 0");
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM_SIZE,
            userspace_addr: host as u64,
        };
        // SAFETY: `region` describes exactly the RAM_SIZE bytes `mem` mapped at `host` above.
        // The mapping lives as long as `mem`, which `TestVm` drops only after `vm` (field order),
        // and every vCPU of this VM is dropped before the `TestVm` (or the `Arc` holding it).
        unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
        let layout = LongModeLayout::new(RAM_SIZE).expect("layout for 64 MiB");
        Self { vm, mem, layout }
    }

    /// Loads `code` at [`LOAD`], refusing an image that overlaps the reserved region.
    fn load(&self, code: &[u8]) {
        let end = LOAD + u64::try_from(code.len()).expect("small image");
        assert!(end <= self.layout.reserved_range().0, "image overlaps");
        self.mem
            .write_slice(code, GuestAddress(LOAD))
            .expect("load guest");
    }

    /// A long-mode vCPU `index` entering at [`LOAD`].
    fn long_mode_vcpu(&self, kvm: &Kvm, index: u32) -> VcpuFd {
        let vcpu = self
            .vm
            .create_vcpu(u64::from(index))
            .expect("KVM_CREATE_VCPU");
        setup_long_mode(kvm, &vcpu, &self.mem, &self.layout, LOAD, index).expect("setup_long_mode");
        vcpu
    }

    /// Runs `vcpu` and decodes an exception report, panicking on one.
    fn run_expecting_exit(&self, vcpu: &mut VcpuFd) -> u8 {
        match run_bounded(vcpu, MAX_EXITS).expect("KVM_RUN") {
            Stop::Exit(code) => code,
            Stop::Exception => panic!("guest exception: {}", self.exception(vcpu)),
            other => panic!("guest stopped with {other:?}"),
        }
    }

    fn exception(&self, vcpu: &VcpuFd) -> GuestException {
        decode_exception(vcpu, &self.mem, &self.layout).expect("decode_exception")
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).expect("read guest")
    }
}

#[test]
fn long_mode_guest_stores_with_sse_and_avx_then_exits_42() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        let pattern: Vec<u8> = (1..=32).collect();
        t.mem
            .write_slice(&pattern, GuestAddress(SOURCE))
            .expect("write source");
        t.load(&assemble(LOAD, |a| {
            a.mov(rdi, DATA)?; // rdi = destination
            a.mov(rsi, SOURCE)?; // rsi = source pattern
            a.mov(rax, 0x1122_3344_5566_7788_u64)?;
            a.mov(qword_ptr(rdi), rax)?; // plain 8-byte store to DATA
            a.movdqu(xmm0, xmmword_ptr(rsi))?; // SSE load of 16 bytes
            a.movdqu(xmmword_ptr(rdi + 0x10), xmm0)?; // SSE store to DATA+0x10
            a.vmovdqu(ymm1, ymmword_ptr(rsi))?; // AVX load of 32 bytes
            a.vmovdqu(ymmword_ptr(rdi + 0x20), ymm1)?; // AVX store to DATA+0x20
            a.push(rax)?; // store on the user stack
            exit_with(a, 42) // out 0xf4 with al = 42
        }));
        let mut vcpu = t.long_mode_vcpu(kvm, 0);

        // Act
        let code = t.run_expecting_exit(&mut vcpu);

        // Assert
        assert_eq!(code, 42);
        assert_eq!(t.read_u64(DATA), 0x1122_3344_5566_7788);
        let mut stored = [0u8; 48];
        t.mem
            .read_slice(&mut stored, GuestAddress(DATA + 0x10))
            .expect("read stores");
        assert_eq!(&stored[..16], &pattern[..16]);
        assert_eq!(&stored[16..], &pattern[..]);
        let stack_top = t.layout.user_stack_top(0).expect("stack of vCPU 0");
        assert_eq!(t.read_u64(stack_top - 8), 0x1122_3344_5566_7788);
    });
}

#[test]
fn ud2_is_reported_as_invalid_opcode_with_its_rip() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        t.load(&assemble(LOAD, |a| {
            a.nop()?; // 1 byte, so the fault is at LOAD + 1
            a.ud2() // #UD
        }));
        let mut vcpu = t.long_mode_vcpu(kvm, 0);

        // Act
        let stop = run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN");

        // Assert
        assert_eq!(stop, Stop::Exception);
        let e = t.exception(&vcpu);
        assert_eq!(e.vector, 6, "{e}");
        assert_eq!(e.rip, LOAD + 1);
        assert_eq!(e.error_code, None);
        assert_eq!(e.cr2, None);
        assert_eq!(e.cs, u64::from(USER_CS));
        assert_eq!(e.ss, u64::from(USER_DS));
        assert_eq!(e.rsp, t.layout.user_stack_top(0).expect("stack"));
        assert_eq!(
            e.to_string(),
            format!("#UD (vector 6) at rip {:#x}", LOAD + 1)
        );
    });
}

#[test]
fn store_above_4gib_is_reported_as_page_fault_with_cr2() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        const TARGET: u64 = 0x10_0000_0000;
        let t = TestVm::new(kvm);
        let setup = |a: &mut iced_x86::code_asm::CodeAssembler| a.mov(rax, TARGET); // rax = 64 GiB
        let prefix_len = assemble(LOAD, setup).len();
        t.load(&assemble(LOAD, |a| {
            setup(a)?;
            a.mov(byte_ptr(rax), 1) // store to an unmapped address: #PF
        }));
        let mut vcpu = t.long_mode_vcpu(kvm, 0);

        // Act
        let stop = run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN");

        // Assert
        assert_eq!(stop, Stop::Exception);
        let e = t.exception(&vcpu);
        assert_eq!(e.vector, 14, "{e}");
        assert_eq!(e.rip, LOAD + u64::try_from(prefix_len).expect("small"));
        // Not present (bit 0 clear), write (bit 1), user mode (bit 2).
        assert_eq!(e.error_code, Some(0b110));
        assert_eq!(e.cr2, Some(TARGET));
        assert_eq!(e.cs, u64::from(USER_CS));
    });
}

#[test]
fn real_mode_guest_stores_and_halts() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        t.load(&assemble16(LOAD, |a| {
            a.mov(byte_ptr(0x500), 7)?; // store 7 at linear 0x500 (DS = 0)
            a.hlt() // KVM_EXIT_HLT (no irqchip)
        }));
        let mut vcpu = t.vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        setup_real_mode(&vcpu, u16::try_from(LOAD).expect("below 64 KiB")).expect("real mode");

        // Act
        let stop = run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN");

        // Assert
        assert_eq!(stop, Stop::Hlt);
        let mut byte = [0u8; 1];
        t.mem
            .read_slice(&mut byte, GuestAddress(0x500))
            .expect("read");
        assert_eq!(byte[0], 7);
    });
}

/// Runs a single-vCPU test body on its own thread under the watchdog, so a guest spinning
/// without exits fails the test instead of hanging it.
fn guarded(kvm: Kvm, body: fn(&Kvm)) {
    with_watchdog(TIMEOUT, move || body(&kvm));
}

/// Runs the same program on two vCPUs at once, each on its own thread, and returns each
/// vCPU's (vcpu, vm) after `run` finished with it.
fn on_two_vcpus<T: Send + 'static>(
    kvm: Kvm,
    t: TestVm,
    before_run: fn(&VcpuFd, u32),
    run: fn(&TestVm, &mut VcpuFd) -> T,
) -> Vec<T> {
    let kvm = Arc::new(kvm);
    let t = Arc::new(t);
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2u32)
        .map(|index| {
            let (kvm, t, barrier) = (Arc::clone(&kvm), Arc::clone(&t), Arc::clone(&barrier));
            std::thread::spawn(move || {
                with_watchdog(TIMEOUT, move || {
                    let mut vcpu = t.long_mode_vcpu(&kvm, index);
                    before_run(&vcpu, index);
                    barrier.wait(); // both enter KVM_RUN together
                    run(&t, &mut vcpu)
                })
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|h| h.join().expect("vCPU thread"))
        .collect()
}

#[test]
fn two_vcpus_store_to_their_own_data_and_stacks_and_exit() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    // Arrange
    const ITERATIONS: u64 = 1_000_000;
    let t = TestVm::new(&kvm);
    t.load(&assemble(LOAD, |a| {
        let mut again = a.create_label();
        a.mov(rcx, ITERATIONS)?; // loop counter
        a.set_label(&mut again)?;
        a.add(qword_ptr(rdi), 1)?; // count in this vCPU's slot (rdi is set per vCPU)
        a.dec(rcx)?;
        a.jnz(again)?;
        a.push(rsi)?; // store this vCPU's tag on its own stack
        exit_with(a, 42)
    }));
    let stacks: Vec<u64> = (0..2)
        .map(|n| t.layout.user_stack_top(n).expect("stack"))
        .collect();
    let mem = t.mem.clone();

    // Act
    let codes = on_two_vcpus(
        kvm,
        t,
        |vcpu, index| {
            let mut regs = vcpu.get_regs().expect("KVM_GET_REGS");
            regs.rdi = DATA + 64 * u64::from(index); // separate cache lines
            regs.rsi = 0xa0 + u64::from(index);
            vcpu.set_regs(&regs).expect("KVM_SET_REGS");
        },
        TestVm::run_expecting_exit,
    );

    // Assert
    assert_eq!(codes, [42, 42]);
    for (n, stack) in stacks.iter().enumerate() {
        let offset = 64 * u64::try_from(n).expect("small");
        let count: u64 = mem.read_obj(GuestAddress(DATA + offset)).expect("read");
        assert_eq!(count, ITERATIONS, "vCPU {n}");
        let tag: u64 = mem.read_obj(GuestAddress(stack - 8)).expect("read");
        assert_eq!(tag, 0xa0 + offset / 64, "vCPU {n}'s stack");
    }
}

#[test]
fn two_vcpus_take_exceptions_on_their_own_cpl0_stacks() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    // Arrange
    let t = TestVm::new(&kvm);
    t.load(&assemble(LOAD, |a| a.ud2()));
    let stacks: Vec<u64> = (0..2)
        .map(|n| t.layout.user_stack_top(n).expect("stack"))
        .collect();
    let kernel_stacks: Vec<u64> = (0..2)
        .map(|n| t.layout.kernel_stack_top(n).expect("stack"))
        .collect();

    // Act
    let reports = on_two_vcpus(
        kvm,
        t,
        |_, _| {},
        |t, vcpu| {
            let stop = run_bounded(vcpu, MAX_EXITS).expect("KVM_RUN");
            let rsp = vcpu.get_regs().expect("KVM_GET_REGS").rsp;
            (stop, t.exception(vcpu), rsp)
        },
    );

    // Assert
    for (n, (stop, e, kernel_rsp)) in reports.iter().enumerate() {
        assert_eq!(*stop, Stop::Exception, "vCPU {n}");
        assert_eq!(e.vector, 6, "vCPU {n}: {e}");
        assert_eq!(e.rip, LOAD);
        assert_eq!(
            e.rsp, stacks[n],
            "vCPU {n}'s frame shows its own user stack"
        );
        // Five 8-byte slots (no error code) on this vCPU's own CPL0 stack.
        assert_eq!(*kernel_rsp, kernel_stacks[n] - 40, "vCPU {n}'s CPL0 stack");
    }
}

#[test]
fn stray_syscall_reports_a_fetch_page_fault_at_the_trap_rip() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        t.load(&assemble(LOAD, |a| a.syscall())); // jumps to MSR_LSTAR = SYSCALL_TRAP_RIP
        let mut vcpu = t.long_mode_vcpu(kvm, 0);

        // Act
        let stop = run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN");

        // Assert: a #PF on the instruction fetch, not a guest running off from address 0.
        // (CS is CPL3 on PVM, where `syscall` stays at CPL3, and CPL0 on VT-x/SVM.)
        assert_eq!(stop, Stop::Exception);
        let e = t.exception(&vcpu);
        assert_eq!(e.vector, 14, "{e}");
        assert_eq!(e.rip, SYSCALL_TRAP_RIP);
        assert_eq!(e.cr2, Some(SYSCALL_TRAP_RIP));
        let regs = vcpu.get_regs().expect("KVM_GET_REGS");
        assert_eq!(regs.rcx, LOAD + 2, "syscall saved the return RIP in rcx");
    });
}

#[test]
fn int3_at_cpl3_reports_breakpoint_after_the_instruction() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        t.load(&assemble(LOAD, |a| a.int3())); // #BP through the DPL3 gate
        let mut vcpu = t.long_mode_vcpu(kvm, 0);

        // Act
        let stop = run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN");

        // Assert: #BP is a trap, so the frame's RIP is after the 1-byte int3.
        assert_eq!(stop, Stop::Exception);
        let e = t.exception(&vcpu);
        assert_eq!(e.vector, 3, "{e}");
        assert_eq!(e.rip, LOAD + 1);
    });
}

#[test]
fn resumed_exception_returns_to_the_patched_frame_rip() {
    let kvm = pagetrack_testkit::kvm_or_skip!();
    guarded(kvm, |kvm| {
        // Arrange
        let t = TestVm::new(kvm);
        t.load(&assemble(LOAD, |a| {
            a.mov(rdi, 0x5a_u64)?; // a register the stub must leave alone
            a.ud2()?; // #UD; the VMM skips it
            a.mov(qword_ptr(DATA), rdi)?; // proves rdi survived the round trip
            exit_with(a, 7)
        }));
        let mut vcpu = t.long_mode_vcpu(kvm, 0);
        assert_eq!(
            run_bounded(&mut vcpu, MAX_EXITS).expect("KVM_RUN"),
            Stop::Exception
        );
        let e = t.exception(&vcpu);
        assert_eq!(e.vector, 6, "{e}");

        // Act: patch the frame's RIP past the 2-byte ud2 and run the stub's iretq.
        let frame = vcpu.get_regs().expect("KVM_GET_REGS").rsp;
        t.mem
            .write_obj(e.rip + 2, GuestAddress(frame))
            .expect("patch frame");
        let code = t.run_expecting_exit(&mut vcpu);

        // Assert
        assert_eq!(code, 7);
        assert_eq!(t.read_u64(DATA), 0x5a);
    });
}
