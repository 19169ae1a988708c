//! Control socket frames: requests (what the owner decodes) and replies
//! (what the CLI decodes).
#![no_main]
use hlfs_device::control::{decode_reply, decode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_request(data);
    let _ = decode_reply(data);
});
