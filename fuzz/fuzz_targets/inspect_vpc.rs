//! Fuzz target: the vpc (VHD) inspector (the cookie stamped at offset 0, the dynamic disk's
//! footer copy, unless the input already ends with a footer: then the fixed-disk path) never
//! panics, never reads past its budget, and accepts only self-consistent images.
#![no_main]

mod sparse;

use libfuzzer_sys::fuzz_target;
use libvirt_volume_provisioner::image::inspect::ReadAt;

fuzz_target!(|data: &[u8]| {
    if let Some(mut image) = sparse::Sparse::decode(data) {
        let tail = image.read_at(image.size.saturating_sub(512), 8);
        if tail.ok().as_deref() != Some(b"conectix".as_slice()) {
            image.stamp(0, b"conectix");
        }
        sparse::check(&image);
    }
});
