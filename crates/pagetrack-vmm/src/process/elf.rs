//! Static x86-64 ELF executables: the header and program headers a loader needs, checked
//! against everything that would make loading unsafe or meaningless (a 32-bit or foreign file,
//! a dynamic executable, segments outside the file or the user address space).

use super::mm::{PAGE, USER_END};

/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// `PT_INTERP`: the executable needs a dynamic loader.
const PT_INTERP: u32 = 3;
/// `PT_PHDR`: where the program headers are in memory.
const PT_PHDR: u32 = 6;
/// `PT_GNU_STACK`: the stack's permissions.
const PT_GNU_STACK: u32 = 0x6474_e551;

const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// More program headers than any real executable has; bounds the work for a hostile file.
const MAX_PHNUM: usize = 128;

/// Where a static-pie executable (`ET_DYN` without an interpreter) is placed, as Linux does
/// with address-space randomization off.
pub const PIE_BASE: u64 = 0x5555_5555_4000;

/// Segment permission bits (`p_flags`).
pub const PF_X: u32 = 1;
/// Writable segment.
pub const PF_W: u32 = 2;
/// Readable segment.
pub const PF_R: u32 = 4;

/// One `PT_LOAD` segment, already relocated by the load bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Virtual address of the first byte.
    pub vaddr: u64,
    /// Bytes in memory (`p_memsz`); the part past `file_size` is zero (bss).
    pub mem_size: u64,
    /// Offset of the segment's bytes in the file.
    pub offset: u64,
    /// Bytes taken from the file (`p_filesz`).
    pub file_size: u64,
    /// `PF_R | PF_W | PF_X`.
    pub flags: u32,
}

/// A parsed static executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executable {
    /// Entry point (relocated).
    pub entry: u64,
    /// Where the program headers are in memory (`AT_PHDR`).
    pub phdr: u64,
    /// Number of program headers (`AT_PHNUM`).
    pub phnum: u64,
    /// The load bias: 0 for `ET_EXEC`, [`PIE_BASE`] for static-pie.
    pub bias: u64,
    /// The loadable segments, in file order.
    pub segments: Vec<Segment>,
    /// `PT_GNU_STACK` asks for an executable stack.
    pub exec_stack: bool,
}

impl Executable {
    /// The first page-aligned address past every segment: where the program break starts.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.vaddr + s.mem_size)
            .max()
            .unwrap_or(0)
            .next_multiple_of(PAGE)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Parses `file` as a static x86-64 executable. The error is a sentence for the user.
///
/// # Errors
/// Not ELF, not 64-bit little-endian x86-64, not an executable, dynamically linked, or with
/// segments that do not fit the file or the user address space.
pub fn parse(file: &[u8]) -> Result<Executable, String> {
    if file.len() < 4 || &file[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if file.len() < EHDR_SIZE {
        return Err("truncated ELF header".into());
    }
    match file[4] {
        2 => {}
        1 => return Err("a 32-bit ELF executable; only x86-64 (ELF64) programs run here".into()),
        c => return Err(format!("unknown ELF class {c}")),
    }
    if file[5] != 1 {
        return Err("a big-endian ELF file; only little-endian x86-64 programs run here".into());
    }
    let machine = u16_at(file, 18);
    if machine != EM_X86_64 {
        return Err(format!("ELF machine {machine} is not x86-64 (62)"));
    }
    let kind = u16_at(file, 16);
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(format!(
            "ELF type {kind} is not an executable (relocatable object or core file?)"
        ));
    }
    let entry = u64_at(file, 24);
    let phoff = u64_at(file, 32);
    let phentsize = usize::from(u16_at(file, 54));
    let phnum = usize::from(u16_at(file, 56));
    if phentsize != PHDR_SIZE {
        return Err(format!(
            "program header size {phentsize}, expected {PHDR_SIZE}"
        ));
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(format!(
            "{phnum} program headers (expected 1 to {MAX_PHNUM})"
        ));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(phnum * PHDR_SIZE).map(|e| (o, e)))
        .filter(|&(_, e)| e <= file.len());
    let Some((table, _)) = table_end else {
        return Err("program headers lie outside the file".into());
    };

    let mut raw = Vec::new();
    let mut phdr_vaddr = None;
    let mut exec_stack = false;
    for i in 0..phnum {
        let h = &file[table + i * PHDR_SIZE..table + (i + 1) * PHDR_SIZE];
        let (p_type, flags) = (u32_at(h, 0), u32_at(h, 4));
        let (offset, vaddr) = (u64_at(h, 8), u64_at(h, 16));
        let (file_size, mem_size) = (u64_at(h, 32), u64_at(h, 40));
        match p_type {
            PT_INTERP => {
                let interp = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(file_size).ok())
                    .and_then(|(o, n)| file.get(o..o.checked_add(n)?))
                    .map(|b| String::from_utf8_lossy(b).trim_end_matches('\0').to_owned())
                    .unwrap_or_default();
                return Err(format!(
                    "a dynamically linked executable (interpreter {interp}); only static \
                     programs run here"
                ));
            }
            PT_PHDR => phdr_vaddr = Some(vaddr),
            PT_GNU_STACK => exec_stack = flags & PF_X != 0,
            PT_LOAD => {
                if mem_size == 0 {
                    continue;
                }
                if file_size > mem_size {
                    return Err(format!("segment {i}: file size above memory size"));
                }
                if offset
                    .checked_add(file_size)
                    .is_none_or(|e| e > file.len() as u64)
                {
                    return Err(format!("segment {i}: its bytes lie outside the file"));
                }
                if vaddr % PAGE != offset % PAGE {
                    return Err(format!(
                        "segment {i}: address {vaddr:#x} and offset {offset:#x} differ modulo the page size"
                    ));
                }
                raw.push(Segment {
                    vaddr,
                    mem_size,
                    offset,
                    file_size,
                    flags,
                });
            }
            _ => {}
        }
    }
    if raw.is_empty() {
        return Err("no loadable segment".into());
    }
    let bias = if kind == ET_DYN { PIE_BASE } else { 0 };
    let mut segments = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let vaddr = s.vaddr.checked_add(bias);
        let end = vaddr.and_then(|v| v.checked_add(s.mem_size));
        let (Some(vaddr), Some(end)) = (vaddr, end) else {
            return Err(format!("segment {i}: address overflows"));
        };
        if vaddr < PAGE || end > USER_END {
            return Err(format!(
                "segment {i} at [{vaddr:#x}, {end:#x}) lies outside the user address space"
            ));
        }
        segments.push(Segment { vaddr, ..s });
    }
    segments.sort_by_key(|s| s.vaddr);
    for w in segments.windows(2) {
        if w[0].vaddr + w[0].mem_size > w[1].vaddr {
            return Err(format!(
                "segments at {:#x} and {:#x} overlap",
                w[0].vaddr, w[1].vaddr
            ));
        }
    }
    // AT_PHDR: PT_PHDR if present, else the load segment that holds the header table.
    let phdr = match phdr_vaddr {
        Some(v) => v + bias,
        None => segments
            .iter()
            .find(|s| phoff >= s.offset && phoff < s.offset + s.file_size)
            .map(|s| s.vaddr + (phoff - s.offset))
            .unwrap_or(0),
    };
    let entry = entry.wrapping_add(bias);
    if !segments
        .iter()
        .any(|s| s.flags & PF_X != 0 && entry >= s.vaddr && entry < s.vaddr + s.mem_size)
    {
        return Err(format!(
            "entry point {entry:#x} is not in an executable segment"
        ));
    }
    Ok(Executable {
        entry,
        phdr,
        phnum: phnum as u64,
        bias,
        segments,
        exec_stack,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 executable: one R+X segment at 0x401000 holding `code`.
    fn tiny(kind: u16, interp: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000 + 16];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&kind.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x40_1000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        let n: u16 = if interp { 2 } else { 1 };
        f[56..58].copy_from_slice(&n.to_le_bytes());
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&(PF_R | PF_X).to_le_bytes());
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[16..24].copy_from_slice(&0x40_1000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&16u64.to_le_bytes());
        ph[40..48].copy_from_slice(&16u64.to_le_bytes());
        if interp {
            let ph = &mut f[120..176];
            ph[0..4].copy_from_slice(&PT_INTERP.to_le_bytes());
            ph[8..16].copy_from_slice(&0x200u64.to_le_bytes());
            ph[32..40].copy_from_slice(&8u64.to_le_bytes());
            f[0x200..0x208].copy_from_slice(b"/ld.so\0\0");
        }
        f
    }

    #[test]
    fn parse_static_exec_gives_entry_and_segment() {
        let e = parse(&tiny(ET_EXEC, false)).unwrap();
        assert_eq!(e.entry, 0x40_1000);
        assert_eq!(e.bias, 0);
        assert_eq!(e.segments.len(), 1);
        assert_eq!(e.end(), 0x40_2000);
    }

    #[test]
    fn parse_static_pie_is_biased() {
        let e = parse(&tiny(ET_DYN, false)).unwrap();
        assert_eq!(e.entry, PIE_BASE + 0x40_1000);
        assert_eq!(e.segments[0].vaddr, PIE_BASE + 0x40_1000);
    }

    #[test]
    fn parse_dynamic_is_refused_with_its_interpreter() {
        let err = parse(&tiny(ET_EXEC, true)).unwrap_err();
        assert!(
            err.contains("dynamically linked") && err.contains("/ld.so"),
            "{err}"
        );
    }

    #[test]
    fn parse_32bit_and_garbage_are_refused() {
        let mut f = tiny(ET_EXEC, false);
        f[4] = 1;
        assert!(parse(&f).unwrap_err().contains("32-bit"));
        assert!(parse(b"#!/bin/sh\n").unwrap_err().contains("not an ELF"));
        assert!(parse(b"\x7fELF").unwrap_err().contains("truncated"));
    }

    #[test]
    fn parse_segment_beyond_file_is_refused() {
        let mut f = tiny(ET_EXEC, false);
        f[64 + 32..64 + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[64 + 40..64 + 48].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(parse(&f).unwrap_err().contains("outside the file"));
    }
}
