//! The DHCP client's decoder on any reply a hostile server can send: no panic, and what it
//! accepts is well-formed (prefix lengths of at most 32 for the address and every route).
#![no_main]
use appliance::image::dhcp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let xid = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    if let Some((_, lease)) = dhcp::decode(&data[4..], xid) {
        assert!(lease.prefix_len <= 32);
        for (_, len, _) in &lease.classless_routes {
            assert!(*len <= 32);
        }
    }
});
