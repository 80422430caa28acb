//! The loyalty report against real RabbitMQ and PostgreSQL: a month small enough to compute by
//! hand (the arithmetic is written beside each figure), an empty period, the CLI, its CSV and
//! the API agreeing; an order applied late counting in the period it happened in; and a 50%
//! holdout keeping about half the members from their welcome and counting their orders as the
//! control group's.

mod common;

use std::collections::BTreeMap;

use common::admin::{self, ADMIN_TOKEN, Auth, Client};
use common::{TestEnv, cli, count, free_port, wait_for};
use lifecycle::testkit::app::{App, Roles};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const SERVING: Roles = Roles {
    ingest: true,
    dispatch: true,
    schedule: false,
    http: true,
};

fn event(id: String, kind: &str, time: &str, data: Value) -> String {
    json!({"specversion": "1.0", "id": id, "source": "test", "type": kind, "time": time, "data": data})
        .to_string()
}

/// Events of one test, their ids made unique by its tag.
struct Events<'a> {
    tag: &'a str,
}

impl Events<'_> {
    fn enrolled(
        &self,
        member: &str,
        email: Option<&str>,
        phone: Option<&str>,
        time: &str,
    ) -> String {
        event(
            format!("{}-enrol-{member}", self.tag),
            "member.enrolled",
            time,
            json!({"member_id": member, "email": email, "phone": phone, "first_name": member,
                   "locale": "en", "timezone": "UTC",
                   "consent": {"email": email.is_some(), "sms": phone.is_some()}}),
        )
    }

    /// An order of `total` minor USD units with one line per SKU.
    fn order(&self, order: &str, member: &str, time: &str, total: i64, skus: &[&str]) -> String {
        let items: Vec<Value> = skus
            .iter()
            .map(|sku| json!({"sku": sku, "name": sku, "quantity": 1, "unit_price": total / skus.len() as i64}))
            .collect();
        event(
            format!("{}-order-{order}", self.tag),
            "order.placed",
            time,
            json!({"order_id": order, "member_id": member, "total": total, "currency": "USD", "items": items}),
        )
    }

    fn answer(&self, n: u32, member: &str, time: &str, score: u8, order: Option<&str>) -> String {
        event(
            format!("{}-answer-{n}", self.tag),
            "feedback.submitted",
            time,
            json!({"member_id": member, "score": score, "order_id": order}),
        )
    }

    fn redeemed(&self, member: &str, time: &str, points: i64) -> String {
        event(
            format!("{}-redeem-{member}", self.tag),
            "points.redeemed",
            time,
            json!({"member_id": member, "points": points}),
        )
    }
}

/// An environment serving the API with the bootstrap token; its base URL.
fn serving_env(extra: &[(&str, &str)]) -> (TestEnv, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = vec![
        ("LIFECYCLE_HTTP_ADDR", addr.clone()),
        ("LIFECYCLE_ADMIN_TOKEN", ADMIN_TOKEN.to_owned()),
    ];
    vars.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    (TestEnv::new(&vars), format!("http://{addr}"))
}

fn time(text: &str) -> chrono::DateTime<chrono::Utc> {
    text.parse().unwrap()
}

/// A report's JSON flattened to CSV's names (`points.issued`, `triggers.welcome.lift`), each
/// a number or None.
fn flatten(report: &Value) -> BTreeMap<String, Option<f64>> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Option<f64>>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let name = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&name, v, out);
                }
            }
            Value::Null => {
                out.insert(prefix.to_owned(), None);
            }
            Value::Number(n) => {
                out.insert(prefix.to_owned(), n.as_f64());
            }
            other => panic!("{prefix}: unexpected {other}"),
        }
    }
    let mut figures = report.clone();
    let object = figures.as_object_mut().unwrap();
    object.remove("from");
    object.remove("to");
    let mut out = BTreeMap::new();
    walk("", &figures, &mut out);
    out
}

fn parse_csv(text: &str) -> BTreeMap<String, Option<f64>> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("figure,value"));
    lines
        .filter(|l| !l.starts_with("from,") && !l.starts_with("to,"))
        .map(|l| {
            let (name, value) = l.split_once(',').unwrap();
            let value = (!value.is_empty()).then(|| value.parse::<f64>().unwrap());
            (name.to_owned(), value)
        })
        .collect()
}

/// A ratio in a report equals `expected` (to rounding).
fn assert_ratio(value: &Value, expected: f64) {
    let got = value
        .as_f64()
        .unwrap_or_else(|| panic!("{value} is not a number"));
    assert!((got - expected).abs() < 1e-9, "{got}, expected {expected}");
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() < 1e-9,
        (None, None) => true,
        _ => false,
    }
}

/// Asks the API, the CLI's JSON and the CLI's CSV for one period, checks they agree, and
/// returns the API's answer.
async fn report_everywhere(env: &TestEnv, api: &Client, from: &str, to: &str) -> Value {
    let (status, by_api) = api
        .json(
            Method::GET,
            &format!("/api/reports/loyalty?from={from}&to={to}"),
            Auth::Bearer(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_api}");
    let by_cli: Value =
        serde_json::from_str(&cli(env, &["report", "--from", from, "--to", to, "--json"])).unwrap();
    assert_eq!(by_cli, by_api, "the CLI's JSON and the API's differ");
    let csv = parse_csv(&cli(env, &["report", "--from", from, "--to", to, "--csv"]));
    let json = flatten(&by_api);
    assert_eq!(
        csv.keys().collect::<Vec<_>>(),
        json.keys().collect::<Vec<_>>()
    );
    for (name, value) in &json {
        assert!(
            close(csv[name], *value),
            "{name}: CSV {:?}, JSON {value:?}",
            csv[name]
        );
    }
    by_api
}

async fn wait_sent(app: &App, trigger: &str, n: i64) {
    let sql =
        format!("select count(*) from messages where trigger = '{trigger}' and status = 'sent'");
    wait_for(&format!("{n} {trigger} sent"), || async {
        (count(app, &sql).await == n).then_some(())
    })
    .await;
}

/// The report of October 2026 ([10-01, 10-31), 30 days; the previous period is [09-01, 10-01)).
///
/// Members: A returns (ordered in September and twice in October), B is new (enrolled and
/// ordered in October, with email and phone: a welcome and a redemption-ready go to B, each by
/// email and SMS), C lapsed (only September; a phone, so a welcome by SMS alone), D orders
/// exactly on the edges (09-01 00:00, 10-01 00:00 and 10-31 00:00), E
/// only before September. Sign-up bonus 50, an order earns 1 point per dollar, feedback 5
/// points per order.
#[tokio::test(flavor = "multi_thread")]
async fn a_month_computed_by_hand_and_the_cli_csv_and_api_agree() {
    let (env, base) = serving_env(&[
        ("LIFECYCLE_NOW", "2026-10-10T12:00:00Z"),
        ("LIFECYCLE_PROGRAM__SIGNUP_BONUS", "50"),
        ("LIFECYCLE_PROGRAM__FEEDBACK_POINTS", "5"),
    ]);
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let e = Events { tag: &env.tag };
    let applied = |n: i64| {
        let app = app.clone();
        async move {
            wait_for(&format!("{n} events applied"), || async {
                (count(&app, "select count(*) from inbox").await >= n).then_some(())
            })
            .await
        }
    };

    // 10-10 12:00: the members join; B's and C's welcomes go now.
    let mut events = vec![
        e.enrolled(
            "B",
            Some("b@example.com"),
            Some("+905321234567"),
            "2026-10-10T11:00:00Z",
        ),
        e.enrolled("C", None, Some("+905321234568"), "2026-08-01T00:00:00Z"),
    ];
    for m in ["A", "D", "E"] {
        events.push(e.enrolled(m, None, None, "2026-08-01T00:00:00Z"));
    }
    env.publish(&events).await;
    wait_sent(&app, "welcome", 3).await;

    // 10-12 10:00: B's first order (50 + 70 = 120 points) reaches the 100-point reward; the
    // redemption-ready message goes now.
    app.clock.set(time("2026-10-12T10:00:00Z"));
    env.publish(&[e.order("b1", "B", "2026-10-12T09:00:00Z", 7000, &["Z"])])
        .await;
    wait_sent(&app, "redemption-ready", 2).await;

    // 11-20: everything else arrives, long after it happened.
    app.clock.set(time("2026-11-20T00:00:00Z"));
    env.publish(&[
        e.order("e1", "E", "2026-08-31T23:59:59Z", 1000, &["X"]),
        e.order("d1", "D", "2026-09-01T00:00:00Z", 2000, &["X"]),
        e.order("a1", "A", "2026-09-10T12:00:00Z", 3000, &["X"]),
        e.order("c1", "C", "2026-09-15T12:00:00Z", 4000, &["Y"]),
        e.order("d2", "D", "2026-10-01T00:00:00Z", 5000, &["X"]),
        e.order("a2", "A", "2026-10-05T12:00:00Z", 6000, &["X", "Y"]),
        e.order("a3", "A", "2026-10-20T12:00:00Z", 8000, &["X"]),
        e.order("d3", "D", "2026-10-31T00:00:00Z", 9000, &["Y"]),
        e.redeemed("B", "2026-10-14T00:00:00Z", 100),
    ])
    .await;
    applied(5 + 1 + 9).await;
    env.publish(&[
        // A: a detractor first (about a2: 5 points), a promoter at the last answer.
        e.answer(1, "A", "2026-10-06T12:00:00Z", 3, Some("a2")),
        e.answer(2, "A", "2026-10-25T12:00:00Z", 10, None),
        e.answer(3, "B", "2026-10-13T12:00:00Z", 6, None),
        e.answer(4, "C", "2026-10-02T12:00:00Z", 10, None),
        // D's answers fall on either side of the period: not counted.
        e.answer(5, "D", "2026-09-30T23:59:59Z", 2, None),
        e.answer(6, "D", "2026-10-31T00:00:00Z", 9, None),
    ])
    .await;
    applied(5 + 1 + 9 + 6).await;

    let october = report_everywhere(&env, &api, "2026-10-01", "2026-10-31").await;
    // S (ordered in September: d1 at 09-01 00:00 counts, e1 a second before does not) = {A, C, D}
    // E (ordered in October: d2 at 10-01 00:00 counts, d3 at 10-31 00:00 does not) = {A, B, D}
    // N (E not in S) = {B}. Retention (E − N) / S = (3 − 1) / 3.
    assert_ratio(&october["retention_rate"], 2.0 / 3.0);
    // Two or more October orders: A (a2, a3) of A, B, D.
    assert_ratio(&october["repeat_purchase_rate"], 1.0 / 3.0);
    // Distinct SKUs in October: A {X, Y} (2+); B {Z}, D {X} (exactly 1). 1 / 2.
    assert_eq!(october["upsell_ratio"], json!(0.5));
    // Latest answer per member: A 10 (promoter), B 6 (detractor), C 10 (promoter); D none in
    // the period. 100 × (2 − 1) / 3.
    assert_ratio(&october["nps"], 100.0 / 3.0);
    // Issued in October: B's sign-up 50 + d2 50 + a2 60 + b1 70 + a3 80 + the answer's 5 = 315.
    // Redeemed: B's 100. Expired: none.
    // Outstanding at 10-31: sign-ups 5 × 50 = 250, orders e1..a3 10 + 20 + 30 + 40 + 50 + 60 +
    // 70 + 80 = 360, the answer's 5, less the 100 redeemed = 515 (d3's 90 comes at 10-31).
    assert_eq!(
        october["points"],
        json!({"issued": 315, "redeemed": 100, "expired": 0, "outstanding": 515})
    );
    let direct: i64 = sqlx::query_scalar(
        "select sum(points)::bigint from point_entries where event_at < '2026-10-31'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(direct, 515, "the journal itself agrees");
    // Welcome: B's (email and SMS: one send) and C's (SMS) at 10-10 12:00; b1 at 10-12 09:00
    // is within 7 days of B's, C did not order: 1 of 2.
    // Redemption-ready: B's at 10-12 10:00 (email and SMS), the redemption at 10-14: 1 of 1.
    // No holdout.
    let t = &october["triggers"];
    assert_eq!(
        t["welcome"],
        json!({"sent": 2, "conversions": 1, "conversion_rate": 0.5, "control_members": 0,
               "control_conversions": 0, "control_conversion_rate": null, "lift": null})
    );
    assert_eq!(
        t["redemption-ready"],
        json!({"sent": 1, "conversions": 1, "conversion_rate": 1.0, "control_members": 0,
               "control_conversions": 0, "control_conversion_rate": null, "lift": null})
    );
    for trigger in ["points-expiring", "tier-up", "birthday", "abandoned-cart"] {
        assert_eq!(t[trigger]["sent"], 0, "{trigger}");
        assert_eq!(t[trigger]["conversion_rate"], Value::Null, "{trigger}");
    }

    // September's outstanding at its end is October's at its start: 250 − 50 (B's comes later)
    // + 10 + 20 + 30 + 40 = 300; and 300 + 315 − 100 − 0 = 515.
    let september = report_everywhere(&env, &api, "2026-09-01", "2026-10-01").await;
    assert_eq!(september["points"]["outstanding"], 300);

    // A month with nothing in it: every ratio null, nothing moved, nothing owed.
    let empty = report_everywhere(&env, &api, "2025-01-01", "2025-02-01").await;
    for ratio in [
        "retention_rate",
        "repeat_purchase_rate",
        "upsell_ratio",
        "nps",
    ] {
        assert_eq!(empty[ratio], Value::Null, "{ratio}");
    }
    assert_eq!(
        empty["points"],
        json!({"issued": 0, "redeemed": 0, "expired": 0, "outstanding": 0})
    );
    for (trigger, figures) in empty["triggers"].as_object().unwrap() {
        for ratio in ["conversion_rate", "control_conversion_rate", "lift"] {
            assert_eq!(figures[ratio], Value::Null, "{trigger} {ratio}");
        }
    }

    // The readable table says the same, with what each figure is made of.
    let table = cli(
        &env,
        &["report", "--from", "2026-10-01", "--to", "2026-10-31"],
    );
    for expected in ["66.7%", "(E 3 − N 1) / S 3", "33.3", "315", "515"] {
        assert!(table.contains(expected), "{expected:?} not in\n{table}");
    }

    // Bad periods are refused with a clear error.
    let (status, body) = api
        .json(
            Method::GET,
            "/api/reports/loyalty?from=2026-10-31&to=2026-10-01",
            Auth::Bearer(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("must be before"),
        "{body}"
    );
    let (status, body) = api
        .json(
            Method::GET,
            "/api/reports/loyalty?from=last%20week",
            Auth::Bearer(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = api
        .json(Method::GET, "/api/reports/loyalty", Auth::None, None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The console page: a marketer sees the figures and the charts.
    let (password, _) = admin::add_user(&env, "mia", "marketer");
    let (_, session) = api.login("mia", &password).await;
    let (cookie, _) = session.expect("logged in");
    let (status, page) = api
        .page("/console/reports?from=2026-10-01&to=2026-10-31", &cookie)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page.matches("<svg class=\"chart\"").count(),
        7,
        "six KPI charts and the triggers'"
    );
    assert!(page.contains("66.7%") && page.contains("(E 3 − N 1) / S 3"));
    assert!(page.contains("aria-label=\"Retention rate."));
    let (status, page) = api.page("/console/reports?from=yesterday", &cookie).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(page.contains("is not a date"), "{page}");

    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// An order placed in October and applied in November counts in October, not November; and
/// October asked again gives the same figures as before, plus that order.
#[tokio::test(flavor = "multi_thread")]
async fn an_order_applied_late_counts_in_the_period_it_happened_in() {
    let (env, base) = serving_env(&[("LIFECYCLE_NOW", "2026-11-20T00:00:00Z")]);
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let e = Events { tag: &env.tag };
    env.publish(&[
        e.enrolled("A", None, None, "2026-09-01T00:00:00Z"),
        e.order("a1", "A", "2026-09-20T00:00:00Z", 1000, &["X"]),
    ])
    .await;
    wait_for("two events applied", || async {
        (count(&app, "select count(*) from inbox").await == 2).then_some(())
    })
    .await;
    let before = report_everywhere(&env, &api, "2026-10-01", "2026-11-01").await;
    // A ordered in September, not in October: retention 0 of 1.
    assert_eq!(before["retention_rate"], json!(0.0));
    assert_eq!(before["repeat_purchase_rate"], Value::Null);

    // Placed on 10-15, applied on 11-20.
    env.publish(&[e.order("a2", "A", "2026-10-15T00:00:00Z", 2000, &["Y"])])
        .await;
    wait_for("the late order applied", || async {
        (count(&app, "select count(*) from orders").await == 2).then_some(())
    })
    .await;
    let after = report_everywhere(&env, &api, "2026-10-01", "2026-11-01").await;
    assert_eq!(after["retention_rate"], json!(1.0));
    assert_eq!(after["repeat_purchase_rate"], json!(0.0));
    assert_eq!(after["points"]["issued"], 20);
    assert_eq!(
        after["points"]["outstanding"],
        before["points"]["outstanding"].as_i64().unwrap() + 20
    );
    // November, when it was applied, knows nothing of it.
    let november = report_everywhere(&env, &api, "2026-11-01", "2026-12-01").await;
    assert_eq!(november["repeat_purchase_rate"], Value::Null);
    assert_eq!(november["points"]["issued"], 0);
    // Asked again, October has not moved.
    let again = report_everywhere(&env, &api, "2026-10-01", "2026-11-01").await;
    assert_eq!(again, after);

    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 200 members join with email under a 50% welcome holdout: those the hash puts in the control
/// group get no welcome (nothing reaches the provider; the message is recorded `held_out`) and
/// take no code from the welcome's coupon pool, everyone else gets one, and when half of each
/// side orders, the report counts the control side's orders as the control's conversions.
#[tokio::test(flavor = "multi_thread")]
async fn half_the_members_are_held_out_of_their_welcome_and_measured_as_its_control() {
    const MEMBERS: usize = 200;
    let (env, base) = serving_env(&[
        ("LIFECYCLE_NOW", "2026-10-10T12:00:00Z"),
        ("LIFECYCLE_PROGRAM__HOLDOUT_PERCENT__WELCOME", "50"),
        ("LIFECYCLE_PROGRAM__COUPONS__WELCOME", "HELLO"),
    ]);
    let codes = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = (0..MEMBERS).map(|i| format!("HELLO-{i:04}")).collect();
    std::fs::write(codes.path(), lines.join("\n")).unwrap();
    cli(
        &env,
        &["coupons", "import", "HELLO", codes.path().to_str().unwrap()],
    );
    let worker = env.start(SERVING).await;
    let app = worker.app.clone();
    let api = Client::new(&base);
    let e = Events { tag: &env.tag };
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("{}-m{i}", env.tag)).collect();
    let holdout = &app.settings.program.holdout_percent;
    let held: Vec<bool> = members
        .iter()
        .map(|m| holdout.holds_out(m, "welcome"))
        .collect();
    let n_held = held.iter().filter(|h| **h).count();
    // Binomial(200, 0.5): mean 100, sd 7.1. The ids are random per run, so this can fail by
    // chance: outside 100 ± 28 (4 sd) about once in 16,000 runs.
    assert!(
        (72..=128).contains(&n_held),
        "{n_held} of {MEMBERS} held out"
    );

    let enrolments: Vec<String> = members
        .iter()
        .map(|m| {
            e.enrolled(
                m,
                Some(&format!("{m}@example.com")),
                None,
                "2026-10-10T11:00:00Z",
            )
        })
        .collect();
    env.publish(&enrolments).await;
    wait_for("every welcome settled", || async {
        let settled = count(
            &app,
            "select count(*) from messages where trigger = 'welcome' and status in ('sent', 'held_out')",
        )
        .await;
        (settled == MEMBERS as i64).then_some(())
    })
    .await;
    // The same side as the hash says, member by member.
    let held_out: Vec<String> = sqlx::query_scalar(
        "select member_id from messages where trigger = 'welcome' and status = 'held_out' order by member_id",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let mut expected: Vec<String> = members
        .iter()
        .zip(&held)
        .filter(|(_, h)| **h)
        .map(|(m, _)| m.clone())
        .collect();
    expected.sort();
    assert_eq!(held_out, expected);
    // Codes went to the members who get the message, none to the control group.
    let drawn = count(
        &app,
        "select count(*) from coupons where occurrence is not null",
    )
    .await;
    assert_eq!(drawn, (MEMBERS - n_held) as i64);
    // At the provider: a welcome for each member not held out, none for the others.
    let delivered: Vec<String> = std::fs::read_dir(env.outbox.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|path| path.extension().is_some_and(|x| x == "json"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    assert_eq!(delivered.len(), MEMBERS - n_held);
    for (m, h) in members.iter().zip(&held) {
        let address = format!("\"{m}@example.com\"");
        let got = delivered.iter().filter(|d| d.contains(&address)).count();
        assert_eq!(got, usize::from(!h), "{m}: held out {h}, {got} welcomes");
    }
    // Ops see them in deliveries.
    let (status, listed) = api
        .json(
            Method::GET,
            "/api/messages?status=held_out&limit=500",
            Auth::Bearer(ADMIN_TOKEN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["messages"].as_array().unwrap().len(), n_held);

    // Every even-numbered member orders two days later, on whichever side.
    app.clock.set(time("2026-11-20T00:00:00Z"));
    let orders: Vec<String> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, m)| e.order(&format!("o{i}"), m, "2026-10-12T12:00:00Z", 1000, &["X"]))
        .collect();
    env.publish(&orders).await;
    wait_for("every order applied", || async {
        (count(&app, "select count(*) from orders").await == orders.len() as i64).then_some(())
    })
    .await;
    let ordered_and = |side: bool| {
        held.iter()
            .enumerate()
            .filter(|(i, h)| i % 2 == 0 && **h == side)
            .count() as i64
    };
    let october = report_everywhere(&env, &api, "2026-10-01", "2026-11-01").await;
    let welcome = &october["triggers"]["welcome"];
    let sent = (MEMBERS - n_held) as i64;
    let rate = ordered_and(false) as f64 / sent as f64;
    let control_rate = ordered_and(true) as f64 / n_held as f64;
    assert_eq!(
        (&welcome["sent"], &welcome["conversions"]),
        (&json!(sent), &json!(ordered_and(false)))
    );
    assert_eq!(
        (&welcome["control_members"], &welcome["control_conversions"]),
        (&json!(n_held), &json!(ordered_and(true)))
    );
    assert_ratio(&welcome["conversion_rate"], rate);
    assert_ratio(&welcome["control_conversion_rate"], control_rate);
    assert_ratio(&welcome["lift"], rate - control_rate);

    worker.stop().await.unwrap();
    env.cleanup().await;
}
