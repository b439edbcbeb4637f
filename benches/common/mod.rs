//! Helpers shared by the benches (each bench uses a subset, hence `dead_code` allowed).
#![allow(dead_code)]

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

/// Whether `/dev/kvm` can be used; says the bench `name` skips when it cannot.
pub fn kvm_or_skip(name: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("{name}: skipped, /dev/kvm is not available");
    }
    ok
}

/// Whether a table named `name` is wanted: `cargo bench --bench NAME [FILTER]` runs the
/// tables whose names contain FILTER, or all of them.
pub fn wanted(name: &str) -> bool {
    // `cargo bench` passes --bench; the filter is the argument that is not an option.
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .is_none_or(|filter| name.contains(&filter))
}
