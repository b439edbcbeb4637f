//! Arbitrary bytes into a QMP session on a mock VM, fed in chunks the input chooses.
//!
//! Input: one byte of VM configuration (vCPU count, dirty ring or not), two bytes seeding
//! the chunk sizes (0 to 32 bytes), then the client's byte stream.
//!
//! Always: no panic; every output line is one line of printable ASCII holding a JSON
//! object; a session that closed stays closed and says nothing more; and the chunking
//! changes nothing (the stream fed at once gives the same lines, timestamps aside).

#![no_main]

use std::sync::Arc;

use dirtyvm::qmp::mock::MockBackend;
use dirtyvm::qmp::{Output, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&config, rest)) = data.split_first() else {
        return;
    };
    let Some((seed, stream)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let vcpus = u32::from(config & 3) + 1;
    let dirty_ring = config & 4 != 0;
    let session = || Session::new(Arc::new(MockBackend::new(vcpus, dirty_ring)));

    let at_once = session().feed(stream);

    let mut chunked = session();
    let mut fed = Output::default();
    let mut chunk_sizes = ChunkSizes(u32::from(u16::from_le_bytes(*seed)));
    let mut rest = stream;
    loop {
        let (chunk, tail) = rest.split_at(chunk_sizes.next().min(rest.len()));
        let output = chunked.feed(chunk);
        assert!(!fed.close || (output.close && output.lines.is_empty()));
        fed.close = output.close;
        fed.lines.extend(output.lines);
        if tail.is_empty() {
            break;
        }
        rest = tail;
    }

    assert_eq!(fed.close, at_once.close);
    assert_eq!(
        fed.lines
            .iter()
            .map(|line| untimed(line))
            .collect::<Vec<_>>(),
        at_once
            .lines
            .iter()
            .map(|line| untimed(line))
            .collect::<Vec<_>>()
    );
    for line in &fed.lines {
        assert!(
            line.bytes().all(|byte| (0x20..0x7f).contains(&byte)),
            "{line}"
        );
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    }
});

/// Chunk sizes from a linear congruential generator: cheap, and the same for the same seed.
struct ChunkSizes(u32);

impl ChunkSizes {
    fn next(&mut self) -> usize {
        self.0 = self.0.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        (self.0 >> 16) as usize % 33
    }
}

/// An event line without its timestamp, its last member (members are written sorted, and
/// events alone start with "data" or "event").
fn untimed(line: &str) -> &str {
    let event = line.starts_with("{\"data\": ") || line.starts_with("{\"event\": ");
    match line.rfind(", \"timestamp\": ") {
        Some(timestamp) if event => &line[..timestamp],
        _ => line,
    }
}
