//! Merge-masked AVX-512 stores (`vmovdqu8 {k}`, glibc's short `memset`/`strcpy` on AVX-512
//! hosts) into tracked frames: completed in userspace with the mask applied, byte-identical
//! to the untracked run, masked-out bytes untouched and unreported (issue 10 item 10).

use iced_x86::code_asm::*;
use pagetrack_testkit::{TwoPass, TwoPassRun};

/// Loads zmm0 with bytes 0x80.. (distinct from the pattern), k1 with `mask`, then `store`.
fn masked(
    offset: i32,
    mask: u64,
    frames: usize,
    store: fn(&mut CodeAssembler, i32) -> Result<(), iced_x86::IcedError>,
) -> Option<TwoPassRun> {
    let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
    let body = move |a: &mut CodeAssembler| {
        a.mov(eax, 0x8081_8283u32)?;
        a.vpbroadcastd(zmm0, eax)?;
        a.mov(rax, mask)?;
        a.kmovq(k1, rax)?;
        store(a, offset)
    };
    let run = TwoPass::new(&body).frames(frames).run(kvm);
    run.assert_exact();
    if mask != 0 {
        assert!(run.stats.emulated_stores >= 1, "completed by pagetrack");
    }
    Some(run)
}

fn stored_bytes(run: &TwoPassRun) -> usize {
    run.events.iter().map(|e| e.new.len()).sum()
}

#[test]
fn vmovdqu8_with_a_mask_stores_only_the_selected_bytes() {
    let store: fn(&mut CodeAssembler, i32) -> _ =
        |a, off| a.vmovdqu8(zmmword_ptr(rdi + off).k1(), zmm0);
    // Aligned, a 13-byte memset-style mask.
    let Some(run) = masked(0x40, (1 << 13) - 1, 1, store) else {
        return;
    };
    assert_eq!(stored_bytes(&run), 13, "{:?}", run.events);
    // Misaligned, a sparse mask: two runs.
    let run = masked(0x103, 0xff00_0000_0000_00f0, 1, store).unwrap();
    assert_eq!(stored_bytes(&run), 12, "{:?}", run.events);
    // Straddling into the next frame (both tracked).
    let run = masked(0xfe0, u64::MAX >> 3, 2, store).unwrap();
    assert_eq!(stored_bytes(&run), 61, "{:?}", run.events);
    // A zero mask stores nothing.
    let run = masked(0x40, 0, 1, store).unwrap();
    assert!(run.events.is_empty(), "{:?}", run.events);
}

#[test]
fn masked_dword_and_qword_stores_apply_the_mask_per_element() {
    let d: fn(&mut CodeAssembler, i32) -> _ =
        |a, off| a.vmovdqu32(zmmword_ptr(rdi + off).k1(), zmm0);
    let Some(run) = masked(0x204, 0b1010_0110_0001, 1, d) else {
        return;
    };
    assert_eq!(stored_bytes(&run), 5 * 4);
    let q: fn(&mut CodeAssembler, i32) -> _ =
        |a, off| a.vmovdqu64(ymmword_ptr(rdi + off).k1(), ymm0);
    let run = masked(0x300, 0b1001, 1, q).unwrap();
    assert_eq!(stored_bytes(&run), 16);
}
