//! Operand bytes: bounds-checked slices, little-endian values and operand-size masks.

use crate::emulate::EmulateError;

pub(crate) fn sub(buf: &[u8], offset: usize, len: usize) -> Result<&[u8], EmulateError> {
    offset
        .checked_add(len)
        .and_then(|end| buf.get(offset..end))
        .ok_or(EmulateError::State {
            what: "buffer shorter than an operand",
        })
}

pub(crate) fn sub_mut(
    buf: &mut [u8],
    offset: usize,
    len: usize,
) -> Result<&mut [u8], EmulateError> {
    offset
        .checked_add(len)
        .and_then(|end| buf.get_mut(offset..end))
        .ok_or(EmulateError::State {
            what: "buffer shorter than an operand",
        })
}

pub(crate) fn read_le(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

pub(crate) fn le_bytes(value: u64, size: usize) -> Vec<u8> {
    value.to_le_bytes()[..size.min(8)].to_vec()
}

pub(crate) fn size_mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

pub(crate) fn sign_extend(value: u64, size: usize) -> i64 {
    let shift = 64 - 8 * size.clamp(1, 8);
    (value << shift).cast_signed() >> shift
}
