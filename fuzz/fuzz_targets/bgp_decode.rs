//! The BGP decoder on arbitrary bytes: framing, then decoding with and without 4-octet AS and
//! ADD-PATH.
//! Nothing may panic; whatever decodes must survive encode → decode, and each path it carries
//! either fits in 4096 bytes as a reflector would pass it on or is refused on arrival.
#![no_main]
use appliance::bgp::rib::{reflected_len, too_long_to_pass_on};
use appliance::bgp::wire::{decode, encode, frame_len, Context, Message, MAX_LEN};
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
                    if again.len() <= MAX_LEN {
                        let _ = decode(&again, ctx).expect("what we encode, we decode");
                    } else {
                        // Only an UPDATE grows (AS4_PATH beside AS_PATH, say); we never send
                        // one whole, but each path of it alone, reflected.
                        assert!(matches!(m, Message::Update(_)), "{m:?} grew past 4096");
                    }
                    if let Message::Update(u) = &m {
                        for (n, a) in u.announced.iter().filter_map(|n| Some((n, u.attributes.as_ref()?))) {
                            // What a reflector would send for the path fits, or the path is
                            // refused on arrival; the cheap bound never lets a long one by.
                            let id = "10.10.0.2".parse().unwrap();
                            let long = reflected_len(&n.prefix, a, id) > MAX_LEN;
                            assert_eq!(long, too_long_to_pass_on(&n.prefix, a, id).is_some());
                        }
                    }
                }
            }
        }
        let _ = decode(data, ctx);
    }
});
