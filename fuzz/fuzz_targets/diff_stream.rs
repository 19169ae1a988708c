//! RBD diff streams (`hlfs import-diff`), v1 and v2, and the header of an
//! image exported in RBD's format 2: any bytes, fed in pieces of any
//! size, are decoded or refused with an error, never a panic; data never
//! lands past the size the stream declared, and a header never claims
//! more bytes than it was given.
#![no_main]
use hlfs_format::rbd_diff::{DiffDecoder, DiffEvent, ImageHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    if let Ok(Some((len, _))) = ImageHeader::parse(stream) {
        assert!(len <= stream.len());
    }
    let mut d = DiffDecoder::new();
    let mut size = None;
    for chunk in stream.chunks(piece as usize + 1) {
        let mut at = 0;
        loop {
            match d.next(&chunk[at..]) {
                Err(_) => return,
                Ok((used, event)) => {
                    at += used;
                    match event {
                        None => break,
                        Some(DiffEvent::Size(s)) => size = Some(s),
                        Some(DiffEvent::Data { offset, bytes }) => {
                            assert!(offset + bytes.len() as u64 <= size.unwrap());
                        }
                        Some(DiffEvent::Zero { offset, len }) => {
                            assert!(offset + len <= size.unwrap());
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }
    let _ = d.finish();
});
