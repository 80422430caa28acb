//! Unsubscribe links: `GET /unsubscribe/{token}` shows a page in the member's language (and
//! changes nothing, so link scanners unsubscribe no one); `POST` is RFC 8058's one-click.

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use tracing::{info, warn};

use crate::app::App;
use crate::domain::{Channel, Email};
use crate::notifications::{How, Sinks};
use crate::suppress;

/// The words of the unsubscribe pages, per language.
struct Words {
    lang: &'static str,
    title: &'static str,
    ask: &'static str,
    button: &'static str,
    done: &'static str,
    invalid: &'static str,
}

fn words(locale: &str) -> Words {
    match locale.split('-').next().unwrap_or("en") {
        "ko" => Words {
            lang: "ko",
            title: "수신 거부",
            ask: "이 주소로 더 이상 이메일을 받지 않으시겠습니까?",
            button: "수신 거부",
            done: "수신 거부되었습니다. 더 이상 이메일을 보내지 않습니다.",
            invalid: "이 링크는 유효하지 않습니다.",
        },
        "tr" => Words {
            lang: "tr",
            title: "Abonelikten çık",
            ask: "Bu adrese artık e-posta almak istemiyor musunuz?",
            button: "Abonelikten çık",
            done: "Aboneliğiniz iptal edildi. Size artık e-posta göndermeyeceğiz.",
            invalid: "Bu bağlantı geçerli değil.",
        },
        _ => Words {
            lang: "en",
            title: "Unsubscribe",
            ask: "Stop receiving email at this address?",
            button: "Unsubscribe",
            done: "You are unsubscribed. We will not email you again.",
            invalid: "This link is not valid.",
        },
    }
}

/// A small page; every value in it is ours (no member text), but escaped all the same.
fn html_page(w: &Words, shop: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"{}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title></head><body style=\"font-family:Helvetica,Arial,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;\">\
         <h1>{}</h1>{body}</body></html>",
        w.lang,
        escape(w.title),
        escape(shop),
    ))
}

fn escape(text: &str) -> String {
    handlebars::html_escape(text)
}

/// Whom an unsubscribe link is for: the member, the address to unsubscribe (the one the
/// link's message went to, else the member's current one) and the page's locale.
struct Recipient {
    member: String,
    email: Option<String>,
    locale: String,
}

/// Looks a token up. `Ok(None)`: not genuine, or a member no longer known. `Err`: the
/// database could not say (the caller answers 503, so the person can try again).
async fn recipient_of(app: &App, token: &str) -> Result<Option<Recipient>, sqlx::Error> {
    let Some(named) = app.tokens.verify(token) else {
        return Ok(None);
    };
    let row =
        crate::outbox::unsubscribed_address(&app.pool, named.member.as_str(), named.message_id)
            .await?;
    Ok(row.map(|(member, email, locale)| Recipient {
        member,
        email,
        locale,
    }))
}

/// The answer to a token that is not genuine (or of a member no longer known).
fn invalid_link(shop: &str) -> Response {
    let w = words("en");
    let body = format!("<p>{}</p>", escape(w.invalid));
    (StatusCode::NOT_FOUND, html_page(&w, shop, &body)).into_response()
}

/// The answer when the database is unavailable: nothing was done; try again.
fn try_again(shop: &str, error: &sqlx::Error) -> Response {
    warn!(%error, "Unsubscribe: the database is unavailable.");
    let w = words("en");
    let body = "<p>We could not handle this just now. Nothing was changed; please try again in a few minutes.</p>";
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "60")],
        html_page(&w, shop, body),
    )
        .into_response()
}

pub(super) async fn page(State(app): State<App>, Path(token): Path<String>) -> Response {
    let shop = &app.settings.shop_name;
    let recipient = match recipient_of(&app, &token).await {
        Ok(Some(recipient)) => recipient,
        Ok(None) => return invalid_link(shop),
        Err(error) => return try_again(shop, &error),
    };
    let w = words(&recipient.locale);
    // The form posts to this same URL: the page works without JavaScript, and a link scanner
    // that follows GETs unsubscribes no one.
    let body = format!(
        "<p>{}</p><form method=\"post\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\" style=\"padding:.75rem 1.25rem;font-size:1rem;\">{}</button></form>",
        escape(w.ask),
        escape(w.button)
    );
    html_page(&w, shop, &body).into_response()
}

pub(super) async fn one_click(State(app): State<App>, Path(token): Path<String>) -> Response {
    let shop = &app.settings.shop_name;
    let recipient = match recipient_of(&app, &token).await {
        Ok(Some(recipient)) => recipient,
        Ok(None) => return invalid_link(shop),
        Err(error) => return try_again(shop, &error),
    };
    if let Some(email) = &recipient.email {
        let change = suppress::Change {
            channel: Channel::Email,
            address: email,
            how: How::OneClick,
            member: Some(&recipient.member),
        };
        let sinks = Sinks::of(&app.settings);
        if let Err(error) =
            suppress::suppress(&app.pool, sinks, change, "unsubscribed", "unsubscribe").await
        {
            return try_again(shop, &error);
        }
        let masked = Email::parse(email).map(|e| e.masked()).unwrap_or_default();
        info!(member = recipient.member, to = masked, "Unsubscribed.");
    }
    let w = words(&recipient.locale);
    html_page(&w, shop, &format!("<p>{}</p>", escape(w.done))).into_response()
}
