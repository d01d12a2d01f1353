//! The meshiam proxy-wasm filter (under construction).
