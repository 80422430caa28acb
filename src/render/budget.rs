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
//!   deeply its blocks nest (the parser's time grows with the square of that, and its stack
//!   with it), and no reserved name. The partials' graph, inline partials included, must have
//!   no cycle (`render::check_partials`).
//! - **While rendering**, every template body (the template itself, each block's body and
//!   `{{else}}`, each partial's and inline partial's body) starts and ends with a call to this
//!   module's helpers (`instrument`), which count steps and nesting, the bytes the body writes,
//!   and check the clock; the output goes to a writer that counts it; and every value printed
//!   is counted by the escape functions. The first limit crossed ends the render with
//!   `Exceeded`, which names the limit.
//! - **Turning MJML into HTML** (mrml, then css-inline) cannot be interrupted, so its input is
//!   bounded first: its size (the output limit), how deeply its tags nest (both libraries
//!   recurse per level: 9,000 levels overflowed an 8 MiB stack), and the CSS inlining's work,
//!   rules × elements (quadratic: 6,000 × 6,000 took 3.2 s). It runs on a stack of its own
//!   (`stacker`), so the thread it runs on does not matter.
//!
//! The numbers are far above what the shipped templates use (see `tests`), and are
//! documented in README ("Templates").

use std::cell::RefCell;
use std::fmt;
use std::time::{Duration, Instant};

use handlebars::template::{Parameter, TemplateElement, TemplateMapping};
use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, Output, RenderContext, RenderErrorReason,
    Template,
};

/// The largest template file.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// The most tags (`{{`) in one file.
pub const MAX_TAGS: usize = 1_000;
/// How deeply blocks (and a tag's subexpressions) may nest in one file.
pub const MAX_SOURCE_NESTING: usize = 32;
/// How deeply bodies may nest while rendering: blocks and partials, across files.
pub const MAX_DEPTH: u32 = 96;
/// How deeply partials (inline ones included) may include one another while rendering.
pub const MAX_PARTIAL_DEPTH: u32 = 12;
/// Bodies rendered and values printed in one render (a loop's body counts once per item).
pub const MAX_STEPS: u64 = 100_000;
/// Bytes one template's render may write.
pub const MAX_OUTPUT: usize = 256 * 1024;
/// Bytes written in all by one render, into its output and into the buffers Handlebars
/// renders partial blocks into first.
pub const MAX_WRITTEN: usize = 2 * MAX_OUTPUT;
/// How long one render (an email's subject, body and text, or an SMS) may take, MJML aside.
pub const TIME_LIMIT: Duration = Duration::from_secs(2);
/// How deeply the tags of an email's MJML may nest.
pub const MAX_MARKUP_NESTING: usize = 100;
/// The CSS inliner's work: style rules × elements of the HTML made from MJML.
pub const MAX_CSS_WORK: u64 = 5_000_000;
/// The stack the MJML stage runs on.
const MJML_STACK: usize = 16 * 1024 * 1024;
/// The most spaces a standalone partial's lines are indented by (Handlebars indents every line
/// of a partial as its tag is; a partial's output could otherwise grow by its indent per line).
const MAX_INDENT: usize = 16;
/// The names of the budget's own helpers start with this; no template may use it.
pub const RESERVED: &str = "__budget";

/// Which limit a render crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// `MAX_STEPS`.
    Steps,
    /// `MAX_DEPTH`.
    Depth,
    /// `MAX_PARTIAL_DEPTH`.
    PartialDepth,
    /// `MAX_OUTPUT` or `MAX_WRITTEN`.
    Output,
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
            Exceeded::Depth => write!(
                f,
                "blocks and partials nested more than {MAX_DEPTH} deep while rendering"
            ),
            Exceeded::PartialDepth => write!(
                f,
                "partials included one another more than {MAX_PARTIAL_DEPTH} deep: a partial that includes itself?"
            ),
            Exceeded::Output => write!(f, "the render wrote more than {} KiB", MAX_OUTPUT / 1024),
            Exceeded::Time => write!(f, "the render took longer than {} s", TIME_LIMIT.as_secs()),
        }
    }
}

impl std::error::Error for Exceeded {}

/// The budget of the render under way on this thread.
struct Budget {
    steps: u64,
    depth: u32,
    partial_depth: u32,
    /// The deepest `depth` and `partial_depth` reached.
    deepest: (u32, u32),
    /// Bytes written, by the bodies' literal text and the values printed.
    written: usize,
    deadline: Instant,
    /// The limit crossed, once one is.
    exceeded: Option<Exceeded>,
}

thread_local! {
    static BUDGET: RefCell<Option<Budget>> = const { RefCell::new(None) };
}

/// Runs `render` under a fresh budget, or under the budget already running on this thread (an
/// email's subject, body and text share one).
pub fn within<T>(render: impl FnOnce() -> T) -> T {
    /// Ends the budget however `render` ends, so a later render starts afresh.
    struct End;
    impl Drop for End {
        fn drop(&mut self) {
            BUDGET.with(|b| b.borrow_mut().take());
        }
    }
    let started = BUDGET.with(|b| {
        let mut b = b.borrow_mut();
        if b.is_some() {
            return false;
        }
        *b = Some(Budget {
            steps: 0,
            depth: 0,
            partial_depth: 0,
            deepest: (0, 0),
            written: 0,
            deadline: Instant::now() + TIME_LIMIT,
            exceeded: None,
        });
        true
    });
    // (Not `then_some`: its argument would be made, and dropped, even when nested.)
    let _end = if started { Some(End) } else { None };
    render()
}

/// What a render used of its budget: (steps, deepest nesting, deepest partial nesting, bytes
/// written). For the tests that show the shipped templates far inside the limits.
#[cfg(test)]
pub(super) fn measure<T>(render: impl FnOnce() -> T) -> (T, (u64, u32, u32, usize)) {
    within(|| {
        let out = render();
        let used = BUDGET.with(|b| {
            let b = b.borrow();
            let b = b.as_ref().expect("within a budget");
            (b.steps, b.deepest.0, b.deepest.1, b.written)
        });
        (out, used)
    })
}

/// The limit the render under way crossed, if any.
pub fn exceeded() -> Option<Exceeded> {
    BUDGET.with(|b| b.borrow().as_ref().and_then(|b| b.exceeded))
}

/// Charges the render under way: `steps` steps, `bytes` written, `depth` and `partials` more
/// nesting (negative when a body ends). An error when a limit is crossed (and for a render
/// outside `within`, which would have no limits).
fn charge(steps: u64, bytes: usize, depth: i32, partials: i32) -> Result<(), Exceeded> {
    BUDGET.with(|b| {
        let mut b = b.borrow_mut();
        let Some(b) = b.as_mut() else {
            return Err(Exceeded::Steps);
        };
        if let Some(exceeded) = b.exceeded {
            return Err(exceeded);
        }
        b.steps += steps;
        b.written = b.written.saturating_add(bytes);
        b.depth = b.depth.saturating_add_signed(depth);
        b.partial_depth = b.partial_depth.saturating_add_signed(partials);
        b.deepest = (b.deepest.0.max(b.depth), b.deepest.1.max(b.partial_depth));
        let crossed = if b.steps > MAX_STEPS {
            Some(Exceeded::Steps)
        } else if b.depth > MAX_DEPTH {
            Some(Exceeded::Depth)
        } else if b.partial_depth > MAX_PARTIAL_DEPTH {
            Some(Exceeded::PartialDepth)
        } else if b.written > MAX_WRITTEN {
            Some(Exceeded::Output)
        } else if b.steps % 32 == 0 && Instant::now() > b.deadline {
            Some(Exceeded::Time)
        } else {
            None
        };
        b.exceeded = crossed;
        crossed.map_or(Ok(()), Err)
    })
}

/// Counts a value printed (the registries' escape functions call it).
pub(super) fn printed(value: &str) {
    // An error here is seen by the next body or write, which ends the render.
    charge(1, value.len(), 0, 0).ok();
}

/// The text registry's escape function: the value as it is, counted.
pub(super) fn no_escape(value: &str) -> String {
    printed(value);
    value.to_owned()
}

/// The output of one template's render: what Handlebars writes, up to `MAX_OUTPUT` bytes,
/// each write a step.
#[derive(Default)]
pub(super) struct Capped {
    pub bytes: Vec<u8>,
}

impl std::io::Write for Capped {
    fn write(&mut self, segment: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + segment.len() > MAX_OUTPUT {
            BUDGET.with(|b| {
                if let Some(b) = b.borrow_mut().as_mut() {
                    b.exceeded.get_or_insert(Exceeded::Output);
                }
            });
            return Err(std::io::Error::other(Exceeded::Output));
        }
        charge(1, 0, 0, 0).map_err(std::io::Error::other)?;
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
    /// A body starts: one step, its literal bytes (the helper's parameter), one level deeper.
    Enter,
    /// A body ends.
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
            Mark::Enter => charge(1, bytes, 1, 0),
            Mark::Leave => charge(0, 0, -1, 0),
            Mark::EnterPartial => charge(1, bytes, 1, 1),
            Mark::LeavePartial => charge(0, 0, -1, -1),
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

/// Puts the budget's marks around every body of a compiled template: `partial` when the
/// template is a partial or a layout. Inline partials' bodies are partials' bodies; blocks',
/// `{{else}}`s' and partial blocks' are plain bodies. Indents of standalone partials are cut
/// to `MAX_INDENT`.
pub(super) fn instrument(template: &mut Template, partial: bool) {
    // The marks of the template itself stand at its first line.
    let start = call(Mark::Leave, None).1;
    mark(template, partial, &start);
}

/// Marks `template`'s bodies; `at` is where an error of its own marks is reported (the line of
/// the block it is the body of).
fn mark(template: &mut Template, partial: bool, at: &TemplateMapping) {
    let mappings: Vec<TemplateMapping> = (0..template.elements.len())
        .map(|i| template.mapping.get(i).unwrap_or(at).clone())
        .collect();
    for (element, mapping) in template.elements.iter_mut().zip(&mappings) {
        match element {
            TemplateElement::HelperBlock(block) => {
                for body in [block.template.as_mut(), block.inverse.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    mark(body, false, mapping);
                }
            }
            TemplateElement::DecoratorBlock(decorator) => {
                let inline = decorator.name.as_name() == Some("inline");
                if let Some(body) = decorator.template.as_mut() {
                    mark(body, inline, mapping);
                }
            }
            TemplateElement::PartialBlock(decorator) => {
                cut_indent(&mut decorator.indent);
                if let Some(body) = decorator.template.as_mut() {
                    mark(body, false, mapping);
                }
            }
            TemplateElement::PartialExpression(decorator) => cut_indent(&mut decorator.indent),
            _ => {}
        }
    }
    let literal: usize = template
        .elements
        .iter()
        .map(|e| match e {
            TemplateElement::RawString(text) => text.len(),
            _ => 0,
        })
        .sum();
    let (enter, leave) = if partial {
        (Mark::EnterPartial, Mark::LeavePartial)
    } else {
        (Mark::Enter, Mark::Leave)
    };
    let keep_mapping = template.mapping.len() == template.elements.len();
    template.elements.insert(0, call(enter, Some(literal)).0);
    template.elements.push(call(leave, None).0);
    if keep_mapping {
        template.mapping.insert(0, at.clone());
        template.mapping.push(at.clone());
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
pub fn check_source(source: &str) -> Result<(), (Option<usize>, String)> {
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

/// How deeply blocks (`{{#…}}` … `{{/…}}`) and subexpressions (`(…)` inside a tag) nest at
/// most, and the byte offset where that depth is first reached. Comments are skipped. The
/// count errs on the deep side (an unclosed block counts), never the shallow one.
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
        let end = source[tag..].find("}}").map_or(bytes.len(), |e| tag + e);
        let is_else = source[tag..end].trim_start().starts_with("else");
        match bytes.get(tag) {
            Some(b'#' | b'^') if !is_else => depth += 1,
            Some(b'/') => depth = depth.saturating_sub(1),
            _ => {}
        }
        let mut parens = 0usize;
        for (k, b) in bytes[tag..end].iter().enumerate() {
            match b {
                b'(' => {
                    parens += 1;
                    if depth + parens > deepest {
                        deepest = depth + parens;
                        at = tag + k;
                    }
                }
                b')' => parens = parens.saturating_sub(1),
                _ => {}
            }
        }
        if depth > deepest {
            deepest = depth;
            at = open;
        }
        i = (end + 2).min(bytes.len());
        if end >= bytes.len() {
            break;
        }
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

/// How deeply tags nest: each opening tag that is not self-closing or void is one deeper,
/// each closing tag one shallower. Comments and `<!…>` declarations are skipped.
fn markup_nesting(markup: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut rest = markup;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        if let Some(comment) = rest.strip_prefix("!--") {
            rest = comment.find("-->").map_or("", |e| &comment[e + 3..]);
            continue;
        }
        let end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..end];
        if let Some(closing) = tag.strip_prefix('/') {
            if !closing.is_empty() {
                depth = depth.saturating_sub(1);
            }
        } else if tag.starts_with(|c: char| c.is_ascii_alphabetic()) && !tag.ends_with('/') {
            let name: String = tag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect::<String>()
                .to_ascii_lowercase();
            if !VOID.contains(&name.as_str()) {
                depth += 1;
                deepest = deepest.max(depth);
            }
        }
        rest = &rest[end.min(rest.len())..];
    }
    deepest
}

/// Whether css-inline may inline the CSS of `html`: its style rules × its elements at most
/// `MAX_CSS_WORK`.
pub(super) fn check_css_work(html: &str) -> Result<(), String> {
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
    let work = rules.saturating_mul(elements);
    if work > MAX_CSS_WORK {
        return Err(format!(
            "inlining {rules} style rules into {elements} elements is too much work ({work} > {MAX_CSS_WORK}); use fewer rules or a smaller email"
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

/// Runs the MJML stage on a stack of its own, big enough for the nesting `check_markup`
/// allows, whatever thread calls it.
pub(super) fn on_own_stack<T>(work: impl FnOnce() -> T) -> T {
    stacker::grow(MJML_STACK, work)
}

/// Refuses what a marketer's file may not hold beyond `check_source`: `{{> @partial-block}}`
/// (a partial block's content written more than once, in nested partial blocks, would
/// multiply the bytes without bound), and inline partials named like no partial.
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
                .contains("3000 style rules")
        );
        assert!(check_css_work("<style>p{}</style><p>x</p>").is_ok());
    }
}
