//! Fuzz target: the image inspector must never panic, and whatever it accepts must be
//! self-consistent (a qcow2 verdict only for data that starts with the qcow2 magic; a raw
//! verdict reports the file size; any verdict a bounded, non-zero virtual size).
#![no_main]

use libfuzzer_sys::fuzz_target;
use libvirt_volume_provisioner::image::ImageType;
use libvirt_volume_provisioner::image::inspect::{QCOW2_MAGIC, inspect_bytes};

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes pick the claimed file length (shorter or longer than the data).
    let (len, head) = if data.len() >= 8 {
        let claimed = u64::from_le_bytes(data[..8].try_into().unwrap());
        (claimed % (1 << 40), &data[8..])
    } else {
        (data.len() as u64, data)
    };
    for file_len in [head.len() as u64, len] {
        if let Ok(verdict) = inspect_bytes(head, file_len) {
            assert!(verdict.virtual_size > 0);
            match verdict.format {
                ImageType::Qcow2 => assert!(head.starts_with(&QCOW2_MAGIC)),
                ImageType::Raw => {
                    assert!(!head.starts_with(&QCOW2_MAGIC));
                    assert_eq!(verdict.virtual_size, file_len);
                }
                _ => assert!(!head.starts_with(&QCOW2_MAGIC)),
            }
        }
    }
});
