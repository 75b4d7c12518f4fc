//! Stores KVM cannot emulate against a read-only fragment: pagetrack completes them in
//! userspace, with exact bytes (compared with the same instruction run natively).

use iced_x86::code_asm::*;
use pagetrack::{Gfn, Source};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};

use crate::common::*;

/// Runs `body` (which stores through `rdi`) once into untracked U and once into tracked T, with
/// the same register state; returns (native page, emulated page, events).
fn native_vs_tracked(
    kvm: kvm_ioctls::Kvm,
    body: impl Fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> (Vec<u8>, Vec<u8>, Vec<Ev>) {
    let code = assemble(ENTRY, |a| {
        // A fixed vector and GPR state: xmm/ymm/zmm0 from a pattern at 0x8000.
        a.mov(rbx, 0x8000u64)?;
        a.vmovdqu64(zmm0, zmmword_ptr(rbx))?; // zmm0 = pattern (64 bytes)
        a.mov(rax, 0x1111_2222_3333_4444u64)?; // rax/rdx: cmpxchg16b compare (matches memory)
        a.mov(rdx, 0x5555_6666_7777_8888u64)?;
        a.mov(rcx, 0x9999_aaaa_bbbb_ccccu64)?; // rcx/rbx: cmpxchg16b new value
        a.mov(rbx, 0xdddd_eeee_ffff_0000u64)?;
        a.mov(rsi, 0x8000u64)?; // movdir64b source
        a.mov(rdi, U)?;
        a.mov(r12, U)?;
        a.mov(r13, 2u64)?; // pass counter
        let mut again = a.create_label();
        a.set_label(&mut again)?;
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.mov(rdx, 0x5555_6666_7777_8888u64)?;
        body(a)?;
        a.mov(rdi, T)?; // second pass: the tracked frame
        a.mov(rax, 0xe7u64)?; // (xsave's RFBM low half is reloaded in the body)
        a.dec(r13)?;
        a.jnz(again)?;
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let pattern: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(1))
        .collect();
    g.vm.untracked_memory()
        .write_slice(&pattern, vm_memory::GuestAddress(0x8000))
        .unwrap();
    // Both frames start with the cmpxchg16b compare value, the rest a fill byte.
    let mut init = vec![0x5au8; 4096];
    init[..8].copy_from_slice(&0x1111_2222_3333_4444u64.to_le_bytes());
    init[8..16].copy_from_slice(&0x5555_6666_7777_8888u64.to_le_bytes());
    for at in [T, U] {
        g.vm.untracked_memory()
            .write_slice(&init, vm_memory::GuestAddress(at))
            .unwrap();
    }
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);
    let ev = rec.take();
    replay(T, &init, &ev, &read(&g.vm, T, 4096));
    assert!(ev.iter().all(|e| e.source == Source::Vcpu(0)));
    assert!(
        g.vm.stats().emulated_stores >= 1,
        "the store went through pagetrack's emulator"
    );
    (read(&g.vm, U, 4096), read(&g.vm, T, 4096), ev)
}

use vm_memory::Bytes;

/// Equal pages, or a short list of the first differing offsets.
fn assert_same(native: &[u8], emulated: &[u8]) {
    let diff: Vec<String> = (0..native.len())
        .filter(|&i| native[i] != emulated[i])
        .take(16)
        .map(|i| {
            format!(
                "{i:#x}: native {:02x} emulated {:02x}",
                native[i], emulated[i]
            )
        })
        .collect();
    assert!(diff.is_empty(), "pages differ at {diff:#?}");
}

#[test]
fn movq_xmm_store_completes_exactly() {
    let (native, emulated, ev) =
        native_vs_tracked(kvm_or_skip!(), |a| a.movq(qword_ptr(rdi), xmm0));
    assert_same(&native, &emulated);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].new.len(), 8);
}

#[test]
fn vmovdqu_ymm_store_completes_exactly() {
    let (native, emulated, ev) =
        native_vs_tracked(kvm_or_skip!(), |a| a.vmovdqu(ymmword_ptr(rdi + 0x40), ymm0));
    assert_same(&native, &emulated);
    assert_eq!(ev.iter().map(|e| e.new.len()).sum::<usize>(), 32);
}

#[test]
fn vmovdqu64_zmm_store_completes_exactly() {
    let (native, emulated, ev) = native_vs_tracked(kvm_or_skip!(), |a| {
        a.vmovdqu64(zmmword_ptr(rdi + 0x80), zmm0)
    });
    assert_same(&native, &emulated);
    assert_eq!(ev.iter().map(|e| e.new.len()).sum::<usize>(), 64);
}

#[test]
fn fxsave64_completes_exactly() {
    let (native, emulated, _) = native_vs_tracked(kvm_or_skip!(), |a| a.fxsave64(ptr(rdi + 0x200)));
    assert_same(&native, &emulated);
}

#[test]
fn xsave64_completes_exactly() {
    let (native, emulated, _) = native_vs_tracked(kvm_or_skip!(), |a| {
        a.mov(eax, 0xe7u32)?; // RFBM = x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM
        a.xor(edx, edx)?;
        a.xsave64(ptr(rdi + 0x400))
    });
    assert_same(&native, &emulated);
}

#[test]
fn lock_cmpxchg16b_completes_exactly() {
    let (native, emulated, ev) =
        native_vs_tracked(kvm_or_skip!(), |a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    assert_same(&native, &emulated);
    assert_eq!(
        &emulated[..8],
        &0xdddd_eeee_ffff_0000u64.to_le_bytes(),
        "the exchange happened"
    );
    assert_eq!(ev.iter().map(|e| e.new.len()).sum::<usize>(), 16);
}

#[test]
fn movdir64b_completes_exactly() {
    let (native, emulated, ev) = native_vs_tracked(kvm_or_skip!(), |a| {
        a.lea(r8, ptr(rdi + 0xc00))?; // 64-byte aligned destination
        a.movdir64b(r8, ptr(rsi))
    });
    assert_same(&native, &emulated);
    assert_eq!(ev.iter().map(|e| e.new.len()).sum::<usize>(), 64);
}

#[test]
fn movdiri_completes_exactly() {
    let (native, emulated, ev) =
        native_vs_tracked(kvm_or_skip!(), |a| a.movdiri(qword_ptr(rdi + 0x800), rcx));
    assert_same(&native, &emulated);
    assert_eq!(ev.len(), 1);
}
