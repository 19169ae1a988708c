//! Map pages: decode, and anything that decodes must re-encode to an
//! equivalent page.
#![no_main]
use hlfs_format::MapPage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(page) = MapPage::decode(data) {
        assert_eq!(MapPage::decode(&page.encode()).expect("re-decode"), page);
    }
});
