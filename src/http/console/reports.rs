//! The console's report page: the period's figures, the KPIs over the last six periods of the
//! same length, and each trigger's conversion against its control group, as SVG charts with
//! the table beside them. Marketers and ops.

use askama::Template;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::charts::{self, Series};
use super::{Session, error_page, page};
use crate::app::App;
use crate::http::api::reports::PeriodQuery;
use crate::http::auth::ApiError;
use crate::report::{self, Period, Report};

/// How many periods the charts cover.
const PERIODS: usize = 6;

pub(super) fn routes() -> Router<App> {
    Router::new().route("/console/reports", get(report_page))
}

#[derive(Template)]
#[template(path = "reports.html")]
struct ReportsPage {
    user: Option<String>,
    csrf: Option<String>,
    from: String,
    to: String,
    error: Option<String>,
    heading: String,
    figures: Vec<report::Line>,
    triggers: Vec<report::TriggerLine>,
    /// SVG markup, made and escaped by `charts`.
    kpi_charts: Vec<String>,
    trigger_chart: String,
    api_query: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ReportQuery {
    from: String,
    to: String,
}

/// A period's label on a chart: its first day (and hour, for periods under a day).
fn label(p: &Period) -> String {
    if p.to - p.from < chrono::Duration::days(1) {
        p.from.format("%m-%d %H:%M").to_string()
    } else {
        p.from.format("%b %-d").to_string()
    }
}

/// A number short enough for a chart: 950, 13k, 7.5M.
fn compact(v: f64) -> String {
    let size = v.abs();
    if size >= 1e9 {
        format!("{:.1}B", v / 1e9)
    } else if size >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if size >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// A time for people: the date, and the minute when it is not midnight.
fn readable(t: DateTime<Utc>) -> String {
    if t.time() == chrono::NaiveTime::MIN {
        t.format("%-d %b %Y").to_string()
    } else {
        t.format("%-d %b %Y %H:%M UTC").to_string()
    }
}

/// A share as a whole percentage.
fn percent(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

/// The charts of the programme's figures over the periods `labels` name, one per figure.
fn kpi_charts(reports: &[Report], labels: &[String]) -> Vec<String> {
    let plain = |v: f64| format!("{v:.2}");
    type Pick = fn(&Report) -> Option<f64>;
    type Format<'a> = &'a dyn Fn(f64) -> String;
    type Span = Option<(f64, f64)>;
    let ratios: [(&str, Pick, Format, Span); 4] = [
        (
            "Retention rate",
            |r| r.retention_rate,
            &percent,
            Some((0.0, 1.0)),
        ),
        (
            "Repeat-purchase rate",
            |r| r.repeat_purchase_rate,
            &percent,
            Some((0.0, 1.0)),
        ),
        ("Upsell ratio", |r| r.upsell_ratio, &plain, None),
        ("NPS", |r| r.nps, &compact, Some((-100.0, 100.0))),
    ];
    let points = |name, class, pick: fn(&report::Points) -> i64| Series {
        name,
        class,
        values: reports
            .iter()
            .map(|r| Some(pick(&r.points) as f64))
            .collect(),
    };
    let mut charts: Vec<String> = ratios
        .into_iter()
        .map(|(title, pick, format, span)| {
            let series = Series {
                name: title,
                class: "s-main",
                values: reports.iter().map(pick).collect(),
            };
            charts::bars(title, labels, &[series], format, span)
        })
        .collect();
    charts.push(charts::bars(
        "Points issued, redeemed and expired",
        labels,
        &[
            points("issued", "s-issued", |p| p.issued),
            points("redeemed", "s-redeemed", |p| p.redeemed),
            points("expired", "s-expired", |p| p.expired),
        ],
        &compact,
        None,
    ));
    charts.push(charts::bars(
        "Points outstanding at the end of each period",
        labels,
        &[points("outstanding", "s-main", |p| p.outstanding)],
        &compact,
        None,
    ));
    charts
}

/// Each trigger's conversion beside its control group's, in the period of `current`.
fn trigger_chart(current: &Report) -> String {
    let names: Vec<String> = current.triggers.keys().cloned().collect();
    let rates = |name, class, pick: fn(&report::TriggerFigures) -> Option<f64>| Series {
        name,
        class,
        values: current.triggers.values().map(pick).collect(),
    };
    charts::bars(
        "Conversion within 7 days: with the message and without it (control)",
        &names,
        &[
            rates("sent", "s-main", |f| f.conversion_rate),
            rates("control", "s-control", |f| f.control_conversion_rate),
        ],
        &percent,
        Some((0.0, 1.0)),
    )
}

async fn report_page(
    State(app): State<App>,
    session: Session,
    Query(q): Query<ReportQuery>,
) -> Response {
    let asked = PeriodQuery {
        from: Some(q.from.clone()),
        to: Some(q.to.clone()),
    };
    let empty = |error: String| ReportsPage {
        user: Some(session.user.name.clone()),
        csrf: Some(session.csrf.clone()),
        from: q.from.clone(),
        to: q.to.clone(),
        error: Some(error),
        heading: String::new(),
        figures: Vec::new(),
        triggers: Vec::new(),
        kpi_charts: Vec::new(),
        trigger_chart: String::new(),
        api_query: String::new(),
    };
    let period = match asked.period(&app) {
        Ok(p) => p,
        Err(e) => return page(StatusCode::BAD_REQUEST, &empty(e.error)),
    };
    let series = period.series(PERIODS);
    let reports =
        futures_util::future::try_join_all(series.iter().map(|p| report::loyalty(&app.pool, *p)))
            .await;
    let reports: Vec<Report> = match reports {
        Ok(r) => r,
        Err(e) => return error_page(ApiError::from_anyhow(e)),
    };
    let Some(current) = reports.last() else {
        return error_page(ApiError::internal("no period"));
    };
    let labels: Vec<String> = series.iter().map(label).collect();
    let kpi_charts = kpi_charts(&reports, &labels);
    let trigger_chart = trigger_chart(current);
    let figures = report::lines(current);
    let triggers = report::trigger_lines(current);
    let api_query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("from", &period.from.to_rfc3339())
        .append_pair("to", &period.to.to_rfc3339())
        .finish();
    page(
        StatusCode::OK,
        &ReportsPage {
            user: Some(session.user.name.clone()),
            csrf: Some(session.csrf.clone()),
            from: q.from.clone(),
            to: q.to.clone(),
            error: None,
            heading: format!("{} to {}", readable(period.from), readable(period.to)),
            figures,
            triggers,
            kpi_charts,
            trigger_chart,
            api_query,
        },
    )
}
