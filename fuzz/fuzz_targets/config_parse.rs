//! The site-config loader on arbitrary text: errors are reports, never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(report) = appliance::model::config::parse("fuzz.kdl", text) {
            let _ = report.render();
        }
    }
});
