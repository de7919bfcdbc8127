//! Fuzz target: the vhdx inspector (the magic stamped at offset 0, so every input reaches
//! it) never panics, never reads past its budget, and accepts only self-consistent images.
#![no_main]

mod sparse;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(mut image) = sparse::Sparse::decode(data) {
        image.stamp(0, b"vhdxfile");
        sparse::check(&image);
    }
});
