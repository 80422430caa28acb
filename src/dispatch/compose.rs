//! The first step of sending: from a claimed message to what a provider is handed, or the
//! reason it must not go (no address, no consent, suppressed). Rendering is CPU work (MJML and
//! CSS inlining take hundreds of microseconds), so it runs on the blocking pool, never on the
//! async workers beside claim renewal and recording.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use super::email;
use super::providers::{Content, Outgoing};
use crate::config::Settings;
use crate::domain::{Channel, Email, MemberId, Phone};
use crate::outbox::Claimed;
use crate::render::Templates;
use crate::suppress::Tokens;
use crate::template_store::{Catalog, StoreError, TemplateStore};

/// What composing a message needs: templates, settings, and the unsubscribe token key.
#[derive(Clone)]
pub(super) struct Composer {
    pub store: Arc<TemplateStore>,
    pub settings: Arc<Settings>,
    pub tokens: Arc<Tokens>,
}

/// A composed message, one that must not be sent, one that cannot be (a broken template,
/// an unknown trigger: the message fails), or one that cannot be now (its templates could not
/// be loaded from the database: it is tried again later).
pub(super) enum Composed {
    Ready(Box<Outgoing>),
    Suppressed(Cow<'static, str>),
    Broken(anyhow::Error),
    Unavailable(anyhow::Error),
}

/// The templates a message renders with, the locale they serve it in, and their version.
type Chosen = (Arc<Templates>, String, i32);

impl Composer {
    /// Composes `claimed` on the blocking pool with the templates of `catalog` (the catalog in
    /// force when the batch was claimed), or with the version the message is pinned to (a
    /// test send; a message rendered before). Returns the version used. A panic inside a
    /// template helper or the renderer fails this message with the panic's words; the
    /// dispatcher goes on.
    pub(super) async fn compose(
        &self,
        claimed: Claimed,
        catalog: &Catalog,
    ) -> (Claimed, Composed, Option<(i32, String)>) {
        let (templates, locale, version) = match self.templates_for(&claimed, catalog).await {
            Ok(found) => found,
            Err(StoreError::Database(error)) => {
                return (claimed, Composed::Unavailable(error), None);
            }
            Err(error) => return (claimed, Composed::Broken(error.into()), None),
        };
        let used = (version, locale.clone());
        let this = self.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                this.compose_now(&claimed, &templates, locale)
            }));
            let composed = match result {
                Ok(Ok(Ok(outgoing))) => Composed::Ready(Box::new(outgoing)),
                Ok(Ok(Err(reason))) => Composed::Suppressed(reason),
                Ok(Err(error)) => Composed::Broken(error),
                Err(panic) => Composed::Broken(anyhow::anyhow!(
                    "rendering panicked: {}",
                    crate::shutdown::panic_message(&*panic)
                )),
            };
            (claimed, composed, Some(used))
        })
        .await;
        // The closure cannot panic past catch_unwind; a join error means the runtime is
        // shutting down, and the claim's lease brings the message back.
        joined.unwrap_or_else(|e| panic!("the blocking pool refused a render: {e}"))
    }

    /// The templates a message renders with, the locale they serve it in, and their version.
    ///
    /// A test send renders exactly the locale and version it asked for. Any other message
    /// renders with the version its pair was pinned to at its first render, as long as its
    /// pair still resolves to the same locale and that version still compiles; otherwise (the
    /// member's locale changed, a more specific locale was published meanwhile, or the version
    /// no longer validates) with the version in force for the pair it resolves to now, which
    /// is then recorded. A database failure while loading a version is `StoreError::Database`:
    /// the message is tried again later, not failed.
    async fn templates_for(&self, c: &Claimed, catalog: &Catalog) -> Result<Chosen, StoreError> {
        let trigger = c.trigger;
        if let Some(locale) = &c.test_locale {
            let version = c
                .template_version
                .unwrap_or_else(|| catalog.version(trigger, locale));
            let templates = self.store.templates_of(trigger, locale, version).await?;
            return Ok((templates, locale.clone(), version));
        }
        let locale = catalog
            .templates
            .resolve_locale(trigger, &c.locale)
            .to_owned();
        let in_force = || {
            let version = catalog.version(trigger, &locale);
            Ok((catalog.templates.clone(), locale.clone(), version))
        };
        let Some(pinned) = c.template_version else {
            return in_force();
        };
        if c.template_locale.as_ref().is_some_and(|pin| *pin != locale) {
            return in_force();
        }
        match self.store.templates_of(trigger, &locale, pinned).await {
            Ok(templates) => Ok((templates, locale, pinned)),
            Err(StoreError::NotFound(_) | StoreError::Invalid(_)) => in_force(),
            Err(error) => Err(error),
        }
    }

    /// Builds the outgoing message, or says why it must not be sent (`Ok(Err(reason))`).
    fn compose_now(
        &self,
        c: &Claimed,
        templates: &Templates,
        locale: String,
    ) -> anyhow::Result<Result<Outgoing, Cow<'static, str>>> {
        let mut context = c.context.clone();
        crate::render::add_shop_variables(&mut context, &self.settings, &locale);
        let composed = match c.channel {
            Channel::Email => self.email(c, templates, &locale, context)?,
            Channel::Sms => sms(c, templates, &locale, &context)?,
        };
        Ok(composed.map(|(to, content)| Outgoing {
            message_id: c.id,
            trigger: c.trigger,
            channel: c.channel,
            locale,
            to,
            content,
        }))
    }

    /// An email's address and content, with its unsubscribe link, or why it must not go.
    fn email(
        &self,
        c: &Claimed,
        templates: &Templates,
        locale: &str,
        mut context: Value,
    ) -> anyhow::Result<Result<(String, Content), Cow<'static, str>>> {
        let Some(address) = c.test_to.as_deref().or(c.email.as_deref()) else {
            return Ok(Err("no email address".into()));
        };
        if let Some(reason) = refusal(c, c.consent_email, "email") {
            return Ok(Err(reason));
        }
        let to = Email::parse(address)?;
        // A test send to a typed address has no member to unsubscribe: its link names no
        // token (the page says the link is not valid).
        let token = match (c.test, c.member_id.as_str()) {
            (true, "") => "test-send".to_owned(),
            (_, member) => self.tokens.issue(&MemberId::parse(member)?, Some(c.id)),
        };
        let settings = &self.settings;
        let unsubscribe_url = format!(
            "{}/unsubscribe/{token}",
            settings.public_url.as_str().trim_end_matches('/'),
        );
        if let Value::Object(map) = &mut context {
            map.insert("unsubscribe_url".into(), unsubscribe_url.clone().into());
        }
        let rendered = templates.render_email(c.trigger, locale, &context)?;
        // The MIME form is composed only by the providers that send it (smtp, file).
        let content = Content::Email {
            rendered,
            from: settings.from.clone(),
            first_name: c.first_name.clone(),
            list_unsubscribe: email::list_unsubscribe(
                &unsubscribe_url,
                settings.unsubscribe_mailto.as_deref(),
            ),
        };
        Ok(Ok((to.to_string(), content)))
    }
}

/// An SMS's number and body, or why it must not go.
fn sms(
    c: &Claimed,
    templates: &Templates,
    locale: &str,
    context: &Value,
) -> anyhow::Result<Result<(String, Content), Cow<'static, str>>> {
    let Some(number) = c.test_to.as_deref().or(c.phone.as_deref()) else {
        return Ok(Err("no phone number".into()));
    };
    if let Some(reason) = refusal(c, c.consent_sms, "SMS") {
        return Ok(Err(reason));
    }
    let to = Phone::parse(number)?;
    let body = templates.render_sms(c.trigger, locale, context)?;
    Ok(Ok((to.to_string(), Content::Sms { body })))
}

/// Why `c` must not go on a channel with this `consent`, if it must not. A test send to an
/// address the marketer typed needs no member's consent; it is still refused when that
/// address is suppressed.
fn refusal(c: &Claimed, consent: bool, what: &'static str) -> Option<Cow<'static, str>> {
    if !consent && c.test_to.is_none() {
        return Some(Cow::Owned(format!("no consent for {what}")));
    }
    c.suppressed
        .as_ref()
        .map(|reason| Cow::Owned(format!("suppressed: {reason}")))
}
