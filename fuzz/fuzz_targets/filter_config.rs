#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshiam_fuzz::filter::config(data));
