//! The fuzz targets' work (`fuzz/harness.rs`) under a short proptest, and every seed and every
//! input that once crashed a target (`fuzz/corpus/`, `fuzz/regressions/`) replayed. The long
//! runs are cargo-fuzz's (README, "Fuzzing").

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

use proptest::prelude::*;

/// Every file under `fuzz/<kind>/<target>/`.
fn inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect()
}

fn replay(target: &str, run: fn(&[u8])) {
    let seeds = inputs("corpus", target);
    assert!(!seeds.is_empty(), "fuzz/corpus/{target} has seeds");
    for input in seeds.iter().chain(&inputs("regressions", target)) {
        run(input);
    }
}

#[test]
fn the_corpus_and_every_former_crash_run_clean() {
    replay("event", harness::event);
    replay("templates", harness::templates);
    replay("addresses", harness::addresses);
    replay("retry_after", harness::retry_after);
}

/// Bytes near valid input: a seed with a span replaced by arbitrary bytes.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = inputs("corpus", target);
    (
        0..seeds.len(),
        any::<prop::sample::Index>(),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(move |(seed, at, bytes)| {
            let mut input = seeds[seed].clone();
            let at = at.index(input.len() + 1);
            let end = (at + bytes.len()).min(input.len());
            input.splice(at..end, bytes);
            input
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn events_never_panic_the_decoder(input in prop_oneof![mutated("event"), prop::collection::vec(any::<u8>(), 0..256)]) {
        harness::event(&input);
    }

    #[test]
    fn hostile_templates_and_contexts_never_panic_rendering(input in prop_oneof![mutated("templates"), prop::collection::vec(any::<u8>(), 0..256)]) {
        harness::templates(&input);
    }

    #[test]
    fn addresses_parse_or_refuse_and_mask(input in prop_oneof![mutated("addresses"), "[ -~]{0,64}".prop_map(String::into_bytes)]) {
        harness::addresses(&input);
    }

    #[test]
    fn retry_after_never_overflows(input in prop_oneof![mutated("retry_after"), "[0-9]{0,30}".prop_map(String::into_bytes), "[ -~]{0,40}".prop_map(String::into_bytes)]) {
        harness::retry_after(&input);
    }
}
