-- Answers to the NPS question (`feedback.submitted`), by the event's time, and the points
-- they earned (once per order).
create table feedback (
    event_id  text primary key,
    member_id text not null,
    order_id  text,
    -- 0 to 10: promoters 9-10, passives 7-8, detractors 0-6
    score     smallint not null check (score between 0 and 10),
    comment   text,
    points    bigint not null default 0,
    at        timestamptz not null
);
create index feedback_at on feedback (at);
create index feedback_member on feedback (member_id, at);
create unique index feedback_rewarded_once on feedback (order_id) where points > 0;

alter table point_entries drop constraint point_entries_kind_check;
alter table point_entries add constraint point_entries_kind_check
    check (kind in ('signup', 'order', 'refund', 'adjustment', 'redemption', 'expiry', 'birthday', 'feedback'));

-- When what a record records happened, by the platform's clock (the event's `time`): a report
-- for a past period counts an event applied late in the period it happened in. Rows from
-- before this migration have none; reports fall back to `at` and `created_at`.
alter table point_entries add column event_at timestamptz;
alter table messages add column event_at timestamptz;
create index point_entries_event_at on point_entries using brin (event_at);

-- The distinct SKUs of each order (a JSON array of strings), for the upsell ratio. Orders from
-- before this migration have none.
alter table orders add column skus jsonb not null default '[]';
