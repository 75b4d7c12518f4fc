//! Guest-program builders over iced-x86's [`CodeAssembler`].

use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, al};
use pagetrack_vmm::x86::GUEST_EXIT_PORT;

/// Assembles a 64-bit guest program to run at `base`.
///
/// ```
/// use iced_x86::code_asm::*;
/// let code = pagetrack_testkit::assemble(0x1000, |a| {
///     a.mov(qword_ptr(0x2000), rax)?; // store rax at 0x2000
///     pagetrack_testkit::exit_with(a, 42) // report exit code 42 on port 0xf4
/// });
/// assert!(!code.is_empty());
/// ```
///
/// # Panics
///
/// If `f` or the assembler fails: the program is the test's own, so this is a test bug.
#[must_use]
pub fn assemble(base: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    assemble_bits(64, base, f)
}

/// Assembles a 16-bit (real-mode) guest program to run at `base`.
///
/// # Panics
///
/// If `f` or the assembler fails.
#[must_use]
pub fn assemble16(
    base: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    assemble_bits(16, base, f)
}

/// Assembles a guest program of `bitness` (16, 32 or 64) to run at `base`.
///
/// # Panics
///
/// If `f` or the assembler fails.
#[must_use]
pub fn assemble_bits(
    bitness: u32,
    base: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let build = || {
        let mut a = CodeAssembler::new(bitness)?;
        f(&mut a)?;
        a.assemble(base)
    };
    match build() {
        Ok(code) => code,
        Err(e) => panic!("cannot assemble the {bitness}-bit guest program at {base:#x}: {e}"),
    }
}

/// Emits the guest-exit convention: `mov al, code; out 0xf4, al`
/// ([`GUEST_EXIT_PORT`]; the byte is the exit code, like QEMU's isa-debug-exit).
///
/// # Errors
///
/// The assembler's error.
pub fn exit_with(a: &mut CodeAssembler, code: u8) -> Result<(), IcedError> {
    a.mov(al, u32::from(code))?; // al = exit code
    a.out(u32::from(GUEST_EXIT_PORT), al) // exit to the VMM on the guest-exit port
}

/// A minimal static x86-64 ELF executable (`ET_EXEC`): one read-write-execute `PT_LOAD` at
/// 0x400000 holding the ELF and program headers followed by `code` (the entry point), with
/// `mem_size` bytes in memory (the rest is bss). For hostile-image tests: `mem_size` is not
/// checked.
pub fn static_elf64(code: &[u8], mem_size: u64) -> Vec<u8> {
    const VADDR: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let mut e = vec![0u8; 120];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little-endian
    e[6] = 1; // version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&(VADDR + HEADERS).to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    e[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[68..72].copy_from_slice(&7u32.to_le_bytes()); // PF_R | PF_W | PF_X
    e[80..88].copy_from_slice(&VADDR.to_le_bytes()); // p_vaddr
    e[88..96].copy_from_slice(&VADDR.to_le_bytes()); // p_paddr
    e[96..104].copy_from_slice(&(HEADERS + code.len() as u64).to_le_bytes()); // p_filesz
    e[104..112].copy_from_slice(&mem_size.to_le_bytes()); // p_memsz
    e[112..120].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    e.extend_from_slice(code);
    e
}

/// Code that exits with status 0 (`mov eax, 60; xor edi, edi; syscall`).
pub const EXIT0_CODE: [u8; 9] = [0xb8, 60, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05];
