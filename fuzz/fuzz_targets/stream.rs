//! Arbitrary bytes into the migration stream's readers: a destination reading a source's
//! stream (the header, then records until the end or an error), and a source reading a
//! destination's hello and verdict.
//!
//! Input: the bytes the peer sent, all of them to each reader.
//!
//! Always: no panic, and nothing allocated in proportion to a size the stream declares (the
//! config may declare up to 64 GiB of guest RAM; the reader allocates none, and neither does
//! this target). A header that is accepted takes exactly its 28 bytes and 17 per vCPU, and
//! writes back (`StreamWriter::header`) to a header that reads back the same. Every record
//! accepted takes exactly its size: 4105 bytes for a page, whose content is the input's, 9
//! for a zero page or a digest, 5 for an end of pass, 1 + 488 per vCPU for the device state
//! (one state per vCPU of the config), 1 for the end; a page record names a page inside the
//! guest. The reader's byte count never goes past the input. A hello accepted is the
//! destination magic and version 1; a refusal's text comes from at most 4096 bytes.

#![no_main]

use dirtyvm::migration::stream::{
    read_hello, read_verdict, Record, StreamReader, StreamWriter, Verdict, DESTINATION_MAGIC,
    MAX_ERROR_LEN, VERSION,
};
use libfuzzer_sys::fuzz_target;

/// Bytes of one vCPU's device state: registers, special registers, TSC, three counters.
const DEVICE_BYTES_PER_VCPU: u64 = 18 * 8 + 312 + 8 + 3 * 8;

fuzz_target!(|data: &[u8]| {
    source_stream(data);
    hello(data);
    verdict(data);
});

/// What a destination does with a source's stream.
fn source_stream(data: &[u8]) {
    let mut reader = StreamReader::new(data);
    let Ok(config) = reader.header() else {
        assert!(reader.bytes() <= data.len() as u64);
        return;
    };
    let header_len = 28 + 17 * u64::from(config.vcpus());
    assert_eq!(reader.bytes(), header_len);

    // The config writes back to a header that reads back the same (byte for byte it may
    // differ: a pace of -0.0 reads as unpaced and writes back as 0).
    let mut writer = StreamWriter::new(Vec::new());
    writer.header(&config).expect("writing to a Vec");
    let rewritten = writer.into_inner().expect("writing to a Vec");
    assert_eq!(rewritten.len() as u64, header_len);
    let again = StreamReader::new(&rewritten[..])
        .header()
        .expect("a header written from an accepted config reads back");
    assert_eq!(again, config);

    let (pages, vcpus) = (config.pages(), config.vcpus());
    // Every record takes at least its tag byte, so this many records cannot fit: a guard
    // against a reader that stops consuming.
    let max_records = data.len() - header_len as usize + 1;
    for _ in 0..max_records {
        let at = reader.bytes();
        let taken = match reader.record() {
            Err(_) => break,
            Ok(Record::Page {
                page,
                data: content,
            }) => {
                assert!(page < pages, "page {page} of {pages}");
                let start = at as usize + 9;
                assert_eq!(&content[..], &data[start..start + 4096]);
                4105
            }
            Ok(Record::Zero { page }) => {
                assert!(page < pages, "page {page} of {pages}");
                9
            }
            Ok(Record::EndOfPass { .. }) => 5,
            Ok(Record::Device(state)) => {
                assert_eq!(state.vcpus.len(), vcpus as usize);
                assert_eq!(state.stats.len(), vcpus as usize);
                1 + DEVICE_BYTES_PER_VCPU * u64::from(vcpus)
            }
            Ok(Record::Digest(_)) => 9,
            Ok(Record::End) => {
                assert_eq!(reader.bytes(), at + 1);
                return;
            }
        };
        assert_eq!(reader.bytes(), at + taken, "record at byte {at}");
    }
    assert!(reader.bytes() <= data.len() as u64);
}

/// What a source does with a destination's first words.
fn hello(data: &[u8]) {
    let mut input = data;
    if read_hello(&mut input).is_ok() {
        assert_eq!(data[..8], DESTINATION_MAGIC);
        assert_eq!(data[8..12], VERSION.to_le_bytes());
        assert_eq!(input.len(), data.len() - 12);
    }
}

/// What a source does with a destination's last words.
fn verdict(data: &[u8]) {
    let mut input = data;
    match read_verdict(&mut input) {
        Ok(Verdict::Running { .. }) => {
            assert_eq!(data[0], b'K');
            assert_eq!(input.len(), data.len() - 9);
        }
        Ok(Verdict::Refused(why)) => {
            assert_eq!(data[0], b'E');
            let len = data.len() - 5 - input.len();
            assert!(len <= MAX_ERROR_LEN as usize);
            // Each invalid byte becomes one U+FFFD (3 bytes) at most.
            assert!(why.len() <= 3 * len);
        }
        Err(_) => {}
    }
}
