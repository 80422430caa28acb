//! Masking personal data in free text: provider error replies, refusal reasons, anything that
//! may quote an email address or a phone number and is bound for a log line or a stored error.
//!
//! Addresses become `j***@example.com` and numbers `+44*******123`, as `Email::masked` and
//! `Phone::masked` show them. The scan is deliberately generous: anything shaped like an
//! address (`x@y`) or a run of seven or more digits (with `+`, spaces, dots or dashes
//! between them) is masked, whether or not it would parse. A masked order number is a small
//! price for never logging a customer's number.

/// `text` with every email address and phone number in it masked.
pub fn text(text: &str) -> String {
    let masked = emails(text);
    numbers(&masked)
}

/// The most characters kept of anything a provider, relay or webhook sent that is stored or
/// logged (an error reply, a status, a message id).
pub(crate) const PARTNER_TEXT: usize = 500;

/// Text from a partner (a provider's reply, a relay's refusal), made fit to store and log:
/// control characters (NUL, which PostgreSQL's `text` refuses, among them) become spaces,
/// runs of whitespace one space, at most `PARTNER_TEXT` characters are kept, and addresses
/// and numbers are masked.
pub(crate) fn partner(text: &str) -> String {
    // Masked before it is cut to length: an address cut in two at the end would no longer
    // look like one.
    let masked = self::text(&clean(text, PARTNER_TEXT * 4));
    clean(&masked, PARTNER_TEXT)
}

/// `text` on one line, without control characters, at most `max` characters (an ellipsis
/// marks a cut): for identifiers and replies from outside that are stored but must stay as
/// they are otherwise (a provider's message id is not masked, or it would no longer match
/// its status callbacks).
pub(crate) fn clean(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut kept = 0;
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            space = !out.is_empty();
            continue;
        }
        if kept == max {
            out.push('…');
            return out;
        }
        if space {
            out.push(' ');
            kept += 1;
            space = false;
            if kept == max {
                out.push('…');
                return out;
            }
        }
        out.push(c);
        kept += 1;
    }
    out
}

/// Characters that can stand in the local part or the domain of an address: RFC 5322's atext
/// and dots, and (RFC 6532, which lettre and so `Email::parse` follow) any other non-ASCII
/// character that is not a space or a control.
fn address_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "._%+-!#$&'*/=?^`{|}~".contains(c)
        || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
}

fn emails(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '@' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // The local part: the address characters just before '@' (already copied to `out`).
        let local_len = chars[..i]
            .iter()
            .rev()
            .take_while(|c| address_char(**c))
            .count();
        // A mistyped address (`a@@b.com`) is masked like a good one: skip every '@'.
        let ats = chars[i..].iter().take_while(|c| **c == '@').count();
        // The domain as RFC 5322 allows it (lettre, and so `Email::parse`, takes `a@*b&c`).
        let domain_len = chars[i + ats..]
            .iter()
            .take_while(|c| address_char(**c))
            .count();
        let domain: String = chars[i + ats..i + ats + domain_len].iter().collect();
        let domain = domain.trim_end_matches('.');
        // Any domain, dotted or not: whatever `Email::parse` takes (`user@localhost`) is masked.
        if local_len == 0 || domain.is_empty() {
            out.extend(std::iter::repeat_n('@', ats));
            i += ats;
            continue;
        }
        // Keep the first character of the local part, as `Email::masked` does. The rest of it
        // is the end of `out` as it came (no address crosses an '@'): cut by its bytes, so
        // that a text of many addresses is masked in one pass.
        let cut: usize = chars[i + 1 - local_len..i]
            .iter()
            .map(|c| c.len_utf8())
            .sum();
        out.truncate(out.len() - cut);
        out.push_str("***@");
        out.push_str(domain);
        i += ats + domain.chars().count();
    }
    out
}

fn numbers(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let starts = chars[i].is_ascii_digit()
            || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        // A run glued to a word (an id such as `order123456789`) is masked all the same.
        if !starts {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        // The run: digits with single separators between them.
        let mut end = i + 1;
        let mut digits = usize::from(chars[i].is_ascii_digit());
        while end < chars.len() {
            if chars[end].is_ascii_digit() {
                digits += 1;
                end += 1;
            } else if " .-()".contains(chars[end])
                && chars.get(end + 1).is_some_and(char::is_ascii_digit)
            {
                end += 1;
            } else {
                break;
            }
        }
        let run: String = chars[i..end].iter().collect();
        if digits >= 7 && !looks_like_a_date_or_time(&run) {
            let ds: Vec<char> = run.chars().filter(char::is_ascii_digit).collect();
            let plus = if run.starts_with('+') { "+" } else { "" };
            let head: String = ds[..2].iter().collect();
            let tail: String = ds[ds.len() - 3..].iter().collect();
            out.push_str(&format!("{plus}{head}{}{tail}", "*".repeat(ds.len() - 5)));
        } else {
            out.push_str(&run);
        }
        i = end;
    }
    out
}

/// `2026-11-22 10:00:00` and `10.00.00` are not phone numbers: runs made of groups of 2 or 4
/// digits split by `-`, `:` or `.` in a date's shape are left alone.
fn looks_like_a_date_or_time(run: &str) -> bool {
    let groups: Vec<&str> = run.split(['-', '.', ' ']).collect();
    groups.len() >= 3
        && groups
            .iter()
            .all(|g| g.len() == 2 || (g.len() == 4 && !g.starts_with('+')))
        && groups.first().is_some_and(|g| g.len() == 4 || g.len() == 2)
        && !run.starts_with('+')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_addresses_are_masked_in_one_pass() {
        // 1 MiB of addresses: once, each address counted and copied the whole text masked so
        // far (about 10^11 steps here). A pass is a fraction of a second; the bound only
        // tells a pass from that.
        let text = "ab@c.de ".repeat(131_072);
        let (sent, got) = std::sync::mpsc::channel();
        let masking = text.clone();
        std::thread::spawn(move || sent.send(super::text(&masking)));
        let masked = got
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("1 MiB of addresses masked within 20 s");
        assert_eq!(masked, "a***@c.de ".repeat(131_072));
        // Multi-byte local parts are cut by their bytes.
        assert_eq!(super::text("ü©ñ@ex.co x"), "ü***@ex.co x");
    }

    #[test]
    fn partner_text_loses_nul_and_control_characters_and_is_capped() {
        assert_eq!(clean("a\u{0}b\r\n\tc  d ", 100), "a b c d");
        assert_eq!(clean("\u{0}\u{0}", 100), "");
        let long = "x".repeat(10_000);
        let kept = clean(&long, 20);
        assert_eq!(kept.chars().count(), 21);
        assert!(kept.ends_with('…'));
        assert_eq!(
            partner("550 no \u{0} ada@example.com"),
            "550 no a***@example.com"
        );
        assert!(partner(&"@".repeat(100_000)).chars().count() <= PARTNER_TEXT + 1);
        // An address or a number across the cut is masked, not cut in two and kept.
        for pad in 480..PARTNER_TEXT {
            let reply = format!("{} ada.lovelace@example.com +14155550123", "x".repeat(pad));
            let kept = partner(&reply);
            assert!(
                !kept.contains("lovelace") && !kept.contains("0123") && !kept.contains("55550"),
                "{kept}"
            );
        }
    }

    #[test]
    fn addresses_and_numbers_are_masked_wherever_they_stand() {
        let table = [
            (
                "smtp: permanent error (550): 5.1.1 <jiwoo.kim@example.co.kr>: Recipient address rejected",
                "smtp: permanent error (550): 5.1.1 <j***@example.co.kr>: Recipient address rejected",
            ),
            (
                "twilio: HTTP 400: The 'To' number +821012345678 is not a valid phone number.",
                "twilio: HTTP 400: The 'To' number +82*******678 is not a valid phone number.",
            ),
            (
                "email \"jiwoo.kim@@example.com\" is not an address; x@y.com too",
                "email \"j***@example.com\" is not an address; x***@y.com too",
            ),
            (
                "phone \"+82 10 1234 5678\" is not an E.164 number",
                "phone \"+82*******678\" is not an E.164 number",
            ),
            ("call 555-123-4567 now", "call 55*****567 now"),
            (
                "order 42 of 3 items at 12:30",
                "order 42 of 3 items at 12:30",
            ),
            (
                "HTTP 503 Service Unavailable",
                "HTTP 503 Service Unavailable",
            ),
            ("on 2026-11-22 at 10.00.00", "on 2026-11-22 at 10.00.00"),
            ("user@localhost refused", "u***@localhost refused"),
            ("a bare @ sign, and @home", "a bare @ sign, and @home"),
            ("한글 a@b.kr 끝", "한글 a***@b.kr 끝"),
            ("odd x@*d&e.co* domain", "odd x***@*d&e.co* domain"),
            ("p@® and ax@؛", "p***@® and a***@؛"),
            ("", ""),
            ("@ alone, and trailing @", "@ alone, and trailing @"),
        ];
        for (input, expected) in table {
            assert_eq!(text(input), expected, "{input:?}");
        }
    }

    #[test]
    fn masking_never_panics_and_removes_every_long_digit_run() {
        use proptest::prelude::*;
        proptest!(|(s in "[ -~가-힣]{0,80}")| {
            let masked = text(&s);
            let mut run = 0;
            for c in masked.chars() {
                run = if c.is_ascii_digit() { run + 1 } else { 0 };
                prop_assert!(run < 7, "{masked:?}");
            }
        });
    }
}
