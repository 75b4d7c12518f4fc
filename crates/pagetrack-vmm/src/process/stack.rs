//! The initial process stack as Linux's `create_elf_tables` lays it out: `argc`, the `argv`
//! and `envp` pointer arrays, the auxiliary vector, then the strings, `AT_RANDOM`'s 16 bytes
//! and the platform name above them.

/// `AT_NULL`.
const AT_NULL: u64 = 0;
/// `AT_PHDR`.
pub const AT_PHDR: u64 = 3;
/// `AT_PHENT`.
pub const AT_PHENT: u64 = 4;
/// `AT_PHNUM`.
pub const AT_PHNUM: u64 = 5;
/// `AT_PAGESZ`.
pub const AT_PAGESZ: u64 = 6;
/// `AT_BASE`.
pub const AT_BASE: u64 = 7;
/// `AT_FLAGS`.
pub const AT_FLAGS: u64 = 8;
/// `AT_ENTRY`.
pub const AT_ENTRY: u64 = 9;
/// `AT_UID`.
pub const AT_UID: u64 = 11;
/// `AT_EUID`.
pub const AT_EUID: u64 = 12;
/// `AT_GID`.
pub const AT_GID: u64 = 13;
/// `AT_EGID`.
pub const AT_EGID: u64 = 14;
/// `AT_PLATFORM` (set by [`build`]).
const AT_PLATFORM: u64 = 15;
/// `AT_HWCAP`.
pub const AT_HWCAP: u64 = 16;
/// `AT_CLKTCK`.
pub const AT_CLKTCK: u64 = 17;
/// `AT_SECURE`.
pub const AT_SECURE: u64 = 23;
/// `AT_RANDOM` (set by [`build`]).
const AT_RANDOM: u64 = 25;
/// `AT_HWCAP2`.
pub const AT_HWCAP2: u64 = 26;
/// `AT_SYSINFO_EHDR`: the vDSO's ELF header.
pub const AT_SYSINFO_EHDR: u64 = 33;
/// `AT_EXECFN` (set by [`build`]).
const AT_EXECFN: u64 = 31;

/// The stack's contents, to be copied to `[base, top)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitialStack {
    /// The stack pointer at entry (points at `argc`; 16-byte aligned).
    pub sp: u64,
    /// The bytes from `sp` up to the top.
    pub bytes: Vec<u8>,
}

/// Lays out the stack below `top` (exclusive). `aux` holds the entries the caller knows;
/// `AT_RANDOM`, `AT_PLATFORM` and `AT_EXECFN` are added here.
pub fn build(
    top: u64,
    argv: &[Vec<u8>],
    envp: &[Vec<u8>],
    execfn: &[u8],
    random: [u8; 16],
    aux: &[(u64, u64)],
) -> InitialStack {
    // Strings first, from the top down: an 8-byte end marker, the file name, the
    // environment and the arguments, the platform; then the random bytes.
    let mut blob: Vec<u8> = Vec::new(); // grows downward: built reversed, then flipped
    let mut at = top - 8;
    blob.extend_from_slice(&[0; 8]);
    let place = |blob: &mut Vec<u8>, at: &mut u64, s: &[u8]| -> u64 {
        let len = s.len() as u64 + 1;
        *at -= len;
        let mut piece = s.to_vec();
        piece.push(0);
        piece.reverse();
        blob.extend_from_slice(&piece);
        *at
    };
    let execfn_at = place(&mut blob, &mut at, execfn);
    let env_at: Vec<u64> = envp.iter().map(|e| place(&mut blob, &mut at, e)).collect();
    let arg_at: Vec<u64> = argv.iter().map(|a| place(&mut blob, &mut at, a)).collect();
    let platform_at = place(&mut blob, &mut at, b"x86_64");
    // Align, then the 16 random bytes.
    let pad = at % 16;
    blob.extend(std::iter::repeat_n(0u8, usize::try_from(pad).unwrap_or(0)));
    at -= pad;
    at -= 16;
    let mut r = random;
    r.reverse();
    blob.extend_from_slice(&r);
    let random_at = at;
    blob.reverse();
    let strings_base = at;

    let mut auxv: Vec<(u64, u64)> = aux.to_vec();
    auxv.push((AT_RANDOM, random_at));
    auxv.push((AT_PLATFORM, platform_at));
    auxv.push((AT_EXECFN, execfn_at));
    auxv.push((AT_NULL, 0));

    let mut words: Vec<u64> = vec![argv.len() as u64];
    words.extend(&arg_at);
    words.push(0);
    words.extend(&env_at);
    words.push(0);
    for (k, v) in auxv {
        words.push(k);
        words.push(v);
    }
    let sp = (strings_base - words.len() as u64 * 8) & !15;
    let mut bytes = Vec::with_capacity(usize::try_from(top - sp).unwrap_or(0));
    for w in &words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    let gap = strings_base - sp - words.len() as u64 * 8;
    bytes.extend(std::iter::repeat_n(0u8, usize::try_from(gap).unwrap_or(0)));
    bytes.extend_from_slice(&blob);
    debug_assert_eq!(sp + bytes.len() as u64, top);
    InitialStack { sp, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(s: &InitialStack, addr: u64) -> u64 {
        let i = usize::try_from(addr - s.sp).unwrap();
        u64::from_le_bytes(s.bytes[i..i + 8].try_into().unwrap())
    }

    fn cstr(s: &InitialStack, addr: u64) -> Vec<u8> {
        let i = usize::try_from(addr - s.sp).unwrap();
        s.bytes[i..]
            .iter()
            .take_while(|&&b| b != 0)
            .copied()
            .collect()
    }

    #[test]
    fn build_lays_out_argc_argv_envp_and_auxv() {
        let top = 0x7fff_0000_0000;
        let s = build(
            top,
            &[b"busybox".to_vec(), b"wc".to_vec()],
            &[b"A=1".to_vec()],
            b"/bin/busybox",
            [7; 16],
            &[(AT_PAGESZ, 4096)],
        );
        assert_eq!(s.sp % 16, 0);
        assert_eq!(s.sp + s.bytes.len() as u64, top);
        assert_eq!(word(&s, s.sp), 2);
        assert_eq!(cstr(&s, word(&s, s.sp + 8)), b"busybox");
        assert_eq!(cstr(&s, word(&s, s.sp + 16)), b"wc");
        assert_eq!(word(&s, s.sp + 24), 0);
        assert_eq!(cstr(&s, word(&s, s.sp + 32)), b"A=1");
        assert_eq!(word(&s, s.sp + 40), 0);
        let mut at = s.sp + 48;
        let mut aux = std::collections::HashMap::new();
        loop {
            let (k, v) = (word(&s, at), word(&s, at + 8));
            at += 16;
            if k == AT_NULL {
                break;
            }
            aux.insert(k, v);
        }
        assert_eq!(aux[&AT_PAGESZ], 4096);
        assert_eq!(cstr(&s, aux[&AT_EXECFN]), b"/bin/busybox");
        assert_eq!(cstr(&s, aux[&AT_PLATFORM]), b"x86_64");
        let r = usize::try_from(aux[&AT_RANDOM] - s.sp).unwrap();
        assert_eq!(&s.bytes[r..r + 16], &[7; 16]);
    }
}
