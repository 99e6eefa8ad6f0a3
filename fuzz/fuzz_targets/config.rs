//! The configuration loader on arbitrary YAML: decoding, validation and plugin building
//! either succeed or return an error naming the problem; nothing panics.
#![no_main]

use endpoint_picker::config::EndpointPickerConfig;
use endpoint_picker::plugins::Defaults;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = EndpointPickerConfig::from_text(text, "fuzz") else {
        return;
    };
    if let Err(e) = config.build(&Defaults::builtin(), Some(1)) {
        assert!(!e.to_string().is_empty());
    }
});
