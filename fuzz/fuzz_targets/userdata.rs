//! Everything a metadata service, config drive or kernel command line hands PID 1: the
//! user-data decoder (size limit, gzip with its bomb guard, UTF-8), validation of the site file
//! with its `appliance` block, the rendering of any errors (bounded), and the command-line
//! parser. No panic, and a report's rendering stays bounded.
#![no_main]
use appliance::image::userdata;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = userdata::decode(data) {
        match userdata::validate("user-data", &text, &userdata::Who::named(Some("c1"))) {
            Ok(a) => assert!(!a.host.is_empty()),
            Err(report) => {
                let r = report.render();
                assert!(r.len() < 64 * 1024, "{} bytes of diagnostics", r.len());
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = userdata::Cmdline::parse(s);
    }
});
