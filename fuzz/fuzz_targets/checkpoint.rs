//! Checkpoint payloads: decode, and round-trip what decodes.
#![no_main]
use hlfs_format::Checkpoint;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cp) = Checkpoint::decode(data) {
        assert_eq!(Checkpoint::decode(&cp.encode()).expect("re-decode"), cp);
    }
});
