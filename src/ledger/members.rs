//! Members: the profile the platform sends, stored one row per member.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use crate::domain::{
    Birthday, Consent, Email, Locale, Member, MemberId, MemberState, Phone, TimeZone,
};
use crate::event::{Profile, ProfileChanges};

impl Member {
    /// The member a `member.enrolled` describes.
    pub(crate) fn enrolled(profile: &Profile, enrolled_at: DateTime<Utc>) -> Member {
        Member {
            profile: profile.clone(),
            enrolled_at,
        }
    }

    /// This member with a `member.updated`'s changes.
    pub(crate) fn updated(&self, c: &ProfileChanges) -> Member {
        let mut m = self.clone();
        let p = &mut m.profile;
        if let Some(email) = &c.email {
            p.email = email.clone();
        }
        if let Some(phone) = &c.phone {
            p.phone = phone.clone();
        }
        if let Some(first_name) = &c.first_name {
            p.first_name = first_name.clone();
        }
        if let Some(locale) = &c.locale {
            p.locale = locale.clone();
        }
        if let Some(timezone) = c.timezone {
            p.timezone = timezone;
        }
        if let Some(birthday) = c.birthday {
            p.birthday = birthday;
        }
        p.consent.email = c.consent_email.unwrap_or(p.consent.email);
        p.consent.sms = c.consent_sms.unwrap_or(p.consent.sms);
        m
    }
}

/// Takes the transaction-scoped lock of each member, in one fixed order.
pub(super) async fn lock(conn: &mut PgConnection, sorted_ids: &[&str]) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "select pg_advisory_xact_lock(k)
         from (select hashtextextended(m, 7) as k from unnest($1::text[]) as m order by 1) as keys",
        sorted_ids as &[&str]
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes the lock of each member that no other transaction holds, without waiting: the ids
/// whose lock another transaction holds. (No wait, so no order is needed against deadlocks.)
pub(super) async fn try_lock(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashSet<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"select m as "m!" from unnest($1::text[]) as m
           where not pg_try_advisory_xact_lock(hashtextextended(m, 7))"#,
        ids as &[&str]
    )
    .fetch_all(conn)
    .await
    .map(|busy| busy.into_iter().collect())
}

/// Loads the members among `ids` that exist, with their lifetime points.
pub(super) async fn load(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<MemberId, (Member, i64)>, sqlx::Error> {
    let rows = sqlx::query_as!(
        Stored,
        "select member_id, email, phone, first_name, locale, timezone, birthday_month, birthday_day,
                birthday_year, consent_email, consent_sms, enrolled_at, lifetime
         from members where member_id = any($1)",
        ids as &[&str]
    )
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            let member = from_row(row).map_err(|e| sqlx::Error::Decode(e.into()))?;
            Ok((member.profile.member_id.clone(), (member, row.lifetime)))
        })
        .collect()
}

/// A member's row as stored, with its lifetime points.
pub(crate) struct Stored {
    member_id: String,
    email: Option<String>,
    phone: Option<String>,
    first_name: Option<String>,
    locale: String,
    timezone: String,
    birthday_month: Option<i16>,
    birthday_day: Option<i16>,
    birthday_year: Option<i16>,
    consent_email: bool,
    consent_sms: bool,
    enrolled_at: DateTime<Utc>,
    lifetime: i64,
}

/// Decodes a stored member, re-checking each value (a hand edit of the table is caught here).
pub(crate) fn from_row(row: &Stored) -> Result<Member, crate::domain::Invalid> {
    let birthday = match (row.birthday_month, row.birthday_day, row.birthday_year) {
        (Some(m), Some(d), None) => Some(Birthday::parse(&format!("{m:02}-{d:02}"))?),
        (Some(m), Some(d), Some(y)) => Some(Birthday::parse(&format!("{y:04}-{m:02}-{d:02}"))?),
        _ => None,
    };
    let profile = Profile {
        member_id: MemberId::parse(&row.member_id)?,
        email: row.email.as_deref().map(Email::parse).transpose()?,
        phone: row.phone.as_deref().map(Phone::parse).transpose()?,
        first_name: row.first_name.clone(),
        locale: Locale::parse(&row.locale)?,
        timezone: TimeZone::parse(&row.timezone)?,
        birthday,
        consent: Consent {
            email: row.consent_email,
            sms: row.consent_sms,
        },
    };
    Ok(Member {
        profile,
        enrolled_at: row.enrolled_at,
    })
}

/// The members whose address on `channel` is `address`, in id order.
pub(super) async fn with_address(
    conn: &mut PgConnection,
    channel: crate::domain::Channel,
    address: &str,
) -> Result<Vec<String>, sqlx::Error> {
    match channel {
        crate::domain::Channel::Email => {
            sqlx::query_scalar!(
                "select member_id from members where email = $1 order by member_id",
                address
            )
            .fetch_all(conn)
            .await
        }
        crate::domain::Channel::Sms => {
            sqlx::query_scalar!(
                "select member_id from members where phone = $1 order by member_id",
                address
            )
            .fetch_all(conn)
            .await
        }
    }
}

/// Inserts or replaces the given members, with their point totals.
pub(super) async fn save(
    conn: &mut PgConnection,
    states: &[&MemberState],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let members: Vec<&Member> = states.iter().map(|s| &s.member).collect();
    let balances: Vec<i64> = states.iter().map(|s| s.points.balance()).collect();
    let lifetimes: Vec<i64> = states.iter().map(|s| s.points.lifetime).collect();
    if members.is_empty() {
        return Ok(());
    }
    let profiles: Vec<&Profile> = members.iter().map(|m| &m.profile).collect();
    let ids: Vec<&str> = profiles.iter().map(|p| p.member_id.as_str()).collect();
    let emails: Vec<Option<&str>> = profiles
        .iter()
        .map(|p| p.email.as_ref().map(Email::as_str))
        .collect();
    let phones: Vec<Option<&str>> = profiles
        .iter()
        .map(|p| p.phone.as_ref().map(Phone::as_str))
        .collect();
    let names: Vec<Option<&str>> = profiles.iter().map(|p| p.first_name.as_deref()).collect();
    let locales: Vec<&str> = profiles.iter().map(|p| p.locale.as_str()).collect();
    let zones: Vec<&str> = profiles.iter().map(|p| p.timezone.name()).collect();
    let months: Vec<Option<i16>> = profiles
        .iter()
        .map(|p| p.birthday.map(|b| b.month() as i16))
        .collect();
    let days: Vec<Option<i16>> = profiles
        .iter()
        .map(|p| p.birthday.map(|b| b.day() as i16))
        .collect();
    let years: Vec<Option<i16>> = profiles
        .iter()
        .map(|p| p.birthday.and_then(|b| b.year()).map(|y| y as i16))
        .collect();
    let consent_email: Vec<bool> = profiles.iter().map(|p| p.consent.email).collect();
    let consent_sms: Vec<bool> = profiles.iter().map(|p| p.consent.sms).collect();
    let enrolled: Vec<DateTime<Utc>> = members.iter().map(|m| m.enrolled_at).collect();
    sqlx::query!(
        "insert into members (member_id, email, phone, first_name, locale, timezone, birthday_month,
                              birthday_day, birthday_year, consent_email, consent_sms, enrolled_at,
                              balance, lifetime, updated_at)
         select *, $13::timestamptz
         from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::smallint[], $8::smallint[], $9::smallint[], $10::bool[], $11::bool[], $12::timestamptz[],
                     $14::bigint[], $15::bigint[])
         on conflict (member_id) do update set
             email = excluded.email, phone = excluded.phone, first_name = excluded.first_name,
             locale = excluded.locale, timezone = excluded.timezone,
             birthday_month = excluded.birthday_month, birthday_day = excluded.birthday_day,
             birthday_year = excluded.birthday_year, consent_email = excluded.consent_email,
             consent_sms = excluded.consent_sms, enrolled_at = excluded.enrolled_at,
             balance = excluded.balance, lifetime = excluded.lifetime, updated_at = excluded.updated_at",
        &ids as &[&str],
        &emails as &[Option<&str>],
        &phones as &[Option<&str>],
        &names as &[Option<&str>],
        &locales as &[&str],
        &zones as &[&str],
        &months as &[Option<i16>],
        &days as &[Option<i16>],
        &years as &[Option<i16>],
        &consent_email,
        &consent_sms,
        &enrolled,
        now,
        &balances,
        &lifetimes
    )
    .execute(conn)
    .await?;
    Ok(())
}
