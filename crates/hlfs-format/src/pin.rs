//! Pins (format v4): a small blob in a parent's store for each clone of one
//! of its snapshots, so that the parent, wherever the clone lives, refuses
//! to delete what the clone reads.

use crate::manifest::{get_str_up_to, put_address};
use crate::wire::Reader;
use crate::{FormatError, Result, FORMAT_CLONES, MAX_ADDRESS_LEN, MAX_NAME_LEN};

pub const PIN_MAGIC: [u8; 4] = *b"HLPN";
/// Pins are the blobs whose names start so, one per clone.
pub const PINS_PREFIX: &str = "clones/";

/// One clone of one snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    /// The clone's volume id: the pin's name.
    pub clone: [u8; 16],
    /// Where the clone is (an absolute path or a URI).
    pub clone_address: String,
    pub snapshot: String,
    pub snapshot_lsn: u64,
    pub created_ms: u64,
}

/// Name of the pin of clone `clone`.
pub fn pin_name(clone: &[u8; 16]) -> String {
    let hex: String = clone.iter().map(|b| format!("{b:02x}")).collect();
    format!("{PINS_PREFIX}{hex}")
}

/// The clone id in a pin's name.
pub fn parse_pin_name(name: &str) -> Option<[u8; 16]> {
    let hex = name.strip_prefix(PINS_PREFIX)?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

impl Pin {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.clone_address.len() + self.snapshot.len());
        out.extend_from_slice(&PIN_MAGIC);
        out.extend_from_slice(&FORMAT_CLONES.to_le_bytes());
        out.extend_from_slice(&self.clone);
        put_address(&mut out, &self.clone_address);
        put_address(&mut out, &self.snapshot);
        out.extend_from_slice(&self.snapshot_lsn.to_le_bytes());
        out.extend_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Pin> {
        let body = crate::sealed_body(bytes, &PIN_MAGIC, 10)?;
        let mut r = Reader::new(body);
        r.bytes(4)?;
        let version = r.u16()?;
        if version != FORMAT_CLONES {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let clone = r.uuid()?;
        let clone_address = get_str_up_to(&mut r, MAX_ADDRESS_LEN)?;
        let snapshot = get_str_up_to(&mut r, MAX_NAME_LEN)?;
        let snapshot_lsn = r.u64()?;
        let created_ms = r.u64()?;
        r.finish()?;
        if clone_address.is_empty() || snapshot.is_empty() {
            return Err(FormatError::Invalid("pin"));
        }
        Ok(Pin {
            clone,
            clone_address,
            snapshot,
            snapshot_lsn,
            created_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Pin {
        Pin {
            clone: core::array::from_fn(|i| i as u8 * 17),
            clone_address: "/var/lib/hlfs/vm-7".into(),
            snapshot: "golden".into(),
            snapshot_lsn: 4242,
            created_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip_and_every_flip_and_cut_detected() {
        let pin = sample();
        let bytes = pin.encode();
        assert_eq!(Pin::decode(&bytes).unwrap(), pin);
        for pos in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[pos] ^= 0x10;
            assert!(Pin::decode(&bad).is_err(), "flip at {pos} not detected");
        }
        for len in 0..bytes.len() {
            assert!(Pin::decode(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn names_carry_the_clone_id() {
        let id = sample().clone;
        let name = pin_name(&id);
        assert_eq!(name, "clones/00112233445566778899aabbccddeeff");
        assert_eq!(parse_pin_name(&name), Some(id));
        assert_eq!(parse_pin_name("clones/0011"), None);
        assert_eq!(
            parse_pin_name("clones/zz112233445566778899aabbccddeeff"),
            None
        );
        assert_eq!(parse_pin_name("segments/0000000001"), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Pin::decode(&bytes);
        }
    }
}
