-- The journal: every movement of a member's points, never updated. A member's balance is the
-- sum of `points`, lifetime points the sum of its positive `points`, and tier points the sum
-- of `qualifying` inside the tier window.
create table point_entries (
    id         bigint generated always as identity primary key,
    member_id  text not null,
    kind       text not null
               check (kind in ('signup', 'order', 'refund', 'adjustment', 'redemption', 'expiry', 'birthday')),
    -- added (positive) or taken (negative) from the balance
    points     bigint not null,
    -- change of tier points: what orders earn and their refunds reverse
    qualifying bigint not null default 0,
    -- business time of the movement
    at         timestamptz not null,
    -- the event (or scheduled scan) that caused it
    cause      text not null
);
create index point_entries_member on point_entries (member_id, at);

-- Earned lots that still have points, the working state of FIFO spending and expiry (spent
-- oldest first: by earned_at, then lot_id). A lot is updated as it is spent and deleted when
-- nothing is left of it.
create table point_lots (
    member_id  text not null,
    lot_id     bigint generated always as identity,
    earned_at  timestamptz not null,
    expires_at timestamptz not null,
    points     bigint not null,
    remaining  bigint not null check (remaining > 0),
    -- by member first: the one index serves loading a member's lots and finding one lot
    primary key (member_id, lot_id)
);
create index point_lots_expiry on point_lots (expires_at);

-- What each order earned and what its refunds took back.
create table orders (
    order_id       text primary key,
    member_id      text not null,
    total_minor    bigint not null,
    currency       text not null,
    earned         bigint not null,
    refunded_minor bigint not null default 0,
    -- points reversed so far; refunds never reverse more than `earned`
    reversed       bigint not null default 0,
    cart_id        text,
    placed_at      timestamptz not null
);

-- The member's totals, kept with the journal in the same transaction for quick reading.
alter table members
    add column balance  bigint not null default 0,
    add column lifetime bigint not null default 0;
