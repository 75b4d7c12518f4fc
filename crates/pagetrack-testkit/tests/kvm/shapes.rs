//! Store shapes KVM splits or batches: string stores, straddling stores, 16-byte stores, push;
//! memslot removal; batches.

use iced_x86::code_asm::*;
use pagetrack::{AsId, Gfn};
use pagetrack_testkit::{assemble, exit_with, kvm_or_skip};
use vm_memory::Bytes;

use crate::common::*;

#[test]
fn rep_stosq_across_two_tracked_frames_reports_every_element() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T - 0x100)?; // start 0x100 bytes below the first tracked frame
        a.mov(rax, 0xabcd_ef01_2345_6789u64)?; // pattern
        a.mov(ecx, (8192 + 0x200) / 8)?; // through both tracked frames and 0x100 beyond
        a.cld()?;
        a.rep().stosq()?; // the string store
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker()
        .add_gfns(AsId::NORMAL, &[Gfn(T >> 12), Gfn((T >> 12) + 1)])
        .unwrap();
    let initial = read(&g.vm, T, 8192);

    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    let ev = rec.take();
    assert_eq!(
        ev.len(),
        1024,
        "one event per 8-byte element inside the tracked frames"
    );
    replay(T, &initial, &ev, &read(&g.vm, T, 8192));
    assert_eq!(
        read(&g.vm, T - 0x100, 8),
        0xabcd_ef01_2345_6789u64.to_le_bytes()
    );
    assert_eq!(
        read(&g.vm, T + 8192, 8),
        0xabcd_ef01_2345_6789u64.to_le_bytes()
    );
    // One fragment of two frames, not two.
    assert_eq!(g.vm.stats().fragments.readonly_fragments, 1);
}

#[test]
fn straddling_and_wide_stores_report_exactly_the_tracked_bytes() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?;
        a.mov(rax, 0x0807_0605_0403_0201u64)?;
        a.mov(qword_ptr(rdi - 4), rax)?; // straddles into T from below: bytes 05..08 tracked
        a.mov(qword_ptr(rdi + 0xffc), rax)?; // straddles out of T: bytes 01..04 tracked
        a.movq(xmm0, rax)?;
        a.pinsrq(xmm0, rax, 1)?; // xmm0 = pattern twice
        a.movdqu(xmmword_ptr(rdi + 0x100), xmm0)?; // 16-byte store: two 8-byte exits
        a.mov(rsp, T + 0x208)?; // stack inside the tracked frame
        a.push(rax)?; // 8-byte push into T
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let initial = read(&g.vm, T, 4096);

    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    let ev = rec.take();
    let got: Vec<(u64, usize)> = ev.iter().map(|e| (e.gpa, e.new.len())).collect();
    assert_eq!(
        got,
        vec![
            (T, 4),
            (T + 0xffc, 4),
            (T + 0x100, 8),
            (T + 0x108, 8),
            (T + 0x200, 8)
        ]
    );
    assert_eq!(ev[0].new, vec![5, 6, 7, 8]);
    replay(T, &initial, &ev, &read(&g.vm, T, 4096));
    assert_eq!(
        read(&g.vm, T - 4, 4),
        vec![1, 2, 3, 4],
        "KVM wrote the untracked part"
    );
}

#[test]
fn remove_ram_with_tracked_frames_delivers_remove_region_once() {
    use std::sync::Mutex;
    #[derive(Default)]
    struct Regions(Mutex<Vec<(AsId, Gfn, u64)>>);
    impl pagetrack::TrackNotifier for Regions {
        fn track_remove_region(&self, a: AsId, base: Gfn, n: u64) {
            self.0.lock().unwrap().push((a, base, n));
        }
    }
    let kvm = kvm_or_skip!();
    let g = boot(kvm, 16 << 20, 1, &[0xf4]);
    let extra = g.vm.add_ram(1 << 32, 8 << 20).unwrap();
    let regions = std::sync::Arc::new(Regions::default());
    let _h =
        g.vm.tracker()
            .register(regions.clone(), pagetrack::NotifierClass::Ordinary)
            .unwrap();
    g.vm.tracker().add_gfn(Gfn((1 << 20) + 3)).unwrap();
    let before = g.vm.stats().fragments.fragments;

    g.vm.remove_ram(extra).unwrap();

    assert_eq!(
        *regions.0.lock().unwrap(),
        vec![(AsId::NORMAL, Gfn(1 << 20), 2048)]
    );
    assert!(g.vm.stats().fragments.fragments < before);
    assert!(g.vm.tracker().add_gfn(Gfn((1 << 20) + 3)).is_err());
    assert!(
        g.vm.memory()
            .write_slice(&[1], vm_memory::GuestAddress(1 << 32))
            .is_err()
    );
    assert!(
        g.vm.remove_ram(extra).is_err(),
        "removing it twice is an error"
    );
}

#[test]
fn batch_of_1000_scattered_frames_is_one_surgery_and_exact() {
    let kvm = kvm_or_skip!();
    let g = boot(kvm, 256 << 20, 1, &[0xf4]);
    let (rec, _h) = recorder(&g.vm);
    // Every 61st frame from 1 MiB up: scattered over many chunks.
    let frames: Vec<Gfn> = (0..1000u64).map(|i| Gfn(0x100 + i * 61)).collect();
    let pauses = g.vm.stats().pauses;

    g.vm.tracker().add_gfns(AsId::NORMAL, &frames).unwrap();

    assert_eq!(
        g.vm.stats().pauses,
        pauses + 1,
        "one pause for the whole batch"
    );
    assert_eq!(g.vm.stats().fragments.readonly_fragments, 1000);
    for f in &frames {
        g.vm.memory()
            .write_slice(&[0xee], vm_memory::GuestAddress(f.gpa().0 + 1))
            .unwrap();
    }
    assert_eq!(rec.take().len(), 1000);
    g.vm.tracker().remove_gfns(AsId::NORMAL, &frames).unwrap();
    assert_eq!(g.vm.stats().fragments.readonly_fragments, 0);
}

#[test]
fn short_slot_budget_merges_tracked_frames_across_small_gaps() {
    let kvm = kvm_or_skip!();
    // 16 MiB in 2 MiB chunks: 8 slots; leave room for only 8 more.
    let nr = kvm.get_nr_memslots();
    let mut config = pagetrack_kvm::VmConfig::default()
        .with_ram(16 << 20)
        .with_chunk_bytes(2 << 20);
    config.reserved_slots = nr - 16;
    let code = assemble(ENTRY, |a| {
        a.mov(rdi, T)?;
        a.mov(ecx, 20)?;
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.mov(qword_ptr(rdi), rcx)?; // every frame of [T, T + 20 pages): tracked or gap
        a.add(rdi, 4096)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        exit_with(a, 0)
    });
    let vm = pagetrack_kvm::Vm::with_kvm(kvm, config).unwrap();
    vm.add_ram(0, 16 << 20).unwrap();
    let layout = pagetrack_vmm::x86::LongModeLayout::new(16 << 20).unwrap();
    use vm_memory::Bytes;
    vm.untracked_memory()
        .write_slice(&code, vm_memory::GuestAddress(ENTRY))
        .unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    pagetrack_vmm::x86::setup_long_mode(
        vm.kvm(),
        vcpu.fd(),
        &*vm.untracked_memory(),
        &layout,
        ENTRY,
        0,
    )
    .unwrap();
    let (rec, _h) = recorder(&vm);
    // Every other frame: 10 tracked runs and 9 gaps would need 21 fragments in one chunk.
    let frames: Vec<Gfn> = (0..10).map(|i| Gfn((T >> 12) + 2 * i)).collect();

    vm.tracker().add_gfns(AsId::NORMAL, &frames).unwrap();

    let st = vm.stats().fragments;
    assert!(st.fragments <= st.budget, "{st:?}");
    run_to_exit(&vm, &layout, &mut vcpu, TIMEOUT);
    let ev = rec.take();
    let got: Vec<u64> = ev.iter().map(|e| e.gpa).collect();
    let want: Vec<u64> = frames.iter().map(|f| f.gpa().0).collect();
    assert_eq!(got, want, "events exactly for the tracked frames");
    for i in 0..20u64 {
        let v = u64::from_le_bytes(read(&vm, T + i * 4096, 8).try_into().unwrap());
        assert_eq!(
            v,
            20 - i,
            "the store to frame {i} landed (merged gaps are applied silently)"
        );
    }
    assert!(
        vm.stats().trapped_writes > 10,
        "gap frames trapped too: they were merged"
    );
}

#[test]
fn scatter_with_equal_indices_stores_every_selected_element_in_order() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        for i in (0..8u64).rev() {
            // zmm0 dword e = e + 1
            a.mov(rax, (2 * i + 2) << 32 | (2 * i + 1))?;
            a.push(rax)?;
        }
        a.vmovdqu64(zmm0, zmmword_ptr(rsp))?;
        a.add(rsp, 64)?;
        a.mov(rdi, T)?;
        a.mov(eax, 0x5555u32)?;
        a.kmovw(k1, eax)?; // mask: the even elements
        a.vpxord(zmm2, zmm2, zmm2)?; // indices 0: every element at [rdi]
        a.vpscatterdd(dword_ptr(rdi + zmm2).k1(), zmm0)?;
        a.kmovw(eax, k1)?;
        a.mov(dword_ptr(T + 64), eax)?; // the mask the scatter left
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker().add_gfn(Gfn(T >> 12)).unwrap();
    let initial = read(&g.vm, T, 4096);

    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    let ev = rec.take();
    let fin = read(&g.vm, T, 4096);
    replay(T, &initial, &ev, &fin);
    let scattered: Vec<u32> = ev
        .iter()
        .filter(|e| e.gpa == T)
        .map(|e| u32::from_le_bytes(e.new[..].try_into().unwrap()))
        .collect();
    assert_eq!(scattered, [1, 3, 5, 7, 9, 11, 13, 15], "element order");
    assert_eq!(fin[..4], 15u32.to_le_bytes(), "the last element wins");
    assert_eq!(fin[64..68], [0; 4], "the mask is cleared");
}

#[test]
fn rep_stosb_and_movsb_report_every_byte_with_few_exits() {
    let kvm = kvm_or_skip!();
    let code = assemble(ENTRY, |a| {
        a.cld()?;
        a.mov(rdi, T + 3)?; // an unaligned start inside the first tracked frame
        a.mov(al, 0x5a)?;
        a.mov(ecx, 8000)?; // through the second tracked frame
        a.rep().stosb()?; // byte string store
        a.mov(rsi, U)?; // copy 3000 bytes of U backwards into the end of the second frame
        a.add(rsi, 2999)?;
        a.mov(rdi, T + 8191)?;
        a.mov(ecx, 3000)?;
        a.std()?;
        a.rep().movsb()?; // byte string copy, DF=1
        a.cld()?;
        exit_with(a, 0)
    });
    let mut g = boot(kvm, 16 << 20, 1, &code);
    let src: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    use vm_memory::Bytes;
    g.vm.untracked_memory()
        .write_slice(&src, vm_memory::GuestAddress(U))
        .unwrap();
    let (rec, _h) = recorder(&g.vm);
    g.vm.tracker()
        .add_gfns(AsId::NORMAL, &[Gfn(T >> 12), Gfn((T >> 12) + 1)])
        .unwrap();
    let initial = read(&g.vm, T, 8192);

    run_to_exit(&g.vm, &g.layout, &mut g.vcpus[0], TIMEOUT);

    let ev = rec.take();
    assert_eq!(ev.len(), 8000 + 3000, "one event per byte element");
    assert!(ev.iter().all(|e| e.new.len() == 1));
    let fin = read(&g.vm, T, 8192);
    replay(T, &initial, &ev, &fin);
    assert!(fin[3..8192 - 3000].iter().all(|&b| b == 0x5a));
    assert_eq!(&fin[8192 - 3000..], &src[..], "the copy landed");
    let st = g.vm.stats();
    assert!(
        st.trapped_writes <= 8,
        "a few exits, not one per byte: {st:?}"
    );
    assert_eq!(st.trapped_writes + st.string_elements, 11_000);
}
