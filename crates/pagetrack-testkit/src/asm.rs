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

fn assemble_bits(
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
