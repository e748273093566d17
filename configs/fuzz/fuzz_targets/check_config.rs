//! Feeds arbitrary bytes to the machine-config parser and validator in every mode.
//!
//! Properties: checking never panics; a config is returned exactly when no diagnostic is
//! an error; every diagnostic has a location; a returned config serializes to TOML that
//! checks clean and parses back to the same config.

#![no_main]

use keelson_configs::{Mode, check_bytes, check_str};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for mode in [Mode::Metal, Mode::Cloud, Mode::Container] {
        let checked = check_bytes(data, "fuzz.toml", mode);
        let has_error = checked.diagnostics.iter().any(|d| d.is_error());
        assert_eq!(checked.is_valid(), !has_error);
        assert!(checked.diagnostics.iter().all(|d| d.location.is_some()));
        let Some(config) = checked.config else {
            continue;
        };
        let Ok(text) = config.to_toml_string() else {
            panic!("a valid config must serialize");
        };
        let again = check_str(&text, "fuzz.toml", mode);
        assert!(again.is_valid(), "{text}\n{:?}", again.diagnostics);
        // NaN never equals itself; such a float can only sit in the kubelet's extra config.
        if !text.contains("nan") {
            assert_eq!(again.config.as_ref(), Some(&config), "{text}");
        }
    }
});
