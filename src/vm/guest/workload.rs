//! Workload specs (`write:64M@100`, `random-write:32M`, `read:64M`, `idle`) and sizes.

use std::fmt;
use std::str::FromStr;

use crate::units::PAGE_SIZE;

/// The slowest pace a writer takes, MiB/s (2.56 pages a second): slower paces would need
/// TSC deadlines so far apart that the guest's deadline arithmetic could wrap.
pub const MIN_PACE_MIBPS: f64 = 0.01;

/// What a vCPU's built-in guest program does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Workload {
    /// Writes one byte per page, in page order, over `bytes`; paced to `mibps` if given.
    Write { bytes: u64, mibps: Option<f64> },
    /// Writes one byte per page, in a pseudo-random page order, over `bytes`.
    RandomWrite { bytes: u64, mibps: Option<f64> },
    /// Reads one word per page, in page order, over `bytes`.
    Read { bytes: u64 },
    /// Halts.
    Idle,
}

impl Workload {
    /// Bytes of guest memory this workload works on (0 for idle).
    pub fn working_set(&self) -> u64 {
        match *self {
            Workload::Write { bytes, .. }
            | Workload::RandomWrite { bytes, .. }
            | Workload::Read { bytes } => bytes,
            Workload::Idle => 0,
        }
    }

    /// Pages of guest memory this workload works on.
    pub fn pages(&self) -> u64 {
        self.working_set() / PAGE_SIZE
    }

    /// The requested pace in MiB/s, if any.
    pub fn pace_mibps(&self) -> Option<f64> {
        match *self {
            Workload::Write { mibps, .. } | Workload::RandomWrite { mibps, .. } => mibps,
            _ => None,
        }
    }

    /// Whether this workload dirties guest memory.
    pub fn writes(&self) -> bool {
        matches!(self, Workload::Write { .. } | Workload::RandomWrite { .. })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, bytes, pace) = match *self {
            Workload::Write { bytes, mibps } => ("write", bytes, mibps),
            Workload::RandomWrite { bytes, mibps } => ("random-write", bytes, mibps),
            Workload::Read { bytes } => ("read", bytes, None),
            Workload::Idle => return f.write_str("idle"),
        };
        write!(f, "{kind}:{}", Size(bytes))?;
        if let Some(mibps) = pace {
            write!(f, "@{mibps}")?;
        }
        Ok(())
    }
}

/// Why a workload spec or size did not parse. The message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

impl FromStr for Workload {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Workload, SpecError> {
        const KINDS: &str = "write:SIZE[@MIBPS], random-write:SIZE[@MIBPS], read:SIZE or idle";
        if spec == "idle" {
            return Ok(Workload::Idle);
        }
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| SpecError(format!("workload '{spec}' is not one of {KINDS}")))?;
        let (size, pace) = match rest.split_once('@') {
            Some((size, pace)) => (size, Some(pace)),
            None => (rest, None),
        };
        let bytes =
            parse_working_set(size).map_err(|e| SpecError(format!("workload '{spec}': {e}")))?;
        let mibps = pace
            .map(|p| match p.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= MIN_PACE_MIBPS => Ok(v),
                Ok(v) if v.is_finite() && v > 0.0 => Err(SpecError(format!(
                    "workload '{spec}': pace '{p}' is below the slowest pace a writer keeps, \
                     {MIN_PACE_MIBPS} MiB/s"
                ))),
                _ => Err(SpecError(format!(
                    "workload '{spec}': pace '{p}' is not a positive number of MiB/s"
                ))),
            })
            .transpose()?;
        match (kind, mibps) {
            ("write", _) => Ok(Workload::Write { bytes, mibps }),
            ("random-write", _) => Ok(Workload::RandomWrite { bytes, mibps }),
            ("read", None) => Ok(Workload::Read { bytes }),
            ("read", Some(_)) => Err(SpecError(format!(
                "workload '{spec}': read takes no pace (only writers are paced)"
            ))),
            ("idle", _) => Err(SpecError(format!("workload '{spec}': idle takes no size"))),
            (other, _) => Err(SpecError(format!(
                "unknown workload kind '{other}' in '{spec}'; expected {KINDS}"
            ))),
        }
    }
}

/// Parses a working-set size: a positive whole number of pages, as [`parse_size`] reads it.
pub fn parse_working_set(text: &str) -> Result<u64, SpecError> {
    let bytes = parse_size(text)?;
    if bytes == 0 || !bytes.is_multiple_of(PAGE_SIZE) {
        return Err(SpecError(format!(
            "working set '{text}' must be a positive multiple of 4K (one page)"
        )));
    }
    Ok(bytes)
}

/// Parses a size: bytes with an optional binary `K`, `M` or `G` suffix (`64M` = 64 MiB).
pub fn parse_size(text: &str) -> Result<u64, SpecError> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let bad = || {
        SpecError(format!(
            "size '{text}' is not a number of bytes with an optional K, M or G suffix (e.g. 256M)"
        ))
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| SpecError(format!("size '{text}' is too large")))
}

/// A byte count shown with the largest binary suffix that divides it.
#[derive(Debug, Clone, Copy)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
            if b != 0 && b.is_multiple_of(1 << shift) {
                return write!(f, "{}{suffix}", b >> shift);
            }
        }
        write!(f, "{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        for bad in ["", "M", "12Q", "-1M", "1.5G", " 1M"] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
        assert!(parse_size("99999999999999G")
            .unwrap_err()
            .0
            .contains("too large"));
    }

    #[test]
    fn specs_parse() {
        assert_eq!(
            "write:64M@100".parse(),
            Ok(Workload::Write {
                bytes: 64 << 20,
                mibps: Some(100.0)
            })
        );
        assert_eq!(
            "random-write:8M".parse(),
            Ok(Workload::RandomWrite {
                bytes: 8 << 20,
                mibps: None
            })
        );
        assert_eq!("read:4K".parse(), Ok(Workload::Read { bytes: 4096 }));
        assert_eq!("idle".parse(), Ok(Workload::Idle));
        assert_eq!(
            "write:64M@0.5".parse::<Workload>().unwrap().to_string(),
            "write:64M@0.5"
        );
    }

    #[test]
    fn bad_specs_name_the_bad_part() {
        let cases = [
            ("scribble:1M", "unknown workload kind 'scribble'"),
            ("write", "is not one of"),
            ("write:12Q", "size '12Q'"),
            ("write:1000", "multiple of 4K"),
            ("write:0", "multiple of 4K"),
            ("write:1M@fast", "pace 'fast'"),
            ("write:1M@-3", "pace '-3'"),
            ("write:64M@1e-13", "below the slowest pace"),
            ("random-write:64M@0.009", "below the slowest pace"),
            ("read:1M@5", "read takes no pace"),
            ("idle:1M", "idle takes no size"),
        ];
        for (spec, expected) in cases {
            let err = spec.parse::<Workload>().unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }
}
