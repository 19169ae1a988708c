//! NBD message decoders: option payloads and request headers.
#![no_main]
use hlfs_nbd::proto::{decode_info_request, decode_meta_context_request, decode_option_header, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_info_request(data);
    let _ = decode_meta_context_request(data);
    if let Ok(head) = <&[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        let _ = decode_option_header(head);
    }
    if let Ok(head) = <&[u8; 28]>::try_from(data.get(..28).unwrap_or(&[])) {
        let _ = decode_request(head);
    }
});
