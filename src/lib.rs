//! dirtyvm: a minimal KVM VMM that tracks, measures and limits guest dirty rates.
