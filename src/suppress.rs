//! Suppression: addresses that must not be messaged, and the ways they get there (one-click
//! unsubscribe, SMS STOP, bounces and complaints). Checked at send time, so a suppression that
//! arrives while a message is queued stops it.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sqlx::{PgConnection, PgPool};

use crate::domain::{Channel, MemberId};
use crate::notifications::{How, Notice, Sinks};

/// A change to whether an address may be messaged on a channel. The platform is told of every
/// member with that address now, and of `member` (whose message it was, perhaps sent to an
/// address they have since changed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Change<'a> {
    pub channel: Channel,
    pub address: &'a str,
    pub how: How,
    pub member: Option<&'a str>,
}

/// Records that the address must not get messages on the channel; a second suppression keeps
/// the first reason. A new one is told to the platform (`member.unsubscribed`) in the same
/// transaction. True when it is new.
pub(crate) async fn suppress(
    pool: &PgPool,
    sinks: Sinks,
    change: Change<'_>,
    reason: &str,
    source: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let new = sqlx::query!(
        "insert into suppressions (channel, address, reason, source) values ($1, $2, $3, $4)
         on conflict (channel, address) do nothing",
        change.channel.as_str(),
        change.address,
        reason,
        source
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if new {
        tell(&mut tx, sinks, change, false).await?;
    }
    tx.commit().await?;
    Ok(new)
}

/// Lifts a suppression (SMS START, or ops), told to the platform (`member.resubscribed`) in
/// the same transaction; true when there was one.
pub(crate) async fn restore(
    pool: &PgPool,
    sinks: Sinks,
    change: Change<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let lifted = sqlx::query!(
        "delete from suppressions where channel = $1 and address = $2",
        change.channel.as_str(),
        change.address
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if lifted {
        tell(&mut tx, sinks, change, true).await?;
    }
    tx.commit().await?;
    Ok(lifted)
}

/// Records the notices of a change: one per member it concerns, in member order.
async fn tell(
    conn: &mut PgConnection,
    sinks: Sinks,
    change: Change<'_>,
    subscribed: bool,
) -> Result<(), sqlx::Error> {
    if !sinks.any() {
        return Ok(());
    }
    let mut members = crate::ledger::with_address(conn, change.channel, change.address).await?;
    if let Some(member) = change.member
        && !members.iter().any(|m| m == member)
    {
        members.push(member.to_owned());
        members.sort();
    }
    let notices: Vec<Notice> = members
        .iter()
        .map(|m| Notice::subscription(m, change.channel, change.how, subscribed))
        .collect();
    crate::notifications::record(conn, sinks, &notices).await
}

/// What an inbound SMS asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keyword {
    /// STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, REVOKE, OPTOUT.
    Stop,
    /// START, UNSTOP.
    Start,
}

/// Reads an inbound SMS as Twilio's opt-out keywords: the whole message, in any case, with
/// surrounding spaces and punctuation ignored ("Stop.", " stop! "). Anything else is `None`.
pub(crate) fn keyword(body: &str) -> Option<Keyword> {
    let word: String = body
        .trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .to_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "REVOKE" | "OPTOUT" => {
            Some(Keyword::Stop)
        }
        "START" | "UNSTOP" => Some(Keyword::Start),
        _ => None,
    }
}

/// Issues and checks unsubscribe tokens: the member id, the message id, and an HMAC-SHA256 of
/// both under a key only the replicas share (kept in the `secrets` table, made on first use).
/// The message id lets an unsubscribe act on the address that message went to, even if the
/// member has changed address since.
#[derive(Clone)]
pub struct Tokens {
    key: hmac::Key,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(***)")
    }
}

const PURPOSE: &[u8] = b"lifecycle unsubscribe v1\0";

/// Whom a genuine token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscriber {
    /// The member.
    pub member: MemberId,
    /// The message whose link it is (tokens issued before messages were named have none).
    pub message_id: Option<i64>,
}

impl Tokens {
    /// Tokens under this key.
    pub fn new(secret: &[u8]) -> Tokens {
        Tokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Loads the shared key, making it on first use.
    pub async fn load(pool: &PgPool) -> Result<Tokens, sqlx::Error> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query!(
            "insert into secrets (name, value) values ('unsubscribe', $1) on conflict do nothing",
            &fresh[..]
        )
        .execute(pool)
        .await?;
        let secret: Vec<u8> =
            sqlx::query_scalar!("select value from secrets where name = 'unsubscribe'")
                .fetch_one(pool)
                .await?;
        Ok(Tokens::new(&secret))
    }

    /// What is signed: the purpose, the member id, and the message id after a NUL when there
    /// is one (a member id holds no NUL, so the two forms cannot be confused).
    fn signed(member: &str, message_id: Option<i64>) -> Vec<u8> {
        let mut signed = [PURPOSE, member.as_bytes()].concat();
        if let Some(id) = message_id {
            signed.push(0);
            signed.extend_from_slice(id.to_string().as_bytes());
        }
        signed
    }

    /// The token of a message's unsubscribe link (URL-safe): `member.message.tag`, or
    /// `member.tag` without a message.
    pub fn issue(&self, member: &MemberId, message_id: Option<i64>) -> String {
        let tag = hmac::sign(&self.key, &Self::signed(member.as_str(), message_id));
        let member = URL_SAFE_NO_PAD.encode(member.as_str());
        let tag = URL_SAFE_NO_PAD.encode(tag.as_ref());
        match message_id {
            Some(id) => format!("{member}.{id}.{tag}"),
            None => format!("{member}.{tag}"),
        }
    }

    /// Whom a token was issued for, if it is genuine.
    pub fn verify(&self, token: &str) -> Option<Unsubscriber> {
        let parts: Vec<&str> = token.split('.').collect();
        let (member, message_id, tag) = match parts[..] {
            [member, tag] => (member, None, tag),
            [member, id, tag] => (member, Some(id.parse::<i64>().ok()?), tag),
            _ => return None,
        };
        let member = String::from_utf8(URL_SAFE_NO_PAD.decode(member).ok()?).ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        hmac::verify(&self.key, &Self::signed(&member, message_id), &tag).ok()?;
        Some(Unsubscriber {
            member: MemberId::parse(&member).ok()?,
            message_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_words_in_any_case_with_punctuation() {
        for stop in [
            "STOP",
            "stop",
            " Stop. ",
            "stopall",
            "UNSUBSCRIBE",
            "cancel!",
            "End",
            "quit",
            "REVOKE",
            "optout",
            "\tSTOP\n",
        ] {
            assert_eq!(keyword(stop), Some(Keyword::Stop), "{stop:?}");
        }
        for start in ["START", "start", "Unstop!", " start "] {
            assert_eq!(keyword(start), Some(Keyword::Start), "{start:?}");
        }
        for other in ["stop it", "please stop", "STOPP", "", "yes", "스톱"] {
            assert_eq!(keyword(other), None, "{other:?}");
        }
    }

    #[test]
    fn tokens_verify_only_as_issued() {
        let tokens = Tokens::new(b"key one");
        let member = MemberId::parse("m-42").unwrap();
        let token = tokens.issue(&member, None);
        let named = |message_id| {
            Some(Unsubscriber {
                member: member.clone(),
                message_id,
            })
        };
        assert_eq!(tokens.verify(&token), named(None));
        let of_message = tokens.issue(&member, Some(7));
        assert_eq!(tokens.verify(&of_message), named(Some(7)));
        let (head, tag) = of_message.rsplit_once('.').unwrap();
        let other_message = format!("{}.8.{tag}", head.rsplit_once('.').unwrap().0);
        assert_eq!(tokens.verify(&other_message), None, "another message's id");
        assert_eq!(Tokens::new(b"key two").verify(&token), None, "another key");
        let other = URL_SAFE_NO_PAD.encode("m-43");
        let forged = format!("{other}.{}", token.split_once('.').unwrap().1);
        assert_eq!(
            tokens.verify(&forged),
            None,
            "another member's id with this tag"
        );
        assert_eq!(tokens.verify("garbage"), None);
        assert_eq!(tokens.verify(""), None);
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        );
    }
}
