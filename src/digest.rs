//! Hashes of guest memory: one page's (page-sampling compares them across a window) and all of
//! guest RAM's (a migration's source and destination compare them before the destination runs
//! a single instruction). A leaf of the module graph.
//!
//! The page hash is XXH64 with seed 1 over the page's 512 little-endian words, as QEMU's
//! page-sampling uses since 8.1 (checked against the reference implementation). The RAM digest
//! is XXH64 (seed: the page count) over the sequence of page hashes, so a side that learns
//! pages one at a time (a migration destination) keeps one hash per page and folds them at
//! the end, and a side that has all of RAM (the source) hashes it in parallel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::units::PAGE_SIZE;

/// 64-bit words per page.
pub const PAGE_WORDS: usize = (PAGE_SIZE / 8) as usize;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, lane: u64) -> u64 {
    (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 with `seed` over `len` words, the `i`th read by `word(i)` (the little-endian u64s
/// of the input), four lanes at a time. Reading through `word` lets a page be hashed where it
/// lies, in guest memory, without a copy.
fn xxh64_by(seed: u64, len: usize, word: impl Fn(usize) -> u64) -> u64 {
    let stripes = len / 4;
    let mut h = if len >= 4 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for stripe in 0..stripes {
            v[0] = round(v[0], word(4 * stripe));
            v[1] = round(v[1], word(4 * stripe + 1));
            v[2] = round(v[2], word(4 * stripe + 2));
            v[3] = round(v[3], word(4 * stripe + 3));
        }
        let h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        v.into_iter().fold(h, merge)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len as u64 * 8);
    for i in 4 * stripes..len {
        h ^= round(0, word(i));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// XXH64 with `seed` over `words`.
fn xxh64(seed: u64, words: &[u64]) -> u64 {
    xxh64_by(seed, words.len(), |i| words[i])
}

/// The hash of a page of zeros.
pub fn zero_page_hash() -> u64 {
    static ZERO: OnceLock<u64> = OnceLock::new();
    *ZERO.get_or_init(|| xxh64(1, &[0; PAGE_WORDS]))
}

/// The hash of one page of memory the guest may be writing, read where it lies; a page of
/// zeros costs a scan, not a hash.
///
/// # Panics
/// If `page` is not `PAGE_WORDS` words long.
pub fn page_hash_of(page: &[AtomicU64]) -> u64 {
    let page: &[AtomicU64; PAGE_WORDS] = page.try_into().expect("a page's words");
    // Relaxed: a torn view of a page under concurrent writes hashes as what was read.
    let word = |i: usize| page[i].load(Ordering::Relaxed);
    if (0..PAGE_WORDS).all(|i| word(i) == 0) {
        return zero_page_hash();
    }
    xxh64_by(1, PAGE_WORDS, word)
}

/// The digest of a RAM whose page hashes, in page order, are `page_hashes`.
pub fn fold(page_hashes: &[u64]) -> u64 {
    xxh64(page_hashes.len() as u64, page_hashes)
}

/// The digest of all of `ram` (its words, a whole number of pages), hashed on `threads`
/// threads at once (the caller's vCPUs are paused: the cores are free).
pub fn ram_digest(ram: &[AtomicU64], threads: usize) -> u64 {
    let pages = ram.len() / PAGE_WORDS;
    let mut hashes = vec![0u64; pages];
    let per_thread = pages.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (chunk, out) in ram
            .chunks(per_thread * PAGE_WORDS)
            .zip(hashes.chunks_mut(per_thread))
        {
            scope.spawn(move || {
                for (page, hash) in chunk.chunks_exact(PAGE_WORDS).zip(out) {
                    *hash = page_hash_of(page);
                }
            });
        }
    });
    fold(&hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(bytes: &[u8]) -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn page(bytes: &[u8]) -> Vec<AtomicU64> {
        words(bytes).into_iter().map(AtomicU64::new).collect()
    }

    #[test]
    fn xxh64_matches_the_reference_implementation() {
        // Values from the python-xxhash package: xxh64(data, seed).
        let bytes: Vec<u8> = (0..4096u32).map(|i| ((i * 7 + 3) & 0xff) as u8).collect();
        assert_eq!(page_hash_of(&page(&bytes)), 0x2215_4cb5_a9b7_bbef);
        assert_eq!(page_hash_of(&page(&[0; 4096])), 0x82da_6c10_8266_bfde);
        assert_eq!(zero_page_hash(), 0x82da_6c10_8266_bfde);
        // Lengths that are not whole stripes: xxh64(bytes(0..40), seed=3) and of 16 bytes.
        let forty: Vec<u8> = (0..40).collect();
        assert_eq!(xxh64(3, &words(&forty)), 0x779e_2e37_6ac9_fe05);
        assert_eq!(xxh64(3, &words(&forty[..16])), 0xaaf0_4291_a1bf_644f);
    }

    #[test]
    fn the_ram_digest_is_the_fold_of_the_page_hashes_whatever_the_threads() {
        let ram: Vec<AtomicU64> = (0..PAGE_WORDS * 37)
            .map(|i| AtomicU64::new(if i % 3000 < 700 { i as u64 } else { 0 }))
            .collect();
        let hashes: Vec<u64> = ram.chunks_exact(PAGE_WORDS).map(page_hash_of).collect();
        let digest = fold(&hashes);
        for threads in [1, 2, 3, 8, 64] {
            assert_eq!(ram_digest(&ram, threads), digest, "{threads} threads");
        }
        // One byte of one page changes it.
        ram[PAGE_WORDS * 20 + 5].fetch_xor(1 << 40, Ordering::Relaxed);
        assert_ne!(ram_digest(&ram, 2), digest);
    }
}
