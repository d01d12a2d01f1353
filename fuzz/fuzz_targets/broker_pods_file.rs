#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshiam_fuzz::broker::pods_file(data));
