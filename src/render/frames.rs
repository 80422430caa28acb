//! Email HTML made once per message structure rather than once per message.
//!
//! Turning MJML into HTML (mrml) and inlining its CSS (css-inline) cost about 300 µs of CPU an
//! email, against about 20 µs for Handlebars. So the MJML template is rendered with every
//! value it prints (`{{first_name}}`, `{{money total currency}}`…) replaced by a numbered
//! token (the HTML registry's escape function makes them): what is left is the message's
//! *structure*, which only the template, its conditions and its loops decide. The structure
//! goes through mrml and css-inline once; the HTML that comes out, with the tokens still in it,
//! is a [`Frame`]. Each later message of the same structure fills the frame's tokens with its
//! own values, escaped as css-inline's serializer escapes text and attributes.
//!
//! A frame also holds its text escaped for a JSON string, made with the frame, so that an HTTP
//! provider's JSON body copies it rather than escaping the whole HTML again for each message
//! (that escaping was about a tenth of the CPU of dispatch over HTTP): filling a frame escapes
//! only the values. JSON escapes each character on its own, so the pieces escaped apart and
//! joined are the whole escaped at once.
//!
//! A frame is kept only when filling it gives, byte for byte, what the whole pipeline gives
//! for the message that made it; a token inside a comment, a `<style>`, a `<script>` or a tag
//! name, or a value the pipeline would change on its way (see [`fits`]), sends the message
//! through the whole pipeline instead.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Opens and closes a token: ASCII letters (mrml writes some attributes, such as `lang`, with
/// anything else escaped), in an order no template or value has reason to hold (a value that
/// does takes the whole pipeline).
const OPEN: &str = "Zq7vQ";
const CLOSE: &str = "Qv7qZ";

/// The memory the published templates' frames may take (each is one structure of one
/// template: an email with and without its coupon, a cart of one item or of three…, about
/// 40 KiB with its key). Past it, the frames used longest ago make room.
pub(super) const PUBLISHED_BUDGET: usize = 32 * 1024 * 1024;

thread_local! {
    /// The values printed by the render under way on this thread, while it makes a frame.
    static COLLECTED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// The HTML registry's escape function: HTML escaping, or, while [`collecting`], a numbered
/// token standing for the value.
pub(super) fn escape(text: &str) -> String {
    super::budget::printed(text);
    COLLECTED.with(|collected| match collected.borrow_mut().as_mut() {
        Some(values) => {
            let token = format!("{OPEN}{}{CLOSE}", values.len());
            values.push(text.to_owned());
            token
        }
        None => handlebars::html_escape(text),
    })
}

/// Runs `render` with values collected as tokens; its result and the values.
pub(super) fn collecting<T>(render: impl FnOnce() -> T) -> (T, Vec<String>) {
    /// Stops collecting however `render` ends, so no later render on this thread gets tokens.
    struct Stop;
    impl Drop for Stop {
        fn drop(&mut self) {
            COLLECTED.with(|collected| collected.borrow_mut().take());
        }
    }
    COLLECTED.with(|collected| *collected.borrow_mut() = Some(Vec::new()));
    let stop = Stop;
    let out = render();
    let values = COLLECTED
        .with(|collected| collected.borrow_mut().take())
        .unwrap_or_default();
    drop(stop);
    (out, values)
}

/// Whether a value can be put in a frame as it is. mrml writes the attribute values it makes
/// (the title as the body's `aria-label`, `mj-*` attributes) as Rust string literals, so a
/// backslash, a line break, a tab, a no-break space or another character Rust escapes comes
/// out changed there (and HTML parsing changes carriage returns and NULs anywhere); such a
/// value, or one holding a token's letters, takes the whole pipeline.
pub(super) fn fits(value: &str) -> bool {
    !value.contains(OPEN)
        && !value.contains(CLOSE)
        && value.chars().all(|c| {
            // Quotes reach mrml as entities (`&quot;`, `&#x27;`), never as they are.
            matches!(c, '"' | '\'') || {
                let mut escaped = c.escape_debug();
                c != '\\' && escaped.next() == Some(c) && escaped.next().is_none()
            }
        })
}

/// One piece of a frame.
#[derive(Debug, PartialEq)]
enum Piece {
    /// HTML as it is, and the same escaped for a JSON string.
    Literal { html: String, json: String },
    /// The value of this index, in text or inside a (double-quoted) attribute value.
    Value { index: usize, attribute: bool },
}

/// The HTML of one structure, with a place for each value.
#[derive(Debug, PartialEq)]
pub(super) struct Frame {
    pieces: Vec<Piece>,
}

/// Where the scanner of a frame's HTML is.
#[derive(Clone, Copy, PartialEq)]
enum At {
    Text,
    /// Inside a tag; `quoted`: inside an attribute's double quotes.
    Tag {
        quoted: bool,
        raw: Option<&'static str>,
    },
    Comment,
    /// Inside an element whose text is written unescaped (`style`, `script`…), until its
    /// end tag.
    Raw(&'static str),
}

/// Elements whose content css-inline's serializer writes as it is.
const RAW_TEXT: [&str; 8] = [
    "style",
    "script",
    "xmp",
    "iframe",
    "noembed",
    "noframes",
    "plaintext",
    "noscript",
];

impl Frame {
    /// The frame of HTML holding tokens, or None when a token is where a value cannot simply
    /// be put (a comment, a raw-text element, a tag outside an attribute's value).
    pub(super) fn parse(html: &str) -> Option<Frame> {
        let mut pieces = Vec::new();
        let mut literal = String::with_capacity(html.len());
        let mut at = At::Text;
        let mut rest = html;
        while let Some(c) = rest.chars().next() {
            if let Some(after) = rest.strip_prefix(OPEN) {
                // The close is looked for after the open: the two may overlap
                // (`Zq7vQv7qZ`), and a template may hold either as text.
                let end = after.find(CLOSE)?;
                let index: usize = after[..end].parse().ok()?;
                let attribute = match at {
                    At::Text => false,
                    At::Tag { quoted: true, .. } => true,
                    _ => return None,
                };
                pieces.push(Piece::literal(std::mem::take(&mut literal)));
                pieces.push(Piece::Value { index, attribute });
                rest = &after[end + CLOSE.len()..];
                continue;
            }
            at = match at {
                At::Text if rest.starts_with("<!--") => At::Comment,
                At::Text if c == '<' => At::Tag {
                    quoted: false,
                    raw: RAW_TEXT
                        .into_iter()
                        .find(|name| starts_tag(&rest[1..], name)),
                },
                At::Tag { quoted, raw } if c == '"' => At::Tag {
                    quoted: !quoted,
                    raw,
                },
                At::Tag { quoted: false, raw } if c == '>' => raw.map_or(At::Text, At::Raw),
                At::Comment if rest.starts_with("-->") => {
                    literal.push_str("-->");
                    rest = &rest[3..];
                    at = At::Text;
                    continue;
                }
                At::Raw(name)
                    if c == '<' && rest[1..].starts_with('/') && starts_tag(&rest[2..], name) =>
                {
                    At::Tag {
                        quoted: false,
                        raw: None,
                    }
                }
                other => other,
            };
            literal.push(c);
            rest = &rest[c.len_utf8()..];
        }
        pieces.push(Piece::literal(literal));
        Some(Frame { pieces })
    }

    /// The HTML with `values` in their places, and the same escaped for a JSON string; None
    /// when the frame wants a value the message does not have.
    pub(super) fn fill(&self, values: &[String]) -> Option<Filled> {
        let size: usize = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Literal { json, .. } => json.len(),
                Piece::Value { .. } => 16,
            })
            .sum();
        let mut html = String::with_capacity(size);
        let mut json = String::with_capacity(size);
        for piece in &self.pieces {
            match piece {
                Piece::Literal {
                    html: text,
                    json: escaped,
                } => {
                    html.push_str(text);
                    json.push_str(escaped);
                }
                Piece::Value { index, attribute } => {
                    let start = html.len();
                    push_escaped(&mut html, values.get(*index)?, *attribute);
                    push_json_escaped(&mut json, &html[start..]);
                }
            }
        }
        Some(Filled { html, json })
    }
}

/// A filled frame: the HTML, and the same as the contents of a JSON string.
#[derive(Debug, PartialEq)]
pub(super) struct Filled {
    pub html: String,
    pub json: String,
}

impl Piece {
    fn literal(html: String) -> Piece {
        let mut json = String::with_capacity(html.len() + html.len() / 16);
        push_json_escaped(&mut json, &html);
        Piece::Literal { html, json }
    }
}

/// `text` escaped as serde_json escapes the contents of a string: quote, backslash, and the
/// control characters (`\n`, `\r`, `\t`, `\b`, `\f`, else `\u00xx`).
fn push_json_escaped(out: &mut String, text: &str) {
    let mut rest = text;
    while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c < ' ') {
        out.push_str(&rest[..at]);
        let c = rest.as_bytes()[at];
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            c => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(c >> 4)]));
                out.push(char::from(HEX[usize::from(c & 0xf)]));
            }
        }
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// Whether `rest` (after `<` or `</`) starts the tag `name` (case-insensitively, then a space,
/// `>` or `/`).
fn starts_tag(rest: &str, name: &str) -> bool {
    rest.get(..name.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(name))
        && rest[name.len()..]
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_whitespace() || c == '>' || c == '/')
}

/// `value` escaped as css-inline's serializer escapes text (`&`, `<`, `>`, no-break space) or
/// attribute values (`&`, `"`, no-break space).
fn push_escaped(out: &mut String, value: &str, attribute: bool) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '\u{A0}' => out.push_str("&nbsp;"),
            '"' if attribute => out.push_str("&quot;"),
            '<' if !attribute => out.push_str("&lt;"),
            '>' if !attribute => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// The frames made so far, by the tokenized MJML of their structure. The key holds the whole
/// structure, so templates and versions may share one cache: the same MJML makes the same
/// HTML. A structure whose frame could not be kept is remembered as None. The cache holds at
/// most `budget` bytes (keys and frames); past it, the entries used longest ago are dropped.
/// A budget of 0 keeps nothing (renders made to validate or preview).
pub(super) struct Frames {
    budget: usize,
    made: Mutex<Made>,
}

#[derive(Default)]
struct Made {
    /// Each structure's frame, its size in bytes, and the tick it was last used at.
    entries: HashMap<String, (Option<Arc<Frame>>, usize, u64)>,
    bytes: usize,
    tick: u64,
}

impl Frames {
    /// A cache of at most `budget` bytes.
    pub(super) fn new(budget: usize) -> Frames {
        Frames {
            budget,
            made: Mutex::new(Made::default()),
        }
    }

    /// Whether this cache keeps frames at all.
    pub(super) fn keeps(&self) -> bool {
        self.budget > 0
    }

    /// The frame of this structure: Some(Some) ready, Some(None) refused, None not made yet.
    pub(super) fn get(&self, structure: &str) -> Option<Option<Arc<Frame>>> {
        let mut made = self.lock();
        made.tick += 1;
        let tick = made.tick;
        let (frame, _, used) = made.entries.get_mut(structure)?;
        *used = tick;
        Some(frame.clone())
    }

    /// Keeps what was made of a structure, making room for it within the budget.
    pub(super) fn keep(&self, structure: String, frame: Option<Frame>) {
        let size = structure.len() + frame.as_ref().map_or(0, Frame::bytes);
        if size > self.budget {
            return;
        }
        let mut made = self.lock();
        while made.bytes + size > self.budget {
            let Some(oldest) = made
                .entries
                .iter()
                .min_by_key(|(_, (_, _, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, freed, _)) = made.entries.remove(&oldest) {
                made.bytes -= freed;
            }
        }
        made.tick += 1;
        let tick = made.tick;
        if let Some((_, replaced, _)) = made
            .entries
            .insert(structure, (frame.map(Arc::new), size, tick))
        {
            made.bytes -= replaced;
        }
        made.bytes += size;
    }

    /// The bytes the cache holds.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Frame {
    /// The bytes the frame's pieces take.
    fn bytes(&self) -> usize {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Literal { html, json } => html.len() + json.len(),
                Piece::Value { .. } => std::mem::size_of::<Piece>(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(i: usize) -> String {
        format!("{OPEN}{i}{CLOSE}")
    }

    #[test]
    fn a_template_may_hold_the_tokens_letters() {
        // The close overlapping the open, a close alone, an open without a number.
        for text in [
            "aZq7vQv7qZb",
            "Qv7qZ",
            "Zq7vQ",
            "Zq7vQxQv7qZ",
            "Zq7vQZq7vQ1Qv7qZ",
        ] {
            let _ = Frame::parse(&format!("<p>{text}</p>"));
        }
        assert_eq!(Frame::parse("<p>Zq7vQv7qZ</p>"), None);
        // Text that reads as a token is one; the frame is kept only if it fills to the
        // message the whole pipeline gives, which this one cannot.
        let frame = Frame::parse("<p>Zq7vQ0Qv7qZ</p>").unwrap();
        assert!(frame.fill(&[]).is_none());
    }

    #[test]
    fn the_cache_stays_within_its_budget_and_keeps_what_is_used() {
        let frames = Frames::new(10_000);
        let frame = |n: usize| Frame::parse(&"x".repeat(n)).unwrap();
        frames.keep("a".repeat(1_000), Some(frame(1_000)));
        frames.keep("b".repeat(1_000), Some(frame(1_000)));
        assert!(frames.get(&"a".repeat(1_000)).is_some());
        // c does not fit beside a and b: b, used longest ago, makes room.
        frames.keep("c".repeat(4_000), Some(frame(1_000)));
        assert!(frames.bytes() <= 10_000, "{}", frames.bytes());
        assert!(frames.get(&"a".repeat(1_000)).is_some());
        assert!(frames.get(&"b".repeat(1_000)).is_none());
        assert!(frames.get(&"c".repeat(4_000)).is_some());
        // Nothing bigger than the whole budget is kept, and a budget of 0 keeps nothing.
        frames.keep("d".repeat(20_000), None);
        assert!(frames.get(&"d".repeat(20_000)).is_none());
        let none = Frames::new(0);
        assert!(!none.keeps());
        none.keep("e".into(), None);
        assert!(none.get("e").is_none());
    }

    #[test]
    fn values_are_escaped_as_the_serializer_escapes_their_place() {
        let html = format!(
            "<p title=\"{}\">{} &amp; {}</p><a href=\"x?a={}\">",
            token(0),
            token(1),
            token(0),
            token(2)
        );
        let frame = Frame::parse(&html).unwrap();
        let values = [
            "\"Tom\" & <Jerry>".to_owned(),
            "a\u{A0}b".to_owned(),
            "1&b=2".to_owned(),
        ];
        assert_eq!(
            frame.fill(&values).unwrap().html,
            "<p title=\"&quot;Tom&quot; &amp; <Jerry>\">a&nbsp;b &amp; \"Tom\" &amp; &lt;Jerry&gt;</p><a href=\"x?a=1&amp;b=2\">"
        );
        assert_eq!(frame.fill(&values[..2]), None, "a value missing");
    }

    #[test]
    fn the_json_form_is_the_html_as_serde_json_escapes_it() {
        let all: String = (0u8..0x80)
            .map(char::from)
            .chain("지우 Öz\u{A0}\u{2028}".chars())
            .collect();
        let mut escaped = String::new();
        push_json_escaped(&mut escaped, &all);
        assert_eq!(
            format!("\"{escaped}\""),
            serde_json::to_string(&all).unwrap()
        );
        // Literals escaped when the frame is made, values when it is filled.
        let html = format!(
            "<p class=\"a\">\t{}\\</p><a href=\"{}\">\n",
            token(0),
            token(1)
        );
        let frame = Frame::parse(&html).unwrap();
        let filled = frame
            .fill(&["\"Tom\" \\ \u{1}".to_owned(), "x\"y".to_owned()])
            .unwrap();
        assert_eq!(
            format!("\"{}\"", filled.json),
            serde_json::to_string(&filled.html).unwrap()
        );
    }

    #[test]
    fn a_token_where_a_value_cannot_simply_go_refuses_the_frame() {
        for html in [
            format!("<!-- {} -->", token(0)),
            format!("<style>p {{ color: {} }}</style>", token(0)),
            format!("<SCRIPT type=\"x\">{}</script>", token(0)),
            format!("<p {}=\"x\">", token(0)),
            format!("<p>{OPEN}x{CLOSE}</p>"),
        ] {
            assert_eq!(Frame::parse(&html), None, "{html}");
        }
        // After those elements end, text is text again.
        let html = format!(
            "<style>p {{}}</style><!-- c --><stylesheet>{}</stylesheet>",
            token(0)
        );
        let frame = Frame::parse(&html).unwrap();
        assert_eq!(
            frame.fill(&["<b>".to_owned()]).unwrap().html,
            "<style>p {}</style><!-- c --><stylesheet>&lt;b&gt;</stylesheet>"
        );
    }

    #[test]
    fn values_the_pipeline_would_change_do_not_fit() {
        for value in ["Ada", "\"Tom\" & <Jerry>", "지우 Öz", "O'Neil", ""] {
            assert!(fits(value), "{value:?}");
        }
        for value in [
            "a\u{A0}b",
            "back\\slash",
            "two\nlines",
            "tab\there",
            "cr\r",
            "nul\0",
            "zero\u{200B}width",
            "Zq7vQ1Qv7qZ",
        ] {
            assert!(!fits(value), "{value:?}");
        }
    }

    #[test]
    fn collecting_stops_even_when_the_render_panics() {
        let ((), values) = collecting(|| {
            assert_eq!(escape("<a>"), token(0));
            assert_eq!(escape("b"), token(1));
        });
        assert_eq!(values, ["<a>", "b"]);
        assert_eq!(escape("<a>"), "&lt;a&gt;");
        let panicked = std::panic::catch_unwind(|| collecting(|| panic!("in a helper")));
        assert!(panicked.is_err());
        assert_eq!(escape("<a>"), "&lt;a&gt;");
    }
}
