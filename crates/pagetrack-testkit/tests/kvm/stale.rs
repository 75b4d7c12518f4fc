//! The system registers a trapped store is decoded with come from the exit itself, not from a
//! cache a CR3 switch or `wrfsbase` makes stale (issue 10 item 2).

use iced_x86::code_asm::*;
use pagetrack_kvm::walk::pte;
use pagetrack_testkit::twopass::{RAM, TRACKED, UNTRACKED};
use pagetrack_testkit::{TwoPass, kvm_or_skip};
use pagetrack_vmm::x86::LongModeLayout;
use vm_memory::{Bytes, GuestAddress};

/// Where the alternative page tables go (free RAM above the harness's regions).
const ALT: u64 = 0x60_0000;
const SWITCH_PORT: u16 = 0xf6;
const BACK_PORT: u16 = 0xf7;

fn read_u64(vm: &pagetrack_kvm::Vm, gpa: u64) -> u64 {
    let mut b = [0u8; 8];
    vm.untracked_memory()
        .read_slice(&mut b, GuestAddress(gpa))
        .unwrap();
    u64::from_le_bytes(b)
}

/// Builds, at [`ALT`], a copy of the harness's page tables in which the page after each data
/// region's first frame maps the frame after it: `base + 0x1000 -> base + 0x2000`, for both
/// regions. Returns the new CR3.
fn alternative_tables(vm: &pagetrack_kvm::Vm) -> u64 {
    let pml4 = LongModeLayout::new(RAM).unwrap().pml4();
    let pdpt = read_u64(vm, pml4) & pte::ADDR_MASK;
    let pd = read_u64(vm, pdpt) & pte::ADDR_MASK;
    let mem = vm.untracked_memory();
    let copy = |from: u64, to: u64| {
        let mut page = vec![0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(from)).unwrap();
        mem.write_slice(&page, GuestAddress(to)).unwrap();
    };
    let put = |at: u64, v: u64| mem.write_slice(&v.to_le_bytes(), GuestAddress(at)).unwrap();
    let (pml4a, pdpta, pda) = (ALT, ALT + 0x1000, ALT + 0x2000);
    copy(pml4, pml4a);
    copy(pdpt, pdpta);
    copy(pd, pda);
    put(pml4a, pdpta | (read_u64(vm, pml4) & !pte::ADDR_MASK));
    put(pdpta, pda | (read_u64(vm, pdpt) & !pte::ADDR_MASK));
    for (i, base) in [(0u64, TRACKED), (1, UNTRACKED)] {
        let pde = read_u64(vm, pd + 8 * i);
        let flags = pde & 0xfff & !pte::HUGE;
        let pt = ALT + 0x3000 + 0x1000 * i;
        for e in 0..512u64 {
            let mut va = (i << 21) + (e << 12);
            if va == base + 0x1000 {
                va = base + 0x2000;
            }
            put(pt + 8 * e, va | flags | pte::ACCESSED | pte::DIRTY);
        }
        put(pda + 8 * i, pt | (pde & 0xfff & !pte::HUGE) | pte::ACCESSED);
    }
    pml4a
}

#[test]
fn rep_stosb_after_a_cr3_switch_uses_the_new_mapping() {
    let kvm = kvm_or_skip!();
    let body = |a: &mut CodeAssembler| {
        a.mov(byte_ptr(rdi), 1)?; // a trapped store under the first CR3
        a.mov(al, 0)?;
        a.out(u32::from(SWITCH_PORT), al)?; // the host switches CR3
        a.lea(rdi, ptr(rdi + 0xfff))?; // last byte of the first frame, then the remapped page
        a.mov(ecx, 256)?;
        a.mov(al, 0x77)?;
        a.rep().stosb()?;
        a.mov(al, 0)?;
        a.out(u32::from(BACK_PORT), al) // and back (the witness copy reads identity-mapped)
    };
    let cr3s = std::sync::Mutex::new((0u64, 0u64));
    let hook = |port: u16, vcpu: &pagetrack_kvm::Vcpu| {
        let (orig, alt) = *cr3s.lock().unwrap();
        let mut s = vcpu.fd().get_sregs().unwrap();
        s.cr3 = if port == SWITCH_PORT { alt } else { orig };
        vcpu.fd().set_sregs(&s).unwrap();
    };
    let run = TwoPass::new(&body)
        .frames(3)
        .on_port(&hook)
        .run_with(kvm, |vm| {
            let alt = alternative_tables(vm);
            *cr3s.lock().unwrap() = (LongModeLayout::new(RAM).unwrap().pml4(), alt);
        });
    run.assert_exact();
    assert_eq!(
        &run.native[0x2000..0x20ff],
        &[0x77; 255][..],
        "native used the new map"
    );
    assert_eq!(
        run.native[0x1000], run.initial[0x1000],
        "old mapping untouched"
    );
}
