//! Helpers shared by the integration tests.

use std::path::Path;

/// Whether `/dev/kvm` can be used; prints why a test skips when it cannot.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/kvm"))
        .is_ok();
    if !ok {
        eprintln!("skipping {test}: /dev/kvm is not available (needs Linux with KVM, read-write)");
    }
    ok
}
