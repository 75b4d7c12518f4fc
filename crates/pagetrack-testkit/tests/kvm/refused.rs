//! Stores KVM refuses on tracked frames although the CPU runs them (issue 10 item 10): x87,
//! MMX, SSE4.1/AVX extracts, AVX-512 down-converts, compresses, opmask and masked moves. Each
//! instruction runs through the two-pass harness three times — aligned, misaligned, and
//! straddling two tracked frames — and must behave exactly as on untracked memory, with
//! exact events. The body's epilogue copies the x87 control, status and tag words, the x87
//! instruction and data pointers, MXCSR and ST0 into general registers, so the harness
//! compares the FPU state the store left behind too.

use iced_x86::IcedError;
use iced_x86::code_asm::*;
use pagetrack_testkit::twopass::{ENTRY, SCRATCH};
use pagetrack_testkit::{TwoPass, TwoPassRun};

type Asm = CodeAssembler;
type Emit = fn(&mut Asm, i32) -> Result<(), IcedError>;

/// Loads distinct bytes into zmm0..zmm3 (the harness code bytes, equal in both passes), k1
/// with a sparse mask, and x87 ST0 = -1234.5678, ST1 = 3.0e38 (pushed after it).
fn prologue(a: &mut Asm) -> Result<(), IcedError> {
    a.fninit()?;
    a.vmovdqu64(zmm0, zmmword_ptr(ENTRY))?;
    a.vmovdqu64(zmm1, zmmword_ptr(ENTRY + 64))?;
    a.vmovdqu64(zmm2, zmmword_ptr(ENTRY + 128))?;
    a.vmovdqu64(zmm3, zmmword_ptr(ENTRY + 192))?;
    a.mov(rax, 0xa5c3_0ff0_1234_8001u64)?;
    a.kmovq(k1, rax)?;
    a.mov(rax, 3.0e38f64.to_bits())?;
    a.push(rax)?;
    a.fld(qword_ptr(rsp))?; // ST0 = 3e38 (overflows an f32)
    a.mov(rax, (-1234.5678f64).to_bits())?;
    a.mov(qword_ptr(rsp), rax)?;
    a.fld(qword_ptr(rsp))?; // ST0 = -1234.5678, ST1 = 3e38
    a.pop(rax)
}

/// Copies the FPU state into registers: rax = FCW, rbx = FSW, rcx = FTW, rdx = MXCSR,
/// rsi = FIP, rbp = FDP (both 32-bit format), r8 = FOP.
fn epilogue(a: &mut Asm) -> Result<(), IcedError> {
    let at = SCRATCH + 0x800; // untracked harness scratch (RSP may point into the data)
    a.fnstenv(ptr(at))?;
    a.movzx(eax, word_ptr(at))?;
    a.movzx(ebx, word_ptr(at + 4))?;
    a.movzx(ecx, word_ptr(at + 8))?;
    a.mov(esi, dword_ptr(at + 12))?;
    a.movzx(r8d, word_ptr(at + 18))?;
    a.mov(ebp, dword_ptr(at + 20))?;
    a.stmxcsr(dword_ptr(at + 32))?;
    a.mov(edx, dword_ptr(at + 32))?;
    a.emms()
}

/// Runs `store` (its memory operand at `rdi + offset`) after [`prologue`] at an aligned, a
/// misaligned and (for `size` > 1) a frame-straddling offset; every run must be exact.
/// Returns the aligned run.
fn cases(size: usize, store: Emit) -> Option<TwoPassRun> {
    let size = i32::try_from(size).unwrap();
    let mut offsets = vec![(0x40, 1), (0x103, 1)];
    if size > 1 {
        offsets.push((0x1000 - size / 2, 2));
    }
    let mut first = None;
    for (offset, frames) in offsets {
        let kvm = pagetrack_testkit::gate::open_kvm_or_skip(module_path!())?;
        let body = move |a: &mut Asm| {
            prologue(a)?;
            store(a, offset)?;
            epilogue(a)
        };
        let run = TwoPass::new(&body).frames(frames).run(kvm);
        run.assert_exact();
        assert!(!run.events.is_empty(), "offset {offset:#x}: no event");
        first.get_or_insert(run);
    }
    first
}

/// Loads `values` into the ymm register `reg` through the (untracked) harness stack.
fn load(a: &mut Asm, reg: AsmRegisterYmm, values: [u64; 4]) -> Result<(), IcedError> {
    for v in values.iter().rev() {
        a.mov(rax, *v)?;
        a.push(rax)?;
    }
    a.vmovdqu(reg, ymmword_ptr(rsp))?;
    a.add(rsp, 32)
}

/// Element-select pattern for the masked-move tests: the MSB is set in dwords 0, 2, 3 and 7,
/// in qwords 1 and 3, and in bytes 3, 11 and 15 of the low 16 bytes.
const SELECT: [u64; 4] = [
    0x0000_0000_8000_0000,
    0x8000_0000_8000_0000,
    0x7fff_ffff_7fff_ffff,
    0x8000_0000_0000_0000,
];

/// Sets the x87 rounding control (0 nearest, 1 down, 2 up, 3 toward zero), exceptions masked.
fn set_rounding(a: &mut Asm, rc: u16) -> Result<(), IcedError> {
    a.mov(word_ptr(SCRATCH + 0x900), u32::from(0x037f | rc << 10))?;
    a.fldcw(word_ptr(SCRATCH + 0x900))
}

/// After an `enter`: keeps RBP in r9 (the epilogue reuses RBP) and rewrites each of the
/// `count` qwords at `rdi + offset` that points into the data region as its offset from RDI,
/// so that both passes' memory compares equal (the pushed frame pointers differ otherwise).
fn as_offsets(a: &mut Asm, offset: i32, count: u32) -> Result<(), IcedError> {
    a.mov(r9, rbp)?;
    a.lea(rsi, ptr(rdi + offset))?;
    a.mov(ecx, count)?;
    let mut next = a.create_label();
    let mut skip = a.create_label();
    a.set_label(&mut next)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.sub(rax, rdi)?;
    a.cmp(rax, 0x2000)?;
    a.jae(skip)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.set_label(&mut skip)?;
    a.add(rsi, 8)?;
    a.dec(ecx)?;
    a.jnz(next)
}

/// Defines one test per instruction: `name: size => |a, off| store`.
macro_rules! stores {
    ($($name:ident: $size:expr => $store:expr;)*) => {$(
        #[test]
        fn $name() {
            let store: Emit = $store;
            let _ = cases($size, store);
        }
    )*};
}

stores! {
    // x87: conversions with the control word's rounding, pops, status flags.
    fst_m32_rounds_and_keeps_the_stack: 4 => |a, o| a.fst(dword_ptr(rdi + o));
    fst_m64_stores_a_double: 8 => |a, o| a.fst(qword_ptr(rdi + o));
    fstp_m32_pops: 4 => |a, o| a.fstp(dword_ptr(rdi + o));
    fstp_m64_pops: 8 => |a, o| a.fstp(qword_ptr(rdi + o));
    fstp_m80_stores_the_raw_register: 10 => |a, o| a.fstp(tword_ptr(rdi + o));
    fstp_m32_overflow_sets_the_flags: 4 => |a, o| {
        a.fstp(st0)?;
        a.fst(dword_ptr(rdi + o))
    };
    fist_m16_rounds_to_nearest: 2 => |a, o| a.fist(word_ptr(rdi + o));
    fist_m32_rounds_to_nearest: 4 => |a, o| a.fist(dword_ptr(rdi + o));
    fistp_m64_pops: 8 => |a, o| a.fistp(qword_ptr(rdi + o));
    fistp_m16_out_of_range_stores_indefinite: 2 => |a, o| {
        a.fstp(st0)?;
        a.fistp(word_ptr(rdi + o))
    };
    fist_m32_rounds_up_with_rc_up: 4 => |a, o| {
        set_rounding(a, 2)?;
        a.fist(dword_ptr(rdi + o))
    };
    fst_m64_rounds_down_with_rc_down: 8 => |a, o| {
        set_rounding(a, 1)?;
        a.fst(qword_ptr(rdi + o))
    };
    fstp_m32_overflow_toward_zero_stores_the_largest_float: 4 => |a, o| {
        set_rounding(a, 3)?;
        a.fstp(st0)?;
        a.fstp(dword_ptr(rdi + o))
    };
    fisttp_m32_truncates: 4 => |a, o| a.fisttp(dword_ptr(rdi + o));
    fisttp_m64_truncates: 8 => |a, o| a.fisttp(qword_ptr(rdi + o));
    fbstp_m80_stores_bcd: 10 => |a, o| a.fbstp(tword_ptr(rdi + o));
    fnstcw_m16: 2 => |a, o| a.fnstcw(word_ptr(rdi + o));
    fnstsw_m16: 2 => |a, o| a.fnstsw(word_ptr(rdi + o));
    fnstenv_stores_28_bytes_and_masks: 28 => |a, o| a.fnstenv(ptr(rdi + o));
    fnsave_stores_108_bytes_and_reinitialises: 108 => |a, o| a.fnsave(ptr(rdi + o));
    // SSE/AVX.
    stmxcsr_m32: 4 => |a, o| a.stmxcsr(dword_ptr(rdi + o));
    vstmxcsr_m32: 4 => |a, o| a.vstmxcsr(dword_ptr(rdi + o));
    pextrb_m8: 1 => |a, o| a.pextrb(byte_ptr(rdi + o), xmm0, 13);
    pextrw_m16: 2 => |a, o| a.pextrw(word_ptr(rdi + o), xmm0, 5);
    pextrd_m32: 4 => |a, o| a.pextrd(dword_ptr(rdi + o), xmm0, 3);
    pextrq_m64: 8 => |a, o| a.pextrq(qword_ptr(rdi + o), xmm0, 1);
    vpextrd_m32: 4 => |a, o| a.vpextrd(dword_ptr(rdi + o), xmm1, 2);
    extractps_m32: 4 => |a, o| a.extractps(dword_ptr(rdi + o), xmm0, 2);
    vextracti128_m128: 16 => |a, o| a.vextracti128(xmmword_ptr(rdi + o), ymm0, 1);
    vextractf128_m128: 16 => |a, o| a.vextractf128(xmmword_ptr(rdi + o), ymm1, 1);
    vextracti32x4_m128: 16 => |a, o| a.vextracti32x4(xmmword_ptr(rdi + o), zmm0, 3);
    vextractf64x4_m256: 32 => |a, o| a.vextractf64x4(ymmword_ptr(rdi + o), zmm1, 1);
    vextracti32x4_masked: 16 => |a, o| a.vextracti32x4(xmmword_ptr(rdi + o).k1(), zmm2, 2);
    vcvtps2ph_m64_sets_overflow_and_precision_flags: 8 => |a, o| {
        let f = |x: f32, y: f32| u64::from(x.to_bits()) | u64::from(y.to_bits()) << 32;
        load(a, ymm0, [f(1.0, -2.5), f(1.0e6, 0.1), 0, 0])?;
        a.vcvtps2ph(qword_ptr(rdi + o), xmm0, 0)
    };
    vcvtps2ph_masked_flags_as_the_cpu: 8 => |a, o| {
        // Element 1 (1e6) overflows but is masked out; this host's CPU still sets MXCSR.OE
        // (measured: 0x1fa8), and so does pagetrack (flags from every element).
        let f = |x: f32, y: f32| u64::from(x.to_bits()) | u64::from(y.to_bits()) << 32;
        load(a, ymm0, [f(1.0, 1.0e6), f(2.0, 0.1), 0, 0])?;
        a.mov(eax, 0b1101)?;
        a.kmovw(k2, eax)?;
        a.vcvtps2ph(qword_ptr(rdi + o).k2(), xmm0, 0)
    };
    vcvtps2ph_m128_rounds_up_from_ymm: 16 => |a, o| {
        let f = |x: f32, y: f32| u64::from(x.to_bits()) | u64::from(y.to_bits()) << 32;
        load(a, ymm0, [f(0.1, -0.3), f(65519.0, -1.0e-3), f(3.0, 7.0e4), f(-7.0e4, 1.5)])?;
        a.vcvtps2ph(xmmword_ptr(rdi + o), ymm0, 2)
    };
    // MMX.
    movntq_m64: 8 => |a, o| {
        a.movq(mm0, qword_ptr(ENTRY + 8))?;
        a.movntq(qword_ptr(rdi + o), mm0)
    };
    movq_from_mmx_m64: 8 => |a, o| {
        a.movq(mm1, qword_ptr(ENTRY + 16))?;
        a.movq(qword_ptr(rdi + o), mm1)
    };
    movd_from_mmx_m32: 4 => |a, o| {
        a.movq(mm2, qword_ptr(ENTRY + 24))?;
        a.movd(dword_ptr(rdi + o), mm2)
    };
    // Masked moves: only the selected bytes are written (and reported).
    maskmovdqu_stores_selected_bytes: 16 => |a, o| {
        a.lea(rdi, ptr(rdi + o))?;
        a.maskmovdqu(xmm0, xmm1)
    };
    maskmovq_stores_selected_bytes: 8 => |a, o| {
        a.movq(mm0, qword_ptr(ENTRY + 8))?;
        a.movq(mm1, qword_ptr(ENTRY + 40))?;
        a.lea(rdi, ptr(rdi + o))?;
        a.maskmovq(mm0, mm1)
    };
    vmaskmovps_m256: 32 => |a, o| {
        load(a, ymm1, SELECT)?;
        a.vmaskmovps(ymmword_ptr(rdi + o), ymm1, ymm0)
    };
    vmaskmovpd_m128: 16 => |a, o| {
        load(a, ymm1, SELECT)?;
        a.vmaskmovpd(xmmword_ptr(rdi + o), xmm1, xmm0)
    };
    vpmaskmovd_m256: 32 => |a, o| {
        load(a, ymm1, SELECT)?;
        a.vpmaskmovd(ymmword_ptr(rdi + o), ymm1, ymm0)
    };
    vpmaskmovq_m128: 16 => |a, o| {
        load(a, ymm1, SELECT)?;
        a.vpmaskmovq(xmmword_ptr(rdi + o), xmm1, xmm0)
    };
    // AVX-512.
    // enter with a nesting level: pushes RBP, the outer frame pointers and the new one.
    enter_nesting_3: 32 => |a, o| {
        a.lea(rsp, ptr(rdi + o + 32))?;
        a.lea(rbp, ptr(rdi + 0x800))?;
        a.enter(16u32, 3u32)?;
        as_offsets(a, o, 4)
    };
    enter_nesting_1_pushes_two: 16 => |a, o| {
        a.lea(rsp, ptr(rdi + o + 16))?;
        a.enter(8u32, 1u32)?;
        as_offsets(a, o, 2)
    };
    enter_nesting_31_reads_its_own_pushes: 256 => |a, o| {
        // RBP just above RSP: the outer frame pointers overlap the slots being pushed.
        a.lea(rsp, ptr(rdi + o + 256))?;
        a.lea(rbp, ptr(rdi + o + 256 + 24))?;
        a.enter(0u32, 31u32)?;
        as_offsets(a, o, 32)
    };
    kmovb_m8: 1 => |a, o| a.kmovb(byte_ptr(rdi + o), k1);
    kmovw_m16: 2 => |a, o| a.kmovw(word_ptr(rdi + o), k1);
    kmovd_m32: 4 => |a, o| a.kmovd(dword_ptr(rdi + o), k1);
    kmovq_m64: 8 => |a, o| a.kmovq(qword_ptr(rdi + o), k1);
    vpcompressd_stores_selected_dwords_packed: 64 => |a, o| {
        a.vpcompressd(zmmword_ptr(rdi + o).k1(), zmm0)
    };
    vcompresspd_stores_selected_qwords_packed: 64 => |a, o| {
        a.vcompresspd(zmmword_ptr(rdi + o).k1(), zmm1)
    };
    vpcompressb_stores_selected_bytes_packed: 64 => |a, o| {
        a.vpcompressb(zmmword_ptr(rdi + o).k1(), zmm2)
    };
    vpmovqb_truncates: 8 => |a, o| a.vpmovqb(qword_ptr(rdi + o), zmm0);
    vpmovdw_truncates: 32 => |a, o| a.vpmovdw(ymmword_ptr(rdi + o), zmm1);
    vpmovsdb_saturates_signed: 16 => |a, o| a.vpmovsdb(xmmword_ptr(rdi + o), zmm2);
    vpmovusqw_saturates_unsigned: 16 => |a, o| a.vpmovusqw(xmmword_ptr(rdi + o), zmm3);
    vpmovwb_masked: 32 => |a, o| a.vpmovwb(ymmword_ptr(rdi + o).k1(), zmm0);
}

fn stored_bytes(run: &TwoPassRun) -> usize {
    run.events.iter().map(|e| e.new.len()).sum()
}

#[test]
fn masked_moves_store_and_report_only_the_selected_elements() {
    // SELECT picks dwords 0, 2, 3, 7 of a ymm (their MSBs) and qword 1 of an xmm.
    let Some(run) = cases(32, |a, o| {
        load(a, ymm1, SELECT)?;
        a.vpmaskmovd(ymmword_ptr(rdi + o), ymm1, ymm0)
    }) else {
        return;
    };
    assert_eq!(stored_bytes(&run), 4 * 4, "{:?}", run.events);
    let run = cases(16, |a, o| {
        load(a, ymm1, SELECT)?;
        a.vmaskmovpd(xmmword_ptr(rdi + o), xmm1, xmm0)
    })
    .unwrap();
    assert_eq!(stored_bytes(&run), 8, "{:?}", run.events);
    // maskmovdqu: the bytes of xmm0 where xmm1's byte has its MSB set.
    let run = cases(16, |a, o| {
        load(a, ymm1, SELECT)?;
        a.lea(rdi, ptr(rdi + o))?;
        a.maskmovdqu(xmm0, xmm1)
    })
    .unwrap();
    assert_eq!(stored_bytes(&run), 3, "{:?}", run.events);
}

#[test]
fn vcvtps2ph_of_a_denormal_is_refused_with_a_typed_error() {
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let body = |a: &mut Asm| {
        load(a, ymm0, [1, 0, 0, 0])?; // the smallest f32 denormal
        a.vcvtps2ph(qword_ptr(rdi + 0x40), xmm0, 0)
    };
    let run = TwoPass::new(&body).run(kvm);
    match &run.ending {
        pagetrack_testkit::Ending::Error(
            e @ pagetrack_kvm::Error::Unemulatable { bytes, reason, .. },
        ) => {
            // The raw bytes and a typed reason, and the message as before.
            let vcvtps2ph = [0xc4, 0xe3, 0x79, 0x1d, 0x47, 0x40, 0x00];
            assert!(bytes.as_slice().starts_with(&vcvtps2ph), "{bytes}");
            assert!(
                matches!(
                    reason,
                    pagetrack_kvm::StopReason::Emulate(e)
                        if matches!(**e, pagetrack_kvm::emulate::EmulateError::Unsupported { .. })
                ),
                "{reason:?}"
            );
            let text = e.to_string();
            assert!(text.contains("(bytes c4 e3 79 1d 47 40 00"), "{text}");
            assert!(text.ends_with(&format!("): {reason}")), "{text}");
        }
        other => panic!("expected Unemulatable, got {other:?}"),
    }
    assert_eq!(run.tracked_final, run.initial, "nothing applied");
    assert!(run.events.is_empty());
}

/// Runs `body` and expects the tracked pass to stop with `Error::Unemulatable` naming the
/// bytes `starts`, with nothing applied and nothing reported.
fn refused(body: &dyn Fn(&mut Asm) -> Result<(), IcedError>, starts: &str) {
    let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
        return;
    };
    let run = TwoPass::new(body).run(kvm);
    match &run.ending {
        pagetrack_testkit::Ending::Error(pagetrack_kvm::Error::Unemulatable { bytes, .. }) => {
            assert!(bytes.to_string().starts_with(starts), "{bytes}");
        }
        other => panic!("expected Unemulatable, got {other:?}"),
    }
    assert_eq!(run.tracked_final, run.initial, "nothing applied");
    assert!(run.events.is_empty());
}

#[test]
fn x87_cases_not_modelled_are_refused_with_a_typed_error() {
    // fst m32 of 1e-40: below the f32 normal range (underflow).
    refused(
        &|a| {
            a.fninit()?;
            a.mov(rax, 1.0e-40f64.to_bits())?;
            a.push(rax)?;
            a.fld(qword_ptr(rsp))?;
            a.pop(rax)?;
            a.fst(dword_ptr(rdi + 0x40))
        },
        "d9 57 40",
    );
    // fstp m64 with an empty stack (stack underflow).
    refused(
        &|a| {
            a.fninit()?;
            a.fstp(qword_ptr(rdi + 0x40))
        },
        "dd 5f 40",
    );
    // fst m32 of an inexact value with the precision exception unmasked.
    refused(
        &|a| {
            a.fninit()?;
            a.fldpi()?;
            set_rounding(a, 0)?;
            a.mov(word_ptr(SCRATCH + 0x900), 0x035fu32)?; // PM clear
            a.fldcw(word_ptr(SCRATCH + 0x900))?;
            a.fst(dword_ptr(rdi + 0x40))
        },
        "d9 57 40",
    );
}

/// Dword scatter indices (scale 4, displacement +4: elements land in [0, 64) of the
/// operand): a negative index and repeats (2, 2 and 3, 3: the later element wins).
const SCATTER_D: [i64; 16] = [5, 0, 1, 15, 2, 2, 7, -1, 9, 3, 14, 4, 6, 10, 12, 3];
/// Qword-data scatter indices (scale 8, displacement +8): repeats 3, 3.
const SCATTER_Q: [i64; 8] = [3, -1, 0, 3, 6, 1, 2, 5];

/// Loads `indices` into zmm2 as dwords or qwords (`size`), sets k1 = 0xfffb (element 2 left
/// out), runs `scatter`, then copies k1 (which the scatter clears) into r10.
fn scatter(
    a: &mut Asm,
    indices: &[i64],
    size: usize,
    scatter: impl FnOnce(&mut Asm) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut image = [0u8; 64];
    for (i, v) in indices.iter().enumerate().take(64 / size) {
        image[i * size..(i + 1) * size].copy_from_slice(&v.to_le_bytes()[..size]);
    }
    for q in image.chunks_exact(8).rev() {
        a.mov(rax, u64::from_le_bytes(q.try_into().unwrap()))?;
        a.push(rax)?;
    }
    a.vmovdqu64(zmm2, zmmword_ptr(rsp))?;
    a.add(rsp, 64)?;
    a.mov(eax, 0xfffbu32)?;
    a.kmovq(k1, rax)?;
    scatter(a)?;
    a.kmovq(r10, k1)
}

stores! {
    // AVX-512 scatters: selected elements in element order, the mask cleared.
    vpscatterdd_in_element_order: 64 => |a, o| scatter(a, &SCATTER_D, 4, |a| {
        a.vpscatterdd(dword_ptr(rdi + zmm2 * 4 + (o + 4)).k1(), zmm0)
    });
    vpscatterdq_in_element_order: 64 => |a, o| scatter(a, &SCATTER_Q, 4, |a| {
        a.vpscatterdq(qword_ptr(rdi + ymm2 * 8 + (o + 8)).k1(), zmm1)
    });
    vpscatterqd_in_element_order: 64 => |a, o| scatter(a, &SCATTER_D, 8, |a| {
        a.vpscatterqd(dword_ptr(rdi + zmm2 * 4 + (o + 4)).k1(), ymm0)
    });
    vpscatterqq_in_element_order: 64 => |a, o| scatter(a, &SCATTER_Q, 8, |a| {
        a.vpscatterqq(qword_ptr(rdi + zmm2 * 8 + (o + 8)).k1(), zmm1)
    });
    vscatterdps_in_element_order: 64 => |a, o| scatter(a, &SCATTER_D, 4, |a| {
        a.vscatterdps(dword_ptr(rdi + zmm2 * 4 + (o + 4)).k1(), zmm3)
    });
    vscatterdpd_in_element_order: 64 => |a, o| scatter(a, &SCATTER_Q, 4, |a| {
        a.vscatterdpd(qword_ptr(rdi + ymm2 * 8 + (o + 8)).k1(), zmm0)
    });
    vscatterqps_in_element_order: 64 => |a, o| scatter(a, &SCATTER_D, 8, |a| {
        a.vscatterqps(dword_ptr(rdi + zmm2 * 4 + (o + 4)).k1(), ymm1)
    });
    vscatterqpd_in_element_order: 64 => |a, o| scatter(a, &SCATTER_Q, 8, |a| {
        a.vscatterqpd(qword_ptr(rdi + zmm2 * 8 + (o + 8)).k1(), zmm2)
    });
    vpscatterdd_ymm_in_element_order: 32 => |a, o| scatter(a, &[1, 0, 7, 7, 3, 2, 6, 5], 4, |a| {
        a.vpscatterdd(dword_ptr(rdi + ymm2 * 4 + o).k1(), ymm3)
    });
}

#[test]
fn scatters_store_and_report_only_the_selected_elements() {
    // 15 of 16 dwords selected; duplicates are reported once per element (in order).
    let Some(run) = cases(64, |a, o| {
        scatter(a, &SCATTER_D, 4, |a| {
            a.vpscatterdd(dword_ptr(rdi + zmm2 * 4 + (o + 4)).k1(), zmm0)
        })
    }) else {
        return;
    };
    assert_eq!(stored_bytes(&run), 15 * 4, "{:?}", run.events);
    assert_eq!(run.tracked_regs[10], 0, "the mask is cleared");
    let run = cases(64, |a, o| {
        scatter(a, &SCATTER_Q, 8, |a| {
            a.vpscatterqq(qword_ptr(rdi + zmm2 * 8 + (o + 8)).k1(), zmm1)
        })
    })
    .unwrap();
    assert_eq!(stored_bytes(&run), 7 * 8, "{:?}", run.events);
}

/// `xsavec` (compacted format) with RFBM = `edx:eax`, 64-byte aligned and straddling two
/// tracked frames; the untracked pass is the CPU's own `xsavec`.
fn xsavec_cases(low: u32, high: u32, rex_w: bool) {
    for (offset, frames) in [(0x40, 1), (0x1000 - 0x400, 2), (0x1000 - 0x80, 2)] {
        let Some(kvm) = pagetrack_testkit::gate::open_kvm_or_skip(module_path!()) else {
            return;
        };
        let body = move |a: &mut Asm| {
            prologue(a)?;
            a.mov(eax, low)?;
            a.mov(edx, high)?;
            if rex_w {
                a.xsavec64(ptr(rdi + offset))?;
            } else {
                a.xsavec(ptr(rdi + offset))?;
            }
            epilogue(a)
        };
        let run = TwoPass::new(&body).frames(frames).run(kvm);
        run.assert_exact();
        assert!(!run.events.is_empty(), "offset {offset:#x}: no event");
    }
}

#[test]
fn xsavec_every_component_below_pkru_as_the_cpu() {
    xsavec_cases(0xff, 0, false);
}

#[test]
fn xsavec64_every_component_below_pkru_as_the_cpu() {
    xsavec_cases(0xff, 0, true);
}

#[test]
fn xsavec_of_pkru_and_later_is_refused_with_a_typed_error() {
    // PVM: the guest's real XCR0 (AMX too) and PKRU are not what KVM reports.
    refused(
        &|a| {
            a.mov(eax, u32::MAX)?;
            a.mov(edx, u32::MAX)?;
            a.xsavec(ptr(rdi + 0x40))
        },
        "0f c7 67 40",
    );
}

#[test]
fn xsavec_some_components_as_the_cpu() {
    // SSE, opmask and Hi16_ZMM: AVX and ZMM_Hi256 left out (the later ones move down).
    xsavec_cases(0b1010_0010, 0, false);
}
