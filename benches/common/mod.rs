//! Helpers shared by the benches (each bench uses what it needs).

/// Every page of `pages` (a power of two) once, in a pseudo-random order: a full-period LCG
/// modulo `pages`, started at `seed`.
pub fn random_order(pages: u64, seed: u64) -> Vec<u64> {
    let mut page = seed % pages;
    (0..pages)
        .map(|_| {
            // a ≡ 1 (mod 4) and c odd: full period over a power-of-two modulus.
            page = page
                .wrapping_mul(0x5851_f42d_4c95_7f2d)
                .wrapping_add(0x1405_7b7e_f767_814f)
                % pages;
            page
        })
        .collect()
}
