//! The render budget: what one render of a marketer's template may take, wherever it runs
//! (save, publish, preview, test send, dispatch, message detail, `templates check`).
//!
//! Handlebars has no limits of its own: an inline partial that includes itself recurses until
//! the stack overflows (which aborts the process: `catch_unwind` cannot catch it), forty
//! nested `{{#each}}` over one list never end, and a string printed inside them fills the
//! memory. So lifecycle bounds it in three ways.
//!
//! - **Before compiling**, each file is checked (`check_source`): its size, its number of
//!   tags (the parser's time grows with tags × size: 1,000 tags in 64 KiB took 250 ms), how
//!   deeply its blocks and subexpressions nest (the parser's time grows with the square of
//!   that), and no reserved name. It is compiled on a stack of its own (`on_compile_stack`),
//!   and the compiled template's nesting checked again exactly (`check_compiled`). A pair's
//!   own files name their partials literally (`check_pair_file`), and the partials' graph,
//!   inline partials included, must have no cycle (`render::check_partials`).
//! - **While rendering**, the bodies that can run more than once per render of their file
//!   (loops' bodies), partial blocks' contents, inline partials' bodies and partials start with
//!   a call to this module's helpers (`instrument`), which count steps, partial depth and the
//!   bytes the body writes, and check the clock; the output goes to a writer that stops at its
//!   limit; and every value printed is counted by the escape functions. The first limit
//!   crossed ends the render with `Exceeded`, which names the limit.
//! - **Turning MJML into HTML** (mrml, then css-inline) cannot be interrupted, so its input is
//!   bounded first: its size (the output limit), how deeply its tags nest (both libraries
//!   recurse per level: 9,000 levels overflowed an 8 MiB stack), and the CSS inlining's work,
//!   rules × elements (quadratic: 6,000 × 6,000 took 3.2 s). It runs on a stack of its own
//!   (`stacker`), so the thread it runs on does not matter.
//!
//! The numbers are far above what the shipped templates use (see `tests`), and are
//! documented in README ("Templates").

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant};

use handlebars::template::{Parameter, TemplateElement, TemplateMapping};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
    Template,
};

/// The largest template file.
pub(crate) const MAX_FILE_BYTES: usize = 64 * 1024;
/// The most tags (`{{`) in one file.
pub(crate) const MAX_TAGS: usize = 1_000;
/// How deeply blocks (an `{{else if}}` chain counting one deeper per link), and a tag's
/// subexpressions and literals, may nest in one file.
pub(crate) const MAX_SOURCE_NESTING: usize = 16;
/// How deeply partials (inline ones included) may include one another while rendering. With
/// the nesting of each file, this bounds how deeply a render recurses: at most
/// (`MAX_PARTIAL_DEPTH` + 1) × `MAX_SOURCE_NESTING` bodies.
pub(crate) const MAX_PARTIAL_DEPTH: u32 = 8;
/// Steps of one template's render: loop bodies rendered (once per item), partials entered,
/// values printed.
pub(crate) const MAX_STEPS: u64 = 100_000;
/// Bytes one template's render may write.
pub(crate) const MAX_OUTPUT: usize = 256 * 1024;
/// Bytes one template's render may write in all, into its output and into the buffers
/// Handlebars renders partial blocks into first.
pub(crate) const MAX_WRITTEN: usize = 2 * MAX_OUTPUT;
/// How long one template's render may take.
pub(crate) const TIME_LIMIT: Duration = Duration::from_secs(2);
/// How deeply the tags of an email's MJML may nest.
pub(crate) const MAX_MARKUP_NESTING: usize = 100;
/// The CSS inliner's work: style rules × elements of the HTML made from MJML.
pub(crate) const MAX_CSS_WORK: u64 = 5_000_000;
/// The stack the MJML stage runs on.
const MJML_STACK: usize = 16 * 1024 * 1024;
/// The stack a file's compile runs on (`on_compile_stack`).
const COMPILE_STACK: usize = 256 * 1024 * 1024;
/// The most spaces a standalone partial's lines are indented by (Handlebars indents every line
/// of a partial as its tag is; a partial's output could otherwise grow by its indent per line).
const MAX_INDENT: usize = 16;
/// The names of the budget's own helpers start with this; no template may use it.
pub(crate) const RESERVED: &str = "__budget";

/// Which limit a render crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exceeded {
    /// `MAX_STEPS`.
    Steps,
    /// `MAX_PARTIAL_DEPTH`.
    PartialDepth,
    /// `MAX_OUTPUT`.
    Output,
    /// `MAX_WRITTEN`.
    Written,
    /// `TIME_LIMIT`.
    Time,
}

impl fmt::Display for Exceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exceeded::Steps => write!(
                f,
                "the render took more than {MAX_STEPS} steps (bodies rendered and values printed): a loop too long, or loops nested too deep"
            ),
            Exceeded::PartialDepth => write!(
                f,
                "partials included one another more than {MAX_PARTIAL_DEPTH} deep: a partial that includes itself?"
            ),
            Exceeded::Output => write!(f, "the render wrote more than {} KiB", MAX_OUTPUT / 1024),
            Exceeded::Written => write!(
                f,
                "the render wrote more than {} KiB in all (its output and the partial blocks it filled)",
                MAX_WRITTEN / 1024
            ),
            Exceeded::Time => write!(f, "the render took longer than {} s", TIME_LIMIT.as_secs()),
        }
    }
}

impl std::error::Error for Exceeded {}

/// The budget of the render under way on this thread: plain cells, since the marks and the
/// escape functions touch it for every loop body and value (a `RefCell<Option<…>>` there cost
/// a tenth of an email's render).
struct Budget {
    /// A render is under way.
    active: Cell<bool>,
    steps: Cell<u64>,
    partial_depth: Cell<u32>,
    /// The deepest `partial_depth` reached.
    deepest: Cell<u32>,
    /// Bytes written, by the marked bodies' literal text and the values printed.
    written: Cell<usize>,
    deadline: Cell<Option<Instant>>,
    /// The limit crossed, once one is.
    exceeded: Cell<Option<Exceeded>>,
}

thread_local! {
    static BUDGET: Budget = const {
        Budget {
            active: Cell::new(false),
            steps: Cell::new(0),
            partial_depth: Cell::new(0),
            deepest: Cell::new(0),
            written: Cell::new(0),
            deadline: Cell::new(None),
            exceeded: Cell::new(None),
        }
    };
}

/// What a render used of its budget: steps, the deepest partial nesting, bytes written (by
/// marked bodies and values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Steps taken.
    pub steps: u64,
    /// The deepest partial nesting.
    pub partials: u32,
    /// Bytes written.
    pub written: usize,
}

/// The state of a budget, to put back when a render inside another ends.
#[derive(Clone, Copy)]
struct Saved {
    active: bool,
    steps: u64,
    partial_depth: u32,
    deepest: u32,
    written: usize,
    deadline: Option<Instant>,
    exceeded: Option<Exceeded>,
}

impl Budget {
    fn save(&self) -> Saved {
        Saved {
            active: self.active.get(),
            steps: self.steps.get(),
            partial_depth: self.partial_depth.get(),
            deepest: self.deepest.get(),
            written: self.written.get(),
            deadline: self.deadline.get(),
            exceeded: self.exceeded.get(),
        }
    }

    fn restore(&self, s: Saved) {
        self.active.set(s.active);
        self.steps.set(s.steps);
        self.partial_depth.set(s.partial_depth);
        self.deepest.set(s.deepest);
        self.written.set(s.written);
        self.deadline.set(s.deadline);
        self.exceeded.set(s.exceeded);
    }
}

/// Runs one template's render under a budget of its own (a render inside another, such as the
/// whole-pipeline render after a frame's, gets its own, and the outer one is put back after).
/// What it used, and whether a limit was crossed (`exceeded`), come with the result.
pub(super) fn within<T>(render: impl FnOnce() -> T) -> (T, Usage, Option<Exceeded>) {
    /// Puts the outer budget back however `render` ends.
    struct Restore(Saved);
    impl Drop for Restore {
        fn drop(&mut self) {
            BUDGET.with(|b| b.restore(self.0));
        }
    }
    let outer = BUDGET.with(|b| {
        let outer = b.save();
        b.restore(Saved {
            active: true,
            steps: 0,
            partial_depth: 0,
            deepest: 0,
            written: 0,
            deadline: Some(Instant::now() + TIME_LIMIT),
            exceeded: None,
        });
        outer
    });
    let _restore = Restore(outer);
    let out = render();
    let (usage, exceeded) = BUDGET.with(|b| {
        (
            Usage {
                steps: b.steps.get(),
                partials: b.deepest.get(),
                written: b.written.get(),
            },
            b.exceeded.get(),
        )
    });
    (out, usage, exceeded)
}

/// Charges the render under way: `steps` steps, `bytes` written, `partials` more partial
/// nesting (negative when a partial's body ends). An error when a limit is crossed (and for a
/// render outside `within`, which would have no limits).
fn charge(steps: u64, bytes: usize, partials: i32) -> Result<(), Exceeded> {
    BUDGET.with(|b| {
        if !b.active.get() {
            return Err(Exceeded::Steps);
        }
        if let Some(exceeded) = b.exceeded.get() {
            return Err(exceeded);
        }
        let total = b.steps.get() + steps;
        b.steps.set(total);
        let written = b.written.get().saturating_add(bytes);
        b.written.set(written);
        let depth = b.partial_depth.get().saturating_add_signed(partials);
        b.partial_depth.set(depth);
        if depth > b.deepest.get() {
            b.deepest.set(depth);
        }
        let crossed = if total > MAX_STEPS {
            Some(Exceeded::Steps)
        } else if depth > MAX_PARTIAL_DEPTH {
            Some(Exceeded::PartialDepth)
        } else if written > MAX_WRITTEN {
            Some(Exceeded::Written)
        } else if total.is_multiple_of(32) && b.deadline.get().is_some_and(|d| Instant::now() > d) {
            Some(Exceeded::Time)
        } else {
            None
        };
        b.exceeded.set(crossed);
        crossed.map_or(Ok(()), Err)
    })
}

/// Counts a value printed (the registries' escape functions call it).
pub(super) fn printed(value: &str) {
    // An error here is seen by the next mark or write, which ends the render.
    charge(1, value.len(), 0).ok();
}

/// The text registry's escape function: the value as it is, counted.
pub(super) fn no_escape(value: &str) -> String {
    printed(value);
    value.to_owned()
}

/// The output of one template's render: what Handlebars writes, up to `MAX_OUTPUT` bytes.
#[derive(Default)]
pub(super) struct Capped {
    pub bytes: Vec<u8>,
}

impl std::io::Write for Capped {
    fn write(&mut self, segment: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + segment.len() > MAX_OUTPUT {
            BUDGET.with(|b| {
                if b.exceeded.get().is_none() {
                    b.exceeded.set(Some(Exceeded::Output));
                }
            });
            return Err(std::io::Error::other(Exceeded::Output));
        }
        // A value printed that crossed a limit (counted by the escape function) ends the
        // render at its write.
        if let Some(exceeded) = BUDGET.with(|b| b.exceeded.get()) {
            return Err(std::io::Error::other(exceeded));
        }
        self.bytes.extend_from_slice(segment);
        Ok(segment.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The helpers a body starts and ends with.
#[derive(Clone, Copy)]
enum Mark {
    /// A loop's or a partial block's body starts: one step, and its literal bytes (the
    /// helper's parameter).
    Enter,
    /// Such a body ends (nothing to count: kept so bodies are marked alike).
    Leave,
    /// A partial's body starts: the same, and one partial deeper.
    EnterPartial,
    /// A partial's body ends.
    LeavePartial,
}

impl Mark {
    const ALL: [Mark; 4] = [
        Mark::Enter,
        Mark::Leave,
        Mark::EnterPartial,
        Mark::LeavePartial,
    ];

    fn name(self) -> &'static str {
        match self {
            Mark::Enter => "__budget_enter",
            Mark::Leave => "__budget_leave",
            Mark::EnterPartial => "__budget_enter_partial",
            Mark::LeavePartial => "__budget_leave_partial",
        }
    }
}

impl HelperDef for Mark {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
        _: &mut dyn Output,
    ) -> HelperResult {
        let bytes = h.param(0).and_then(|p| p.value().as_u64()).unwrap_or(0) as usize;
        let charged = match self {
            Mark::Enter => charge(1, bytes, 0),
            Mark::Leave => charge(0, 0, 0),
            Mark::EnterPartial => charge(1, bytes, 1),
            Mark::LeavePartial => charge(0, 0, -1),
        };
        charged.map_err(|e| RenderErrorReason::Other(e.to_string()).into())
    }
}

/// Registers the budget's helpers.
pub(super) fn register(registry: &mut Handlebars<'static>) {
    for mark in Mark::ALL {
        registry.register_helper(mark.name(), Box::new(mark));
    }
}

/// Puts the budget's marks around the bodies of a compiled template that can run more than
/// once per render of their file, or hold what is written elsewhere first: every loop's body
/// (`{{#each}}`'s, and any block but `if`, `unless` and `with`, which run theirs once), every
/// partial block's content (rendered into a buffer before the partial writes it), every inline
/// partial's body and, when `partial`, the template itself (a partial or a layout). The rest
/// runs at most once per marked body, within the file's size and nesting, so it needs no mark;
/// an email's shipped templates get about twenty marks. Indents of standalone partials are cut
/// to `MAX_INDENT`.
pub(super) fn instrument(template: &mut Template, partial: bool) {
    // The marks of the template itself stand at its first line.
    let start = call(Mark::Leave, None).1;
    walk(template, &start);
    if partial {
        mark(template, Mark::EnterPartial, Mark::LeavePartial, &start);
    }
}

/// Marks what `template`'s elements hold; `at` is where an error of a mark is reported (the
/// line of the block a body belongs to).
fn walk(template: &mut Template, at: &TemplateMapping) {
    let mappings: Vec<TemplateMapping> = (0..template.elements.len())
        .map(|i| template.mapping.get(i).unwrap_or(at).clone())
        .collect();
    for (element, mapping) in template.elements.iter_mut().zip(&mappings) {
        match element {
            TemplateElement::HelperBlock(block) => {
                let once = matches!(block.name.as_name(), Some("if" | "unless" | "with"));
                if let Some(body) = block.template.as_mut() {
                    walk(body, mapping);
                    if !once {
                        mark(body, Mark::Enter, Mark::Leave, mapping);
                    }
                }
                if let Some(body) = block.inverse.as_mut() {
                    walk(body, mapping);
                    if !once && block.name.as_name() != Some("each") {
                        mark(body, Mark::Enter, Mark::Leave, mapping);
                    }
                }
            }
            TemplateElement::DecoratorBlock(decorator) => {
                let inline = decorator.name.as_name() == Some("inline");
                if let Some(body) = decorator.template.as_mut() {
                    walk(body, mapping);
                    if inline {
                        mark(body, Mark::EnterPartial, Mark::LeavePartial, mapping);
                    }
                }
            }
            TemplateElement::PartialBlock(decorator) => {
                cut_indent(&mut decorator.indent);
                if let Some(body) = decorator.template.as_mut() {
                    walk(body, mapping);
                    mark(body, Mark::Enter, Mark::Leave, mapping);
                }
            }
            TemplateElement::PartialExpression(decorator) => cut_indent(&mut decorator.indent),
            _ => {}
        }
    }
}

/// Puts `enter` (with the body's literal bytes) before a body's elements, and `leave` after
/// them when it counts something (a partial's depth).
fn mark(template: &mut Template, enter: Mark, leave: Mark, at: &TemplateMapping) {
    let literal: usize = template
        .elements
        .iter()
        .map(|e| match e {
            TemplateElement::RawString(text) => text.len(),
            _ => 0,
        })
        .sum();
    let keep_mapping = template.mapping.len() == template.elements.len();
    template.elements.insert(0, call(enter, Some(literal)).0);
    let closes = matches!(leave, Mark::LeavePartial);
    if closes {
        template.elements.push(call(leave, None).0);
    }
    if keep_mapping {
        template.mapping.insert(0, at.clone());
        if closes {
            template.mapping.push(at.clone());
        }
    } else {
        template.mapping.clear();
    }
}

fn cut_indent(indent: &mut Option<String>) {
    if let Some(text) = indent
        && text.len() > MAX_INDENT
    {
        // An indent is spaces and tabs: any byte is a character's boundary.
        let cut = (0..=MAX_INDENT)
            .rev()
            .find(|at| text.is_char_boundary(*at))
            .unwrap_or(0);
        text.truncate(cut);
    }
}

/// `{{<mark> <bytes>}}` as a compiled element, with its place (line 1, column 1).
fn call(mark: Mark, bytes: Option<usize>) -> (TemplateElement, TemplateMapping) {
    let source = match bytes {
        Some(n) => format!("{{{{{} {n}}}}}", mark.name()),
        None => format!("{{{{{}}}}}", mark.name()),
    };
    let mut compiled = Template::compile(&source).expect("a mark compiles");
    (compiled.elements.remove(0), compiled.mapping.remove(0))
}

/// Checks one template file before it is compiled: its size, its tags, how deeply its blocks
/// and subexpressions nest, and that it uses no reserved name. The error says which, with the
/// line when there is one.
pub(crate) fn check_source(source: &str) -> Result<(), (Option<usize>, String)> {
    if source.len() > MAX_FILE_BYTES {
        return Err((
            None,
            format!(
                "larger than {} KiB ({} bytes)",
                MAX_FILE_BYTES / 1024,
                source.len()
            ),
        ));
    }
    if let Some(at) = source.find(|c: char| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err((
            Some(line_of(source, at)),
            "holds a control character (a NUL, an escape…): templates are text".into(),
        ));
    }
    if let Some(at) = source.find(RESERVED) {
        return Err((
            Some(line_of(source, at)),
            format!("`{RESERVED}…` names lifecycle's own helpers; use another name"),
        ));
    }
    let tags = source.matches("{{").count();
    if tags > MAX_TAGS {
        return Err((
            None,
            format!("has {tags} tags ({{{{…}}}}); at most {MAX_TAGS}"),
        ));
    }
    let (deepest, at) = nesting(source);
    if deepest > MAX_SOURCE_NESTING {
        return Err((
            Some(line_of(source, at)),
            format!("blocks or subexpressions nest {deepest} deep; at most {MAX_SOURCE_NESTING}"),
        ));
    }
    Ok(())
}

/// The 1-based line of byte offset `at` in `source`.
pub(super) fn line_of(source: &str, at: usize) -> usize {
    source[..at].matches('\n').count() + 1
}

/// How deeply a source's blocks and subexpressions nest (for the tests' figures).
#[cfg(test)]
pub(super) fn source_nesting(source: &str) -> usize {
    nesting(source).0
}

/// How deeply markup's tags nest (for the tests' figures).
#[cfg(test)]
pub(super) fn markup_depth(markup: &str) -> usize {
    markup_nesting(markup)
}

/// The CSS inliner's work for `html`: style rules × elements.
pub(super) fn css_work(html: &str) -> u64 {
    let mut rules = 0u64;
    let mut rest = html;
    while let Some(at) = find_ascii_case(rest, "<style") {
        let after = &rest[at..];
        let end = find_ascii_case(after, "</style").unwrap_or(after.len());
        rules += after[..end].matches('{').count() as u64;
        rest = &after[end..];
    }
    let elements = html
        .as_bytes()
        .windows(2)
        .filter(|w| w[0] == b'<' && w[1].is_ascii_alphabetic())
        .count() as u64;
    rules.saturating_mul(elements)
}

/// How deeply blocks (`{{#…}}` … `{{/…}}`) and, inside a tag, subexpressions `(…)` and
/// array and object literals (`[…]`, `{…}`) nest at most, and the byte offset where that depth
/// is first reached. Quoted strings inside a tag are skipped (a `}}` or a `)` in one neither
/// ends the tag nor closes anything), as are comments. The count errs on the deep side (an
/// unclosed block counts), never the shallow one.
fn nesting(source: &str) -> (usize, usize) {
    let bytes = source.as_bytes();
    let (mut depth, mut deepest, mut at) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while let Some(open) = source[i..].find("{{").map(|o| i + o) {
        let mut tag = open + 2;
        while tag < bytes.len() && matches!(bytes[tag], b'{' | b'~' | b' ' | b'\t' | b'\n' | b'\r')
        {
            tag += 1;
        }
        if source[tag..].starts_with("!--") {
            i = source[tag..]
                .find("--}}")
                .map_or(bytes.len(), |e| tag + e + 4);
            continue;
        }
        if source[tag..].starts_with('!') {
            i = source[tag..]
                .find("}}")
                .map_or(bytes.len(), |e| tag + e + 2);
            continue;
        }
        match bytes.get(tag) {
            Some(b'#' | b'^') if !source[tag + 1..].trim_start().starts_with("else") => depth += 1,
            Some(b'/') => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > deepest {
            deepest = depth;
            at = open;
        }
        // The tag's own nesting, up to its end: `}}` outside a string.
        let (mut inner, mut quote, mut k) = (0usize, None, tag);
        while k < bytes.len() {
            let b = bytes[k];
            match quote {
                Some(q) => {
                    if b == b'\\' {
                        k += 1;
                    } else if b == q {
                        quote = None;
                    }
                }
                None => match b {
                    b'"' | b'\'' => quote = Some(b),
                    // A `}}` with a subexpression or literal still open belongs to it
                    // (a literal object closing), or the tag is not well formed: either way
                    // the scan goes on, and errs on the deep side.
                    b'}' if inner == 0 && bytes.get(k + 1) == Some(&b'}') => break,
                    b'(' | b'[' | b'{' => {
                        inner += 1;
                        if depth + inner > deepest {
                            deepest = depth + inner;
                            at = k;
                        }
                    }
                    b')' | b']' | b'}' => inner = inner.saturating_sub(1),
                    _ => {}
                },
            }
            k += 1;
        }
        i = (k + 2).min(bytes.len());
    }
    (deepest, at)
}

/// Whether an email's MJML (as the template rendered it) may go through mrml and css-inline:
/// its tags nest at most `MAX_MARKUP_NESTING` deep. An error names the limit.
pub(super) fn check_markup(markup: &str) -> Result<(), String> {
    let deepest = markup_nesting(markup);
    if deepest > MAX_MARKUP_NESTING {
        return Err(format!(
            "the email's tags nest {deepest} deep; at most {MAX_MARKUP_NESTING}"
        ));
    }
    Ok(())
}

/// Elements HTML and MJML never close.
const VOID: [&str; 16] = [
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "param",
    "source",
    "track",
    "wbr",
    "mj-image",
    "mj-divider",
];

/// How deeply tags nest: each opening tag that is not self-closing or void is one deeper; a
/// closing tag closes the innermost open element of its name and those inside it, and a
/// closing tag with no open element of its name (`</br>`) closes nothing, as HTML parsers do.
/// Comments and `<!…>` declarations are skipped.
fn markup_nesting(markup: &str) -> usize {
    let mut open: Vec<String> = Vec::new();
    let mut deepest = 0usize;
    let mut rest = markup;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        if let Some(comment) = rest.strip_prefix("!--") {
            rest = comment.find("-->").map_or("", |e| &comment[e + 3..]);
            continue;
        }
        let end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..end];
        let name = |text: &str| -> String {
            text.chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
                .to_ascii_lowercase()
        };
        if let Some(closing) = tag.strip_prefix('/') {
            let closed = name(closing);
            if let Some(position) = open.iter().rposition(|n| *n == closed) {
                open.truncate(position);
            }
        } else if tag.starts_with(|c: char| c.is_ascii_alphabetic()) && !tag.ends_with('/') {
            let opened = name(tag);
            if !VOID.contains(&opened.as_str()) {
                open.push(opened);
                deepest = deepest.max(open.len());
                if deepest > 10 * MAX_MARKUP_NESTING {
                    return deepest;
                }
            }
        }
        rest = &rest[end.min(rest.len())..];
    }
    deepest
}

/// Whether css-inline may inline the CSS of `html`: its style rules × its elements at most
/// `MAX_CSS_WORK`.
pub(super) fn check_css_work(html: &str) -> Result<(), String> {
    let work = css_work(html);
    if work > MAX_CSS_WORK {
        return Err(format!(
            "inlining the email's style rules into its elements is too much work ({work} rules × elements; at most {MAX_CSS_WORK}): use fewer rules or a smaller email"
        ));
    }
    Ok(())
}

fn find_ascii_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Runs the MJML stage, which recurses per level of the markup's nesting, on a stack of its
/// own, big enough for the nesting `check_markup` allows, whatever thread calls it.
pub(super) fn on_own_stack<T>(work: impl FnOnce() -> T) -> T {
    stacker::grow(MJML_STACK, work)
}

/// Runs the compile of one file on a stack of its own. Its parser guards its own stack (pest
/// fails with "stack limit reached"), but Handlebars then builds, and later drops, the
/// template recursively, per level of subexpressions: a file of 64 KiB holds 32,000 levels,
/// which took more than 64 MiB of stack in a debug build. `check_source` refuses such a file
/// before it is parsed; this stack is for what it cannot see (its scan is not the grammar).
/// Only the pages used are ever touched.
pub(super) fn on_compile_stack<T>(work: impl FnOnce() -> T) -> T {
    stacker::grow(COMPILE_STACK, work)
}

/// How deeply a compiled template nests: each block's, partial block's and inline partial's
/// body is one deeper than its tag, an `{{else if}}` is one deeper than the block it chains
/// (Handlebars renders a chain as nested blocks), and each subexpression one deeper than its
/// tag. This is the depth the render recurses to within one file.
fn tree_nesting(template: &Template) -> usize {
    fn parameter(p: &Parameter) -> usize {
        match p {
            Parameter::Subexpression(sub) => 1 + element(sub.as_element()),
            _ => 0,
        }
    }
    fn tag<'a>(
        name: &'a Parameter,
        params: &'a [Parameter],
        hash: impl Iterator<Item = &'a Parameter>,
    ) -> usize {
        std::iter::once(name)
            .chain(params)
            .chain(hash)
            .map(parameter)
            .max()
            .unwrap_or(0)
    }
    fn body(t: &Option<Template>) -> usize {
        t.as_ref().map_or(0, |t| 1 + tree_nesting(t))
    }
    fn element(e: &TemplateElement) -> usize {
        match e {
            TemplateElement::Expression(h)
            | TemplateElement::HtmlExpression(h)
            | TemplateElement::HelperBlock(h) => tag(&h.name, &h.params, h.hash.values())
                .max(body(&h.template))
                .max(body(&h.inverse)),
            TemplateElement::DecoratorExpression(d)
            | TemplateElement::DecoratorBlock(d)
            | TemplateElement::PartialExpression(d)
            | TemplateElement::PartialBlock(d) => {
                tag(&d.name, &d.params, d.hash.values()).max(body(&d.template))
            }
            _ => 0,
        }
    }
    template.elements.iter().map(element).max().unwrap_or(0)
}

/// Checks a compiled file's nesting as the render will meet it (`tree_nesting`): at most
/// `MAX_SOURCE_NESTING`.
pub(super) fn check_compiled(template: &Template) -> Result<(), (Option<usize>, String)> {
    let deepest = tree_nesting(template);
    if deepest > MAX_SOURCE_NESTING {
        return Err((
            None,
            format!(
                "blocks, `{{{{else if}}}}` chains or subexpressions nest {deepest} deep; at most {MAX_SOURCE_NESTING}"
            ),
        ));
    }
    Ok(())
}

/// Refuses what a marketer's file may not hold beyond `check_source`: `{{> @partial-block}}`
/// (a partial block's content written more than once, in nested partial blocks, would
/// multiply the bytes without bound), a partial whose name is computed while rendering
/// (`{{> (lookup …)}}`: it could name `@partial-block`, or recurse where no cycle can be seen),
/// and `{{{…}}}` or `{{& …}}`, which print without escaping (a member's text as HTML) and
/// without being counted.
pub(super) fn check_pair_file(template: &Template) -> Result<(), (Option<usize>, String)> {
    fn walk(template: &Template) -> Result<(), (Option<usize>, String)> {
        for (i, element) in template.elements.iter().enumerate() {
            let line = template.mapping.get(i).map(|m| m.0);
            match element {
                TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d)
                    if d.name.as_name() == Some("@partial-block") =>
                {
                    return Err((
                        line,
                        "`{{> @partial-block}}` is for shared layouts only".into(),
                    ));
                }
                TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d)
                    if !matches!(
                        d.name,
                        Parameter::Name(_) | Parameter::Literal(serde_json::Value::String(_))
                    ) =>
                {
                    return Err((
                        line,
                        "a partial's name must be written out, not computed (`{{> (…)}}`)".into(),
                    ));
                }
                TemplateElement::HtmlExpression(_) => {
                    return Err((
                        line,
                        "`{{{…}}}` and `{{& …}}` print without escaping; every value is escaped here"
                            .into(),
                    ));
                }
                TemplateElement::HelperBlock(block) => {
                    for body in [&block.template, &block.inverse].into_iter().flatten() {
                        walk(body)?;
                    }
                }
                TemplateElement::DecoratorBlock(d) | TemplateElement::PartialBlock(d) => {
                    if let Some(body) = &d.template {
                        walk(body)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
    walk(template)
}

/// The literal names of the partials a compiled template includes, and the inline partials
/// it defines with their own includes: the edges of the partial graph (`{{> (dynamic)}}`
/// names are left to the render's depth limit).
pub(super) fn includes(template: &Template) -> (Vec<String>, Vec<(String, Vec<String>)>) {
    fn name(p: &Parameter) -> Option<String> {
        match p {
            Parameter::Literal(serde_json::Value::String(s)) => Some(s.clone()),
            Parameter::Subexpression(_) | Parameter::Literal(_) => None,
            other => other.as_name().map(str::to_owned),
        }
    }
    fn walk(
        template: &Template,
        calls: &mut Vec<String>,
        inlines: &mut Vec<(String, Vec<String>)>,
    ) {
        for element in &template.elements {
            match element {
                TemplateElement::PartialExpression(d) | TemplateElement::PartialBlock(d) => {
                    if let Some(n) = name(&d.name).filter(|n| n != "@partial-block") {
                        calls.push(n);
                    }
                    if let Some(body) = &d.template {
                        walk(body, calls, inlines);
                    }
                }
                TemplateElement::DecoratorBlock(d) => {
                    let inline = d.name.as_name() == Some("inline");
                    if let (true, Some(n), Some(body)) =
                        (inline, d.params.first().and_then(name), &d.template)
                    {
                        let mut own = Vec::new();
                        walk(body, &mut own, inlines);
                        inlines.push((n, own));
                    } else if let Some(body) = &d.template {
                        walk(body, calls, inlines);
                    }
                }
                TemplateElement::HelperBlock(block) => {
                    for body in [&block.template, &block.inverse].into_iter().flatten() {
                        walk(body, calls, inlines);
                    }
                }
                _ => {}
            }
        }
    }
    let (mut calls, mut inlines) = (Vec::new(), Vec::new());
    walk(template, &mut calls, &mut inlines);
    (calls, inlines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_counts_blocks_and_subexpressions_and_skips_comments() {
        assert_eq!(
            nesting("{{#if a}}{{#each b}}x{{/each}}{{else}}y{{/if}}").0,
            2
        );
        assert_eq!(nesting("{{x (a (b (c d)))}}").0, 3);
        assert_eq!(nesting("{{#if a}}{{x (a b)}}{{/if}}").0, 2);
        assert_eq!(nesting("{{!-- {{#if}}{{#if}} --}}{{x}}").0, 0);
        assert_eq!(nesting("{{~#if a~}} {{~/if~}}").0, 1);
        let deep = "{{#if a}}".repeat(40) + &"{{/if}}".repeat(40);
        assert_eq!(nesting(&deep).0, 40);
        assert!(check_source(&deep).unwrap_err().1.contains("nest 40 deep"));
    }

    #[test]
    fn nesting_is_not_hidden_by_quotes_brackets_or_chains() {
        let deep =
            |open: &str, close: &str| format!("{{{{x {}y{}}}}}", open.repeat(40), close.repeat(40));
        // A `}}` in a string neither ends the tag nor hides what follows.
        let quoted = deep("(eq \"}}\" ", ")");
        assert!(
            check_source(&quoted)
                .unwrap_err()
                .1
                .contains("nest 40 deep")
        );
        let arrays = deep("[", "]");
        assert!(
            check_source(&arrays)
                .unwrap_err()
                .1
                .contains("nest 40 deep")
        );
        // What the scan cannot see (a quote inside a path's `[…]` segment, which the grammar
        // reads as raw text), the compiled template's depth refuses.
        let hidden = format!("{{{{x y.[a\"] {}y{}}}}}", "(a ".repeat(40), ")".repeat(40));
        assert!(check_source(&hidden).is_ok(), "the scan does not see it");
        let refused = super::super::compile_file("t", &hidden, false)
            .unwrap_err()
            .1;
        assert!(refused.contains("nest 40 deep"), "{refused}");
        // So do long `{{else if}}` chains: Handlebars renders them as nested blocks.
        let chain = format!("{{{{#if a}}}}{}{{{{/if}}}}", "{{else if b}}x".repeat(20));
        assert_eq!(nesting(&chain).0, 1);
        let refused = super::super::compile_file("t", &chain, false)
            .unwrap_err()
            .1;
        assert!(refused.contains("chains"), "{refused}");
        let short = format!("{{{{#if a}}}}{}{{{{/if}}}}", "{{else if b}}x".repeat(10));
        assert!(super::super::compile_file("t", &short, false).is_ok());
    }

    #[test]
    fn a_file_of_the_deepest_subexpressions_compiles_to_a_clear_error_on_a_small_thread() {
        // 64 KiB of `(a`, hidden from the scan: the compile's own stack holds the parser and
        // Handlebars' recursive build; a thread of 256 KiB calls it.
        let levels = (MAX_FILE_BYTES - 16) / 3;
        let source = format!(
            "{{{{x y.[\"] {}y{}}}}}",
            "(a".repeat(levels),
            ")".repeat(levels)
        );
        assert!(source.len() <= MAX_FILE_BYTES && check_source(&source).is_ok());
        let refused = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || super::super::compile_file("t", &source, false).map(|_| ()))
            .unwrap()
            .join()
            .expect("no overflow");
        assert!(refused.unwrap_err().1.contains("deep"));
    }

    #[test]
    fn sources_are_checked_for_size_tags_control_characters_and_reserved_names() {
        assert!(check_source("Hello {{first_name}}\n").is_ok());
        let big = "x".repeat(MAX_FILE_BYTES + 1);
        assert!(
            check_source(&big)
                .unwrap_err()
                .1
                .contains("larger than 64 KiB")
        );
        let tags = "{{x}}".repeat(MAX_TAGS + 1);
        assert!(check_source(&tags).unwrap_err().1.contains("at most 1000"));
        assert_eq!(
            check_source("a\nb\u{0}").unwrap_err().0,
            Some(2),
            "a NUL is refused, with its line"
        );
        assert!(
            check_source("{{__budget_leave}}")
                .unwrap_err()
                .1
                .contains("reserved")
                || check_source("{{__budget_leave}}")
                    .unwrap_err()
                    .1
                    .contains("lifecycle's own")
        );
    }

    #[test]
    fn markup_nesting_skips_void_and_self_closing_tags() {
        assert_eq!(
            markup_nesting("<mjml><mj-body><br><img src=x><mj-image/></mj-body></mjml>"),
            2
        );
        assert_eq!(markup_nesting(&"<div>".repeat(300)), 300);
        assert_eq!(markup_nesting("<!-- <div><div> --><p>x</p>"), 1);
        // A closing tag of an element that is not open (`</br>`) closes nothing.
        assert_eq!(markup_nesting(&"<b></br>".repeat(300)), 300);
        assert_eq!(markup_nesting(&"<p><b>x</p>".repeat(300)), 2);
        assert!(check_markup(&"<div>".repeat(101)).is_err());
    }

    #[test]
    fn the_css_work_is_rules_times_elements() {
        let html = format!(
            "<html><head><style>{}</style></head><body>{}</body></html>",
            "p{color:red}".repeat(3000),
            "<p>x</p>".repeat(3000)
        );
        assert!(
            check_css_work(&html)
                .unwrap_err()
                .contains("(9012000 rules × elements")
        );
        assert!(check_css_work("<style>p{}</style><p>x</p>").is_ok());
    }
}
