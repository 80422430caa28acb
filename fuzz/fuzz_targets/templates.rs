#![no_main]
//! Fuzz target: see `fuzz/harness.rs`.
//!
//! mrml's HTML tokenizer (htmlparser 0.2) panics on some malformed markup; lifecycle catches
//! that panic around MJML rendering (`render::mjml_to_html`, with a regression test in
//! `fuzz/regressions/templates/`). libFuzzer's panic hook aborts on every panic, caught or not,
//! so this target lets that one known panic through to the catch and keeps fuzzing the rest.

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(
    init: {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_htmlparser = info
                .location()
                .is_some_and(|l| l.file().contains("/htmlparser-"));
            if !in_htmlparser {
                abort(info);
            }
        }));
    },
    |data: &[u8]| harness::templates(data)
);
