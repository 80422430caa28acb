//! The loyalty report (DESIGN.md, "Loyalty report"): whether the programme keeps customers and
//! whether each trigger's messages bring them back, for a period [from, to) of event time.
//!
//! Every figure is counted from rows: orders by `placed_at`, journal entries by `event_at`,
//! answers by their `at` (all the event's time, so an event applied late counts in the period
//! it happened in), and sends and holdouts by `sent_at`. Four statements, run side by side:
//! buyers (retention, repeat purchase, upsell), answers (NPS), points, and triggers. A ratio
//! with nothing to divide by is `None` (JSON `null`).

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, NaiveDate, NaiveTime, SubsecRound, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::domain::Trigger;

pub(crate) mod bench;

/// How long after a send a conversion counts.
pub(crate) const CONVERSION_WINDOW_DAYS: i64 = 7;

/// The default period's length, in days, ending now.
pub(crate) const DEFAULT_DAYS: i64 = 30;

/// A period of event time, `from` included, `to` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Period {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The longest period a report covers: five years.
pub(crate) const MAX_DAYS: i64 = 5 * 366;

impl Period {
    /// The period from `from` to `to`; either may be left out (the default is the last 30
    /// days up to `now`; `from` alone runs up to `now`, `to` alone starts 30 days before it).
    pub(crate) fn new(
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Period> {
        // Whole seconds: a period people read.
        let to = to.unwrap_or_else(|| now.trunc_subsecs(0));
        let from = match from {
            Some(from) => from,
            None => to
                .checked_sub_signed(Duration::days(DEFAULT_DAYS))
                .context("`to` is too early")?,
        };
        if from >= to {
            bail!("`from` ({from}) must be before `to` ({to})");
        }
        // The report compares the period with the one before it and reads every event of
        // both: a period of centuries is a query no one wants, and a cheap way to load the
        // database.
        if to - from > Duration::days(MAX_DAYS) {
            bail!(
                "the period from {from} to {to} is longer than {MAX_DAYS} days (5 years); ask for a shorter one"
            );
        }
        let period = Period { from, to };
        // The previous period and the conversion window must be representable.
        period.previous()?;
        to.checked_add_signed(Duration::days(CONVERSION_WINDOW_DAYS))
            .context("`to` is too late")?;
        Ok(period)
    }

    /// The period of the same length just before this one (retention's S).
    pub(crate) fn previous(&self) -> anyhow::Result<Period> {
        let from = self
            .from
            .checked_sub_signed(self.to - self.from)
            .context("the period before `from` is before the calendar's start")?;
        Ok(Period {
            from,
            to: self.from,
        })
    }

    /// The `count` periods of this length ending with this one, oldest first.
    pub(crate) fn series(&self, count: usize) -> Vec<Period> {
        let mut periods = vec![*self];
        while periods.len() < count {
            match periods.last().map(Period::previous) {
                Some(Ok(p)) => periods.push(p),
                _ => break,
            }
        }
        periods.reverse();
        periods
    }
}

/// A time given as a date (`2026-10-01`, midnight UTC) or an RFC 3339 instant.
pub(crate) fn parse_time(text: &str) -> anyhow::Result<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date.and_time(NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            anyhow::anyhow!(
                "{:?} is not a date (2026-10-01) or an RFC 3339 time (2026-10-01T00:00:00Z)",
                crate::mask::text(&text.chars().take(40).collect::<String>())
            )
        })
}

/// The report's figures, in DESIGN.md's JSON shape.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub(crate) struct Report {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// (E − N) / S: the share of the previous period's buyers who bought again in this one.
    pub retention_rate: Option<f64>,
    /// Members with two or more orders ÷ members with one or more.
    pub repeat_purchase_rate: Option<f64>,
    /// Members who bought two or more distinct SKUs ÷ members who bought exactly one.
    pub upsell_ratio: Option<f64>,
    /// % promoters (9–10) − % detractors (0–6), each member's latest answer; −100 to 100.
    pub nps: Option<f64>,
    pub points: Points,
    /// Every trigger, by name.
    pub triggers: BTreeMap<String, TriggerFigures>,
    /// The counts the ratios are made of (not in the JSON, whose shape is fixed).
    #[serde(skip)]
    pub counts: Counts,
}

/// Points moved in the period, and the balance owed at its end.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub(crate) struct Points {
    /// Given (orders, sign-up, birthday, feedback, adjustments), net of what refunds and
    /// negative adjustments took back.
    pub issued: i64,
    /// Spent on rewards.
    pub redeemed: i64,
    /// Lapsed.
    pub expired: i64,
    /// Every member's balance at `to`: the programme's liability.
    pub outstanding: i64,
}

/// One trigger's sends in the period and what followed them.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, utoipa::ToSchema)]
pub(crate) struct TriggerFigures {
    /// Sends: members reached by one occurrence of the trigger (its email and SMS are one).
    pub sent: i64,
    /// Sends followed within 7 days by what the trigger asks for.
    pub conversions: i64,
    /// conversions ÷ sent.
    pub conversion_rate: Option<f64>,
    /// Occurrences held out (the control group): planned, not sent.
    pub control_members: i64,
    /// Holdouts followed within 7 days (of when the message would have gone) by the same.
    pub control_conversions: i64,
    /// control_conversions ÷ control_members.
    pub control_conversion_rate: Option<f64>,
    /// conversion_rate − control_conversion_rate: what the message added.
    pub lift: Option<f64>,
}

/// The counts behind the ratios.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// S: members who ordered in the previous period.
    pub previous_buyers: i64,
    /// E: members who ordered in this one.
    pub buyers: i64,
    /// N: those of E who did not order in the previous period.
    pub new_buyers: i64,
    /// Members with two or more orders in the period.
    pub repeat_buyers: i64,
    /// Members who bought two or more distinct SKUs.
    pub multi_sku_buyers: i64,
    /// Members who bought exactly one distinct SKU.
    pub single_sku_buyers: i64,
    /// Members who answered (their latest answer counts).
    pub answers: i64,
    pub promoters: i64,
    pub detractors: i64,
}

/// `numerator / denominator`, or `None` when there is nothing to divide by.
fn ratio(numerator: i64, denominator: i64) -> Option<f64> {
    (denominator > 0).then(|| numerator as f64 / denominator as f64)
}

/// What converts a trigger's send: a redemption, any order, or the cart's own order.
fn converts_by_redemption(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::RedemptionReady | Trigger::PointsExpiring)
}

/// The report for `period`.
pub(crate) async fn loyalty(pool: &PgPool, period: Period) -> anyhow::Result<Report> {
    let previous = period.previous()?;
    let (buyers, answers, points, triggers) = tokio::try_join!(
        buyers(pool, previous.from, period),
        answers(pool, period),
        points(pool, period),
        triggers(pool, period),
    )?;
    let mut counts = buyers;
    counts.answers = answers.0;
    counts.promoters = answers.1;
    counts.detractors = answers.2;
    let c = &counts;
    Ok(Report {
        from: period.from,
        to: period.to,
        retention_rate: ratio(c.buyers - c.new_buyers, c.previous_buyers),
        repeat_purchase_rate: ratio(c.repeat_buyers, c.buyers),
        upsell_ratio: ratio(c.multi_sku_buyers, c.single_sku_buyers),
        nps: ratio(100 * (c.promoters - c.detractors), c.answers),
        points,
        triggers,
        counts,
    })
}

/// Buyers of this period and the one before: S, E, N, repeat buyers, and buyers by distinct
/// SKUs, in one pass over the two periods' orders grouped by member. An order's SKUs are
/// stored distinct and sorted (bytewise), so a member bought two or more distinct SKUs when
/// one order has two or more, or their orders' smallest and largest SKUs differ; exactly one
/// when they are all the same one.
async fn buyers(pool: &PgPool, since: DateTime<Utc>, period: Period) -> anyhow::Result<Counts> {
    let row = sqlx::query!(
        r#"select count(*) filter (where before) as "previous_buyers!",
                count(*) filter (where now) as "buyers!",
                count(*) filter (where now and not before) as "new_buyers!",
                count(*) filter (where orders >= 2) as "repeat_buyers!",
                count(*) filter (where several or lowest <> highest) as "multi_sku_buyers!",
                count(*) filter (where not several and lowest = highest) as "single_sku_buyers!"
         from (select bool_or(placed_at >= $2) as now,
                      bool_or(placed_at < $2) as before,
                      count(*) filter (where placed_at >= $2) as orders,
                      bool_or(jsonb_array_length(skus) >= 2) filter (where placed_at >= $2)
                          as several,
                      min((skus->>0) collate "C") filter (where placed_at >= $2) as lowest,
                      max((skus->>-1) collate "C") filter (where placed_at >= $2) as highest
               from orders where placed_at >= $1 and placed_at < $3
               group by member_id) buyers"#,
        since,
        period.from,
        period.to
    )
    .fetch_one(&mut *reading(pool).await?)
    .await
    .context("counting buyers")?;
    Ok(Counts {
        previous_buyers: row.previous_buyers,
        buyers: row.buyers,
        new_buyers: row.new_buyers,
        repeat_buyers: row.repeat_buyers,
        multi_sku_buyers: row.multi_sku_buyers,
        single_sku_buyers: row.single_sku_buyers,
        ..Counts::default()
    })
}

/// A read-only transaction for one of the report's statements: they may hash a period's rows
/// in memory (the default `work_mem` of 4 MB spills a year's members to disk), and they join
/// by hashing, never in nested loops (the planner cannot count the sends of a period before
/// it has them, guesses a few hundred, and probes an index per send when there are
/// thousands).
async fn reading(pool: &PgPool) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await.context("starting the report")?;
    sqlx::query!("set transaction read only")
        .execute(&mut *tx)
        .await?;
    sqlx::query!("set local work_mem = '64MB'")
        .execute(&mut *tx)
        .await?;
    sqlx::query!("set local enable_nestloop = off")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Members who answered, promoters and detractors, each by their latest answer in the period
/// (two answers at the same time: the greater event id is the later).
async fn answers(pool: &PgPool, period: Period) -> anyhow::Result<(i64, i64, i64)> {
    let row = sqlx::query!(
        r#"select count(*) as "answers!", count(*) filter (where score >= 9) as "promoters!",
                count(*) filter (where score <= 6) as "detractors!"
         from (select distinct on (member_id) score
               from feedback where at >= $1 and at < $2
               order by member_id, at desc, event_id desc) latest"#,
        period.from,
        period.to
    )
    .fetch_one(&mut *reading(pool).await?)
    .await
    .context("counting answers")?;
    Ok((row.answers, row.promoters, row.detractors))
}

/// Points issued, redeemed and expired in the period, and the balance at its end: today's
/// balances less what happened since `to` (one snapshot, so the two agree), which reads only
/// the journal after `from` rather than all of it.
async fn points(pool: &PgPool, period: Period) -> anyhow::Result<Points> {
    let row = sqlx::query!(
        r#"select coalesce(sum(points) filter (
                    where event_at < $2 and kind not in ('redemption', 'expiry')), 0)::bigint
                    as "issued!",
                coalesce(-sum(points) filter (where event_at < $2 and kind = 'redemption'), 0)::bigint
                    as "redeemed!",
                coalesce(-sum(points) filter (where event_at < $2 and kind = 'expiry'), 0)::bigint
                    as "expired!",
                (select coalesce(sum(balance), 0) from members)::bigint
                    - coalesce(sum(points) filter (where event_at >= $2), 0)::bigint
                    as "outstanding!"
         from point_entries where event_at >= $1"#,
        period.from,
        period.to
    )
    .fetch_one(&mut *reading(pool).await?)
    .await
    .context("summing points")?;
    Ok(Points {
        issued: row.issued,
        redeemed: row.redeemed,
        expired: row.expired,
        outstanding: row.outstanding,
    })
}

/// Each trigger's sends and holdouts in the period, and how many converted within the window.
///
/// A send is one occurrence of the trigger for one member: its email, or its SMS when it had no
/// email sent or held out (an email and an SMS of one occurrence are one send, at the email's
/// time). Conversions are semi-joins (the first matching order or redemption ends the search):
/// by member for orders and redemptions, and by cart too for abandoned-cart.
async fn triggers(
    pool: &PgPool,
    period: Period,
) -> anyhow::Result<BTreeMap<String, TriggerFigures>> {
    let by_redemption: Vec<&str> = Trigger::ALL
        .into_iter()
        .filter(|t| converts_by_redemption(*t))
        .map(Trigger::as_str)
        .collect();
    let rows = sqlx::query!(
        r#"with sends as materialized (
             select trigger, member_id, status = 'held_out' as held_out, sent_at as at,
                    sent_at + make_interval(days => $3) as until,
                    case when trigger = 'abandoned-cart' then context->>'cart_id' end as cart_id
             from messages m
             where sent_at >= $1 and sent_at < $2 and status in ('sent', 'held_out') and not test
               and (channel = 'email' or not exists (
                   select 1 from messages e
                   where e.dedupe_key = left(m.dedupe_key, -3) || 'email'
                     and e.status in ('sent', 'held_out')))
         )
         select trigger as "trigger!", held_out as "held_out!", count(*) as "sends!", 0::bigint as "converted!" from sends group by 1, 2
         union all
         select trigger, held_out, 0, count(*) from sends s
         where not (trigger = any($4))
           and exists (
               select 1 from orders o
               where o.member_id = s.member_id and o.placed_at > s.at and o.placed_at <= s.until
                 and (s.cart_id is null or o.cart_id = s.cart_id)
                 and o.placed_at > $1 and o.placed_at <= $2 + make_interval(days => $3))
         group by 1, 2
         union all
         select trigger, held_out, 0, count(*) from sends s
         where trigger = any($4)
           and exists (
               select 1 from point_entries r
               where r.kind = 'redemption' and r.member_id = s.member_id
                 and r.event_at > s.at and r.event_at <= s.until
                 and r.event_at > $1 and r.event_at <= $2 + make_interval(days => $3))
         group by 1, 2"#,
        period.from,
        period.to,
        CONVERSION_WINDOW_DAYS as i32,
        &by_redemption as &[&str]
    )
    .fetch_all(&mut *reading(pool).await?)
    .await
    .context("counting sends and conversions")?;
    let mut figures: BTreeMap<String, TriggerFigures> = Trigger::ALL
        .into_iter()
        .map(|t| (t.as_str().to_owned(), TriggerFigures::default()))
        .collect();
    for row in rows {
        let f = figures.entry(row.trigger).or_default();
        let (total, conversions) = if row.held_out {
            (&mut f.control_members, &mut f.control_conversions)
        } else {
            (&mut f.sent, &mut f.conversions)
        };
        *total += row.sends;
        *conversions += row.converted;
    }
    for f in figures.values_mut() {
        f.conversion_rate = ratio(f.conversions, f.sent);
        f.control_conversion_rate = ratio(f.control_conversions, f.control_members);
        f.lift = f
            .conversion_rate
            .zip(f.control_conversion_rate)
            .map(|(treated, control)| treated - control);
    }
    Ok(figures)
}

/// A ratio as a percentage with one decimal, or `–` for none.
fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

/// A signed difference of ratios in percentage points.
fn points_difference(value: Option<f64>) -> String {
    value.map_or_else(|| "–".to_owned(), |v| format!("{:+.1} pt", v * 100.0))
}

/// One figure as people read it: its name, its value, and what it is made of.
pub(crate) struct Line {
    pub name: &'static str,
    pub value: String,
    pub from: String,
}

/// The report's figures as people read them (the CLI's table and the console page).
pub(crate) fn lines(r: &Report) -> Vec<Line> {
    let c = &r.counts;
    let line = |name, value, from| Line { name, value, from };
    vec![
        line(
            "Retention rate",
            percent(r.retention_rate),
            format!(
                "(E {} − N {}) / S {}",
                c.buyers, c.new_buyers, c.previous_buyers
            ),
        ),
        line(
            "Repeat-purchase rate",
            percent(r.repeat_purchase_rate),
            format!(
                "{} of {} buyers ordered twice or more",
                c.repeat_buyers, c.buyers
            ),
        ),
        line(
            "Upsell ratio",
            r.upsell_ratio
                .map_or_else(|| "–".to_owned(), |v| format!("{v:.2}")),
            format!(
                "{} bought 2+ SKUs / {} bought exactly 1",
                c.multi_sku_buyers, c.single_sku_buyers
            ),
        ),
        line(
            "NPS",
            r.nps.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}")),
            format!(
                "{} promoters, {} detractors of {} members who answered",
                c.promoters, c.detractors, c.answers
            ),
        ),
        line(
            "Points issued",
            r.points.issued.to_string(),
            "net of refunds and negative adjustments".into(),
        ),
        line(
            "Points redeemed",
            r.points.redeemed.to_string(),
            String::new(),
        ),
        line(
            "Points expired",
            r.points.expired.to_string(),
            String::new(),
        ),
        line(
            "Points outstanding",
            r.points.outstanding.to_string(),
            format!("every balance at {}", r.to.to_rfc3339()),
        ),
    ]
}

/// One trigger's figures as people read them.
pub(crate) struct TriggerLine {
    pub name: String,
    pub sent: i64,
    pub conversions: i64,
    pub rate: String,
    pub control_members: i64,
    pub control_conversions: i64,
    pub control_rate: String,
    pub lift: String,
}

/// Each trigger's figures as people read them, by trigger name.
pub(crate) fn trigger_lines(r: &Report) -> Vec<TriggerLine> {
    r.triggers
        .iter()
        .map(|(name, f)| TriggerLine {
            name: name.clone(),
            sent: f.sent,
            conversions: f.conversions,
            rate: percent(f.conversion_rate),
            control_members: f.control_members,
            control_conversions: f.control_conversions,
            control_rate: percent(f.control_conversion_rate),
            lift: points_difference(f.lift),
        })
        .collect()
}

/// The report as CSV: a `figure,value` row per figure, named as in the JSON
/// (`points.issued`, `triggers.welcome.lift`); an empty value is `null`.
pub(crate) fn csv(r: &Report) -> String {
    let mut out = String::from("figure,value\n");
    let mut row = |name: &str, value: String| {
        out.push_str(name);
        out.push(',');
        out.push_str(&value);
        out.push('\n');
    };
    let ratio = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    row("from", r.from.to_rfc3339());
    row("to", r.to.to_rfc3339());
    row("retention_rate", ratio(r.retention_rate));
    row("repeat_purchase_rate", ratio(r.repeat_purchase_rate));
    row("upsell_ratio", ratio(r.upsell_ratio));
    row("nps", ratio(r.nps));
    row("points.issued", r.points.issued.to_string());
    row("points.redeemed", r.points.redeemed.to_string());
    row("points.expired", r.points.expired.to_string());
    row("points.outstanding", r.points.outstanding.to_string());
    for (name, f) in &r.triggers {
        let key = |figure: &str| format!("triggers.{name}.{figure}");
        row(&key("sent"), f.sent.to_string());
        row(&key("conversions"), f.conversions.to_string());
        row(&key("conversion_rate"), ratio(f.conversion_rate));
        row(&key("control_members"), f.control_members.to_string());
        row(
            &key("control_conversions"),
            f.control_conversions.to_string(),
        );
        row(
            &key("control_conversion_rate"),
            ratio(f.control_conversion_rate),
        );
        row(&key("lift"), ratio(f.lift));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        parse_time(text).unwrap()
    }

    #[test]
    fn periods_default_to_the_last_30_days_and_refuse_an_empty_one() {
        let now = at("2026-11-30T12:00:00Z");
        let p = Period::new(None, None, now).unwrap();
        assert_eq!((p.from, p.to), (at("2026-10-31T12:00:00Z"), now));
        let p = Period::new(Some(at("2026-11-01")), None, now).unwrap();
        assert_eq!((p.from, p.to), (at("2026-11-01T00:00:00Z"), now));
        let p = Period::new(None, Some(at("2026-11-01")), now).unwrap();
        assert_eq!(p.from, at("2026-10-02"));
        let error = Period::new(Some(at("2026-11-01")), Some(at("2026-11-01")), now)
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be before"), "{error}");
        assert!(parse_time("2026-13-01").is_err());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn the_previous_period_has_the_same_length_and_series_run_oldest_first() {
        let p = Period::new(
            Some(at("2026-10-01")),
            Some(at("2026-10-11")),
            at("2026-12-01"),
        )
        .unwrap();
        let prev = p.previous().unwrap();
        assert_eq!((prev.from, prev.to), (at("2026-09-21"), at("2026-10-01")));
        let series = p.series(3);
        assert_eq!(
            series.iter().map(|p| p.from).collect::<Vec<_>>(),
            [at("2026-09-11"), at("2026-09-21"), at("2026-10-01")]
        );
        // At the calendar's ends: an error, never a panic.
        let early = Period::new(
            Some(DateTime::<Utc>::MIN_UTC),
            Some(DateTime::<Utc>::MIN_UTC + Duration::days(30)),
            at("2026-12-01"),
        );
        assert!(early.unwrap_err().to_string().contains("calendar"));
        // No period longer than five years.
        let long = Period::new(Some(at("0001-01-01")), None, at("2026-12-01"));
        assert!(long.unwrap_err().to_string().contains("5 years"));
        assert!(Period::new(Some(at("2021-12-02")), None, at("2026-12-01")).is_ok());
        let late = Period::new(None, Some(DateTime::<Utc>::MAX_UTC), at("2026-12-01"));
        assert!(late.unwrap_err().to_string().contains("too late"));
    }

    #[test]
    fn ratios_with_nothing_to_divide_by_are_none() {
        assert_eq!(ratio(0, 0), None);
        assert_eq!(ratio(3, 4), Some(0.75));
        assert_eq!(percent(None), "–");
        assert_eq!(points_difference(Some(-0.125)), "-12.5 pt");
    }
}
