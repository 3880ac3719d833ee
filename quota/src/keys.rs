//! API key helpers: hashing and generation.
//!
//! Tollgate never stores a plain key: licenses hold the SHA-256 of each key,
//! and the hot path hashes the presented key to look it up. This module must
//! not draw randomness itself; the caller passes the random bytes in, which
//! keeps it deterministic under simulation.

use sha2::{Digest, Sha256};

/// Prefix of every generated key, so a leaked key is recognisable by scanners.
pub const KEY_PREFIX: &str = "tg_";

/// The SHA-256 of `plain`, as 64 lowercase hex characters (the stored form).
pub fn hash_key(plain: &str) -> String {
    hex::encode(hash_key_bytes(plain))
}

/// The SHA-256 of `plain` as raw bytes (what the key index is keyed by, so the
/// hot path skips hex encoding).
pub fn hash_key_bytes(plain: &str) -> [u8; 32] {
    Sha256::digest(plain.as_bytes()).into()
}

/// Decodes a 64-hex-character SHA-256; `None` if it is not one.
pub fn decode_hash(hash_hex: &str) -> Option<[u8; 32]> {
    if hash_hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash_hex, &mut out).ok()?;
    Some(out)
}

/// A new key: `tg_` followed by the 52-character lowercase base32 (RFC 4648,
/// unpadded) of `random`. The caller supplies the 32 random bytes from a
/// CSPRNG; this function only encodes them.
pub fn generate_key(random: [u8; 32]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(KEY_PREFIX.len() + 52);
    out.push_str(KEY_PREFIX);
    let mut buffer: u32 = 0;
    let mut n_bits: u32 = 0;
    for byte in random {
        buffer = (buffer << 8) | u32::from(byte);
        n_bits += 8;
        while n_bits >= 5 {
            let idx = (buffer >> (n_bits - 5)) & 31;
            out.push(char::from(ALPHABET[idx as usize]));
            n_bits -= 5;
        }
        // Keep only the bits not yet emitted so the buffer never overflows.
        buffer &= (1 << n_bits) - 1;
    }
    if n_bits > 0 {
        let idx = (buffer << (5 - n_bits)) & 31;
        out.push(char::from(ALPHABET[idx as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(decode_hash(&hash_key("abc")), Some(hash_key_bytes("abc")));
        assert_eq!(decode_hash("zz"), None);
    }

    #[test]
    fn generated_keys_are_prefixed_and_distinct() {
        let a = generate_key([0u8; 32]);
        let b = generate_key([1u8; 32]);
        assert!(a.starts_with("tg_"));
        assert_eq!(a.len(), 3 + 52);
        assert_ne!(a, b);
    }
}
