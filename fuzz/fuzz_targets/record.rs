//! Log records: header decoding and verification must reject garbage with
//! an error, never panic.
#![no_main]
use hlfs_format::{decode_header, verify_record, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = decode_header(data) {
        let payload = data.get(HEADER_LEN..).unwrap_or(&[]);
        let payload = &payload[..payload.len().min(h.payload_len as usize)];
        let _ = verify_record(&h, data, payload, &h.volume);
    }
});
