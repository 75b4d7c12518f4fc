//! The notifier contract, run against every backend: the core with a fake backend, KVM
//! device writes, KVM guest stores, and KVM guest stores in a VMM that embeds pagetrack (its
//! own VM fd, memory, vCPU fd and run loop).
#![expect(
    clippy::unwrap_used,
    reason = "test harness set-up fails the test loudly"
)]

use std::sync::Arc;

use iced_x86::code_asm::{al, ax, byte_ptr, dword_ptr, eax, qword_ptr, rax, rcx, rdi, word_ptr};
use pagetrack::{
    Gfn, Gpa, MemoryRegion, NoEnforcement, PageTracker, SlotId, Source, TrackerConfig, Tracking,
    WriteEvent,
};
use pagetrack_kvm::{Exit, ExitHandler, Handled, HostCaps, Ran, Vcpu, Vm, VmConfig};
use pagetrack_testkit::{Harness, assemble, assert_notifier_contract, exit_with, kvm_or_skip};
use pagetrack_vmm::x86::{self, GUEST_EXIT_PORT, LONG_MODE_RFLAGS, LongModeLayout};
use vm_memory::{Bytes, GuestAddress};

/// The core alone: a backend that keeps guest memory in a `Vec` and reports what it applies.
struct Fake {
    tracker: Arc<PageTracker>,
    view: Tracking,
    mem: Vec<u8>,
}

impl Harness for Fake {
    fn tracker(&self) -> &Tracking {
        &self.view
    }
    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        let at = usize::try_from(gpa).unwrap();
        let old = self.mem[at..at + bytes.len()].to_vec();
        self.mem[at..at + bytes.len()].copy_from_slice(bytes);
        self.tracker
            .report_write(&WriteEvent::new(Gpa(gpa), bytes, Source::Vcpu(3)).with_old(&old));
    }
    fn source(&self) -> Source {
        Source::Vcpu(3)
    }
    fn knows_old_bytes(&self) -> bool {
        true
    }
    fn frames(&self) -> (Gfn, Gfn) {
        (Gfn(5), Gfn(9))
    }
}

#[test]
fn contract_core_with_a_fake_backend() {
    assert_notifier_contract(|| {
        let tracker = PageTracker::new(TrackerConfig::default(), Arc::new(NoEnforcement));
        tracker
            .set_memory_region(MemoryRegion::new(SlotId(0), Gfn(0), 16))
            .unwrap();
        Fake {
            view: Tracking::new(Arc::clone(&tracker)),
            tracker,
            mem: vec![0; 16 * 4096],
        }
    });
}

/// KVM device writes through `TrackedMemory`.
struct Device(Vm);

impl Harness for Device {
    fn tracker(&self) -> &Tracking {
        self.0.tracker()
    }
    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        vm_memory::Bytes::write_slice(&self.0.memory(), bytes, vm_memory::GuestAddress(gpa))
            .unwrap();
    }
    fn source(&self) -> Source {
        Source::Device
    }
    fn knows_old_bytes(&self) -> bool {
        true
    }
    fn frames(&self) -> (Gfn, Gfn) {
        (Gfn(0x100), Gfn(0x200))
    }
}

#[test]
fn contract_kvm_device_writes() {
    let kvm = kvm_or_skip!();
    drop(kvm);
    assert_notifier_contract(|| {
        let vm = Vm::new(VmConfig::default().with_ram(16 << 20)).unwrap();
        vm.add_ram(0, 16 << 20).unwrap();
        Device(vm)
    });
}

/// KVM guest stores: a CPL3 program stores rax (1, 2, 4 or 8 bytes, by rcx) at rdi.
struct Guest {
    vm: Vm,
    vcpu: Vcpu,
    layout: LongModeLayout,
}

const ENTRY: u64 = 0x1000;

impl Harness for Guest {
    fn tracker(&self) -> &Tracking {
        self.vm.tracker()
    }
    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        let mut value = [0u8; 8];
        value[..bytes.len()].copy_from_slice(bytes);
        let mut regs = self.vcpu.fd().get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rsp = self.layout.user_stack_top(0).unwrap();
        regs.rflags = LONG_MODE_RFLAGS;
        regs.rdi = gpa;
        regs.rax = u64::from_le_bytes(value);
        regs.rcx = bytes.len() as u64;
        self.vcpu.fd().set_regs(&regs).unwrap();
        match self.vcpu.run().unwrap() {
            Exit::IoOut {
                port: GUEST_EXIT_PORT,
                ..
            } => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    fn source(&self) -> Source {
        Source::Vcpu(0)
    }
    fn knows_old_bytes(&self) -> bool {
        true
    }
    fn frames(&self) -> (Gfn, Gfn) {
        (Gfn(0x100), Gfn(0x200))
    }
}

/// A CPL3 program that stores rax (1, 2, 4 or 8 bytes, by rcx) at rdi, then exits.
fn store_program() -> Vec<u8> {
    assemble(ENTRY, |a| {
        let (mut b1, mut b2, mut b4, mut done) = (
            a.create_label(),
            a.create_label(),
            a.create_label(),
            a.create_label(),
        );
        a.cmp(rcx, 1)?;
        a.je(b1)?;
        a.cmp(rcx, 2)?;
        a.je(b2)?;
        a.cmp(rcx, 4)?;
        a.je(b4)?;
        a.mov(qword_ptr(rdi), rax)?; // 8-byte store
        a.jmp(done)?;
        a.set_label(&mut b1)?;
        a.mov(byte_ptr(rdi), al)?; // 1-byte store
        a.jmp(done)?;
        a.set_label(&mut b2)?;
        a.mov(word_ptr(rdi), ax)?; // 2-byte store
        a.jmp(done)?;
        a.set_label(&mut b4)?;
        a.mov(dword_ptr(rdi), eax)?; // 4-byte store
        a.set_label(&mut done)?;
        exit_with(a, 0)
    })
}

#[test]
fn contract_kvm_guest_stores() {
    let kvm = kvm_or_skip!();
    drop(kvm);
    let code = store_program();
    assert_notifier_contract(|| {
        let vm = Vm::new(VmConfig::default().with_ram(16 << 20)).unwrap();
        vm.add_ram(0, 16 << 20).unwrap();
        vm.untracked_memory()
            .write_slice(&code, GuestAddress(ENTRY))
            .unwrap();
        let layout = LongModeLayout::new(16 << 20).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        x86::setup_long_mode(
            vm.kvm(),
            vcpu.fd(),
            &*vm.untracked_memory(),
            &layout,
            ENTRY,
            0,
        )
        .unwrap();
        Guest { vm, vcpu, layout }
    });
}

/// KVM guest stores in an embedding VMM: the VM fd, the guest memory mapping and the vCPU fd
/// are the VMM's, pagetrack has a slot-id range, and the run loop is the VMM's own around
/// `ExitHandler`.
struct Embedded {
    vm: Vm,
    vcpu: kvm_ioctls::VcpuFd,
    handler: ExitHandler,
    layout: LongModeLayout,
}

impl Harness for Embedded {
    fn tracker(&self) -> &Tracking {
        self.vm.tracker()
    }
    fn write(&mut self, gpa: u64, bytes: &[u8]) {
        let mut value = [0u8; 8];
        value[..bytes.len()].copy_from_slice(bytes);
        let mut regs = self.vcpu.get_regs().unwrap();
        regs.rip = ENTRY;
        regs.rsp = self.layout.user_stack_top(0).unwrap();
        regs.rflags = LONG_MODE_RFLAGS;
        regs.rdi = gpa;
        regs.rax = u64::from_le_bytes(value);
        regs.rcx = bytes.len() as u64;
        self.vcpu.set_regs(&regs).unwrap();
        loop {
            match self.handler.run(&mut self.vcpu).unwrap() {
                Ran::Tracked(exit) => match self.handler.handle(exit, &mut self.vcpu).unwrap() {
                    Handled::Done => {}
                    other => panic!("unexpected {other:?}"),
                },
                Ran::Exit(kvm_ioctls::VcpuExit::IoOut(GUEST_EXIT_PORT, _)) => return,
                Ran::Exit(other) => panic!("unexpected exit {other:?}"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    fn source(&self) -> Source {
        Source::Vcpu(0)
    }
    fn knows_old_bytes(&self) -> bool {
        true
    }
    fn frames(&self) -> (Gfn, Gfn) {
        (Gfn(0x100), Gfn(0x200))
    }
}

#[test]
fn contract_kvm_embedded_vmm() {
    let kvm = kvm_or_skip!();
    let code = store_program();
    assert_notifier_contract(|| {
        let vm_fd = Arc::new(kvm.create_vm().unwrap());
        let region = Arc::new(
            vm_memory::GuestRegionMmap::from_range(GuestAddress(0), 16 << 20, None).unwrap(),
        );
        let vm = Vm::from_vm_fd(
            &kvm,
            Arc::clone(&vm_fd),
            HostCaps::probe(&kvm),
            VmConfig::default().with_ram(16 << 20).with_kvm_slots(8..40),
        )
        .unwrap();
        vm.add_region(region).unwrap();
        vm.untracked_memory()
            .write_slice(&code, GuestAddress(ENTRY))
            .unwrap();
        let layout = LongModeLayout::new(16 << 20).unwrap();
        let mut vcpu = vm_fd.create_vcpu(0).unwrap();
        x86::setup_long_mode(&kvm, &vcpu, &*vm.untracked_memory(), &layout, ENTRY, 0).unwrap();
        let handler = vm.exit_handler(0, &mut vcpu).unwrap();
        Embedded {
            vm,
            vcpu,
            handler,
            layout,
        }
    });
}
