//! The BGP decoder on arbitrary bytes: framing, then decoding with and without 4-octet AS and
//! ADD-PATH.
//! Nothing may panic; whatever decodes must survive encode → decode.
#![no_main]
use appliance::bgp::wire::{decode, encode, frame_len, Context};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for ctx in [
        Context::PLAIN,
        Context {
            four_octet_as: true,
            ..Context::PLAIN
        },
        Context::ALL,
    ] {
        if let Ok(Some(len)) = frame_len(data) {
            if len <= data.len() {
                if let Ok(m) = decode(&data[..len], ctx) {
                    let again = encode(&m, ctx);
                    if again.len() <= 4096 {
                        let _ = decode(&again, ctx).expect("what we encode, we decode");
                    }
                }
            }
        }
        let _ = decode(data, ctx);
    }
});
