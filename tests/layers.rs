//! The crate's layers, checked on its sources: every top-level module is in one layer, every
//! `crate::` path a module names points to its own layer or one below, and no modules import
//! one another in a circle. `docs/architecture.md` draws the same layers.
//!
//! The check reads the sources as text (comments and string literals removed) rather than
//! asking a tool: `cargo modules` builds rust-analyzer, longer than the whole suite on two
//! cores. It sees every `crate::a::…` and `crate::{a, b::…}` path, in `use` lines and in code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may import its own layer and the ones before it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary: domain values and what every part uses",
        &["domain", "mask", "shutdown", "backoff", "metrics"],
    ),
    (
        "settings, events and the programme's rules",
        &["clock", "event", "program", "config"],
    ),
    ("connections", &["db", "amqp"]),
    ("pure decisions", &["render", "triggers"]),
    (
        "stores, each the owner of its tables, and publishing",
        &[
            "ledger",
            "coupons",
            "outbox",
            "template_store",
            "users",
            "suppress",
            "publish",
            "notifications",
        ],
    ),
    ("the shared handle", &["app"]),
    (
        "roles and what ops read",
        &[
            "ingest",
            "dispatch",
            "scheduler",
            "dead_letters",
            "queues",
            "deliveries",
            "report",
            "notifier",
        ],
    ),
    ("the process", &["worker", "http", "bench"]),
    ("the command line", &["cli"]),
    ("what the tests may use", &["testkit"]),
];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text with comments, string literals and character literals blanked out, so that only
/// code is left (a lifetime's `'a` is kept as code).
fn code_of(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i..].starts_with(b"/*") {
                        depth += 1;
                        i += 2;
                    } else if b[i..].starts_with(b"*/") {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'r' if b.get(i + 1).is_some_and(|&c| c == b'"' || c == b'#')
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let close: Vec<u8> = std::iter::once(b'"')
                    .chain(std::iter::repeat_n(b'#', hashes))
                    .collect();
                i = open + 1;
                while i < b.len() && !b[i..].starts_with(&close) {
                    i += 1;
                }
                i += close.len();
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' if b.get(i + 1) == Some(&b'\\') => {
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
            }
            b'\'' if b.get(i + 2) == Some(&b'\'') => i += 3,
            _ => {
                // Whole characters, so that the text stays UTF-8.
                let c = text[i..].chars().next().unwrap();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

/// The first segment of each path a `crate::` at `at` names: `crate::a::b` gives `a`;
/// `crate::{a::b, c}` gives `a` and `c`.
fn named_after(code: &str, at: usize) -> Vec<String> {
    let rest = &code[at..];
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 0;
        let mut items = vec![String::new()];
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(String::new());
                    continue;
                }
                _ => {}
            }
            items.last_mut().unwrap().push(c);
        }
        return items
            .iter()
            .filter_map(|item| {
                let name: String = item
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                (!name.is_empty() && name != "self").then_some(name)
            })
            .collect();
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    vec![name]
}

/// The import arrows between top-level modules: module → the modules it names.
fn arrows() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let top = |path: &Path| -> String {
        let first = path
            .strip_prefix(&root)
            .unwrap()
            .components()
            .next()
            .unwrap();
        let name = first.as_os_str().to_str().unwrap();
        name.strip_suffix(".rs").unwrap_or(name).to_owned()
    };
    let modules: BTreeSet<String> = files.iter().map(|f| top(f)).collect();
    let mut arrows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = top(file);
        if from == "main" || from == "lib" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let entry = arrows.entry(from.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            for name in named_after(&code, at + "crate::".len()) {
                if name != from && modules.contains(&name) {
                    entry.insert(name);
                }
            }
        }
    }
    arrows
}

/// The modules that import one another in a circle, each circle as a set.
fn circles(arrows: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(m) = todo.pop() {
            for next in arrows.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        arrows.keys().map(|m| (m, reach(m))).collect();
    let mut circles: Vec<BTreeSet<String>> = Vec::new();
    for (m, from_m) in &reached {
        if !from_m.contains(*m) || circles.iter().any(|c| c.contains(*m)) {
            continue;
        }
        let circle = from_m
            .iter()
            .filter(|other| reached.get(other).is_some_and(|r| r.contains(*m)))
            .cloned()
            .collect();
        circles.push(circle);
    }
    circles
}

#[test]
fn no_module_imports_a_layer_above_it_and_none_import_each_other_in_a_circle() {
    let arrows = arrows();
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(n, (_, modules))| modules.iter().map(move |m| (*m, n)))
        .collect();
    let unplaced: Vec<&String> = arrows
        .keys()
        .filter(|m| !layer_of.contains_key(m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced:?}"
    );
    let upward: Vec<String> = arrows
        .iter()
        .flat_map(|(from, to)| to.iter().map(move |to| (from, to)))
        .filter(|(from, to)| layer_of[to.as_str()] > layer_of[from.as_str()])
        .map(|(from, to)| {
            format!(
                "{from} ({}) imports {to} ({})",
                LAYERS[layer_of[from.as_str()]].0,
                LAYERS[layer_of[to.as_str()]].0
            )
        })
        .collect();
    let circles = circles(&arrows);
    let count: usize = arrows.values().map(BTreeSet::len).sum();
    println!(
        "layers: {} modules, {count} import arrows, {} upward, {} circles",
        arrows.len(),
        upward.len(),
        circles.len()
    );
    assert!(
        upward.is_empty(),
        "imports up a layer:\n{}",
        upward.join("\n")
    );
    assert!(
        circles.is_empty(),
        "modules importing one another: {circles:?}"
    );
}

#[test]
fn the_reader_sees_paths_in_groups_and_code_but_not_in_comments_or_strings() {
    let code = code_of(
        "use crate::{a::X, b, self};\n// crate::c\nlet s = \"crate::d\"; let r = r#\"crate::e\"#;\n\
         let q = '\"'; fn f<'a>(x: &'a crate::g::Y) {}\n/* crate::h /* nested */ crate::i */",
    );
    let named: Vec<String> = code
        .match_indices("crate::")
        .flat_map(|(at, _)| named_after(&code, at + "crate::".len()))
        .collect();
    assert_eq!(named, ["a", "b", "g"]);
}
