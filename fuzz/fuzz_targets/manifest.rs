//! Manifests. Half the inputs get a valid checksum appended so the fuzzer
//! reaches the field decoders behind the CRC check.
#![no_main]
use hlfs_format::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Manifest::decode(data);
    let mut sealed = b"HLMF".to_vec();
    sealed.extend_from_slice(data);
    let crc = crc32c::crc32c(&sealed);
    sealed.extend_from_slice(&crc.to_le_bytes());
    if let Ok(m) = Manifest::decode(&sealed) {
        assert_eq!(Manifest::decode(&m.encode()).expect("re-decode"), m);
    }
});
