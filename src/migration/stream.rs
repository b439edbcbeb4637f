//! The migration stream: what the source writes and the destination reads, and the
//! destination's few words back. Every integer is little-endian.
//!
//! ```text
//! source -> destination
//!   header      "DIRTYVM\0" (8 bytes), version u32 (1)
//!   config      memory u64, tsc_khz u32, vcpus u32,
//!               then per vCPU: kind u8 (0 idle, 1 write, 2 random-write, 3 read),
//!                              bytes u64, pace f64 bits u64 (0: unpaced)
//!   records     tag u8, then by tag:
//!     1 page            page u64, 4096 bytes
//!     2 zero page       page u64                      (the page is all zeros)
//!     3 end of pass     iteration u32
//!     4 device state    per vCPU: regs (18 × u64), sregs (the 312 bytes of kvm_sregs, field
//!                       by field), TSC u64, then pages written, pages read, passes (3 × u64)
//!     5 digest          u64                            (digest of all of guest RAM at pause)
//!     6 end
//! destination -> source
//!   hello       "DIRTYVMd" (8 bytes), version u32, on accepting the connection
//!   result      tag u8: b'K' then the destination's digest u64 (it checked it and runs the
//!               guest), or b'E' then length u32 and that many bytes of UTF-8: why it refused
//! ```
//!
//! The reader is strict and trusts nothing: the magic and version, every tag, every page
//! number (below the guest's page count), every count (the vCPUs of the config, at most
//! `MAX_VCPUS`), every length (an error text at most 4096 bytes), the config itself (the same
//! checks a boot makes); a stream that ends early says in which record and at which byte. It
//! never panics, whatever the bytes (the `stream` fuzz target feeds it arbitrary ones).

use std::fmt;
use std::io::{self, BufRead, Read, Write};

use dirtyvm_sys as sys;

use crate::units::PAGE_SIZE;
use crate::vm::guest::{GuestStats, Layout, Workload, MAX_VCPUS, MIN_PACE_MIBPS};
use crate::vm::kvm::VcpuState;

/// First bytes of a stream from a source.
pub const MAGIC: [u8; 8] = *b"DIRTYVM\0";
/// First bytes from a destination.
pub const DESTINATION_MAGIC: [u8; 8] = *b"DIRTYVMd";
/// The version this dirtyvm writes and reads.
pub const VERSION: u32 = 1;
/// The longest error text a destination sends back.
pub const MAX_ERROR_LEN: u32 = 4096;

const TAG_PAGE: u8 = 1;
const TAG_ZERO: u8 = 2;
const TAG_END_OF_PASS: u8 = 3;
const TAG_DEVICE: u8 = 4;
const TAG_DIGEST: u8 = 5;
const TAG_END: u8 = 6;

/// What the destination needs to build the same VM.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamConfig {
    /// Guest RAM, bytes.
    pub memory: u64,
    /// The guest TSC frequency, kHz.
    pub tsc_khz: u32,
    /// Each vCPU's workload, by id.
    pub workloads: Vec<Workload>,
}

impl StreamConfig {
    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.workloads.len() as u32
    }

    /// Guest RAM, pages.
    pub fn pages(&self) -> u64 {
        self.memory / PAGE_SIZE
    }
}

/// The state of every vCPU at the switchover.
#[derive(Debug, Clone)]
pub struct DeviceState {
    /// Registers and TSC, by vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// Ground-truth counters, by vCPU id.
    pub stats: Vec<GuestStats>,
}

/// One record of the stream after the header.
#[derive(Debug)]
pub enum Record<'a> {
    /// A page and its content.
    Page { page: u64, data: &'a [u8; 4096] },
    /// A page of zeros.
    Zero { page: u64 },
    /// The end of a pass over the dirty pages.
    EndOfPass { iteration: u32 },
    /// The vCPUs' state.
    Device(DeviceState),
    /// The digest of guest RAM at the source's pause.
    Digest(u64),
    /// The end of the stream.
    End,
}

/// Why a stream could not be read: what was wrong, and where.
#[derive(Debug)]
pub struct StreamError {
    message: String,
    /// The transport failed (as opposed to bytes that make no sense).
    pub io: Option<io::ErrorKind>,
}

impl StreamError {
    fn invalid(message: String) -> StreamError {
        StreamError { message, io: None }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StreamError {}

/// Writes a stream, counting the bytes, through its own buffer: a page goes from guest memory
/// straight into the buffer ([`StreamWriter::page`]), and the buffer to `out` in large writes.
#[derive(Debug)]
pub struct StreamWriter<W: Write> {
    out: W,
    bytes: u64,
    /// What is not written to `out` yet: `buffer[..filled]`.
    buffer: Box<[u8]>,
    filled: usize,
}

/// Bytes of a page record: tag, index, content.
const PAGE_RECORD: usize = 9 + PAGE_SIZE as usize;

/// Bytes the writer gathers before writing them out: big enough that writes are few, small
/// enough that a source's rate limit sees bytes as they go.
pub const WRITE_BUFFER: usize = 256 << 10;

/// Bytes a destination reads from its socket at once: the throughput bench's written 1 GiB
/// guest migrated over TCP in 0.65-0.69 s reading 2 MiB at once, 0.72-0.84 s reading 256 KiB
/// and 0.80-0.86 s reading 64 KiB (three runs each): fewer receive calls and window updates.
pub const READ_BUFFER: usize = 2 << 20;

impl<W: Write> StreamWriter<W> {
    /// A writer onto `out` (unbuffered: the writer buffers).
    pub fn new(out: W) -> StreamWriter<W> {
        StreamWriter {
            out,
            bytes: 0,
            buffer: vec![0; WRITE_BUFFER].into_boxed_slice(),
            filled: 0,
        }
    }

    /// Bytes written so far (some may still be in the buffer).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Writes out what is buffered and returns the underlying writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.drain()?;
        Ok(self.out)
    }

    fn drain(&mut self) -> io::Result<()> {
        self.out.write_all(&self.buffer[..self.filled])?;
        self.filled = 0;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.filled + bytes.len() > self.buffer.len() {
            self.drain()?;
        }
        if bytes.len() > self.buffer.len() {
            self.out.write_all(bytes)?;
        } else {
            self.buffer[self.filled..][..bytes.len()].copy_from_slice(bytes);
            self.filled += bytes.len();
        }
        self.bytes += bytes.len() as u64;
        Ok(())
    }

    /// A page record, or a zero-page record when the page's words, `word(0)` to
    /// `word(PAGE_WORDS - 1)`, are all zero. Returns whether the page was a zero page. Each
    /// word is read once, into the record in the buffer: no copy of the page on the way.
    pub fn page(&mut self, page: u64, word: impl Fn(usize) -> u64) -> io::Result<bool> {
        if self.filled + PAGE_RECORD > self.buffer.len() {
            self.drain()?;
        }
        let record = &mut self.buffer[self.filled..][..PAGE_RECORD];
        let mut any = 0;
        for (i, bytes) in record[9..].chunks_exact_mut(8).enumerate() {
            let value = word(i);
            any |= value;
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        if any == 0 {
            let mut b = [0u8; 9];
            b[0] = TAG_ZERO;
            b[1..].copy_from_slice(&page.to_le_bytes());
            self.put(&b)?;
            return Ok(true);
        }
        record[0] = TAG_PAGE;
        record[1..9].copy_from_slice(&page.to_le_bytes());
        self.filled += PAGE_RECORD;
        self.bytes += PAGE_RECORD as u64;
        Ok(false)
    }

    /// The header and the config.
    pub fn header(&mut self, config: &StreamConfig) -> io::Result<()> {
        let mut b = Vec::with_capacity(32 + 17 * config.workloads.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&config.memory.to_le_bytes());
        b.extend_from_slice(&config.tsc_khz.to_le_bytes());
        b.extend_from_slice(&config.vcpus().to_le_bytes());
        for workload in &config.workloads {
            let (kind, pace) = match *workload {
                Workload::Idle => (0u8, None),
                Workload::Write { mibps, .. } => (1, mibps),
                Workload::RandomWrite { mibps, .. } => (2, mibps),
                Workload::Read { .. } => (3, None),
            };
            b.push(kind);
            b.extend_from_slice(&workload.working_set().to_le_bytes());
            b.extend_from_slice(&pace.map_or(0, f64::to_bits).to_le_bytes());
        }
        self.put(&b)
    }

    /// The end of a pass.
    pub fn end_of_pass(&mut self, iteration: u32) -> io::Result<()> {
        let mut b = [TAG_END_OF_PASS, 0, 0, 0, 0];
        b[1..].copy_from_slice(&iteration.to_le_bytes());
        self.put(&b)
    }

    /// The vCPUs' state.
    pub fn device(&mut self, state: &DeviceState) -> io::Result<()> {
        let mut b = vec![TAG_DEVICE];
        for (vcpu, stats) in state.vcpus.iter().zip(&state.stats) {
            put_regs(&mut b, &vcpu.regs);
            put_sregs(&mut b, &vcpu.sregs);
            b.extend_from_slice(&vcpu.tsc.to_le_bytes());
            for v in [stats.pages_written, stats.pages_read, stats.passes] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.put(&b)
    }

    /// The digest of guest RAM.
    pub fn digest(&mut self, digest: u64) -> io::Result<()> {
        let mut b = [0u8; 9];
        b[0] = TAG_DIGEST;
        b[1..].copy_from_slice(&digest.to_le_bytes());
        self.put(&b)
    }

    /// The end of the stream, then everything buffered written out and flushed.
    pub fn end(&mut self) -> io::Result<()> {
        self.put(&[TAG_END])?;
        self.drain()?;
        self.out.flush()
    }
}

/// Bytes of one vCPU's device state.
const DEVICE_BYTES_PER_VCPU: usize = 18 * 8 + 312 + 8 + 3 * 8;

fn put_regs(b: &mut Vec<u8>, r: &sys::kvm_regs) {
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

fn put_segment(b: &mut Vec<u8>, s: &sys::kvm_segment) {
    b.extend_from_slice(&s.base.to_le_bytes());
    b.extend_from_slice(&s.limit.to_le_bytes());
    b.extend_from_slice(&s.selector.to_le_bytes());
    b.extend_from_slice(&[
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable, s.padding,
    ]);
}

fn put_dtable(b: &mut Vec<u8>, t: &sys::kvm_dtable) {
    b.extend_from_slice(&t.base.to_le_bytes());
    b.extend_from_slice(&t.limit.to_le_bytes());
    for p in t.padding {
        b.extend_from_slice(&p.to_le_bytes());
    }
}

fn put_sregs(b: &mut Vec<u8>, s: &sys::kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(b, seg);
    }
    put_dtable(b, &s.gdt);
    put_dtable(b, &s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in s.interrupt_bitmap {
        b.extend_from_slice(&v.to_le_bytes());
    }
}

/// Decodes fixed-size fields from a byte slice the caller sized exactly.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at gave N bytes")
    }

    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    fn regs(&mut self) -> sys::kvm_regs {
        sys::kvm_regs {
            rax: self.u64(),
            rbx: self.u64(),
            rcx: self.u64(),
            rdx: self.u64(),
            rsi: self.u64(),
            rdi: self.u64(),
            rsp: self.u64(),
            rbp: self.u64(),
            r8: self.u64(),
            r9: self.u64(),
            r10: self.u64(),
            r11: self.u64(),
            r12: self.u64(),
            r13: self.u64(),
            r14: self.u64(),
            r15: self.u64(),
            rip: self.u64(),
            rflags: self.u64(),
        }
    }

    fn segment(&mut self) -> sys::kvm_segment {
        sys::kvm_segment {
            base: self.u64(),
            limit: self.u32(),
            selector: self.u16(),
            type_: self.u8(),
            present: self.u8(),
            dpl: self.u8(),
            db: self.u8(),
            s: self.u8(),
            l: self.u8(),
            g: self.u8(),
            avl: self.u8(),
            unusable: self.u8(),
            padding: self.u8(),
        }
    }

    fn dtable(&mut self) -> sys::kvm_dtable {
        sys::kvm_dtable {
            base: self.u64(),
            limit: self.u16(),
            padding: [self.u16(), self.u16(), self.u16()],
        }
    }

    fn sregs(&mut self) -> sys::kvm_sregs {
        let mut s = sys::kvm_sregs {
            cs: self.segment(),
            ds: self.segment(),
            es: self.segment(),
            fs: self.segment(),
            gs: self.segment(),
            ss: self.segment(),
            tr: self.segment(),
            ldt: self.segment(),
            gdt: self.dtable(),
            idt: self.dtable(),
            cr0: self.u64(),
            cr2: self.u64(),
            cr3: self.u64(),
            cr4: self.u64(),
            cr8: self.u64(),
            efer: self.u64(),
            apic_base: self.u64(),
            ..Default::default()
        };
        for word in &mut s.interrupt_bitmap {
            *word = self.u64();
        }
        s
    }
}

/// Reads a stream, checking everything. A page's content is lent straight from `input`'s
/// buffer when it holds the whole page, and copied into the reader's own page otherwise.
#[derive(Debug)]
pub struct StreamReader<R: BufRead> {
    input: R,
    /// Bytes read so far: where an error is.
    offset: u64,
    /// The config, once read.
    config: Option<StreamConfig>,
    page: Box<[u8; PAGE_SIZE as usize]>,
    /// Bytes of `input`'s buffer lent as the last page, consumed when the next record is read.
    lent: usize,
}

impl<R: BufRead> StreamReader<R> {
    /// A reader of `input`.
    pub fn new(input: R) -> StreamReader<R> {
        StreamReader {
            input,
            offset: 0,
            config: None,
            page: Box::new([0; PAGE_SIZE as usize]),
            lent: 0,
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), StreamError> {
        read_exact_at(&mut self.input, &mut self.offset, buf, what)
    }

    fn bytes_of(&mut self, len: usize, what: &str) -> Result<Vec<u8>, StreamError> {
        let mut buf = vec![0; len];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    /// Reads the header and the config, and checks them.
    pub fn header(&mut self) -> Result<StreamConfig, StreamError> {
        let head = self.bytes_of(12 + 16, "the header")?;
        let mut f = Fields(&head);
        let magic: [u8; 8] = f.take();
        if magic != MAGIC {
            return Err(StreamError::invalid(format!(
                "not a dirtyvm migration stream: it starts with {}",
                show_bytes(&magic)
            )));
        }
        let version = f.u32();
        if version != VERSION {
            return Err(StreamError::invalid(format!(
                "the stream is version {version}; this dirtyvm reads version {VERSION}"
            )));
        }
        let (memory, tsc_khz, vcpus) = (f.u64(), f.u32(), f.u32());
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(StreamError::invalid(format!(
                "the stream's configuration has {vcpus} vCPUs (1 to {MAX_VCPUS} are possible)"
            )));
        }
        if tsc_khz == 0 {
            return Err(StreamError::invalid(
                "the stream's configuration has a TSC of 0 kHz".into(),
            ));
        }
        let table = self.bytes_of(17 * vcpus as usize, "the vCPUs' workloads")?;
        let mut f = Fields(&table);
        let workloads = (0..vcpus)
            .map(|id| {
                let (kind, bytes, pace) = (f.u8(), f.u64(), f64::from_bits(f.u64()));
                let mibps = (pace != 0.0).then_some(pace);
                if mibps.is_some_and(|p| !(p.is_finite() && p >= MIN_PACE_MIBPS)) {
                    return Err(StreamError::invalid(format!(
                        "vCPU {id}'s workload has a pace of {pace} MiB/s"
                    )));
                }
                match (kind, mibps) {
                    (0, None) if bytes == 0 => Ok(Workload::Idle),
                    (1, _) => Ok(Workload::Write { bytes, mibps }),
                    (2, _) => Ok(Workload::RandomWrite { bytes, mibps }),
                    (3, None) => Ok(Workload::Read { bytes }),
                    _ => Err(StreamError::invalid(format!(
                        "vCPU {id}'s workload is of unknown kind {kind} (size {bytes}, pace \
                         {pace})"
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if workloads.iter().any(|w| {
            *w != Workload::Idle && (w.working_set() == 0 || w.working_set() % PAGE_SIZE != 0)
        }) {
            return Err(StreamError::invalid(
                "a workload's working set is not a positive whole number of pages".into(),
            ));
        }
        Layout::new(vcpus, memory, &workloads).map_err(|e| {
            StreamError::invalid(format!("the stream's configuration is impossible: {e}"))
        })?;
        let config = StreamConfig {
            memory,
            tsc_khz,
            workloads,
        };
        self.config = Some(config.clone());
        Ok(config)
    }

    /// The next record.
    ///
    /// # Panics
    /// If called before [`StreamReader::header`] succeeded.
    pub fn record(&mut self) -> Result<Record<'_>, StreamError> {
        let config = self.config.as_ref().expect("header read first");
        let (pages, vcpus) = (config.pages(), config.vcpus() as usize);
        let at = self.offset;
        self.input.consume(std::mem::take(&mut self.lent));
        let mut tag = [0u8];
        self.fill(&mut tag, "a record's tag")?;
        match tag[0] {
            TAG_PAGE | TAG_ZERO => {
                let mut index = [0u8; 8];
                self.fill(&mut index, "a page record")?;
                let page = u64::from_le_bytes(index);
                if page >= pages {
                    return Err(StreamError::invalid(format!(
                        "a page record at byte {at} names page {page}, beyond the guest's \
                         {pages} pages"
                    )));
                }
                if tag[0] == TAG_ZERO {
                    return Ok(Record::Zero { page });
                }
                let buffered = self.input.fill_buf().map_or(0, |b| b.len());
                if buffered >= PAGE_SIZE as usize {
                    self.offset += PAGE_SIZE;
                    self.lent = PAGE_SIZE as usize;
                    let buffer = self.input.fill_buf().expect("the buffer just filled");
                    return Ok(Record::Page {
                        page,
                        data: buffer[..PAGE_SIZE as usize].try_into().expect("a page"),
                    });
                }
                read_exact_at(
                    &mut self.input,
                    &mut self.offset,
                    &mut self.page[..],
                    "a page's content",
                )?;
                Ok(Record::Page {
                    page,
                    data: &self.page,
                })
            }
            TAG_END_OF_PASS => {
                let mut n = [0u8; 4];
                self.fill(&mut n, "an end-of-pass record")?;
                Ok(Record::EndOfPass {
                    iteration: u32::from_le_bytes(n),
                })
            }
            TAG_DEVICE => {
                let raw = self.bytes_of(vcpus * DEVICE_BYTES_PER_VCPU, "the device state")?;
                let mut f = Fields(&raw);
                let mut state = DeviceState {
                    vcpus: Vec::with_capacity(vcpus),
                    stats: Vec::with_capacity(vcpus),
                };
                for _ in 0..vcpus {
                    state.vcpus.push(VcpuState {
                        regs: f.regs(),
                        sregs: f.sregs(),
                        tsc: f.u64(),
                    });
                    state.stats.push(GuestStats {
                        pages_written: f.u64(),
                        pages_read: f.u64(),
                        passes: f.u64(),
                    });
                }
                Ok(Record::Device(state))
            }
            TAG_DIGEST => {
                let mut d = [0u8; 8];
                self.fill(&mut d, "the digest record")?;
                Ok(Record::Digest(u64::from_le_bytes(d)))
            }
            TAG_END => Ok(Record::End),
            other => Err(StreamError::invalid(format!(
                "unknown record tag {other:#04x} at byte {at}"
            ))),
        }
    }
}

/// The destination's hello: written on accepting a connection.
pub fn write_hello(out: &mut impl Write) -> io::Result<()> {
    let mut b = DESTINATION_MAGIC.to_vec();
    b.extend_from_slice(&VERSION.to_le_bytes());
    out.write_all(&b)?;
    out.flush()
}

/// Reads a destination's hello; the error says what the peer is not.
pub fn read_hello(input: &mut impl Read) -> Result<(), StreamError> {
    let mut b = [0u8; 12];
    input.read_exact(&mut b).map_err(|e| StreamError {
        message: match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the destination closed the connection without a word: it is not a dirtyvm \
                 migration destination, or it refused"
                    .into()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                "the destination did not say hello: it is not a dirtyvm migration destination"
                    .into()
            }
            _ => format!("reading the destination's hello: {e}"),
        },
        io: Some(e.kind()),
    })?;
    let mut f = Fields(&b);
    let magic: [u8; 8] = f.take();
    if magic != DESTINATION_MAGIC {
        return Err(StreamError::invalid(format!(
            "the destination is not a dirtyvm migration destination: it sent {}",
            show_bytes(&magic)
        )));
    }
    let version = f.u32();
    if version != VERSION {
        return Err(StreamError::invalid(format!(
            "the destination reads stream version {version}; this dirtyvm writes version \
             {VERSION}"
        )));
    }
    Ok(())
}

/// What the destination answers at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It runs the guest; its digest of the RAM it received.
    Running { digest: u64 },
    /// It refused, and why.
    Refused(String),
}

/// Writes the destination's verdict.
pub fn write_verdict(out: &mut impl Write, verdict: &Verdict) -> io::Result<()> {
    let mut b = Vec::new();
    match verdict {
        Verdict::Running { digest } => {
            b.push(b'K');
            b.extend_from_slice(&digest.to_le_bytes());
        }
        Verdict::Refused(why) => {
            let mut len = why.len().min(MAX_ERROR_LEN as usize);
            while !why.is_char_boundary(len) {
                len -= 1;
            }
            let why = &why.as_bytes()[..len];
            b.push(b'E');
            b.extend_from_slice(&(why.len() as u32).to_le_bytes());
            b.extend_from_slice(why);
        }
    }
    out.write_all(&b)?;
    out.flush()
}

/// Reads the destination's verdict.
pub fn read_verdict(input: &mut impl Read) -> Result<Verdict, StreamError> {
    let fail = |e: io::Error| StreamError {
        message: match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the destination closed the connection before saying whether it runs the guest"
                    .into()
            }
            _ => format!("reading the destination's answer: {e}"),
        },
        io: Some(e.kind()),
    };
    let mut tag = [0u8];
    input.read_exact(&mut tag).map_err(fail)?;
    match tag[0] {
        b'K' => {
            let mut d = [0u8; 8];
            input.read_exact(&mut d).map_err(fail)?;
            Ok(Verdict::Running {
                digest: u64::from_le_bytes(d),
            })
        }
        b'E' => {
            let mut n = [0u8; 4];
            input.read_exact(&mut n).map_err(fail)?;
            let n = u32::from_le_bytes(n);
            if n > MAX_ERROR_LEN {
                return Err(StreamError::invalid(format!(
                    "the destination's error is {n} bytes long (at most {MAX_ERROR_LEN})"
                )));
            }
            let mut why = vec![0; n as usize];
            input.read_exact(&mut why).map_err(fail)?;
            Ok(Verdict::Refused(String::from_utf8_lossy(&why).into_owned()))
        }
        other => Err(StreamError::invalid(format!(
            "the destination answered with {other:#04x}, not a dirtyvm verdict"
        ))),
    }
}

/// Bytes as text where printable, else escaped.
fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// Reads exactly `buf.len()` bytes of `what` at `offset` (advanced past them); the error says
/// where the stream ended or failed. A function of the two fields, so that a record's page is
/// read into the reader's own buffer without taking it out.
fn read_exact_at(
    input: &mut impl Read,
    offset: &mut u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), StreamError> {
    let at = *offset;
    input.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => StreamError {
            message: format!("the stream ends in the middle of {what} (at byte {at})"),
            io: Some(e.kind()),
        },
        kind => StreamError {
            message: format!("reading {what} at byte {at}: {e}"),
            io: Some(kind),
        },
    })?;
    *offset += buf.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::PAGE_WORDS;

    fn config() -> StreamConfig {
        StreamConfig {
            memory: 64 << 20,
            tsc_khz: 2_500_000,
            workloads: vec![
                "write:8M@64".parse().unwrap(),
                "read:8M".parse().unwrap(),
                Workload::Idle,
            ],
        }
    }

    fn state(vcpus: usize) -> DeviceState {
        let mut sregs = sys::kvm_sregs::default();
        sregs.cs.selector = 8;
        sregs.gdt.limit = 23;
        sregs.efer = 0x500;
        sregs.interrupt_bitmap[3] = 7;
        DeviceState {
            vcpus: (0..vcpus as u64)
                .map(|i| VcpuState {
                    regs: sys::kvm_regs {
                        rip: 0x80000 + i,
                        r15: u64::MAX - i,
                        ..Default::default()
                    },
                    sregs,
                    tsc: 1 << 40,
                })
                .collect(),
            stats: (0..vcpus as u64)
                .map(|i| GuestStats {
                    pages_written: i * 10,
                    pages_read: i * 20,
                    passes: i,
                })
                .collect(),
        }
    }

    fn write_all(config: &StreamConfig) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        w.header(config).unwrap();
        let mut page = [0u64; PAGE_WORDS];
        page[3] = 0xdead_beef;
        assert!(!w.page(7, |i| page[i]).unwrap());
        assert!(w.page(8, |_| 0).unwrap());
        w.end_of_pass(1).unwrap();
        w.device(&state(config.workloads.len())).unwrap();
        w.digest(0x1234).unwrap();
        w.end().unwrap();
        let bytes = w.bytes();
        let out = w.into_inner().unwrap();
        assert_eq!(bytes, out.len() as u64);
        out
    }

    #[test]
    fn a_stream_reads_back_as_written() {
        let config = config();
        let bytes = write_all(&config);
        let mut r = StreamReader::new(&bytes[..]);
        assert_eq!(r.header().unwrap(), config);
        match r.record().unwrap() {
            Record::Page { page: 7, data } => {
                assert_eq!(&data[24..32], &0xdead_beef_u64.to_le_bytes());
                assert_eq!(data.iter().filter(|&&b| b != 0).count(), 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.record().unwrap(), Record::Zero { page: 8 }));
        assert!(matches!(
            r.record().unwrap(),
            Record::EndOfPass { iteration: 1 }
        ));
        match r.record().unwrap() {
            Record::Device(d) => {
                let want = state(3);
                for (got, want) in d.vcpus.iter().zip(&want.vcpus) {
                    assert_eq!(got.regs, want.regs);
                    assert_eq!(got.sregs, want.sregs);
                    assert_eq!(got.tsc, want.tsc);
                }
                assert_eq!(d.stats, want.stats);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.record().unwrap(), Record::Digest(0x1234)));
        assert!(matches!(r.record().unwrap(), Record::End));
        assert_eq!(r.bytes(), bytes.len() as u64);
    }

    /// A page is lent from the input's buffer when the buffer holds all of it, copied when
    /// it straddles a refill: both give the page as written.
    #[test]
    fn pages_read_back_whether_lent_or_copied() {
        let config = config();
        let mut w = StreamWriter::new(Vec::new());
        w.header(&config).unwrap();
        for page in 0..8u64 {
            w.page(page, |i| (page << 32) | (i as u64 + 1)).unwrap();
        }
        w.end().unwrap();
        let bytes = w.into_inner().unwrap();
        for capacity in [5000, 9000, 64 << 10] {
            let mut r = StreamReader::new(io::BufReader::with_capacity(capacity, &bytes[..]));
            r.header().unwrap();
            for page in 0..8u64 {
                match r.record().unwrap() {
                    Record::Page { page: p, data } => {
                        assert_eq!(p, page);
                        for (i, word) in data.chunks_exact(8).enumerate() {
                            let want = (page << 32) | (i as u64 + 1);
                            assert_eq!(word, want.to_le_bytes(), "capacity {capacity}");
                        }
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(matches!(r.record().unwrap(), Record::End));
            assert_eq!(r.bytes(), bytes.len() as u64);
        }
    }

    #[test]
    fn zero_pages_cost_no_payload() {
        let mut w = StreamWriter::new(Vec::new());
        w.page(1, |_| 0).unwrap();
        assert_eq!(w.bytes(), 9);
        assert_eq!(w.into_inner().unwrap().len(), 9);
    }

    fn refused(bytes: &[u8]) -> String {
        let mut r = StreamReader::new(bytes);
        let result = r.header().and_then(|_| loop {
            if let Record::End = r.record()? {
                return Ok(());
            }
        });
        result.expect_err("a bad stream was accepted").to_string()
    }

    #[test]
    fn bad_streams_are_refused_with_what_was_wrong() {
        let good = write_all(&config());
        assert!(refused(b"GARBAGE!garbage garbage garbage").contains("not a dirtyvm"));
        let mut other_version = good.clone();
        other_version[8] = 9;
        assert!(refused(&other_version).contains("version 9"));
        // Every truncation says where it ended.
        for cut in [0, 5, 20, 40, 90, 100, 4200, good.len() - 1] {
            let text = refused(&good[..cut]);
            assert!(
                text.contains("ends in the middle of"),
                "cut at {cut}: {text}"
            );
        }
        // A page beyond the guest.
        let mut w = StreamWriter::new(Vec::new());
        w.header(&config()).unwrap();
        w.page(16384, |_| 1).unwrap();
        assert!(refused(&w.into_inner().unwrap())
            .contains("page 16384, beyond the guest's 16384 pages"));
        // An unknown tag.
        let mut w = StreamWriter::new(Vec::new());
        w.header(&config()).unwrap();
        w.put(&[0x42]).unwrap();
        assert!(refused(&w.into_inner().unwrap()).contains("unknown record tag 0x42"));
        // A config that cannot boot.
        let too_big = StreamConfig {
            memory: 4 << 20,
            ..config()
        };
        let mut w = StreamWriter::new(Vec::new());
        w.header(&too_big).unwrap();
        assert!(refused(&w.into_inner().unwrap()).contains("impossible"));
        let mut w = StreamWriter::new(Vec::new());
        w.header(&config()).unwrap();
        let mut out = w.into_inner().unwrap();
        out[24] = 0;
        assert!(refused(&out).contains("0 vCPUs"));
    }

    #[test]
    fn the_destination_answers() {
        let mut b = Vec::new();
        write_hello(&mut b).unwrap();
        read_hello(&mut &b[..]).unwrap();
        assert!(read_hello(&mut &b"HTTP/1.1 200 OK"[..])
            .unwrap_err()
            .to_string()
            .contains("not a dirtyvm migration destination"));
        for verdict in [
            Verdict::Running { digest: 99 },
            Verdict::Refused("the sizes differ".into()),
        ] {
            let mut b = Vec::new();
            write_verdict(&mut b, &verdict).unwrap();
            assert_eq!(read_verdict(&mut &b[..]).unwrap(), verdict);
        }
        let long = Verdict::Refused("x".repeat(10_000));
        let mut b = Vec::new();
        write_verdict(&mut b, &long).unwrap();
        assert!(matches!(read_verdict(&mut &b[..]), Ok(Verdict::Refused(s)) if s.len() == 4096));
        let mut huge = vec![b'E'];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_verdict(&mut &huge[..]).is_err());
    }
}
