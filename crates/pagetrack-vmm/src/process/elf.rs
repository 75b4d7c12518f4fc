//! Static x86-64 ELF executables: the header and program headers a loader needs, checked
//! against everything that would make loading unsafe or meaningless (a 32-bit or foreign file,
//! a dynamic executable, segments outside the file or the user address space).

use super::mm::{PAGE, USER_END};
use crate::ElfProblem;

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

/// Parses `file` as a static x86-64 executable.
///
/// # Errors
/// Not ELF, not 64-bit little-endian x86-64, not an executable, dynamically linked, or with
/// segments that do not fit the file or the user address space.
pub fn parse(file: &[u8]) -> Result<Executable, ElfProblem> {
    if file.len() < 4 || &file[..4] != b"\x7fELF" {
        return Err(ElfProblem::NotElf);
    }
    if file.len() < EHDR_SIZE {
        return Err(ElfProblem::Truncated);
    }
    match file[4] {
        2 => {}
        1 => return Err(ElfProblem::Elf32),
        class => return Err(ElfProblem::UnknownClass { class }),
    }
    if file[5] != 1 {
        return Err(ElfProblem::BigEndian);
    }
    let machine = u16_at(file, 18);
    if machine != EM_X86_64 {
        return Err(ElfProblem::Machine { machine });
    }
    let kind = u16_at(file, 16);
    if kind != ET_EXEC && kind != ET_DYN {
        return Err(ElfProblem::NotExecutable { kind });
    }
    let entry = u64_at(file, 24);
    let phoff = u64_at(file, 32);
    let phentsize = usize::from(u16_at(file, 54));
    let phnum = usize::from(u16_at(file, 56));
    if phentsize != PHDR_SIZE {
        return Err(ElfProblem::HeaderSize {
            size: phentsize,
            expected: PHDR_SIZE,
        });
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(ElfProblem::HeaderCount {
            count: phnum,
            max: MAX_PHNUM,
        });
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|o| o.checked_add(phnum * PHDR_SIZE).map(|e| (o, e)))
        .filter(|&(_, e)| e <= file.len());
    let Some((table, _)) = table_end else {
        return Err(ElfProblem::HeadersOutsideFile);
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
                return Err(ElfProblem::Dynamic {
                    interpreter: interp,
                });
            }
            PT_PHDR => phdr_vaddr = Some(vaddr),
            PT_GNU_STACK => exec_stack = flags & PF_X != 0,
            PT_LOAD => {
                if mem_size == 0 {
                    continue;
                }
                if file_size > mem_size {
                    return Err(ElfProblem::FileSizeAboveMemSize { index: i });
                }
                if offset
                    .checked_add(file_size)
                    .is_none_or(|e| e > file.len() as u64)
                {
                    return Err(ElfProblem::SegmentOutsideFile { index: i });
                }
                if vaddr % PAGE != offset % PAGE {
                    return Err(ElfProblem::Misaligned {
                        index: i,
                        vaddr,
                        offset,
                    });
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
        return Err(ElfProblem::NoLoadSegment);
    }
    let bias = if kind == ET_DYN { PIE_BASE } else { 0 };
    let mut segments = Vec::with_capacity(raw.len());
    for (i, s) in raw.into_iter().enumerate() {
        let vaddr = s.vaddr.checked_add(bias);
        let end = vaddr.and_then(|v| v.checked_add(s.mem_size));
        let (Some(vaddr), Some(end)) = (vaddr, end) else {
            return Err(ElfProblem::AddressOverflow { index: i });
        };
        if vaddr < PAGE || end > USER_END {
            return Err(ElfProblem::OutsideUserSpace {
                index: i,
                start: vaddr,
                end,
            });
        }
        segments.push(Segment { vaddr, ..s });
    }
    segments.sort_by_key(|s| s.vaddr);
    for w in segments.windows(2) {
        if w[0].vaddr + w[0].mem_size > w[1].vaddr {
            return Err(ElfProblem::Overlap {
                first: w[0].vaddr,
                second: w[1].vaddr,
            });
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
        return Err(ElfProblem::EntryNotExecutable { entry });
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
            matches!(&err, ElfProblem::Dynamic { interpreter } if interpreter.ends_with("/ld.so")),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("dynamically linked") && msg.contains("/ld.so"),
            "{msg}"
        );
    }

    #[test]
    fn parse_32bit_and_garbage_are_refused() {
        let mut f = tiny(ET_EXEC, false);
        f[4] = 1;
        assert_eq!(parse(&f), Err(ElfProblem::Elf32));
        assert_eq!(parse(b"#!/bin/sh\n"), Err(ElfProblem::NotElf));
        assert_eq!(parse(b"\x7fELF"), Err(ElfProblem::Truncated));
        f[4] = 7;
        assert_eq!(parse(&f), Err(ElfProblem::UnknownClass { class: 7 }));
    }

    #[test]
    fn parse_segment_beyond_file_is_refused() {
        let mut f = tiny(ET_EXEC, false);
        f[64 + 32..64 + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[64 + 40..64 + 48].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert_eq!(parse(&f), Err(ElfProblem::SegmentOutsideFile { index: 0 }));
    }
}
