//! Clone pins. Half the inputs get a valid checksum appended so the fuzzer
//! reaches the field decoders behind the CRC check.
#![no_main]
use hlfs_format::Pin;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Pin::decode(data);
    let mut sealed = b"HLPN".to_vec();
    sealed.extend_from_slice(data);
    let crc = crc32c::crc32c(&sealed);
    sealed.extend_from_slice(&crc.to_le_bytes());
    if let Ok(p) = Pin::decode(&sealed) {
        assert_eq!(Pin::decode(&p.encode()).expect("re-decode"), p);
    }
});
