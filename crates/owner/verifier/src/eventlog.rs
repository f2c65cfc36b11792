//! TDX event logs: the TCG crypto-agile log TDX firmware writes to the
//! ACPI CCEL table (CoCo's TDX evidence carries it as `cc_eventlog`),
//! parsed and replayed into RTMR values. A log is worth nothing until its
//! replay equals the RTMRs of a verified quote; then each event's digest
//! is as trustworthy as the quote.
//!
//! Format (TCG PC Client Platform Firmware Profile, "crypto agile"): a
//! first event in the SHA-1 layout whose data is the `Spec ID Event03`
//! header listing the digest algorithms and their sizes, then
//! `TCG_PCR_EVENT2` records: index, type, digests (algorithm id + digest,
//! per algorithm), event size, event data. The index is the CC measurement
//! register index (UEFI 2.10, 38.4.1): 0 = MRTD, 1..=4 = RTMR[0..3]. No
//! crate parses this log without pulling in a TPM stack, hence the code.

use sha2::{Digest, Sha384};

const EV_NO_ACTION: u32 = 0x3;
const TPM_ALG_SHA384: u16 = 0x000C;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
/// More algorithms than any firmware lists: a bound, not a format rule.
const MAX_ALGORITHMS: u32 = 16;

/// One event that extends an RTMR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// 0..=3.
    pub rtmr: usize,
    pub event_type: u32,
    pub sha384: [u8; 48],
    pub data: Vec<u8>,
}

/// What is wrong with a TDX event log, or with its replay.
#[derive(Debug, thiserror::Error)]
pub enum EventLogError {
    #[error("event log truncated in {what} at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("the event log does not start with a Spec ID event")]
    NoSpecId,
    #[error("the event log is not in the crypto-agile format (no Spec ID Event03)")]
    NotCryptoAgile,
    #[error("the Spec ID event lists {0} digest algorithms")]
    AlgorithmCount(u32),
    #[error("the event log has no SHA-384 digests (TDX RTMRs are SHA-384)")]
    NoSha384,
    #[error("the Spec ID event declares digest algorithm {0:#06x} twice")]
    DuplicateAlgorithm(u16),
    #[error("the Spec ID event declares SHA-384 digests of {0} bytes (they have 48)")]
    Sha384Size(usize),
    #[error("event at byte {at} has {digests} digests, the log declares {count} algorithms")]
    DigestCount { at: usize, digests: u32, count: u32 },
    #[error("event at byte {at} uses digest algorithm {alg:#06x} the log does not declare")]
    UndeclaredAlgorithm { at: usize, alg: u16 },
    #[error("event at byte {at} names measurement register {index} (TDX has MRTD and RTMR 0-3)")]
    Register { at: usize, index: u32 },
    #[error("event at byte {at} extends RTMR{rtmr} without a SHA-384 digest")]
    NoSha384Digest { at: usize, rtmr: usize },
    #[error("RTMR{rtmr} is {quoted} in the quote, but the event log replays to {replayed}")]
    Mismatch {
        rtmr: usize,
        quoted: String,
        replayed: String,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EventLogError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(EventLogError::Truncated { what, at: self.pos })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, EventLogError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, EventLogError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

/// The events of `log` that extend RTMRs, in order. Errors name the
/// malformed part; trailing 0xFF or zero bytes (the unused log area) end it.
pub fn parse(log: &[u8]) -> Result<Vec<Event>, EventLogError> {
    let mut r = Reader { buf: log, pos: 0 };
    let algorithms = spec_id_algorithms(&mut r)?;
    let mut events = Vec::new();
    loop {
        let rest = r.rest();
        if rest.len() < 8 || rest.iter().all(|&b| b == 0xFF) || rest.iter().all(|&b| b == 0) {
            break;
        }
        match next_event(&mut r, &algorithms)? {
            Next::End => break,
            Next::Skipped => {}
            Next::Event(e) => events.push(e),
        }
    }
    Ok(events)
}

/// The header event (SHA-1 layout) holding the Spec ID event: the digest
/// algorithms of the log and their sizes, SHA-384 among them.
fn spec_id_algorithms(r: &mut Reader<'_>) -> Result<Vec<(u16, usize)>, EventLogError> {
    r.take(4, "the header's index")?;
    if r.u32("the header's type")? != EV_NO_ACTION {
        return Err(EventLogError::NoSpecId);
    }
    r.take(20, "the header's digest")?;
    let size = r.u32("the header's size")? as usize;
    let mut spec = Reader {
        buf: r.take(size, "the Spec ID event")?,
        pos: 0,
    };
    if spec.take(16, "the Spec ID signature")? != SPEC_ID_SIGNATURE {
        return Err(EventLogError::NotCryptoAgile);
    }
    spec.take(8, "the Spec ID fields")?;
    let count = spec.u32("the algorithm count")?;
    if count == 0 || count > MAX_ALGORITHMS {
        return Err(EventLogError::AlgorithmCount(count));
    }
    let mut sizes = Vec::new();
    for _ in 0..count {
        let alg = spec.u16("an algorithm id")?;
        let size = spec.u16("a digest size")?;
        sizes.push((alg, usize::from(size)));
    }
    // One size per algorithm: a second entry would make events parse by
    // whichever the lookup finds first.
    for (i, (alg, size)) in sizes.iter().enumerate() {
        if sizes[..i].iter().any(|(a, _)| a == alg) {
            return Err(EventLogError::DuplicateAlgorithm(*alg));
        }
        if *alg == TPM_ALG_SHA384 && *size != 48 {
            return Err(EventLogError::Sha384Size(*size));
        }
    }
    if !sizes.contains(&(TPM_ALG_SHA384, 48)) {
        return Err(EventLogError::NoSha384);
    }
    Ok(sizes)
}

/// What the next record of the log is.
enum Next {
    /// The end marker.
    End,
    /// A record that extends no RTMR (EV_NO_ACTION, or MRTD's).
    Skipped,
    Event(Event),
}

fn next_event(r: &mut Reader<'_>, algorithms: &[(u16, usize)]) -> Result<Next, EventLogError> {
    let at = r.pos;
    let index = r.u32("an event's index")?;
    let event_type = r.u32("an event's type")?;
    if index == u32::MAX && event_type == u32::MAX {
        return Ok(Next::End);
    }
    let digests = r.u32("an event's digest count")?;
    // At most MAX_ALGORITHMS, so the cast is exact.
    let count = algorithms.len() as u32;
    if digests > count {
        return Err(EventLogError::DigestCount { at, digests, count });
    }
    let mut sha384 = None;
    for _ in 0..digests {
        let alg = r.u16("a digest's algorithm")?;
        let size = algorithms
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, s)| *s)
            .ok_or(EventLogError::UndeclaredAlgorithm { at, alg })?;
        let digest = r.take(size, "a digest")?;
        if alg == TPM_ALG_SHA384 {
            let mut d = [0u8; 48];
            d.copy_from_slice(digest);
            sha384 = Some(d);
        }
    }
    let size = r.u32("an event's size")? as usize;
    let data = r.take(size, "an event's data")?.to_vec();
    if event_type == EV_NO_ACTION {
        return Ok(Next::Skipped);
    }
    let rtmr = match index {
        // MRTD is built by the TDX module, not extended from the log.
        0 => return Ok(Next::Skipped),
        1..=4 => (index - 1) as usize,
        other => return Err(EventLogError::Register { at, index: other }),
    };
    let sha384 = sha384.ok_or(EventLogError::NoSha384Digest { at, rtmr })?;
    Ok(Next::Event(Event {
        rtmr,
        event_type,
        sha384,
        data,
    }))
}

/// RTMR[0..3] after extending zeros with `events` in order.
pub fn replay(events: &[Event]) -> [[u8; 48]; 4] {
    let mut rtmrs = [[0u8; 48]; 4];
    for e in events {
        let mut h = Sha384::new();
        h.update(rtmrs[e.rtmr]);
        h.update(e.sha384);
        rtmrs[e.rtmr].copy_from_slice(&h.finalize());
    }
    rtmrs
}

/// The log's replay equals `quoted` (the verified quote's RTMRs); the
/// error names the first RTMR that differs.
pub fn check(events: &[Event], quoted: [&[u8; 48]; 4]) -> Result<(), EventLogError> {
    for (i, (replayed, quoted)) in replay(events).iter().zip(quoted).enumerate() {
        if replayed != quoted {
            return Err(EventLogError::Mismatch {
                rtmr: i,
                quoted: hex::encode(quoted),
                replayed: hex::encode(replayed),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A crypto-agile log (SHA-256 and SHA-384 declared) of `events`
    /// (index, type, data), each digest the hash of its data, padded with
    /// 0xFF as the CCEL area is.
    pub(crate) fn build_log(events: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let mut spec = SPEC_ID_SIGNATURE.to_vec();
        spec.extend([0u8; 4]); // platform class
        spec.extend([0, 2, 0, 2]); // version 2.0, errata, uintn size
        spec.extend(2u32.to_le_bytes());
        spec.extend(0x000Bu16.to_le_bytes());
        spec.extend(32u16.to_le_bytes());
        spec.extend(TPM_ALG_SHA384.to_le_bytes());
        spec.extend(48u16.to_le_bytes());
        spec.push(0); // vendor info size
        let mut log = Vec::new();
        log.extend(0u32.to_le_bytes());
        log.extend(EV_NO_ACTION.to_le_bytes());
        log.extend([0u8; 20]);
        log.extend((spec.len() as u32).to_le_bytes());
        log.extend(spec);
        for (index, typ, data) in events {
            log.extend(index.to_le_bytes());
            log.extend(typ.to_le_bytes());
            log.extend(2u32.to_le_bytes());
            log.extend(0x000Bu16.to_le_bytes());
            log.extend(sha2::Sha256::digest(data));
            log.extend(TPM_ALG_SHA384.to_le_bytes());
            log.extend(Sha384::digest(data));
            log.extend((data.len() as u32).to_le_bytes());
            log.extend(*data);
        }
        log.extend([0xFFu8; 64]);
        log
    }

    fn extend(rtmr: [u8; 48], data: &[u8]) -> [u8; 48] {
        let mut h = Sha384::new();
        h.update(rtmr);
        h.update(Sha384::digest(data));
        h.finalize().into()
    }

    #[test]
    fn replay_extends_each_rtmr_in_order_and_skips_no_action_and_mrtd() {
        let log = build_log(&[
            (1, 0x8000_000A, b"td hob"),
            (2, 0x8000_0001, b"kernel"),
            (1, EV_NO_ACTION, b"ignored"),
            (0, 0x1, b"mrtd"),
            (2, 0xD, b"cmdline"),
            (4, 0xD, b"runtime"),
        ]);
        let events = parse(&log).expect("parse");
        assert_eq!(events.len(), 4);
        assert_eq!(events[1].data, b"kernel");
        let r = replay(&events);
        assert_eq!(r[0], extend([0; 48], b"td hob"));
        assert_eq!(r[1], extend(extend([0; 48], b"kernel"), b"cmdline"));
        assert_eq!(r[2], [0; 48]);
        assert_eq!(r[3], extend([0; 48], b"runtime"));
        assert!(check(&events, [&r[0], &r[1], &r[2], &r[3]]).is_ok());
        // Order matters.
        let swapped = build_log(&[(2, 0xD, b"cmdline"), (2, 0x8000_0001, b"kernel")]);
        let s = replay(&parse(&swapped).expect("parse"));
        assert_ne!(s[1], r[1]);
    }

    #[test]
    fn a_changed_event_no_longer_matches_the_quote() {
        let good = parse(&build_log(&[(2, 0xD, b"console=hvc0")])).expect("parse");
        let quoted = replay(&good);
        let evil = parse(&build_log(&[(2, 0xD, b"console=hvc0 init=/bin/sh")])).expect("parse");
        let err = check(&evil, [&quoted[0], &quoted[1], &quoted[2], &quoted[3]]).unwrap_err();
        assert!(err.to_string().starts_with("RTMR1 is "), "{err}");
        // Dropping the event is as visible.
        let err = check(&[], [&quoted[0], &quoted[1], &quoted[2], &quoted[3]]).unwrap_err();
        assert!(err.to_string().starts_with("RTMR1 is "), "{err}");
    }

    #[test]
    fn malformed_logs_are_refused_with_the_reason() {
        let log = build_log(&[(1, 0xD, b"x")]);
        let cut = &log[..log.len() - 64 - 1];
        assert!(parse(cut).unwrap_err().to_string().contains("truncated"));
        assert!(parse(&log[..10])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut not_agile = log.clone();
        not_agile[32] ^= 1; // inside the Spec ID signature
        assert!(parse(&not_agile)
            .unwrap_err()
            .to_string()
            .contains("crypto-agile"));
        let bad_index = build_log(&[(7, 0xD, b"x")]);
        assert!(parse(&bad_index)
            .unwrap_err()
            .to_string()
            .contains("register 7"));
        // An algorithm id the header does not declare.
        let mut unknown = build_log(&[(1, 0xD, b"x")]);
        let at = unknown.len() - 64 - 1 - 4 - 48 - 2 - 32 - 2;
        unknown[at] = 0x12; // SM3
        assert!(parse(&unknown)
            .unwrap_err()
            .to_string()
            .contains("does not declare"));
        assert!(parse(&[]).is_err());
    }

    /// A Spec ID event declaring SHA-384 twice (or with a size other than
    /// 48) is refused: events would parse by whichever entry the lookup
    /// finds, and a 32-byte "SHA-384" digest does not fit a register.
    #[test]
    fn each_algorithm_is_declared_once_with_its_size() {
        let log = build_log(&[(1, 0xD, b"x")]);
        // The header event: index, type, SHA-1 digest, size (32 bytes); then
        // the Spec ID signature, class, version, count (28 bytes).
        let first_alg = 32 + 28;
        let mut twice = log.clone();
        twice[first_alg..first_alg + 2].copy_from_slice(&TPM_ALG_SHA384.to_le_bytes());
        twice[first_alg + 2..first_alg + 4].copy_from_slice(&48u16.to_le_bytes());
        let err = parse(&twice).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        let mut short = log.clone();
        let second_size = first_alg + 6;
        short[second_size..second_size + 2].copy_from_slice(&32u16.to_le_bytes());
        let err = parse(&short).unwrap_err().to_string();
        assert!(err.contains("SHA-384 digests of 32 bytes"), "{err}");
        parse(&log).unwrap();
    }
}
