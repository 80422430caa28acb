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
use handlebars::Handlebars;
use serde_json::Value;

use crate::domain::Locale;
use crate::triggers::Trigger;

/// The locale every trigger must have.
pub const DEFAULT_LOCALE: &str = "en";
/// Largest template file accepted.
const MAX_TEMPLATE_BYTES: u64 = 256 * 1024;

/// A rendered email.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedEmail {
    /// One line: control characters removed, so it cannot break the header.
    pub subject: String,
    /// The HTML part.
    pub html: String,
    /// The plain-text alternative.
    pub text: String,
}

/// The loaded templates.
pub struct Templates {
    html: Handlebars<'static>,
    text: Handlebars<'static>,
    /// `trigger/locale` pairs that have templates.
    available: HashSet<String>,
}

impl Templates {
    /// Loads and compiles every template under `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Templates> {
        let mut html = Handlebars::new();
        let mut text = Handlebars::new();
        text.register_escape_fn(handlebars::no_escape);
        for registry in [&mut html, &mut text] {
            registry.set_strict_mode(true);
            registry.set_dev_mode(false);
        }
        let mut available = HashSet::new();

        for shared in ["partials", "layouts"] {
            for (name, source) in read_dir_templates(&dir.join(shared))? {
                let name = format!("{shared}/{name}");
                for registry in [&mut html, &mut text] {
                    registry
                        .register_partial(&name, &source)
                        .with_context(|| format!("compiling template {shared}/{name}.hbs"))?;
                }
            }
        }
        for trigger in Trigger::ALL {
            let trigger_dir = dir.join(trigger.as_str());
            let Ok(locales) = std::fs::read_dir(&trigger_dir) else {
                continue;
            };
            for locale in locales {
                let locale = locale?;
                if !locale.file_type()?.is_dir() {
                    continue;
                }
                let locale_name = locale.file_name().to_string_lossy().into_owned();
                Locale::parse(&locale_name)
                    .with_context(|| format!("template directory {}", locale.path().display()))?;
                for (file, source) in read_dir_templates(&locale.path())? {
                    let name = format!("{}/{locale_name}/{file}", trigger.as_str());
                    let registry = if file.ends_with(".html") {
                        &mut html
                    } else {
                        &mut text
                    };
                    registry
                        .register_template_string(&name, source)
                        .with_context(|| format!("compiling template {name}.hbs"))?;
                }
                available.insert(format!("{}/{locale_name}", trigger.as_str()));
            }
        }
        let templates = Templates {
            html,
            text,
            available,
        };
        templates.check_complete()?;
        Ok(templates)
    }

    /// Every trigger that has templates has them in the default locale, with the required files.
    fn check_complete(&self) -> anyhow::Result<()> {
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
            if !self.html.has_template(&format!("{key}/email.html")) {
                bail!("templates/{key}/email.html.hbs is missing");
            }
        }
        Ok(())
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

    /// Renders the email of a trigger in `locale` (already resolved).
    pub fn render_email(
        &self,
        trigger: Trigger,
        locale: &str,
        context: &Value,
    ) -> anyhow::Result<RenderedEmail> {
        let base = format!("{}/{locale}", trigger.as_str());
        let render_text = |file: &str| {
            self.text
                .render(&format!("{base}/{file}"), context)
                .with_context(|| format!("rendering {base}/{file}.hbs"))
        };
        let subject = one_line(&render_text("email.subject")?);
        let html = self
            .html
            .render(&format!("{base}/email.html"), context)
            .with_context(|| format!("rendering {base}/email.html.hbs"))?;
        let text = if self.text.has_template(&format!("{base}/email.txt")) {
            render_text("email.txt")?
        } else {
            html_to_text(&html)
        };
        Ok(RenderedEmail {
            subject,
            html,
            text,
        })
    }

    /// Renders the SMS of a trigger in `locale` (already resolved).
    pub fn render_sms(
        &self,
        trigger: Trigger,
        locale: &str,
        context: &Value,
    ) -> anyhow::Result<String> {
        let name = format!("{}/{locale}/sms", trigger.as_str());
        let body = self
            .text
            .render(&name, context)
            .with_context(|| format!("rendering {name}.hbs"))?;
        Ok(body.trim().to_owned())
    }
}

/// Reads `*.hbs` files of a directory as (name without `.hbs`, source).
fn read_dir_templates(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".hbs"))
        else {
            continue;
        };
        if entry.metadata()?.len() > MAX_TEMPLATE_BYTES {
            bail!(
                "{} is larger than {MAX_TEMPLATE_BYTES} bytes",
                path.display()
            );
        }
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        out.push((name.to_owned(), source));
    }
    Ok(out)
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
            if (tag == skipped || tag.starts_with(&format!("{skipped} ")))
                && let Some(close) = rest.to_ascii_lowercase().find(&format!("</{skipped}>"))
            {
                rest = &rest[close + skipped.len() + 3..];
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn templates() -> Templates {
        Templates::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("templates")).unwrap()
    }

    /// A sample of each trigger's context, as the triggers build it.
    fn sample(trigger: Trigger) -> Value {
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
        context
    }

    #[test]
    fn cart_contents_are_escaped_in_html_and_plain_in_text() {
        let t = templates();
        let cart = sample(Trigger::AbandonedCart);
        let email = t.render_email(Trigger::AbandonedCart, "tr", &cart).unwrap();
        assert!(email.html.contains("2 × Mug &lt;b&gt;"), "{}", email.html);
        assert!(
            email
                .html
                .contains(r#"href="https://shop.example/cart/c1?a&#x3D;1&amp;b&#x3D;2""#)
        );
        assert!(
            email.text.contains("- 2 × Mug <b>\n- 1 × Tea"),
            "{}",
            email.text
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
                    email.html.starts_with("<!doctype html>"),
                    "{trigger:?}/{locale}: layout"
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
                email.html.starts_with("<!doctype html>"),
                "{locale}: the layout wraps the body"
            );
            assert!(
                email.html.contains(&format!("<html lang=\"{locale}\">")),
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
    fn subjects_are_one_line() {
        assert_eq!(one_line("Hi\r\nBcc: x@y.z\tnow "), "Hi Bcc: x@y.z now");
    }

    #[test]
    fn html_becomes_text() {
        let html = "<html><head><style>p{}</style></head><body><p>Hello &amp; welcome</p><p>Line&nbsp;2</p></body></html>";
        assert_eq!(html_to_text(html), "Hello & welcome\nLine 2");
    }
}
