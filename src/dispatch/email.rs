//! Composing an email: MIME with UTF-8 headers, text and HTML parts, and the tracing headers.

use lettre::Message;
use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};

use crate::domain::Email;
use crate::render::RenderedEmail;
use crate::triggers::Trigger;

/// `X-Lifecycle-Trigger: welcome`
#[derive(Debug, Clone)]
struct TriggerHeader(String);

/// `X-Lifecycle-Message-Id: 42`
#[derive(Debug, Clone)]
struct MessageIdHeader(String);

/// `List-Unsubscribe: <https://…/unsubscribe/TOKEN>` (RFC 2369)
#[derive(Debug, Clone)]
struct ListUnsubscribe(String);

/// `List-Unsubscribe-Post: List-Unsubscribe=One-Click` (RFC 8058)
#[derive(Debug, Clone)]
struct ListUnsubscribePost(String);

macro_rules! text_header {
    ($type:ident, $name:literal) => {
        impl Header for $type {
            fn name() -> HeaderName {
                HeaderName::new_from_ascii_str($name)
            }

            fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
                Ok(Self(s.to_owned()))
            }

            fn display(&self) -> HeaderValue {
                HeaderValue::new(Self::name(), self.0.clone())
            }
        }
    };
}

text_header!(TriggerHeader, "X-Lifecycle-Trigger");
text_header!(MessageIdHeader, "X-Lifecycle-Message-Id");
text_header!(ListUnsubscribe, "List-Unsubscribe");
text_header!(ListUnsubscribePost, "List-Unsubscribe-Post");

/// The `List-Unsubscribe` value: the https link, and a mailto where one is configured
/// (RFC 2369). The link is ours (public URL and a URL-safe token), never member text.
pub fn list_unsubscribe(url: &str, mailto: Option<&str>) -> String {
    match mailto {
        Some(address) => format!("<{url}>, <mailto:{address}?subject=unsubscribe>"),
        None => format!("<{url}>"),
    }
}

/// The formatted message (RFC 5322 bytes) of a rendered email. Names and subjects are
/// encoded by lettre (RFC 2047), and the subject is already one line, so no value can add a
/// header.
pub(crate) fn compose(
    from: &Mailbox,
    to: &Email,
    name: Option<&str>,
    message_id: i64,
    trigger: Trigger,
    rendered: &RenderedEmail,
    list_unsubscribe: &str,
) -> anyhow::Result<Vec<u8>> {
    // lettre panics formatting a display name with a line break in it; names are checked at
    // ingest, and here control characters become spaces all the same.
    let name = name.map(|n| {
        n.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
    });
    let to = Mailbox::new(name, to.as_str().parse()?);
    let message = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(rendered.subject.clone())
        .header(TriggerHeader(trigger.as_str().to_owned()))
        .header(MessageIdHeader(message_id.to_string()))
        // RFC 8058 one-click: mail clients POST to the link.
        .header(ListUnsubscribe(list_unsubscribe.to_owned()))
        .header(ListUnsubscribePost("List-Unsubscribe=One-Click".to_owned()))
        .multipart(MultiPart::alternative_plain_html(
            rendered.text.clone(),
            rendered.html.clone(),
        ))?;
    Ok(message.formatted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_in_a_subject_or_name_adds_no_header() {
        let rendered = RenderedEmail {
            subject: "Hi\r\nBcc: thief@example.com".into(),
            html: "<p>x</p>".into(),
            text: "x".into(),
        };
        let mime = compose(
            &"Shop <shop@example.com>".parse().unwrap(),
            &Email::parse("ada@example.com").unwrap(),
            Some("Ada\r\nBcc: thief@example.com"),
            7,
            Trigger::Welcome,
            &rendered,
            "<https://loyalty.example/unsubscribe/t>",
        )
        .unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&mime).unwrap();
        assert!(
            parsed.header_raw("Bcc").is_none(),
            "{}",
            String::from_utf8_lossy(&mime)
        );
        let to: Vec<_> = parsed.to().unwrap().iter().collect();
        assert_eq!(to.len(), 1);
        assert_eq!(to[0].address(), Some("ada@example.com"));
        assert!(
            parsed.subject().unwrap().contains("Bcc: thief@example.com"),
            "kept as text"
        );
        assert_eq!(
            parsed.header_raw("List-Unsubscribe-Post").map(str::trim),
            Some("List-Unsubscribe=One-Click")
        );
    }
}
