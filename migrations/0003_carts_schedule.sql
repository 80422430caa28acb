-- Open carts and their abandoned-cart timers. Every `cart.updated` newer than the last change
-- bumps `version` and moves `due_at`; a checkout (or an order naming the cart) closes it.
create table carts (
    cart_id          text primary key,
    member_id        text not null,
    -- counts the updates applied; the abandoned-cart dedupe key is (cart, version)
    version          integer not null,
    open             boolean not null,
    -- the newest event time seen for this cart (an older event arriving late changes nothing)
    changed_at       timestamptz not null,
    -- when the abandoned-cart message is due, if the cart stays open and unchanged
    due_at           timestamptz,
    -- the version an abandoned-cart message was planned for, if any
    notified_version integer,
    items            jsonb not null default '[]',
    total_minor      bigint not null default 0,
    currency         text not null default '',
    checkout_url     text not null default ''
);
-- The due-cart scan reads only open carts not yet notified at this version.
create index carts_due on carts (due_at) where open and notified_version is distinct from version;

-- One row per scheduled scan. A replica runs a scan only while it holds the lease (database
-- time, so replicas need not agree on clocks); `last_run` is business time, so a scan whose
-- cron instant passed while every worker was down runs once when one returns.
create table scheduled_jobs (
    job         text primary key,
    last_run    timestamptz,
    leased_by   text,
    lease_until timestamptz
);

-- The birthday scan looks members up by month and day.
create index members_birthday on members (birthday_month, birthday_day)
    where birthday_month is not null;
