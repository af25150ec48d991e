//! The BGP decoder on arbitrary bytes: framing, then decoding with and without 4-octet AS and
//! ADD-PATH.
//! Nothing may panic; whatever decodes must survive encode → decode.
#![no_main]
use appliance::bgp::wire::{decode, encode, frame_len, Context, Families};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let both = Families {
        ipv4: true,
        ipv6: true,
    };
    for (four, add_path) in [(false, false), (true, false), (true, true)] {
        let ap = if add_path { both } else { Families::NONE };
        let ctx = Context {
            four_octet_as: four,
            add_path_rx: ap,
            add_path_tx: ap,
        };
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
