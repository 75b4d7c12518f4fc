//! The XSAVE area: standard-format layout of the state components (from CPUID leaf 0xD),
//! reads of a component out of KVM's XSAVE buffer, and the image `fxsave`/`xsave` store.

use kvm_bindings::kvm_cpuid_entry2;

use crate::bytes::{read_le, sub, sub_mut};
use crate::emulate::{CpuState, EmulateError};
use crate::plan::Piece;

/// Bytes of the legacy region that `fxsave` and `xsave` use (the rest of the 512 is untouched).
pub(crate) const LEGACY_USED: usize = 416;
/// Offset of the XSAVE header (XSTATE_BV is its first 8 bytes).
pub(crate) const XSAVE_HEADER: usize = 512;
/// Smallest XSAVE area this module accepts: legacy region plus header.
pub(crate) const XSAVE_MIN: usize = 576;

/// Offset and size of one XSAVE state component in the standard (non-compacted) format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsaveComponent {
    /// Offset from the start of the XSAVE area: CPUID(0xD, i).EBX.
    pub offset: u32,
    /// Size in bytes: CPUID(0xD, i).EAX; 0 when the component is unknown.
    pub size: u32,
    /// Whether the compacted format (`xsavec`) aligns it to 64 bytes: CPUID(0xD, i).ECX bit 1.
    pub align: bool,
}

/// Number of XSAVE state components [`XsaveLayout`] describes (0..=9: x87 to PKRU).
pub const XSAVE_COMPONENTS: usize = 10;

/// Standard-format layout of the XSAVE user state components 2..=9, from CPUID leaf 0xD. It is
/// used both for the KVM buffer and for the guest's XSAVE area: KVM reports the host's standard
/// offsets and guests normally see the same CPUID leaf 0xD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XsaveLayout {
    /// Indexed by component number; entries 0 and 1 (legacy region) are ignored.
    pub components: [XsaveComponent; XSAVE_COMPONENTS],
}

impl XsaveLayout {
    /// The layout of current Intel CPUs: AVX at 576, MPX at 960/1024, opmask at 1088,
    /// ZMM_Hi256 at 1152, Hi16_ZMM at 1664, PKRU at 2688.
    #[must_use]
    pub const fn typical() -> Self {
        const fn c(offset: u32, size: u32) -> XsaveComponent {
            XsaveComponent {
                offset,
                size,
                align: false,
            }
        }
        Self {
            components: [
                c(0, 0),
                c(0, 0),
                c(576, 256),
                c(960, 64),
                c(1024, 64),
                c(1088, 64),
                c(1152, 512),
                c(1664, 1024),
                c(0, 0),
                c(2688, 8),
            ],
        }
    }

    /// Builds the layout from CPUID entries (function 0xD, indices 2..=9); supervisor components
    /// (offset 0) stay unknown.
    #[must_use]
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let mut layout = Self::default();
        for e in entries.iter().filter(|e| e.function == 0xd && e.ebx != 0) {
            if let Ok(i) = usize::try_from(e.index)
                && (2..XSAVE_COMPONENTS).contains(&i)
            {
                layout.components[i] = XsaveComponent {
                    offset: e.ebx,
                    size: e.eax,
                    align: e.ecx & 2 != 0,
                };
            }
        }
        layout
    }

    /// Offset and size of component `i` (2..=9) if known.
    pub(crate) fn range(&self, i: usize) -> Option<(usize, usize)> {
        let c = self.components.get(i).filter(|_| i >= 2)?;
        let offset = usize::try_from(c.offset).ok()?;
        let size = usize::try_from(c.size).ok()?;
        (size != 0 && offset >= XSAVE_MIN).then_some((offset, size))
    }
}

/// The parts of an XSAVE area that `xsave` writes for `rfbm`, sorted and merged; an error
/// names a component that cannot be saved.
pub(crate) fn xsave_ranges(
    layout: &XsaveLayout,
    rfbm: u64,
) -> Result<Vec<(usize, usize)>, &'static str> {
    let mut ranges = Vec::new();
    if rfbm & 1 != 0 {
        ranges.extend([(0, 24), (32, 128)]);
    }
    if rfbm & 0b110 != 0 {
        ranges.push((24, 8)); // MXCSR and MXCSR_MASK go with SSE or AVX
    }
    if rfbm & 0b10 != 0 {
        ranges.push((160, 256));
    }
    ranges.push((XSAVE_HEADER, 8));
    for i in 2..64 {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        if i >= XSAVE_COMPONENTS {
            return Err("xsave of a state component beyond pkru");
        }
        let range = layout.range(i);
        ranges.push(range.ok_or("xsave component not in layout")?);
    }
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match merged.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
            _ => merged.push((start, len)),
        }
    }
    Ok(merged)
}

pub(crate) fn xsave_area(state: &CpuState) -> Result<&[u8], EmulateError> {
    state
        .xsave
        .as_deref()
        .filter(|a| a.len() >= XSAVE_MIN)
        .ok_or(EmulateError::State {
            what: "no xsave area (or shorter than 576 bytes)",
        })
}

/// `len` bytes at `offset` inside component `i` (>= 2) of the KVM XSAVE area; zeros (the
/// initial value of components 2..=9) when XSTATE_BV says the component is in its initial state.
pub(crate) fn component_bytes(
    state: &CpuState,
    i: usize,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, EmulateError> {
    let area = xsave_area(state)?;
    let missing = EmulateError::State {
        what: "xsave layout lacks a needed component",
    };
    let (start, size) = state.xsave_layout.range(i).ok_or(missing)?;
    if offset + len > size {
        return Err(EmulateError::State {
            what: "xsave component smaller than expected",
        });
    }
    if read_le(sub(area, XSAVE_HEADER, 8)?) & (1 << i) == 0 {
        return Ok(vec![0; len]);
    }
    Ok(sub(area, start + offset, len)?.to_vec())
}

/// Written parts of an operand: (offset, len), sorted, disjoint.
pub(crate) type Ranges = Vec<(usize, usize)>;

/// The image `xsavec` stores (compacted format) for the requested-feature `mask` (EDX:EAX;
/// RFBM = XCR0 & mask), and its written parts.
///
/// XINUSE is KVM's XSTATE_BV. The x87 fields are written when x87 is requested and in use,
/// MXCSR when SSE or AVX is requested, the XMM registers when SSE is requested and in use;
/// the header gets XSTATE_BV = XINUSE & RFBM and XCOMP_BV = RFBM | bit 63. Each requested
/// component i >= 2 has its place after the previous ones from offset 576 (rounded up to 64
/// where CPUID(0xD, i).ECX[1] says), and is written only when in use.
pub(crate) fn xsavec_image(
    state: &CpuState,
    mask: u64,
    rex_w: bool,
) -> Result<(Vec<u8>, Ranges), &'static str> {
    let rfbm = state.xcr0 & mask;
    let area = xsave_area(state).map_err(|_| "no xsave area")?;
    let xinuse = read_le(sub(area, XSAVE_HEADER, 8).map_err(|_| "short xsave area")?);
    let saved = rfbm & xinuse;
    if mask >> 9 != 0 {
        // PKRU and later: under PVM the guest runs with the host's XCR0 (AMX included) and
        // KVM reports neither it nor the PKRU the CPU saves, so the image cannot be proven.
        return Err("xsavec of pkru or a later state component");
    }
    let mut places = Vec::new();
    let mut end = XSAVE_MIN;
    for i in 2..64 {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        if i >= XSAVE_COMPONENTS {
            return Err("xsavec of a state component beyond pkru");
        }
        let c = state.xsave_layout.components[i];
        let (from, size) = state
            .xsave_layout
            .range(i)
            .ok_or("xsavec component not in layout")?;
        if c.align {
            end = end.next_multiple_of(64);
        }
        places.push((i, from, end, size));
        end += size;
    }
    let mut image = vec![0u8; end];
    let mut ranges = Vec::new();
    let mut copy = |image: &mut [u8], from: usize, to: usize, len: usize| {
        image[to..to + len].copy_from_slice(&area[from..from + len]);
        ranges.push((to, len));
    };
    if saved & 1 != 0 {
        copy(&mut image, 0, 0, 24);
        copy(&mut image, 32, 32, 128);
        if !rex_w {
            narrow_fpu_pointers(&mut image);
        }
    }
    if rfbm & 0b110 != 0 {
        copy(&mut image, 24, 24, 8);
    }
    if saved & 2 != 0 {
        copy(&mut image, 160, 160, 256);
    }
    for &(i, from, to, size) in &places {
        if saved & (1 << i) != 0 {
            if from + size > area.len() {
                return Err("short xsave area");
            }
            copy(&mut image, from, to, size);
        }
    }
    image[XSAVE_HEADER..XSAVE_HEADER + 8].copy_from_slice(&saved.to_le_bytes());
    let xcomp = rfbm | 1 << 63;
    image[XSAVE_HEADER + 8..XSAVE_HEADER + 16].copy_from_slice(&xcomp.to_le_bytes());
    ranges.push((XSAVE_HEADER, 16)); // the rest of the header is left alone (measured)
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (start, len) in ranges {
        match merged.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(start + len - *s),
            _ => merged.push((start, len)),
        }
    }
    Ok((image, merged))
}

/// Rewrites the FPU IP/DP fields of a legacy region from the 64-bit format (what KVM returns)
/// to the format of `fxsave`/`xsave` without REX.W: 32-bit offsets followed by the selectors,
/// which modern CPUs (FCS/FDS deprecated) store as 0.
pub(crate) fn narrow_fpu_pointers(legacy: &mut [u8]) {
    for field in [8..16, 16..24] {
        if let Some(f) = legacy.get_mut(field) {
            f[4..].fill(0);
        }
    }
}

/// New bytes of an XSAVE area operand (`old` is the current memory over the operand extent).
pub(crate) fn xsave_image(
    state: &CpuState,
    pieces: &[Piece],
    rfbm: u64,
    rex_w: bool,
    old: &[u8],
) -> Result<Option<Vec<u8>>, EmulateError> {
    let area = xsave_area(state)?;
    let mut new = old.to_vec();
    for p in pieces {
        sub_mut(&mut new, p.offset, p.len)?.copy_from_slice(sub(area, p.offset, p.len)?);
    }
    if rfbm & 1 != 0 && !rex_w {
        narrow_fpu_pointers(&mut new);
    }
    let kvm_bv = read_le(sub(area, XSAVE_HEADER, 8)?);
    for i in 2..XSAVE_COMPONENTS {
        if rfbm & (1 << i) != 0
            && kvm_bv & (1 << i) == 0
            && let Some((start, size)) = state.xsave_layout.range(i)
        {
            sub_mut(&mut new, start, size)?.fill(0);
        }
    }
    let old_bv = read_le(sub(old, XSAVE_HEADER, 8)?);
    let bv = (old_bv & !rfbm) | (kvm_bv & rfbm);
    sub_mut(&mut new, XSAVE_HEADER, 8)?.copy_from_slice(&bv.to_le_bytes());
    Ok(Some(new))
}
