//! Template helpers: money, points, dates and links, formatted for the message's locale (the
//! context's `locale`, set by dispatch to the templates' locale; `en` when absent).
//!
//! `{{money total_minor currency}}` → `$12.00`, `₩12,000`, `₺1.234,56`;
//! `{{number 1234}}` → `1,234` (`1.234` in Turkish); `{{date "2026-12-15"}}` →
//! `15 December 2026`, `2026년 12월 15일`, `15 Aralık 2026`; `{{url checkout_url}}` refuses
//! anything but an http(s) URL, so a `javascript:` link can never reach an href.

use chrono::{Datelike, NaiveDate};
use handlebars::{
    Context, Handlebars, Helper, HelperResult, Output, RenderContext, RenderError,
    RenderErrorReason,
};
use serde_json::Value;

/// Registers every helper.
pub(crate) fn register(registry: &mut Handlebars<'static>) {
    registry.register_helper("money", Box::new(money));
    registry.register_helper("number", Box::new(number));
    registry.register_helper("date", Box::new(date));
    registry.register_helper("url", Box::new(url));
}

fn locale(ctx: &Context) -> String {
    ctx.data()
        .get("locale")
        .and_then(Value::as_str)
        .unwrap_or("en")
        .split('-')
        .next()
        .unwrap_or("en")
        .to_owned()
}

fn param<'a>(h: &'a Helper, i: usize, name: &'static str) -> Result<&'a Value, RenderError> {
    h.param(i)
        .map(|p| p.value())
        .ok_or_else(|| RenderErrorReason::ParamNotFoundForIndex(name, i).into())
}

fn invalid(helper: &str, what: String) -> RenderError {
    RenderErrorReason::Other(format!("{helper}: {what}")).into()
}

/// Digits grouped by thousands with `separator`.
fn grouped(n: u64, separator: char) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(separator);
        }
        out.push(c);
    }
    out
}

/// (thousands separator, decimal mark) of a locale.
fn marks(locale: &str) -> (char, char) {
    match locale {
        "tr" | "de" | "es" | "it" | "nl" | "pt" | "id" => ('.', ','),
        "fr" => ('\u{202f}', ','),
        _ => (',', '.'),
    }
}

/// An amount in minor units of an ISO 4217 currency, as the locale writes it.
pub(crate) fn format_money(minor: i64, currency: &str, locale: &str) -> String {
    let digits = crate::domain::Currency::parse(currency)
        .map(|c| c.minor_digits())
        .unwrap_or(2);
    let (group, decimal) = marks(locale);
    let scale = 10_u64.pow(u32::from(digits));
    let abs = minor.unsigned_abs();
    let mut number = grouped(abs / scale, group);
    if digits > 0 {
        number.push(decimal);
        number.push_str(&format!(
            "{:0width$}",
            abs % scale,
            width = usize::from(digits)
        ));
    }
    let sign = if minor < 0 { "-" } else { "" };
    let symbol = match currency {
        "USD" => Some("$"),
        "EUR" => Some("€"),
        "KRW" => Some("₩"),
        "TRY" => Some("₺"),
        "GBP" => Some("£"),
        "JPY" => Some("¥"),
        _ => None,
    };
    match symbol {
        Some(symbol) => format!("{sign}{symbol}{number}"),
        None => format!("{sign}{number} {currency}"),
    }
}

/// A whole number of points, grouped as the locale writes numbers.
pub(crate) fn format_points(n: i64, locale: &str) -> String {
    let sign = if n < 0 { "-" } else { "" };
    format!("{sign}{}", grouped(n.unsigned_abs(), marks(locale).0))
}

/// A date as the locale writes it in prose.
pub(crate) fn format_date(date: NaiveDate, locale: &str) -> String {
    const EN: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const TR: [&str; 12] = [
        "Ocak", "Şubat", "Mart", "Nisan", "Mayıs", "Haziran", "Temmuz", "Ağustos", "Eylül", "Ekim",
        "Kasım", "Aralık",
    ];
    let month = date.month0() as usize;
    match locale {
        "ko" => format!("{}년 {}월 {}일", date.year(), date.month(), date.day()),
        "tr" => format!("{} {} {}", date.day(), TR[month], date.year()),
        _ => format!("{} {} {}", date.day(), EN[month], date.year()),
    }
}

/// Writes a helper's text through the registry's escaping: `&` becomes `&amp;` in HTML, as it
/// must, and stays `&` in text and SMS.
fn write_escaped(r: &Handlebars, out: &mut dyn Output, text: &str) -> HelperResult {
    out.write(&(r.get_escape_fn())(text))?;
    Ok(())
}

fn money(
    h: &Helper,
    r: &Handlebars,
    ctx: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let minor = param(h, 0, "money")?.as_i64().ok_or_else(|| {
        invalid(
            "money",
            "the amount must be an integer of minor units".into(),
        )
    })?;
    let currency = param(h, 1, "money")?
        .as_str()
        .ok_or_else(|| invalid("money", "the currency must be an ISO 4217 code".into()))?;
    write_escaped(r, out, &format_money(minor, currency, &locale(ctx)))
}

fn number(
    h: &Helper,
    r: &Handlebars,
    ctx: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let n = param(h, 0, "number")?
        .as_i64()
        .ok_or_else(|| invalid("number", "expects a whole number".into()))?;
    write_escaped(r, out, &format_points(n, &locale(ctx)))
}

fn date(
    h: &Helper,
    r: &Handlebars,
    ctx: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let raw = param(h, 0, "date")?
        .as_str()
        .ok_or_else(|| invalid("date", "expects a YYYY-MM-DD string".into()))?;
    let day = NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map_err(|_| invalid("date", format!("{raw:?} is not YYYY-MM-DD")))?;
    write_escaped(r, out, &format_date(day, &locale(ctx)))
}

fn url(
    h: &Helper,
    r: &Handlebars,
    _: &Context,
    _: &mut RenderContext,
    out: &mut dyn Output,
) -> HelperResult {
    let raw = param(h, 0, "url")?
        .as_str()
        .ok_or_else(|| invalid("url", "expects a string".into()))?;
    let parsed = url::Url::parse(raw).map_err(|e| invalid("url", format!("{raw:?}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(
            "url",
            format!("{:?} is not an http(s) URL", parsed.scheme()),
        ));
    }
    write_escaped(r, out, parsed.as_str())
}

/// How an SMS is encoded and how many segments it takes: GSM-7 (160 characters, or 153 a
/// segment when split; the extension characters `^{}\[~]|€` count twice) unless a character
/// is outside GSM-7, then UCS-2 (70, or 67 a segment, counting UTF-16 units): Korean is
/// always UCS-2, and one `ş` makes a Turkish message UCS-2.
pub(crate) fn sms_segments(text: &str) -> (&'static str, usize) {
    const BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const EXTENDED: &str = "^{}\\[~]|€\u{c}";
    let mut septets: usize = 0;
    let mut gsm = true;
    for c in text.chars() {
        if BASIC.contains(c) {
            septets += 1;
        } else if EXTENDED.contains(c) {
            septets += 2;
        } else {
            gsm = false;
            break;
        }
    }
    if gsm {
        let n = if septets <= 160 {
            1
        } else {
            septets.div_ceil(153)
        };
        ("GSM-7", n.max(1))
    } else {
        let units = text.encode_utf16().count();
        let n = if units <= 70 { 1 } else { units.div_ceil(67) };
        ("UCS-2", n.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_as_each_locale_writes_it() {
        assert_eq!(format_money(1_200, "USD", "en"), "$12.00");
        assert_eq!(format_money(12_000, "KRW", "ko"), "₩12,000");
        assert_eq!(format_money(123_456, "TRY", "tr"), "₺1.234,56");
        assert_eq!(format_money(1_234_567_890, "EUR", "en"), "€12,345,678.90");
        assert_eq!(format_money(-505, "USD", "en"), "-$5.05");
        assert_eq!(format_money(999, "CHF", "en"), "9.99 CHF");
        assert_eq!(format_money(0, "KRW", "en"), "₩0");
    }

    #[test]
    fn points_and_dates() {
        assert_eq!(format_points(1_234, "en"), "1,234");
        assert_eq!(format_points(1_234_567, "tr"), "1.234.567");
        assert_eq!(format_points(999, "ko"), "999");
        let d = NaiveDate::from_ymd_opt(2026, 12, 15).unwrap();
        assert_eq!(format_date(d, "en"), "15 December 2026");
        assert_eq!(format_date(d, "ko"), "2026년 12월 15일");
        assert_eq!(format_date(d, "tr"), "15 Aralık 2026");
    }

    #[test]
    fn sms_segments_by_encoding() {
        assert_eq!(sms_segments("Hello"), ("GSM-7", 1));
        assert_eq!(sms_segments(&"a".repeat(160)), ("GSM-7", 1));
        assert_eq!(sms_segments(&"a".repeat(161)), ("GSM-7", 2));
        assert_eq!(sms_segments(&"a".repeat(306)), ("GSM-7", 2));
        assert_eq!(sms_segments(&"a".repeat(307)), ("GSM-7", 3));
        // Extension characters take two septets.
        assert_eq!(sms_segments(&"€".repeat(80)), ("GSM-7", 1));
        assert_eq!(sms_segments(&"€".repeat(81)), ("GSM-7", 2));
        // Korean: UCS-2, 70 a message.
        assert_eq!(sms_segments(&"가".repeat(70)), ("UCS-2", 1));
        assert_eq!(sms_segments(&"가".repeat(71)), ("UCS-2", 2));
        // One Turkish ş turns the whole message into UCS-2.
        assert_eq!(sms_segments(&format!("{}ş", "a".repeat(69))), ("UCS-2", 1));
        assert_eq!(sms_segments(&format!("{}ş", "a".repeat(70))), ("UCS-2", 2));
    }
}
