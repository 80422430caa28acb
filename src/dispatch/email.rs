//! Composing an email: MIME with UTF-8 headers, text and HTML parts, and the tracing headers.

use lettre::Message;
use lettre::message::header::{ContentTransferEncoding, Header, HeaderName, HeaderValue};
use lettre::message::{Body, Mailbox, MultiPart};

use crate::domain::Email;
use crate::domain::Trigger;
use crate::render::RenderedEmail;

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
pub(crate) fn list_unsubscribe(url: &str, mailto: Option<&str>) -> String {
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
            body(&rendered.text),
            body(&rendered.html),
        ))?;
    Ok(message.formatted())
}

/// A text part, with CRLF line ends: `7bit` when it is ASCII in lines of at most 998 octets
/// with no NUL or bare CR (RFC 2045 2.7, RFC 5322 2.1.1), quoted-printable otherwise.
///
/// lettre's own choice (`Body::new`) takes quoted-printable for any line over 76 characters,
/// which a rendered email always has (MJML writes lines of 6,000), and it cost 31–36 µs for
/// 10 KB of HTML: three passes over the text, a `String::insert` for each LF and the
/// `quoted_printable` crate's encoder. Here it is one pass of 10–13 µs, mostly the escapes of
/// the markup's `=`.
fn body(text: &str) -> Body {
    match seven_bit(text) {
        Some(lines) => Body::dangerous_pre_encoded(lines, ContentTransferEncoding::SevenBit),
        None => Body::dangerous_pre_encoded(
            quoted_printable(text),
            ContentTransferEncoding::QuotedPrintable,
        ),
    }
}

/// The lines of a text as they are, each ended by CRLF (a final one without a line end stays
/// without), or `None` when the text cannot go unencoded.
fn seven_bit(text: &str) -> Option<Vec<u8>> {
    /// RFC 5322 2.1.1: at most 998 characters a line, without its CRLF.
    const LONGEST_LINE: usize = 998;
    if !text.is_ascii() {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() + text.len() / 16 + 2);
    for line in text.as_bytes().split_inclusive(|b| *b == b'\n') {
        let (content, ends) = line_end(line);
        if content.len() > LONGEST_LINE || content.contains(&b'\r') || content.contains(&0) {
            return None;
        }
        out.extend_from_slice(content);
        if ends {
            out.extend_from_slice(b"\r\n");
        }
    }
    Some(out)
}

/// A text in quoted-printable (RFC 2045 6.7): its line ends as CRLF (hard line breaks), every
/// other byte outside `!`..=`~`, `=`, and a space or tab that ends a line as `=XX`, and a soft
/// break (`=` CRLF) before an encoded line would pass 76 characters. Runs of bytes that stand
/// for themselves are copied whole.
fn quoted_printable(text: &str) -> Vec<u8> {
    /// 76 characters a line with the `=` of a soft break.
    const WIDTH: usize = 75;
    /// Bytes that stand for themselves (a space or tab only inside a line).
    const LITERAL: [bool; 256] = {
        let mut table = [false; 256];
        let mut byte = 0;
        while byte < 256 {
            table[byte] = matches!(byte as u8, b'!'..=b'<' | b'>'..=b'~' | b' ' | b'\t');
            byte += 1;
        }
        table
    };
    fn escape(out: &mut Vec<u8>, byte: u8) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.extend_from_slice(&[
            b'=',
            HEX[usize::from(byte >> 4)],
            HEX[usize::from(byte & 15)],
        ]);
    }
    let mut out = Vec::with_capacity(text.len() + text.len() / 8 + 16);
    for line in text.as_bytes().split_inclusive(|b| *b == b'\n') {
        let (content, ends) = line_end(line);
        let mut column = 0;
        let mut rest = content;
        while !rest.is_empty() {
            if column == WIDTH {
                out.extend_from_slice(b"=\r\n");
                column = 0;
            }
            let room = (WIDTH - column).min(rest.len());
            let run = rest[..room]
                .iter()
                .position(|b| !LITERAL[usize::from(*b)])
                .unwrap_or(room);
            out.extend_from_slice(&rest[..run]);
            column += run;
            rest = &rest[run..];
            if run < room {
                if column + 3 > WIDTH {
                    out.extend_from_slice(b"=\r\n");
                    column = 0;
                }
                escape(&mut out, rest[0]);
                column += 3;
                rest = &rest[1..];
            }
        }
        // A space or tab that ends a line went out as itself: it is encoded instead, or a
        // mail system could strip it.
        if let Some(&last @ (b' ' | b'\t')) = content.last() {
            out.pop();
            if column - 1 + 3 > WIDTH {
                out.extend_from_slice(b"=\r\n");
            }
            escape(&mut out, last);
        }
        if ends {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// A line (as `split_inclusive` gives it) without its line end, LF or CRLF, and whether it had
/// one. A CR without an LF after it is part of the line.
fn line_end(line: &[u8]) -> (&[u8], bool) {
    match line.strip_suffix(b"\n") {
        Some(content) => (content.strip_suffix(b"\r").unwrap_or(content), true),
        None => (line, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of `text` and `html`, the encodings of its parts, and its parts as a mail
    /// client reads them (line ends as LF).
    fn round_trip(text: &str, html: &str) -> (String, Vec<String>, String, String) {
        let rendered = RenderedEmail {
            subject: "Hi".into(),
            html: html.into(),
            text: text.into(),
            html_json: None,
        };
        let mime = compose(
            &"Shop <shop@example.com>".parse().unwrap(),
            &Email::parse("ada@example.com").unwrap(),
            None,
            7,
            Trigger::Welcome,
            &rendered,
            "<https://loyalty.example/unsubscribe/t>",
        )
        .unwrap();
        let parsed = mail_parser::MessageParser::default().parse(&mime).unwrap();
        let lf = |s: std::borrow::Cow<'_, str>| s.replace("\r\n", "\n");
        let text = lf(parsed.body_text(0).unwrap());
        let html = lf(parsed.body_html(0).unwrap());
        let mime = String::from_utf8(mime).expect("a message is ASCII");
        let encodings = mime
            .lines()
            .filter_map(|l| l.strip_prefix("Content-Transfer-Encoding: "))
            .map(str::to_owned)
            .collect();
        (mime, encodings, text, html)
    }

    /// Every line ends with CRLF, and none is longer than `longest` without it.
    fn lines_within(mime: &str, longest: usize) {
        for line in mime.split_inclusive('\n') {
            let content = line
                .strip_suffix("\r\n")
                .unwrap_or_else(|| panic!("{line:?} ends with CRLF"));
            assert!(!content.contains(['\r', '\n']), "{line:?}");
            assert!(
                content.len() <= longest,
                "{} > {longest}: {line:?}",
                content.len()
            );
        }
    }

    #[test]
    fn ascii_in_short_lines_goes_as_it_is() {
        let long = format!("<p style=\"margin:0\">{}</p>", "a=b ".repeat(200));
        let html = format!("<html>\n{long}\r\n<p>.dot</p>\n</html>");
        let (mime, encodings, text, got) = round_trip("Hi Ada,\nyour points \n", &html);
        assert_eq!(encodings, ["7bit", "7bit"]);
        assert_eq!(text, "Hi Ada,\nyour points \n");
        assert_eq!(got, html.replace("\r\n", "\n"));
        assert!(mime.contains(&long), "the long line is whole");
        lines_within(&mime, 998);
        let (_, encodings, got, _) = round_trip(&"x".repeat(998), "<p>x</p>");
        assert_eq!((encodings[0].as_str(), got), ("7bit", "x".repeat(998)));
    }

    #[test]
    fn anything_else_is_quoted_printable_and_decodes_to_the_same_text() {
        let texts = [
            "x".repeat(999),
            "a\rb".into(),
            "a\0b".into(),
            "ends in CR\r".into(),
            "안녕하세요, 에이다님\n포인트가 1,200점 있어요".into(),
            format!("Zoë{}", " =\t".repeat(60)),
            format!("trailing space \nand tab\t\r\n{}é ", "=".repeat(30)),
            format!(
                "{} \n{} \n{}\t\n{}=",
                "x".repeat(1000),
                "x".repeat(74),
                "x".repeat(72),
                "x".repeat(73)
            ),
        ];
        for text in texts {
            let (mime, encodings, got, _) = round_trip(&text, "<p>x</p>");
            assert_eq!(encodings[0], "quoted-printable", "{text:?}");
            assert_eq!(got, text.replace("\r\n", "\n"), "{text:?}");
            lines_within(&mime, 76);
            assert!(
                !mime.contains(" \r\n") && !mime.contains("\t\r\n"),
                "a space or tab ending a line is encoded: {mime}"
            );
        }
    }

    #[test]
    fn every_shipped_email_decodes_to_what_was_rendered() {
        let templates = crate::render::Templates::shipped().unwrap();
        let pairs = templates.pairs();
        assert!(
            pairs.len() >= 18,
            "six triggers in three languages: {pairs:?}"
        );
        for (trigger, locale) in pairs {
            let rendered = templates
                .render_email(trigger, &locale, &crate::render::sample_context(trigger))
                .unwrap();
            let (mime, encodings, text, html) = round_trip(&rendered.text, &rendered.html);
            // MJML writes lines of thousands of characters.
            assert_eq!(encodings[1], "quoted-printable", "{trigger:?} {locale}");
            assert_eq!(
                text,
                rendered.text.replace("\r\n", "\n"),
                "{trigger:?} {locale}"
            );
            assert_eq!(
                html,
                rendered.html.replace("\r\n", "\n"),
                "{trigger:?} {locale}"
            );
            lines_within(&mime, 998);
        }
    }

    #[test]
    fn crlf_in_a_subject_or_name_adds_no_header() {
        let rendered = RenderedEmail {
            subject: "Hi\r\nBcc: thief@example.com".into(),
            html: "<p>x</p>".into(),
            text: "x".into(),
            html_json: None,
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
