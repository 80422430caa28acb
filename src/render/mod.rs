//! Templates: two Handlebars registries built once at start-up, with locale fallback.
//!
//! `templates/<trigger>/<locale>/` holds `email.subject.hbs`, `email.html.hbs`, optional
//! `email.txt.hbs` and `sms.hbs`; `templates/partials/` and `templates/layouts/` are shared.
//! HTML templates live in a registry that escapes every value; subject, text and SMS live in a
//! no-escape registry (their output is not HTML). Both are strict: a variable that the context
//! lacks is an error, not an empty string.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, bail};
use handlebars::{Handlebars, Template};
use serde_json::Value;

pub(crate) mod budget;
mod context;
mod frames;
pub(crate) mod helpers;

pub(crate) use context::{add_shop_variables, context_now};

use crate::domain::Locale;
use crate::domain::Trigger;

/// The locale every trigger must have.
pub(crate) const DEFAULT_LOCALE: &str = "en";

/// A rendered email.
#[derive(Debug, Clone)]
pub struct RenderedEmail {
    /// One line: control characters removed, so it cannot break the header.
    pub subject: String,
    /// The HTML part.
    pub html: String,
    /// The plain-text alternative.
    pub text: String,
    /// `html` escaped as the contents of a JSON string, when its frame made it (see
    /// `frames`): what an HTTP provider's JSON body copies instead of escaping `html` again.
    pub html_json: Option<String>,
}

impl PartialEq for RenderedEmail {
    /// The same email: `html_json` is only another form of `html`.
    fn eq(&self, other: &RenderedEmail) -> bool {
        (&self.subject, &self.html, &self.text) == (&other.subject, &other.html, &other.text)
    }
}

/// The loaded templates.
#[derive(Clone)]
pub struct Templates {
    /// Email HTML; its escape function makes frames' tokens while a frame is made.
    html: Handlebars<'static>,
    text: Handlebars<'static>,
    /// `trigger/locale` pairs that have templates.
    available: HashSet<String>,
    /// Every source by its path under the templates' root (`welcome/ko/sms.hbs`).
    sources: std::collections::BTreeMap<String, String>,
    /// What each compiled file includes: the partial graph's edges (`Graph`).
    graph: Graph,
    /// MJML emails made into HTML once per structure. The shipped templates and the catalog
    /// in force share one cache (`sharing_frames`); an overlay made to validate or preview
    /// has none, so a marketer's previews never take the room of the published emails.
    frames: std::sync::Arc<frames::Frames>,
}

/// The partial graph: what each compiled file (by name, `partials/footer`,
/// `welcome/ko/email.mjml`) includes by a literal name, and each inline partial it defines
/// with what that includes.
type Graph = std::collections::BTreeMap<String, (Vec<String>, Vec<(String, Vec<String>)>)>;

/// The files a (trigger, locale) may have, by name.
pub(crate) const FILE_NAMES: [&str; 5] = [
    "email.subject.hbs",
    "email.mjml.hbs",
    "email.html.hbs",
    "email.txt.hbs",
    "sms.hbs",
];

/// A problem with one file of a template version: which file, the line when known, and what.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct FileError {
    /// The file's name (`email.mjml.hbs`), or empty when the problem is the version's.
    pub file: String,
    /// 1-based line, when the error has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The shipped templates, compiled into the binary: `lifecycle` finds them from any directory.
static SHIPPED: include_dir::Dir<'static> =
    include_dir::include_dir!("$CARGO_MANIFEST_DIR/templates");

/// Template files by path relative to the templates' root (`welcome/ko/sms.hbs`).
type Sources = Vec<(String, String)>;

impl Templates {
    /// The templates in use: those of `dir` when one is configured (it must exist and hold
    /// every trigger's default locale), else the shipped ones compiled into the binary.
    pub fn load_configured(dir: Option<&Path>) -> anyhow::Result<Templates> {
        match dir {
            Some(dir) => Templates::load(dir).with_context(|| {
                format!(
                    "loading templates from {} (LIFECYCLE_TEMPLATES_DIR)",
                    dir.display()
                )
            }),
            None => Templates::shipped(),
        }
    }

    /// The shipped templates (version 0).
    pub fn shipped() -> anyhow::Result<Templates> {
        let mut sources = Sources::new();
        collect_shipped(&SHIPPED, &mut sources)?;
        Templates::compile(sources).context("compiling the shipped templates")
    }

    /// Loads and compiles every template under `dir`, which must exist.
    pub fn load(dir: &Path) -> anyhow::Result<Templates> {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let mut sources = Sources::new();
        read_tree(dir, dir, &mut sources)?;
        Templates::compile(sources)
    }

    /// Compiles templates from their sources: (path under the templates' root, such as
    /// `welcome/ko/sms.hbs` or `partials/footer.hbs`, and the file's text).
    pub fn from_sources(sources: Vec<(String, String)>) -> anyhow::Result<Templates> {
        Templates::compile(sources)
    }

    /// Compiles templates from their sources: every file within the budget, then the shared
    /// partials and layouts (refusing an include cycle), then each (trigger, locale)'s files.
    fn compile(sources: Sources) -> anyhow::Result<Templates> {
        let mut templates = Templates::empty();
        for (path, source) in &sources {
            let (line, message) = match budget::check_source(source) {
                Ok(()) => continue,
                Err(refused) => refused,
            };
            let at = line.map_or(String::new(), |l| format!(" line {l}"));
            bail!("templates/{path}{at}: {message}");
        }
        for (path, source) in &sources {
            templates.add_shared(path, source)?;
        }
        // A partial that includes itself, directly or not, would recurse until the stack
        // overflows (the render's depth limit stops it, but a literal cycle is refused here
        // with its name): refuse it before anything renders.
        check_graph(&templates.graph)?;
        for (path, source) in &sources {
            templates.add_pair_file(path, source)?;
        }
        check_graph(&templates.graph)?;
        templates.check_complete()?;
        Ok(templates)
    }

    /// No templates yet: the two registries with lifecycle's helpers, strict.
    fn empty() -> Templates {
        let mut html = Handlebars::new();
        let mut text = Handlebars::new();
        text.register_escape_fn(budget::no_escape);
        html.register_escape_fn(frames::escape);
        for registry in [&mut html, &mut text] {
            registry.set_strict_mode(true);
            registry.set_dev_mode(false);
            helpers::register(registry);
            budget::register(registry);
        }
        Templates {
            html,
            text,
            available: HashSet::new(),
            sources: Default::default(),
            graph: Graph::new(),
            frames: std::sync::Arc::new(frames::Frames::new(frames::PUBLISHED_BUDGET)),
        }
    }

    /// Registers `path` in both registries if it is a shared partial or layout
    /// (`partials/x.hbs`, `layouts/x.hbs`).
    fn add_shared(&mut self, path: &str, source: &str) -> anyhow::Result<()> {
        let shared = (path.starts_with("partials/") || path.starts_with("layouts/"))
            && path.matches('/').count() == 1;
        let Some(name) = path.strip_suffix(".hbs").filter(|_| shared) else {
            return Ok(());
        };
        let (parsed, compiled) = compile_file(name, source, true).map_err(|(line, message)| {
            let at = line.map_or(String::new(), |l| format!(" line {l}"));
            anyhow::anyhow!("compiling template {name}.hbs{at}: {message}")
        })?;
        self.html.register_template(name, compiled.clone());
        self.text.register_template(name, compiled);
        self.graph
            .insert(name.to_owned(), budget::includes(&parsed));
        self.sources.insert(path.to_owned(), source.to_owned());
        Ok(())
    }

    /// Registers `path` if it is a (trigger, locale)'s file (`welcome/ko/sms.hbs`).
    fn add_pair_file(&mut self, path: &str, source: &str) -> anyhow::Result<()> {
        let parts: Vec<&str> = path.split('/').collect();
        let [trigger, locale_name, file] = parts[..] else {
            return Ok(());
        };
        let (Some(_), Some(stem)) = (Trigger::parse(trigger), file.strip_suffix(".hbs")) else {
            return Ok(());
        };
        Locale::parse(locale_name)
            .with_context(|| format!("template directory {trigger}/{locale_name}"))?;
        let name = format!("{trigger}/{locale_name}/{stem}");
        let (parsed, compiled) =
            compile_file(&name, source, false).map_err(|(line, message)| {
                let at = line.map_or(String::new(), |l| format!(" line {l}"));
                anyhow::anyhow!("compiling template {name}.hbs{at}: {message}")
            })?;
        self.graph.insert(name.clone(), budget::includes(&parsed));
        self.registry_of(stem).register_template(&name, compiled);
        self.sources.insert(path.to_owned(), source.to_owned());
        self.available.insert(format!("{trigger}/{locale_name}"));
        Ok(())
    }

    /// The registry of a file: the escaping one for HTML and MJML, the other for the rest.
    fn registry_of(&mut self, stem: &str) -> &mut Handlebars<'static> {
        if stem.ends_with(".html") || stem.ends_with(".mjml") {
            &mut self.html
        } else {
            &mut self.text
        }
    }

    /// These templates with their MJML frames kept in `frames` (the catalog in force shares
    /// the shipped templates' cache).
    pub fn sharing_frames(mut self, other: &Templates) -> Templates {
        self.frames = other.frames.clone();
        self
    }

    /// Every trigger has templates in the default locale, and every locale has the required
    /// files.
    fn check_complete(&self) -> anyhow::Result<()> {
        for trigger in Trigger::ALL {
            let key = format!("{}/{DEFAULT_LOCALE}", trigger.as_str());
            if !self.available.contains(&key) {
                bail!(
                    "templates/{key}/ is missing: every trigger needs its {DEFAULT_LOCALE} templates"
                );
            }
        }
        for key in &self.available {
            let (trigger, _) = key.split_once('/').expect("trigger/locale");
            if !self
                .available
                .contains(&format!("{trigger}/{DEFAULT_LOCALE}"))
            {
                bail!("templates/{key} exists but templates/{trigger}/{DEFAULT_LOCALE} does not");
            }
            for required in ["email.subject", "sms"] {
                if !self.text.has_template(&format!("{key}/{required}")) {
                    bail!("templates/{key}/{required}.hbs is missing");
                }
            }
            if !self.html.has_template(&format!("{key}/email.mjml"))
                && !self.html.has_template(&format!("{key}/email.html"))
            {
                bail!("templates/{key}/ has neither email.mjml.hbs nor email.html.hbs");
            }
        }
        Ok(())
    }

    /// The files of one (trigger, locale) as they are here, by file name.
    pub fn files(
        &self,
        trigger: Trigger,
        locale: &str,
    ) -> std::collections::BTreeMap<String, String> {
        let prefix = format!("{}/{locale}/", trigger.as_str());
        self.sources
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .filter_map(|(path, source)| {
                let file = &path[prefix.len()..];
                FILE_NAMES
                    .contains(&file)
                    .then(|| (file.to_owned(), source.clone()))
            })
            .collect()
    }

    /// The (trigger, locale) pairs that have templates, sorted.
    pub fn pairs(&self) -> Vec<(Trigger, String)> {
        let mut pairs: Vec<(Trigger, String)> = self
            .available
            .iter()
            .filter_map(|key| {
                let (trigger, locale) = key.split_once('/')?;
                Some((Trigger::parse(trigger)?, locale.to_owned()))
            })
            .collect();
        pairs.sort_by(|a, b| (a.0.as_str(), &a.1).cmp(&(b.0.as_str(), &b.1)));
        pairs
    }

    /// These templates with one (trigger, locale)'s files replaced by `files` (a version),
    /// validated as `templates check` validates: each file compiles, includes only the shared
    /// partials and layouts, is at most 256 KiB; the required files are there; and the email
    /// and SMS render with the trigger's sample context (strict: an unknown variable is an
    /// error). Errors name the file and, where the error has one, the line.
    pub fn overlay(
        &self,
        trigger: Trigger,
        locale: &str,
        files: &std::collections::BTreeMap<String, String>,
    ) -> Result<Templates, Vec<FileError>> {
        let mut errors = Vec::new();
        let whole = |message: String| FileError {
            file: String::new(),
            line: None,
            message,
        };
        if Locale::parse(locale).is_err() {
            return Err(vec![whole(format!(
                "{locale:?} is not a locale (BCP 47, e.g. ko or ko-KR)"
            ))]);
        }
        let mut next = self.clone();
        // Renders made to validate or preview keep no frames.
        next.frames = std::sync::Arc::new(frames::Frames::new(0));
        let base = format!("{}/{locale}", trigger.as_str());
        for file in FILE_NAMES {
            let name = format!("{base}/{}", file.trim_end_matches(".hbs"));
            next.html.unregister_template(&name);
            next.text.unregister_template(&name);
            next.sources.remove(&format!("{base}/{file}"));
            next.graph.remove(&name);
        }
        for (file, source) in files {
            if let Err(error) = next.add_file(&base, file, source, self) {
                errors.push(error);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        errors.extend(missing_files(files));
        if !errors.is_empty() {
            return Err(errors);
        }
        next.available.insert(base.clone());
        let mut context = sample_context(trigger);
        context["locale"] = Value::String(locale.to_owned());
        let email = next.render_email(trigger, locale, &context).map(drop);
        let sms = next.render_sms(trigger, locale, &context).map(drop);
        for error in [email.err(), sms.err()].into_iter().flatten() {
            errors.push(render_error(&base, &error));
        }
        if errors.is_empty() {
            Ok(next)
        } else {
            Err(errors)
        }
    }

    /// Compiles one file of a version into these templates, after checking its budget, that
    /// it includes only shared partials and layouts or its own inline ones, and that its
    /// includes make no cycle. `shared` holds the partials and layouts.
    fn add_file(
        &mut self,
        base: &str,
        file: &str,
        source: &str,
        shared: &Templates,
    ) -> Result<(), FileError> {
        let at = |line: Option<usize>, message: String| FileError {
            file: file.to_owned(),
            line,
            message,
        };
        if !FILE_NAMES.contains(&file) {
            return Err(at(
                None,
                format!(
                    "not a template file; the files are {}",
                    FILE_NAMES.join(", ")
                ),
            ));
        }
        let stem = file.trim_end_matches(".hbs");
        let name = format!("{base}/{stem}");
        let (parsed, compiled) = match compile_file(&name, source, false) {
            Ok(compiled) => compiled,
            Err((line, message)) => {
                return Err(at(line, message));
            }
        };
        if let Err((line, message)) = budget::check_pair_file(&parsed) {
            return Err(at(line, message));
        }
        // A version may include the shared partials and layouts, and partials it defines
        // inline; never another trigger's or locale's files.
        let (calls, inlines) = budget::includes(&parsed);
        let own: HashSet<&str> = inlines.iter().map(|(n, _)| n.as_str()).collect();
        let called = calls
            .iter()
            .chain(inlines.iter().flat_map(|(_, c)| c))
            .find(|c| !shared.is_shared(c) && !own.contains(c.as_str()));
        if let Some(bad) = called {
            let line = source
                .find(bad.as_str())
                .map(|at| budget::line_of(source, at));
            return Err(at(
                line,
                format!(
                    "includes {bad}, which is not a partial or layout (partials/…, layouts/…) nor one defined inline here"
                ),
            ));
        }
        self.graph.insert(name.clone(), (calls, inlines));
        if let Err(cycle) = check_graph(&self.graph) {
            self.graph.remove(&name);
            return Err(at(None, format!("{cycle:#}")));
        }
        self.registry_of(stem).register_template(&name, compiled);
        self.sources
            .insert(format!("{base}/{file}"), source.to_owned());
        Ok(())
    }

    /// Whether `name` is a shared partial or layout.
    fn is_shared(&self, name: &str) -> bool {
        (name.starts_with("partials/") || name.starts_with("layouts/"))
            && self.sources.contains_key(&format!("{name}.hbs"))
    }

    /// Whether (trigger, locale) has templates of its own (not through fallback).
    pub fn has_pair(&self, trigger: Trigger, locale: &str) -> bool {
        self.available
            .contains(&format!("{}/{locale}", trigger.as_str()))
    }

    /// Whether the trigger has templates at all.
    pub fn has_trigger(&self, trigger: Trigger) -> bool {
        self.available
            .contains(&format!("{}/{DEFAULT_LOCALE}", trigger.as_str()))
    }

    /// The locale whose templates serve `locale`: `ko-KR` → `ko` → `en`.
    pub fn resolve_locale<'a>(&self, trigger: Trigger, locale: &'a Locale) -> &'a str {
        locale
            .fallbacks()
            .into_iter()
            .find(|l| {
                self.available
                    .contains(&format!("{}/{l}", trigger.as_str()))
            })
            .unwrap_or(DEFAULT_LOCALE)
    }

    /// Renders the email of a trigger in `locale` (already resolved), each of its templates
    /// within the render budget (`budget`).
    pub fn render_email(
        &self,
        trigger: Trigger,
        locale: &str,
        context: &Value,
    ) -> anyhow::Result<RenderedEmail> {
        let base = format!("{}/{locale}", trigger.as_str());
        // One copy of the context for the email's three or four renders: `Registry::render`
        // copies it for each (through serde), about a tenth of an email's render time.
        let context = &handlebars::Context::from(context.clone());
        let subject = one_line(&render(
            &self.text,
            &format!("{base}/email.subject"),
            context,
        )?);
        let mjml_name = format!("{base}/email.mjml");
        let (html, html_json) = if self.html.has_template(&mjml_name) {
            self.mjml_email(&mjml_name, context)?
        } else {
            (
                render(&self.html, &format!("{base}/email.html"), context)?,
                None,
            )
        };
        let text_name = format!("{base}/email.txt");
        let text = if self.text.has_template(&text_name) {
            render(&self.text, &text_name, context)?
        } else {
            html_to_text(&html)
        };
        Ok(RenderedEmail {
            subject,
            html,
            text,
            html_json,
        })
    }

    /// The HTML of MJML template `name`: from its structure's frame when there is one (see
    /// `frames`), with its JSON form, else through the whole pipeline (Handlebars, mrml,
    /// css-inline); the first message of a structure makes its frame, kept only if it gives
    /// this message's HTML.
    fn mjml_email(
        &self,
        name: &str,
        context: &handlebars::Context,
    ) -> anyhow::Result<(String, Option<String>)> {
        let whole = || Ok((self.mjml_email_whole(name, context)?, None));
        if !self.frames.keeps() {
            return whole();
        }
        let (structure, values) = frames::collecting(|| render(&self.html, name, context));
        let structure = structure?;
        if !values.iter().all(|v| frames::fits(v)) {
            return whole();
        }
        match self.frames.get(&structure) {
            Some(Some(frame)) => match frame.fill(&values) {
                Some(filled) => Ok((filled.html, Some(filled.json))),
                None => whole(),
            },
            Some(None) => whole(),
            None => {
                let html = self.mjml_email_whole(name, context)?;
                let frame = mjml_to_html(&structure)
                    .ok()
                    .and_then(|made| frames::Frame::parse(&made))
                    .filter(|frame| frame.fill(&values).is_some_and(|f| f.html == html));
                self.frames.keep(structure, frame);
                Ok((html, None))
            }
        }
    }

    /// The HTML of MJML template `name` through the whole pipeline.
    fn mjml_email_whole(
        &self,
        name: &str,
        context: &handlebars::Context,
    ) -> anyhow::Result<String> {
        let mjml = render(&self.html, name, context)?;
        mjml_to_html(&mjml).with_context(|| format!("turning {name}.hbs into HTML"))
    }

    /// Renders every template of every trigger and locale with the trigger's sample context
    /// (strict: a variable outside the documented context fails, naming the file) and returns
    /// warnings: SMS texts longer than `max_sms_segments` segments.
    pub fn check(&self, max_sms_segments: usize) -> anyhow::Result<Vec<String>> {
        let mut warnings = Vec::new();
        let mut keys: Vec<&String> = self.available.iter().collect();
        keys.sort();
        for key in keys {
            let (name, locale) = key.split_once('/').expect("trigger/locale");
            let trigger = Trigger::parse(name).expect("loaded by trigger");
            let mut context = sample_context(trigger);
            context["locale"] = Value::String(locale.to_owned());
            self.render_email(trigger, locale, &context)?;
            let sms = self.render_sms(trigger, locale, &context)?;
            let (encoding, segments) = helpers::sms_segments(&sms);
            if segments > max_sms_segments {
                warnings.push(format!(
                    "templates/{key}/sms.hbs: {segments} {encoding} segments with the sample context, more than dispatch.sms_max_segments ({max_sms_segments})"
                ));
            }
        }
        Ok(warnings)
    }

    /// Renders the SMS of a trigger in `locale` (already resolved), within the render budget.
    pub fn render_sms(
        &self,
        trigger: Trigger,
        locale: &str,
        context: &Value,
    ) -> anyhow::Result<String> {
        let name = format!("{}/{locale}/sms", trigger.as_str());
        let body = render(
            &self.text,
            &name,
            &handlebars::Context::from(context.clone()),
        )?;
        Ok(body.trim().to_owned())
    }
}

/// Renders template `name` of `registry` into a string of at most `budget::MAX_OUTPUT`
/// bytes, within the render budget under way. An error names the file and, when a limit was
/// crossed, carries it (`budget::Exceeded`) above Handlebars' error, which has the line.
fn render(
    registry: &Handlebars<'static>,
    name: &str,
    context: &handlebars::Context,
) -> anyhow::Result<String> {
    let mut out = budget::Capped::default();
    let (rendered, _, exceeded) =
        budget::within(|| registry.render_with_context_to_write(name, context, &mut out));
    match rendered {
        Ok(()) => Ok(String::from_utf8(out.bytes).expect("Handlebars writes text")),
        Err(error) => {
            let error = anyhow::Error::new(error);
            Err(match exceeded {
                Some(limit) => error
                    .context(limit)
                    .context(format!("rendering {name}.hbs: over the render budget")),
                None => error.context(format!("rendering {name}.hbs")),
            })
        }
    }
}

/// Compiles template file `name` (`welcome/ko/sms`, `partials/footer`): the template as
/// parsed, and as registered, with the budget's marks (`budget::instrument`; `partial` for
/// partials and layouts). The source is checked first (`budget::check_source`). An error is
/// the line, when known, and what is wrong.
fn compile_file(
    name: &str,
    source: &str,
    partial: bool,
) -> Result<(Template, Template), (Option<usize>, String)> {
    budget::check_source(source)?;
    let parsed = budget::on_compile_stack(|| {
        let parsed = Template::compile_with_name(source, name.to_owned())
            .map_err(|e| (e.pos().map(|(line, _)| line), e.reason().to_string()))?;
        // Refused, it is dropped here, on the stack it was built on.
        budget::check_compiled(&parsed)?;
        Ok::<_, (Option<usize>, String)>(parsed)
    })?;
    let mut compiled = parsed.clone();
    budget::instrument(&mut compiled, partial);
    Ok((parsed, compiled))
}

/// A rendering error of (trigger/locale) `base` as a file error: the file and line when the
/// error is in one of its files, else the whole message (an error inside a shared layout).
pub(crate) fn render_error(base: &str, error: &anyhow::Error) -> FileError {
    // Over the render budget: the limit crossed is the message.
    if let Some(limit) = error
        .chain()
        .find_map(|e| e.downcast_ref::<budget::Exceeded>())
    {
        let at = error
            .chain()
            .find_map(|e| e.downcast_ref::<handlebars::RenderError>());
        let file = at
            .and_then(|e| e.template_name.as_deref())
            .and_then(|name| name.strip_prefix(&format!("{base}/")))
            .map_or(String::new(), |stem| format!("{stem}.hbs"));
        return FileError {
            line: at.and_then(|e| e.line_no).filter(|_| !file.is_empty()),
            file,
            message: format!("over the render budget: {limit}"),
        };
    }
    let message = format!("{error:#}");
    let Some(e) = error
        .chain()
        .find_map(|e| e.downcast_ref::<handlebars::RenderError>())
    else {
        let file = FILE_NAMES
            .iter()
            .find(|f| message.contains(&format!("{base}/{f}")))
            .map_or(String::new(), |f| (*f).to_owned());
        return FileError {
            file,
            line: None,
            message,
        };
    };
    let in_file = e
        .template_name
        .as_deref()
        .and_then(|name| name.strip_prefix(&format!("{base}/")));
    match in_file {
        Some(stem) => FileError {
            file: format!("{stem}.hbs"),
            line: e.line_no,
            message: e.reason().to_string(),
        },
        None => FileError {
            file: String::new(),
            line: None,
            message,
        },
    }
}

/// MJML to responsive HTML (mrml), then CSS inlined (css-inline) for mail clients that ignore
/// `<style>`. No remote stylesheet or font is ever loaded, and `@media` rules are kept, since
/// MJML's responsive layout lives in them.
fn mjml_to_html(mjml: &str) -> anyhow::Result<String> {
    // Both libraries recurse once per level of nesting: bounded first, and on a stack of
    // their own.
    budget::check_markup(mjml).map_err(|e| anyhow::anyhow!("MJML: {e}"))?;
    // mrml's HTML tokenizer panics on some malformed input (a slice inside a multi-byte
    // character, found by fuzzing: fuzz/regressions/templates/): a marketer's template or a
    // member's text must fail this message, never panic a worker.
    budget::on_own_stack(|| {
        std::panic::catch_unwind(|| mjml_to_html_unguarded(mjml)).unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "MJML: the parser failed on this markup (malformed MJML)"
            ))
        })
    })
}

fn mjml_to_html_unguarded(mjml: &str) -> anyhow::Result<String> {
    let parsed = mrml::parse(mjml).map_err(|e| anyhow::anyhow!("MJML: {e}"))?;
    let options = mrml::prelude::render::RenderOptions {
        disable_comments: true,
        social_icon_origin: None,
        fonts: Default::default(),
    };
    let html = parsed
        .element
        .render(&options)
        .map_err(|e| anyhow::anyhow!("MJML: {e}"))?;
    budget::check_css_work(&html).map_err(|e| anyhow::anyhow!("inlining CSS: {e}"))?;
    let inliner = css_inline::InlineOptions::default()
        .load_remote_stylesheets(false)
        .keep_style_tags(true)
        .keep_at_rules(true)
        .build();
    inliner
        .inline(&html)
        .map_err(|e| anyhow::anyhow!("inlining CSS: {e}"))
}

/// Refuses a cycle in the partial graph, naming it (`partials/a → partials/b → partials/a`),
/// and an include of a partial that exists nowhere. An inline partial is a node of the name
/// it defines: a call of that name may reach it, or the shared partial of that name, so both
/// are followed (`{{#*inline "partials/footer"}}{{> partials/footer}}{{/inline}}` is a cycle).
fn check_graph(graph: &Graph) -> anyhow::Result<()> {
    let mut edges: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for (name, (calls, inlines)) in graph {
        edges
            .entry(name.as_str())
            .or_default()
            .extend(calls.iter().map(String::as_str));
        for (inline, own) in inlines {
            edges
                .entry(inline.as_str())
                .or_default()
                .extend(own.iter().map(String::as_str));
        }
    }
    for (name, (calls, _)) in graph {
        let shared = name.starts_with("partials/") || name.starts_with("layouts/");
        if let Some(missing) = calls.iter().find(|c| !edges.contains_key(c.as_str()))
            && shared
        {
            bail!("templates/{name}.hbs includes {missing}, which does not exist");
        }
    }
    // Depth-first search from every node, with the path so far.
    fn visit<'a>(
        edges: &std::collections::BTreeMap<&'a str, Vec<&'a str>>,
        name: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut HashSet<&'a str>,
    ) -> anyhow::Result<()> {
        if let Some(start) = path.iter().position(|p| *p == name) {
            let mut cycle: Vec<&str> = path[start..].to_vec();
            cycle.push(name);
            bail!(
                "partial cycle: {} (it would recurse forever)",
                cycle.join(" → ")
            );
        }
        if !done.insert(name) {
            return Ok(());
        }
        path.push(name);
        for next in edges.get(name).into_iter().flatten() {
            visit(edges, next, path, done)?;
        }
        path.pop();
        Ok(())
    }
    let mut done = HashSet::new();
    for name in edges.keys() {
        visit(&edges, name, &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

/// Reads every `*.hbs` file under `dir` (one or two levels below `root`) as (path relative to
/// `root`, source).
fn read_tree(root: &Path, dir: &Path, out: &mut Sources) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .replace('\\', "/");
        if entry.file_type()?.is_dir() {
            // trigger/locale/file at most.
            if relative.matches('/').count() < 2 {
                read_tree(root, &path, out)?;
            }
            continue;
        }
        if !relative.ends_with(".hbs") {
            continue;
        }
        if entry.metadata()?.len() > budget::MAX_FILE_BYTES as u64 {
            bail!(
                "{} is larger than {} KiB",
                path.display(),
                budget::MAX_FILE_BYTES / 1024
            );
        }
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        out.push((relative, source));
    }
    Ok(())
}

/// The shipped templates' files, as `read_tree` gives a directory's.
fn collect_shipped(dir: &include_dir::Dir<'static>, out: &mut Sources) -> anyhow::Result<()> {
    for file in dir.files() {
        let path = file.path().to_string_lossy().replace('\\', "/");
        if !path.ends_with(".hbs") {
            continue;
        }
        let source = file
            .contents_utf8()
            .with_context(|| format!("shipped template {path} is not UTF-8"))?;
        out.push((path, source.to_owned()));
    }
    for sub in dir.dirs() {
        collect_shipped(sub, out)?;
    }
    Ok(())
}

/// Collapses any run of whitespace and control characters (CR, LF, tab …) into one space.
fn one_line(text: &str) -> String {
    text.split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A plain-text rendering of HTML, for emails without a text template: tags dropped,
/// `<head>`/`<style>` skipped, block ends become line breaks, common entities decoded.
fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('>') else {
            break;
        };
        let tag = rest[start + 1..start + end].to_ascii_lowercase();
        rest = &rest[start + end + 1..];
        for skipped in ["head", "style", "script"] {
            if tag == skipped || tag.starts_with(&format!("{skipped} ")) {
                // Everything up to its end tag is skipped; without one, the rest is (so a
                // thousand unclosed tags cost one pass, not a thousand).
                let close = format!("</{skipped}>");
                rest = rest
                    .as_bytes()
                    .windows(close.len())
                    .position(|w| w.eq_ignore_ascii_case(close.as_bytes()))
                    .map_or("", |at| &rest[at + close.len()..]);
            }
        }
        if [
            "p", "/p", "br", "br/", "br /", "/div", "/tr", "/h1", "/h2", "/h3", "/li",
        ]
        .contains(&tag.as_str())
        {
            out.push('\n');
        }
    }
    out.push_str(rest);
    let decoded = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&#x3D;", "=")
        .replace("&#x60;", "`")
        .replace("&amp;", "&");
    decoded
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sample of each trigger's context as dispatch renders it (the trigger's variables, plus
/// `shop_name`, `unsubscribe_url`, `locale`), with hostile text in it: `templates check`
/// renders every template with it, and the tests do.
pub fn sample_context(trigger: Trigger) -> Value {
    use serde_json::json;
    let rewards = json!([{"points": 100, "discount": 10}, {"points": 250, "discount": 30}]);
    let mut context = match trigger {
        Trigger::Welcome => {
            json!({"member_id": "m1", "signup_bonus": 100, "balance": 100, "rewards": [{"points": 100, "discount": 10}]})
        }
        Trigger::RedemptionReady => {
            json!({"balance": 260, "reward": {"points": 250, "discount": 30}, "rewards": rewards})
        }
        Trigger::TierUp => {
            json!({"tier": "Silver", "previous_tier": "Bronze", "tier_points": 510, "benefits": ["Free shipping", "Early access"]})
        }
        Trigger::PointsExpiring => {
            json!({"points": 40, "expiry_date": "2026-12-22", "days_left": 30, "notice_days": 30, "balance": 140})
        }
        Trigger::Birthday => json!({"bonus": 50, "balance": 150}),
        Trigger::AbandonedCart => json!({
            "cart_id": "c1", "item_count": 3, "total_minor": 3_600, "currency": "USD",
            "items": [{"sku": "m", "name": "Mug <b>", "quantity": 2, "unit_price": 900},
                      {"sku": "t", "name": "Tea", "quantity": 1, "unit_price": 1_800}],
            "checkout_url": "https://shop.example/cart/c1?a=1&b=2",
        }),
    };
    context["first_name"] = json!("Ada <script>");
    context["shop_name"] = json!("Shop");
    context["unsubscribe_url"] = json!("https://loyalty.example/unsubscribe/abc.def");
    context["locale"] = json!("en");
    context["shop_address"] = json!("1 Market Street <Suite 5>, Springfield");
    context["next_tier"] = json!("Gold");
    context["points_to_next_tier"] = json!(120);
    context["next_reward"] = json!({"points": 250, "discount": 30});
    context["points_to_next_reward"] = json!(90);
    context["coupon_code"] = if matches!(trigger, Trigger::AbandonedCart | Trigger::Birthday) {
        json!("SAVE-10 <b>")
    } else {
        Value::Null
    };
    context
}

/// The files a version must have that `files` lacks.
fn missing_files(files: &std::collections::BTreeMap<String, String>) -> Vec<FileError> {
    let whole = |message: String| FileError {
        file: String::new(),
        line: None,
        message,
    };
    let mut errors = Vec::new();
    for required in ["email.subject.hbs", "sms.hbs"] {
        if !files.contains_key(required) {
            errors.push(whole(format!("{required} is missing")));
        }
    }
    if !files.contains_key("email.mjml.hbs") && !files.contains_key("email.html.hbs") {
        errors.push(whole(
            "the email needs email.mjml.hbs or email.html.hbs".to_owned(),
        ));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context as `render_email` makes it.
    fn scope(context: &Value) -> handlebars::Context {
        handlebars::Context::from(context.clone())
    }

    /// `context` with every free text (names, shop, tier, coupon) made hostile: markup,
    /// quotes, ampersands, a no-break space, non-Latin letters, spaces at the edges.
    fn hostile(context: &Value) -> Value {
        const FREE_TEXT: [&str; 8] = [
            "first_name",
            "shop_name",
            "shop_address",
            "coupon_code",
            "next_tier",
            "tier",
            "previous_tier",
            "name",
        ];
        match context {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Value::String(s) if FREE_TEXT.contains(&k.as_str()) => Value::String(
                                format!(" {s} & <b>\"O'Neil\"</b> = `x` 지우 Öz &amp; "),
                            ),
                            other => hostile(other),
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(hostile).collect()),
            other => other.clone(),
        }
    }

    #[test]
    fn every_shipped_email_from_its_frame_is_the_email_made_whole() {
        let t = Templates::shipped().unwrap();
        let mut emails = 0;
        for (trigger, locale) in t.pairs() {
            let name = format!("{}/{locale}/email.mjml", trigger.as_str());
            if !t.html.has_template(&name) {
                continue;
            }
            let mut sample = sample_context(trigger);
            sample["locale"] = Value::String(locale.clone());
            // The same structure without the progress line and the coupon, and with one item.
            let mut plainer = sample.clone();
            plainer["next_tier"] = Value::Null;
            plainer["next_reward"] = Value::Null;
            plainer["coupon_code"] = Value::Null;
            plainer["shop_address"] = Value::Null;
            if let Some(items) = plainer.get_mut("items").and_then(Value::as_array_mut) {
                items.truncate(1);
            }
            for context in [sample, plainer] {
                let whole = t.mjml_email_whole(&name, &scope(&context)).unwrap();
                // The first message of a structure makes its frame…
                assert_eq!(
                    t.mjml_email(&name, &scope(&context)).unwrap(),
                    (whole, None),
                    "{name}"
                );
                let (structure, _) =
                    frames::collecting(|| budget::within(|| t.html.render(&name, &context)).0);
                assert!(
                    matches!(t.frames.get(&structure.unwrap()), Some(Some(_))),
                    "{name}: no frame kept for {context}"
                );
                // …and another message of that structure, with other values, is filled in.
                let other = hostile(&context);
                let (_, values) =
                    frames::collecting(|| budget::within(|| t.html.render(&name, &other)).0);
                assert!(values.iter().all(|v| frames::fits(v)), "{name}: {values:?}");
                let (from_frame, json) = t.mjml_email(&name, &scope(&other)).unwrap();
                assert_eq!(
                    from_frame,
                    t.mjml_email_whole(&name, &scope(&other)).unwrap(),
                    "{name} with {other}"
                );
                // …with its JSON form, as serde_json writes the HTML.
                let as_json = serde_json::to_string(&from_frame).unwrap();
                assert_eq!(
                    json.as_deref(),
                    Some(&as_json[1..as_json.len() - 1]),
                    "{name} with {other}"
                );
                // A value mrml would change in an attribute (a no-break space in the shop's
                // name, which is the title) goes the whole way, and comes out the same.
                let mut odd = other.clone();
                odd["shop_name"] = Value::String("Shop\u{a0}One\\Two\nThree".into());
                assert_eq!(
                    t.mjml_email(&name, &scope(&odd)).unwrap(),
                    (t.mjml_email_whole(&name, &scope(&odd)).unwrap(), None)
                );
                emails += 1;
            }
        }
        assert_eq!(
            emails,
            2 * 18,
            "six triggers in three locales, two structures each"
        );
    }
    use serde_json::json;
    use std::collections::BTreeMap;

    fn templates() -> Templates {
        Templates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")).unwrap()
    }

    fn sample(trigger: Trigger) -> Value {
        sample_context(trigger)
    }

    /// A copy of the shipped templates to spoil.
    fn copy_of_templates() -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            std::fs::create_dir_all(to).unwrap();
            for entry in std::fs::read_dir(from).unwrap() {
                let entry = entry.unwrap();
                let target = to.join(entry.file_name());
                if entry.file_type().unwrap().is_dir() {
                    copy(&entry.path(), &target);
                } else {
                    std::fs::copy(entry.path(), target).unwrap();
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        copy(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("templates"),
            dir.path(),
        );
        dir
    }

    /// The shipped welcome's files with `file` replaced.
    fn welcome_with(t: &Templates, file: &str, source: &str) -> BTreeMap<String, String> {
        let mut files = t.files(Trigger::Welcome, "en");
        files.insert(file.into(), source.into());
        files
    }

    /// The first error of a version of the English welcome with `file` replaced.
    fn refusal(t: &Templates, file: &str, source: &str) -> FileError {
        match t.overlay(Trigger::Welcome, "en", &welcome_with(t, file, source)) {
            Ok(_) => panic!("{file} was accepted: {source:.200}"),
            Err(errors) => errors[0].clone(),
        }
    }

    #[test]
    fn recursion_through_partials_is_refused_or_stopped_never_a_stack_overflow() {
        let t = templates();
        // Self-recursion by an inline partial named as a shared one: a cycle, refused.
        let error = refusal(
            &t,
            "sms.hbs",
            r#"{{#*inline "partials/footer"}}{{> partials/footer}}{{/inline}}{{> partials/footer}}"#,
        );
        assert!(error.message.contains("partial cycle"), "{error:?}");
        // The same, guarded by the member: still a cycle, refused before anyone gets it.
        let error = refusal(
            &t,
            "sms.hbs",
            r#"{{#*inline "partials/footer"}}{{#if (eq member_id "m42")}}{{> partials/footer}}{{/if}}{{/inline}}{{> partials/footer}} STOP"#,
        );
        assert!(error.message.contains("partial cycle"), "{error:?}");
        // Mutual recursion of two inline partials.
        let error = refusal(
            &t,
            "email.subject.hbs",
            r#"{{#*inline "a"}}{{> b}}{{/inline}}{{#*inline "b"}}{{> a}}{{/inline}}{{> a}}"#,
        );
        assert!(error.message.contains("a → b → a"), "{error:?}");
        // Recursion through a name computed at render time (no cycle to see): refused, a
        // partial's name must be written out. (A render deeper than the partial limit is
        // stopped anyway: `the_deepest_render_allowed_fits_a_small_thread_stack`.)
        let error = refusal(
            &t,
            "sms.hbs",
            r#"{{#*inline "m42"}}{{#if (eq member_id "m42")}}{{> (lookup this "member_id")}}{{/if}}{{/inline}}{{> m42}}Hi STOP"#,
        );
        assert!(error.message.contains("must be written out"), "{error:?}");
        assert_eq!(error.line, Some(1), "{error:?}");
    }

    #[test]
    fn loops_output_and_nesting_are_bounded() {
        let t = templates();
        let with_rewards = |n: usize, address: &str| {
            let mut context = sample(Trigger::Welcome);
            context["rewards"] = json!(
                (0..n)
                    .map(|i| json!({"points": i, "discount": i}))
                    .collect::<Vec<_>>()
            );
            context["shop_address"] = json!(address);
            context
        };
        // Forty nested loops: refused when saved (blocks nest 40 deep).
        let forty = "{{#each @root.rewards}}".repeat(40) + "x" + &"{{/each}}".repeat(40);
        let error = refusal(&t, "sms.hbs", &forty);
        assert!(error.message.contains("nest 40 deep"), "{error:?}");
        // Sixteen, as deep as a file may nest, over a member's list of three: 3^16 bodies;
        // the step limit ends it, in well under the time limit.
        let loops = "{{#each @root.rewards}}".repeat(16) + "x" + &"{{/each}}".repeat(16) + " STOP";
        let next = t
            .overlay(Trigger::Welcome, "en", &welcome_with(&t, "sms.hbs", &loops))
            .expect("one reward in the sample: one pass");
        let started = std::time::Instant::now();
        let error = next
            .render_sms(Trigger::Welcome, "en", &with_rewards(3, "x"))
            .unwrap_err();
        let file = render_error("welcome/en", &error);
        assert_eq!(
            (file.file.as_str(), file.line),
            ("sms.hbs", Some(1)),
            "{file:?}"
        );
        assert!(file.message.contains("more than 100000 steps"), "{file:?}");
        assert!(
            started.elapsed() < budget::TIME_LIMIT,
            "{:?}",
            started.elapsed()
        );
        // A long string printed in loops: the output limit ends it, not the memory.
        let printed = "{{#each @root.rewards}}{{#each @root.rewards}}{{@root.shop_address}}{{/each}}{{/each}} STOP";
        let next = t
            .overlay(
                Trigger::Welcome,
                "en",
                &welcome_with(&t, "sms.hbs", printed),
            )
            .unwrap();
        let error = next
            .render_sms(
                Trigger::Welcome,
                "en",
                &with_rewards(30, &"y".repeat(100_000)),
            )
            .unwrap_err();
        let file = render_error("welcome/en", &error);
        assert_eq!(file.file, "sms.hbs", "{file:?}");
        assert!(file.message.contains("wrote more than 256 KiB"), "{file:?}");
        // Inside a partial block (rendered into a buffer before the layout writes it): the
        // bytes written there are counted too, and end the render when they pass the limit
        // of all it writes.
        let layout = format!(
            "{{{{#> layouts/email lang=\"en\"}}}}<mj-text>{printed}</mj-text>{{{{/layouts/email}}}}"
        );
        let next = t
            .overlay(
                Trigger::Welcome,
                "en",
                &welcome_with(&t, "email.mjml.hbs", &layout),
            )
            .unwrap();
        let error = next
            .render_email(
                Trigger::Welcome,
                "en",
                &with_rewards(30, &"y".repeat(100_000)),
            )
            .unwrap_err();
        assert!(
            render_error("welcome/en", &error)
                .message
                .contains("wrote more than 512 KiB in all"),
            "{error:#}"
        );
        // Blocks nested deeper than a file may hold: refused before the parser sees them.
        let deep = "{{#if first_name}}".repeat(33) + &"{{/if}}".repeat(33) + " STOP";
        assert!(
            refusal(&t, "sms.hbs", &deep)
                .message
                .contains("nest 33 deep")
        );
        // MJML nested deeper than mrml and css-inline may take: a clear error.
        let mjml = format!(
            "<mjml><mj-body><mj-section><mj-column><mj-text>{}{{{{first_name}}}}{}</mj-text></mj-column></mj-section></mj-body></mjml>",
            "<div>".repeat(200),
            "</div>".repeat(200)
        );
        let error = refusal(&t, "email.mjml.hbs", &mjml);
        assert!(error.message.contains("nest 205 deep"), "{error:?}");
    }

    #[test]
    fn previews_keep_no_frames_and_the_catalog_shares_the_published_cache() {
        let t = templates();
        assert!(t.frames.keeps());
        // What a save or a preview renders with: no cache of its own to fill.
        let preview = t
            .overlay(Trigger::Welcome, "en", &t.files(Trigger::Welcome, "en"))
            .unwrap();
        assert!(!preview.frames.keeps());
        let mut context = sample(Trigger::Welcome);
        context["locale"] = json!("en");
        for n in 0..20 {
            context["first_name"] = json!(format!("Preview {n}"));
            preview
                .render_email(Trigger::Welcome, "en", &context)
                .unwrap();
        }
        assert_eq!(
            t.frames.bytes(),
            0,
            "previews took no room in the published cache"
        );
        // The catalog in force (an overlay made to be published) shares it.
        let catalog = preview.sharing_frames(&t);
        catalog
            .render_email(Trigger::Welcome, "en", &context)
            .unwrap();
        assert!(t.frames.bytes() > 0, "the published email made its frame");
    }

    #[test]
    fn the_shipped_templates_use_a_fraction_of_the_budget() {
        let t = templates();
        // Each template of each email and SMS, rendered with its trigger's sample.
        let mut most = budget::Usage::default();
        let (mut markup, mut css) = (0, 0u64);
        for (trigger, locale) in t.pairs() {
            let mut context = sample(trigger);
            context["locale"] = json!(locale);
            let context = scope(&context);
            for file in ["email.subject", "email.mjml", "email.txt", "sms"] {
                let name = format!("{}/{locale}/{file}", trigger.as_str());
                let registry = if file == "email.mjml" {
                    &t.html
                } else {
                    &t.text
                };
                let mut out = budget::Capped::default();
                let (done, used, _) = budget::within(|| {
                    registry.render_with_context_to_write(&name, &context, &mut out)
                });
                done.unwrap();
                most.steps = most.steps.max(used.steps);
                most.partials = most.partials.max(used.partials);
                most.written = most.written.max(used.written.max(out.bytes.len()));
                if file == "email.mjml" {
                    let mjml = String::from_utf8(out.bytes).unwrap();
                    markup = markup.max(budget::markup_depth(&mjml));
                    let html = mrml::parse(&mjml)
                        .unwrap()
                        .element
                        .render(&Default::default())
                        .unwrap();
                    css = css.max(budget::css_work(&html));
                }
            }
        }
        let (mut bytes, mut tags, mut nesting) = (0, 0, 0);
        for source in t.sources.values() {
            bytes = bytes.max(source.len());
            tags = tags.max(source.matches("{{").count());
            nesting = nesting.max(budget::source_nesting(source));
        }
        println!(
            "the shipped templates' largest: {bytes} bytes, {tags} tags, nesting {nesting} a file; a render's {most:?}; MJML nesting {markup}; CSS work {css}"
        );
        // Far inside every limit.
        assert!(bytes * 16 < budget::MAX_FILE_BYTES && tags * 10 < budget::MAX_TAGS);
        assert!(nesting * 4 <= budget::MAX_SOURCE_NESTING);
        assert!(markup * 2 < budget::MAX_MARKUP_NESTING);
        assert!(css * 10 < budget::MAX_CSS_WORK);
        assert!(most.steps * 100 < budget::MAX_STEPS, "{most:?}");
        assert!(most.partials * 4 <= budget::MAX_PARTIAL_DEPTH, "{most:?}");
        assert!(most.written * 20 < budget::MAX_OUTPUT, "{most:?}");
    }

    #[test]
    fn the_deepest_render_allowed_fits_a_small_thread_stack() {
        // Partials as deep as allowed, each nesting blocks (a loop, `with`, `if`, and
        // subexpressions in a tag) as deep as a file may: run on a 2 MiB thread (the blocking
        // pool's), it renders; one partial deeper, it ends with the partial limit, not a stack
        // overflow.
        let with_chain = |levels: usize| {
            let mut sources: Vec<(String, String)> = Vec::new();
            collect_shipped(&SHIPPED, &mut sources).unwrap();
            let per_file = budget::MAX_SOURCE_NESTING;
            let open = "{{#each @root.rewards}}{{#with this}}".to_owned()
                + &"{{#unless (eq 1 (eq 1 2))}}".repeat(per_file - 4);
            let close = "{{/unless}}".repeat(per_file - 4) + "{{/with}}{{/each}}";
            assert_eq!(budget::source_nesting(&format!("{open}{close}")), per_file);
            for level in 0..levels {
                let next = if level + 1 == levels {
                    "end".to_owned()
                } else {
                    format!("{{{{> partials/p{}}}}}", level + 1)
                };
                sources.push((
                    format!("partials/p{level}.hbs"),
                    format!("{open}{next}{close}"),
                ));
            }
            sources.retain(|(path, _)| path != "welcome/en/sms.hbs");
            sources.push((
                "welcome/en/sms.hbs".into(),
                format!("{open}{{{{> partials/p0}}}}{close}"),
            ));
            let t = Templates::from_sources(sources).unwrap();
            let context = sample(Trigger::Welcome);
            std::thread::Builder::new()
                .stack_size(2 * 1024 * 1024)
                .spawn(move || {
                    t.render_sms(Trigger::Welcome, "en", &context)
                        .map_err(|e| format!("{e:#}"))
                })
                .unwrap()
                .join()
                .expect("no stack overflow")
        };
        let depth = budget::MAX_PARTIAL_DEPTH as usize;
        assert_eq!(with_chain(depth).unwrap(), "end");
        let error = with_chain(depth + 1).unwrap_err();
        assert!(error.contains("more than 8 deep"), "{error}");
    }

    #[test]
    fn a_partial_cycle_is_refused_before_it_can_overflow_the_stack() {
        let dir = copy_of_templates();
        let partials = dir.path().join("partials");
        std::fs::write(partials.join("a.hbs"), "A {{> partials/b}}").unwrap();
        std::fs::write(
            partials.join("b.hbs"),
            "B {{~#> partials/a}}x{{/partials/a}}",
        )
        .unwrap();
        let error = format!("{:#}", Templates::load(dir.path()).err().unwrap());
        assert!(
            error.contains("partial cycle: partials/a → partials/b → partials/a"),
            "{error}"
        );
        std::fs::write(partials.join("b.hbs"), "B").unwrap();
        std::fs::write(partials.join("footer.hbs"), "{{> partials/footer}}").unwrap();
        let error = format!("{:#}", Templates::load(dir.path()).err().unwrap());
        assert!(
            error.contains("partials/footer → partials/footer"),
            "{error}"
        );
        std::fs::write(partials.join("footer.hbs"), "{{> partials/nowhere}}").unwrap();
        let error = format!("{:#}", Templates::load(dir.path()).err().unwrap());
        assert!(
            error.contains("includes partials/nowhere, which does not exist"),
            "{error}"
        );
    }

    #[test]
    fn the_check_renders_everything_and_counts_sms_segments() {
        assert_eq!(templates().check(2).unwrap(), Vec::<String>::new());
        let dir = copy_of_templates();
        // 80 Korean characters: UCS-2, two segments.
        std::fs::write(dir.path().join("birthday/ko/sms.hbs"), "생".repeat(80)).unwrap();
        let t = Templates::load(dir.path()).unwrap();
        let warnings = t.check(1).unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with("templates/birthday/ko/sms.hbs: 2 UCS-2 segments")),
            "{warnings:?}"
        );
        // A variable outside the trigger's documented context is an error naming the file.
        std::fs::write(
            dir.path().join("tier-up/tr/email.subject.hbs"),
            "{{tier}} {{voucher}}",
        )
        .unwrap();
        let t = Templates::load(dir.path()).unwrap();
        let error = format!("{:#}", t.check(2).unwrap_err());
        assert!(error.contains("tier-up/tr/email.subject"), "{error}");
        assert!(error.contains("voucher"), "{error}");
    }

    #[test]
    fn korean_and_turkish_survive_mjml_inlining_and_the_text_part() {
        let t = templates();
        for (locale, words) in [
            ("ko", ["생일을 축하합니다", "수신 거부", "지우"]),
            ("tr", ["İyi ki doğdunuz", "Abonelikten çık", "Işıl Çağrı"]),
        ] {
            let mut context = sample(Trigger::Birthday);
            context["locale"] = json!(locale);
            context["first_name"] = json!(words[2]);
            let email = t.render_email(Trigger::Birthday, locale, &context).unwrap();
            for word in &words[..2] {
                assert!(email.html.contains(word), "{locale}: {word} in the HTML");
            }
            assert!(email.html.contains(words[2]) && email.subject.contains(words[2]));
            assert!(email.text.contains(words[0]) && email.text.contains(words[2]));
            // Inlined: the body's styles are on the elements themselves.
            assert!(
                email.html.contains("<h1 style=\"font-size: 22px"),
                "{locale}: inlined"
            );
            assert!(!email.html.contains("fonts.googleapis"), "no remote fonts");
        }
    }

    #[test]
    fn cart_contents_are_escaped_in_html_and_plain_in_text() {
        let t = templates();
        let mut cart = sample(Trigger::AbandonedCart);
        cart["locale"] = json!("tr");
        let email = t.render_email(Trigger::AbandonedCart, "tr", &cart).unwrap();
        assert!(
            email.html.contains("2 × Mug &lt;b&gt; ($9,00)"),
            "{}",
            email.html
        );
        assert!(email.html.contains("Toplam: $36,00"), "{}", email.html);
        assert!(
            email
                .html
                .contains(r#"href="https://shop.example/cart/c1?a=1&amp;b=2""#)
        );
        assert!(
            email
                .text
                .contains("- 2 × Mug <b> ($9,00)\n- 1 × Tea ($18,00)\nToplam: $36,00"),
            "{}",
            email.text
        );
        // A javascript: link never reaches an href.
        let mut hostile = cart.clone();
        hostile["checkout_url"] = json!("javascript:alert(1)");
        let refused = t
            .render_email(Trigger::AbandonedCart, "tr", &hostile)
            .unwrap_err();
        assert!(
            format!("{refused:#}").contains("not an http(s) URL"),
            "{refused:#}"
        );
        let sms = t.render_sms(Trigger::AbandonedCart, "ko", &cart).unwrap();
        assert!(
            sms.contains("https://shop.example/cart/c1?a=1&b=2"),
            "{sms}"
        );
    }

    #[test]
    fn every_template_renders_in_every_shipped_locale() {
        let t = templates();
        for trigger in Trigger::ALL {
            assert!(t.has_trigger(trigger), "{trigger:?}");
            for locale in ["en", "ko", "tr"] {
                let context = sample(trigger);
                let email = t
                    .render_email(trigger, locale, &context)
                    .unwrap_or_else(|e| panic!("{trigger:?}/{locale}: {e:#}"));
                assert!(
                    email.html.contains("Ada &lt;script&gt;") || !email.html.contains("Ada"),
                    "{trigger:?}/{locale}: escaped"
                );
                assert!(!email.html.contains("<script>"), "{trigger:?}/{locale}");
                assert!(
                    email.html.starts_with("<!DOCTYPE html>")
                        && email.html.contains("@media only screen")
                        && email
                            .html
                            .contains("https://loyalty.example/unsubscribe/abc.def"),
                    "{trigger:?}/{locale}: MJML layout, responsive, with the unsubscribe link"
                );
                assert!(
                    !email.subject.is_empty() && !email.text.is_empty(),
                    "{trigger:?}/{locale}"
                );
                let sms = t.render_sms(trigger, locale, &context).unwrap();
                assert!(
                    sms.contains("STOP"),
                    "{trigger:?}/{locale}: SMS says how to opt out"
                );
            }
        }
        let tier = t
            .render_email(Trigger::TierUp, "tr", &sample(Trigger::TierUp))
            .unwrap();
        assert!(
            tier.text.contains("- Free shipping\n- Early access"),
            "{}",
            tier.text
        );
        let ready = t
            .render_email(
                Trigger::RedemptionReady,
                "ko",
                &sample(Trigger::RedemptionReady),
            )
            .unwrap();
        assert!(
            ready.text.contains("250포인트로 다음 주문 시 30 할인"),
            "{}",
            ready.text
        );
    }

    #[test]
    fn welcome_renders_in_every_shipped_locale() {
        let t = templates();
        let context = sample(Trigger::Welcome);
        for locale in ["en", "ko", "tr"] {
            let email = t.render_email(Trigger::Welcome, locale, &context).unwrap();
            assert!(!email.subject.is_empty(), "{locale}");
            assert!(
                email.html.contains("Ada &lt;script&gt;"),
                "{locale}: HTML escapes values"
            );
            assert!(
                email.html.starts_with("<!DOCTYPE html>"),
                "{locale}: the layout wraps the body"
            );
            assert!(
                email.html.contains(&format!("<html lang=\"{locale}\"")),
                "{locale}"
            );
            assert!(!email.html.contains("<script>"), "{locale}");
            assert!(
                email.text.contains("Ada <script>"),
                "{locale}: text is not HTML"
            );
            assert!(
                !t.render_sms(Trigger::Welcome, locale, &context)
                    .unwrap()
                    .is_empty()
            );
        }
    }

    #[test]
    fn locale_falls_back() {
        let t = templates();
        let cases = [
            ("ko-KR", "ko"),
            ("tr", "tr"),
            ("en-GB", "en"),
            ("fr-CA", "en"),
        ];
        for (asked, served) in cases {
            assert_eq!(
                t.resolve_locale(Trigger::Welcome, &Locale::parse(asked).unwrap()),
                served
            );
        }
    }

    #[test]
    fn strict_mode_refuses_unknown_variables() {
        let t = templates();
        let error = t
            .render_email(Trigger::Welcome, "en", &json!({}))
            .unwrap_err();
        assert!(format!("{error:#}").contains("welcome/en"), "{error:#}");
    }

    #[test]
    fn a_version_overlays_one_pair_and_its_errors_name_file_and_line() {
        let t = templates();
        let mut files = t.files(Trigger::Welcome, "ko");
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            [
                "email.mjml.hbs",
                "email.subject.hbs",
                "email.txt.hbs",
                "sms.hbs"
            ]
        );
        files.insert("sms.hbs".into(), "새 환영 {{first_name}} STOP".into());
        let next = t.overlay(Trigger::Welcome, "ko", &files).unwrap();
        let context = sample(Trigger::Welcome);
        assert_eq!(
            next.render_sms(Trigger::Welcome, "ko", &context).unwrap(),
            "새 환영 Ada <script> STOP"
        );
        // Only that pair changed.
        assert_eq!(
            next.render_sms(Trigger::Welcome, "tr", &context).unwrap(),
            t.render_sms(Trigger::Welcome, "tr", &context).unwrap()
        );

        // A syntax error on line 3.
        let mut broken = files.clone();
        broken.insert(
            "email.txt.hbs".into(),
            "one\ntwo\n{{#if first_name}}\n".into(),
        );
        let errors = t.overlay(Trigger::Welcome, "ko", &broken).err().unwrap();
        assert_eq!(errors[0].file, "email.txt.hbs", "{errors:?}");
        assert!(errors[0].line.is_some_and(|l| l >= 3), "{errors:?}");
        // An unknown variable, found by rendering the sample, on line 2.
        let mut unknown = files.clone();
        unknown.insert("sms.hbs".into(), "hi\n{{voucher}}".into());
        let errors = t.overlay(Trigger::Welcome, "ko", &unknown).err().unwrap();
        assert_eq!(
            (errors[0].file.as_str(), errors[0].line),
            ("sms.hbs", Some(2)),
            "{errors:?}"
        );
        assert!(errors[0].message.contains("voucher"), "{errors:?}");
        // A template may include only the shared partials (never itself: no recursion).
        let mut looped = files.clone();
        looped.insert("sms.hbs".into(), "{{> welcome/ko/sms}}".into());
        let errors = t.overlay(Trigger::Welcome, "ko", &looped).err().unwrap();
        assert!(errors[0].message.contains("not a partial"), "{errors:?}");
        // A required file missing, an unknown file.
        let mut missing = files.clone();
        missing.remove("email.subject.hbs");
        missing.insert("notes.md".into(), "x".into());
        let errors = t.overlay(Trigger::Welcome, "ko", &missing).err().unwrap();
        assert_eq!(errors[0].file, "notes.md", "{errors:?}");
    }

    #[test]
    fn the_shipped_templates_say_what_is_ahead_and_carry_the_coupon() {
        let t = templates();
        let welcome = t
            .render_email(Trigger::Welcome, "en", &sample(Trigger::Welcome))
            .unwrap();
        assert!(
            welcome.html.contains("120 points</strong> to Gold"),
            "{}",
            welcome.html
        );
        assert!(
            welcome.text.contains("120 points to Gold."),
            "{}",
            welcome.text
        );
        let ko = t
            .render_email(Trigger::Welcome, "ko", &sample(Trigger::Welcome))
            .unwrap();
        assert!(
            ko.text.contains("Gold 등급까지 120포인트 남았습니다."),
            "{}",
            ko.text
        );
        for locale in ["en", "ko", "tr"] {
            for trigger in [Trigger::AbandonedCart, Trigger::Birthday] {
                let context = sample(trigger);
                let email = t.render_email(trigger, locale, &context).unwrap();
                assert!(
                    email.html.contains("SAVE-10 &lt;b&gt;"),
                    "{trigger:?}/{locale}"
                );
                assert!(email.text.contains("SAVE-10 <b>"), "{trigger:?}/{locale}");
                let sms = t.render_sms(trigger, locale, &context).unwrap();
                assert!(sms.contains("SAVE-10"), "{trigger:?}/{locale}: {sms}");
                let mut without = context.clone();
                without["coupon_code"] = Value::Null;
                let sms = t.render_sms(trigger, locale, &without).unwrap();
                assert!(!sms.contains("SAVE") && sms.contains("STOP"), "{sms}");
            }
        }
    }

    #[test]
    fn subjects_are_one_line() {
        assert_eq!(one_line("Hi\r\nBcc: x@y.z\tnow "), "Hi Bcc: x@y.z now");
    }

    #[test]
    fn html_becomes_text() {
        let html = "<html><head><style>p{}</style></head><body><p>Hello &amp; welcome</p><p>Line&nbsp;2</p></body></html>";
        assert_eq!(html_to_text(html), "Hello & welcome\nLine 2");
    }
}
