//! Providers: where a rendered message is handed over. One enum, one variant per provider.

mod file;
mod http;
mod sendgrid;
mod smtp;
mod twilio;
mod webhook;

use std::fmt;
use std::time::Duration;

use crate::config::{EmailProviderKind, Settings, SmsProviderKind};
use crate::domain::Trigger;
use crate::domain::{Channel, Email, Phone};
use crate::render::RenderedEmail;

pub(crate) use file::FileProvider;
pub(crate) use http::client_builder;
pub use http::parse_retry_after;
pub(crate) use sendgrid::SendgridProvider;
pub(crate) use smtp::SmtpProvider;
pub(crate) use twilio::TwilioProvider;
pub(crate) use webhook::WebhookProvider;

/// The enhanced status code (RFC 3463: `class.subject.detail`) a reply's text starts with.
pub(crate) fn enhanced_status(text: &str) -> Option<(u8, u16, u16)> {
    let code = text.split_whitespace().next()?;
    let mut parts = code.split('.');
    let class: u8 = parts.next()?.parse().ok()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    (parts.next().is_none() && matches!(class, 2 | 4 | 5) && subject < 1000 && detail < 1000)
        .then_some((class, subject, detail))
}

/// Whether an enhanced status says the mailbox itself is gone for good: 5.1.x (bad mailbox or
/// address) or 5.2.1 (mailbox disabled). Only that suppresses an address; a relay's policy
/// (5.7.x) says nothing of it.
pub(crate) fn mailbox_gone(status: (u8, u16, u16)) -> bool {
    matches!(status, (5, 1, _) | (5, 2, 1))
}

/// A message ready for a provider.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// Outbox id: `X-Lifecycle-Message-Id` and the idempotency key of provider APIs.
    pub message_id: i64,
    /// Why it is sent.
    pub trigger: Trigger,
    /// Email or SMS.
    pub channel: Channel,
    /// Locale of the templates used.
    pub locale: String,
    /// The address or number (full; use `masked_to` in logs).
    pub to: String,
    /// What is sent.
    pub content: Content,
}

impl Outgoing {
    /// The recipient as logs may show it.
    pub(crate) fn masked_to(&self) -> String {
        match self.channel {
            Channel::Email => Email::parse(&self.to)
                .map(|e| e.masked())
                .unwrap_or_else(|_| "***".into()),
            Channel::Sms => Phone::parse(&self.to)
                .map(|p| p.masked())
                .unwrap_or_else(|_| "***".into()),
        }
    }

    /// The full RFC 5322 message of an email, as sent over SMTP or written to `.eml`.
    pub(crate) fn mime(&self) -> Result<Vec<u8>, Failure> {
        let Content::Email {
            rendered,
            from,
            first_name,
            list_unsubscribe,
        } = &self.content
        else {
            return Err(Failure::permanent("an SMS has no MIME form"));
        };
        let to = Email::parse(&self.to).map_err(|e| Failure::permanent(e.to_string()))?;
        crate::dispatch::email::compose(
            from,
            &to,
            first_name.as_deref(),
            self.message_id,
            self.trigger,
            rendered,
            list_unsubscribe,
        )
        .map_err(|e| Failure::permanent(format!("composing the email: {e:#}")))
    }

    /// The JSON form of DESIGN.md (`message_id`, `trigger`, `channel`, `locale`, `to`,
    /// `subject`, `body`, and `html` for an email), as the `file` and `webhook` providers write
    /// it. It borrows the message: an email's HTML is escaped straight into the output.
    pub(crate) fn to_json(&self) -> MessageJson<'_> {
        let (subject, body, html) = match &self.content {
            Content::Email { rendered, .. } => (
                Some(rendered.subject.as_str()),
                rendered.text.as_str(),
                Some(rendered.html.as_str()),
            ),
            Content::Sms { body } => (None, body.as_str(), None),
        };
        MessageJson {
            body,
            channel: self.channel.as_str(),
            html,
            locale: &self.locale,
            message_id: self.message_id.to_string(),
            subject,
            to: &self.to,
            trigger: self.trigger.as_str(),
        }
    }

    /// `to_json` as compact JSON bytes, as `serde_json::to_vec` writes it. An email's HTML is
    /// copied from its JSON form when its frame made one (`RenderedEmail::html_json`) rather
    /// than escaped here: escaping 10 kB of HTML was about a tenth of the CPU of dispatch over
    /// HTTP.
    pub(crate) fn json_body(&self) -> Vec<u8> {
        let json = self.to_json();
        let escaped = match &self.content {
            Content::Email { rendered, .. } => rendered.html_json.as_deref(),
            Content::Sms { .. } => None,
        };
        let Some(escaped) = escaped else {
            return serde_json::to_vec(&json).expect("JSON of strings");
        };
        let mut out = Vec::with_capacity(escaped.len() + json.body.len() + 512);
        let field = |out: &mut Vec<u8>, name: &str, value: &str| {
            out.extend_from_slice(name.as_bytes());
            serde_json::to_writer(&mut *out, value).expect("JSON of a string");
        };
        // The fields of `MessageJson`, in its order.
        field(&mut out, "{\"body\":", json.body);
        field(&mut out, ",\"channel\":", json.channel);
        out.extend_from_slice(b",\"html\":\"");
        out.extend_from_slice(escaped.as_bytes());
        out.push(b'"');
        field(&mut out, ",\"locale\":", json.locale);
        field(&mut out, ",\"message_id\":", &json.message_id);
        if let Some(subject) = json.subject {
            field(&mut out, ",\"subject\":", subject);
        }
        field(&mut out, ",\"to\":", json.to);
        field(&mut out, ",\"trigger\":", json.trigger);
        out.push(b'}');
        out
    }
}

/// A message as JSON (`Outgoing::to_json`). The fields are in alphabetical order, as they were
/// when this was a `serde_json::Value`, so a receiver sees the same bytes as before.
#[derive(Debug, serde::Serialize)]
pub(crate) struct MessageJson<'a> {
    body: &'a str,
    channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<&'a str>,
    locale: &'a str,
    message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    to: &'a str,
    trigger: &'a str,
}

/// The rendered content of a message.
#[derive(Debug, Clone)]
pub(crate) enum Content {
    /// An email: its parts, and what its RFC 5322 form needs besides.
    Email {
        /// Subject, HTML and text.
        rendered: RenderedEmail,
        /// The sender.
        from: lettre::message::Mailbox,
        /// The recipient's name for the `To` header.
        first_name: Option<String>,
        /// The `List-Unsubscribe` header's value.
        list_unsubscribe: String,
    },
    /// An SMS body.
    Sms {
        /// The text.
        body: String,
    },
}

/// A provider took the message.
#[derive(Debug, Clone)]
pub(crate) struct Accepted {
    /// The provider's reference: its message id, the SMTP reply, or the file written; cleaned
    /// (`Accepted::new`), as everything a provider sends back is before it is stored.
    pub reference: String,
}

/// The longest provider reference kept.
const MAX_REFERENCE: usize = 200;

impl Accepted {
    /// A provider's reference as it may be stored: no control characters (a NUL in a
    /// provider's id once stopped every result from being recorded), one line, bounded.
    pub(crate) fn new(reference: &str) -> Accepted {
        Accepted {
            reference: crate::mask::clean(reference, MAX_REFERENCE),
        }
    }
}

/// The longest a provider may make us wait (`Retry-After`): a day. Anything longer is taken
/// as a day, so no provider answer can push a message out of reach or overflow a date.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A provider did not take the message; what happens next depends on the kind. Every message
/// is cleaned and masked (`mask::partner`) when the failure is made, because provider replies
/// quote addresses and numbers, may hold any bytes, and go to logs and to `last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Will fail the same way again (SMTP 5xx, HTTP 4xx): the message fails at once.
    Permanent {
        /// What the provider said.
        message: String,
        /// The server refused the recipient's address for good (SMTP 550/551/553 to RCPT):
        /// the address is suppressed.
        rejects_recipient: bool,
    },
    /// Worth trying again later (SMTP 4xx, HTTP 429/5xx, a connection never made), through
    /// the next provider first.
    Transient {
        /// How long the provider asked us to wait, at most `MAX_RETRY_AFTER`.
        retry_after: Option<Duration>,
        /// What the provider said.
        message: String,
    },
    /// The provider may have taken the message (a timeout or a lost connection after the
    /// request or the mail data went out): trying another provider could send it twice, so
    /// the message waits for a retry of the same provider, and the attempt is recorded as
    /// unsure.
    Unsure {
        /// What happened.
        message: String,
    },
}

impl Failure {
    /// A transient failure; `retry_after` is capped at `MAX_RETRY_AFTER`.
    pub fn transient(retry_after: Option<Duration>, message: impl AsRef<str>) -> Failure {
        Failure::Transient {
            retry_after: retry_after.map(|d| d.min(MAX_RETRY_AFTER)),
            message: crate::mask::partner(message.as_ref()),
        }
    }

    /// An unsure failure.
    pub fn unsure(message: impl AsRef<str>) -> Failure {
        Failure::Unsure {
            message: crate::mask::partner(message.as_ref()),
        }
    }

    /// A permanent failure.
    pub fn permanent(message: impl AsRef<str>) -> Failure {
        Failure::Permanent {
            message: crate::mask::partner(message.as_ref()),
            rejects_recipient: false,
        }
    }

    /// A permanent refusal of the recipient's address: the address is suppressed.
    pub fn recipient_rejected(message: impl AsRef<str>) -> Failure {
        Failure::Permanent {
            message: crate::mask::partner(message.as_ref()),
            rejects_recipient: true,
        }
    }

    /// Whether the address itself was refused for good.
    pub fn rejects_recipient(&self) -> bool {
        matches!(
            self,
            Failure::Permanent {
                rejects_recipient: true,
                ..
            }
        )
    }

    /// Whether the provider may have taken the message despite the failure.
    pub fn is_unsure(&self) -> bool {
        matches!(self, Failure::Unsure { .. })
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Failure::Permanent { .. })
    }

    /// How long the provider asked us to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The outcome recorded in `delivery_attempts`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Failure::Permanent { .. } => "permanent",
            Failure::Transient { .. } => "transient",
            Failure::Unsure { .. } => "unsure",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Permanent { message, .. }
            | Failure::Transient { message, .. }
            | Failure::Unsure { message } => f.write_str(message),
        }
    }
}

/// A configured provider.
pub(crate) enum Provider {
    /// SMTP relay.
    Smtp(Box<SmtpProvider>),
    /// SendGrid's mail send API.
    Sendgrid(Box<SendgridProvider>),
    /// A signed JSON POST.
    Webhook(Box<WebhookProvider>),
    /// Twilio's Messages API.
    Twilio(Box<TwilioProvider>),
    /// Files in the outbox directory.
    File(FileProvider),
}

impl Provider {
    /// The provider's name as configured and recorded.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Provider::Smtp(_) => "smtp",
            Provider::Sendgrid(_) => "sendgrid",
            Provider::Webhook(_) => "webhook",
            Provider::Twilio(_) => "twilio",
            Provider::File(_) => "file",
        }
    }

    /// Hands the message over.
    pub(crate) async fn send(&self, message: &Outgoing) -> Result<Accepted, Failure> {
        match self {
            Provider::Smtp(p) => p.send(message).await,
            Provider::Sendgrid(p) => p.send(message).await,
            Provider::Webhook(p) => p.send(message).await,
            Provider::Twilio(p) => p.send(message).await,
            Provider::File(p) => p.send(message).await,
        }
    }
}

/// The email providers of the settings, in order.
pub(crate) fn email_providers(settings: &Settings) -> anyhow::Result<Vec<Provider>> {
    settings
        .email_providers
        .iter()
        .map(|kind| {
            Ok(match kind {
                EmailProviderKind::Smtp => Provider::Smtp(Box::new(SmtpProvider::new(settings))),
                EmailProviderKind::Sendgrid => {
                    Provider::Sendgrid(Box::new(SendgridProvider::new(settings)?))
                }
                EmailProviderKind::Webhook => {
                    Provider::Webhook(Box::new(WebhookProvider::new(settings)?))
                }
                EmailProviderKind::File => Provider::File(FileProvider::new(settings)?),
            })
        })
        .collect()
}

/// The SMS providers of the settings, in order.
pub(crate) fn sms_providers(settings: &Settings) -> anyhow::Result<Vec<Provider>> {
    settings
        .sms_providers
        .iter()
        .map(|kind| {
            Ok(match kind {
                SmsProviderKind::Twilio => {
                    Provider::Twilio(Box::new(TwilioProvider::new(settings)?))
                }
                SmsProviderKind::Webhook => {
                    Provider::Webhook(Box::new(WebhookProvider::new(settings)?))
                }
                SmsProviderKind::File => Provider::File(FileProvider::new(settings)?),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An email with hostile text everywhere; `framed`: with the HTML's JSON form.
    fn email(framed: bool) -> Outgoing {
        let hostile = "\"a\" \\ </script> \u{1}\n지우 \u{2028}";
        let html = format!("<p title=\"{hostile}\">{hostile}</p>");
        Outgoing {
            message_id: 42,
            trigger: Trigger::AbandonedCart,
            channel: Channel::Email,
            locale: "ko".into(),
            to: "ada+\"x\"@example.com".into(),
            content: Content::Email {
                rendered: RenderedEmail {
                    subject: format!("Hi {hostile}"),
                    text: format!("Text {hostile}"),
                    html_json: framed.then(|| {
                        let quoted = serde_json::to_string(&html).unwrap();
                        quoted[1..quoted.len() - 1].to_owned()
                    }),
                    html,
                },
                from: "Shop <shop@example.com>".parse().unwrap(),
                first_name: None,
                list_unsubscribe: String::new(),
            },
        }
    }

    #[test]
    fn the_json_body_is_serde_jsons_with_or_without_the_html_escaped_before() {
        for message in [email(false), email(true)] {
            assert_eq!(
                String::from_utf8(message.json_body()).unwrap(),
                serde_json::to_string(&message.to_json()).unwrap()
            );
        }
        let sms = Outgoing {
            channel: Channel::Sms,
            content: Content::Sms {
                body: "STOP \"x\"".into(),
            },
            ..email(false)
        };
        assert_eq!(sms.json_body(), serde_json::to_vec(&sms.to_json()).unwrap());
    }
}
