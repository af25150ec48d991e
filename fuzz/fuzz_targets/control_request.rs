//! The control socket's request decoder on any line a local user can send: no panic, and what
//! it accepts re-encodes to a request that decodes the same.
#![no_main]
use appliance::daemon::control;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > control::LINE_MAX {
        return;
    }
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(r) = control::parse_request(line) {
            let again = serde_json::to_string(&r).unwrap();
            assert_eq!(control::parse_request(&again).unwrap(), r);
        }
    }
});
