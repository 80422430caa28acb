-- Dead letters moved from the broker's dead-letter queue into PostgreSQL, where ops list,
-- search, replay and archive them. The body is kept as it came, byte for byte.
create table dead_letters (
    id               bigint generated always as identity primary key,
    -- from the body when it is JSON with an id and a type (a malformed body has neither)
    event_id         text,
    event_type       text,
    routing_key      text not null,
    -- lifecycle's reason (x-lifecycle-error), or the broker's (x-death: delivery limit, ...)
    reason           text not null,
    headers          jsonb not null,
    body             bytea not null,
    dead_lettered_at timestamptz not null default now(),
    replays          integer not null default 0,
    replayed_at      timestamptz,
    replayed_by      text,
    archived_at      timestamptz,
    archived_by      text
);
create index dead_letters_time on dead_letters (dead_lettered_at desc);
create index dead_letters_open on dead_letters (id) where archived_at is null;

-- Failed messages, counted for the gauges and listed for ops.
create index messages_failed on messages (id) where status = 'failed';

-- Suppressions ops lifted: whose, why, by whom and when (the suppression itself is deleted).
create table suppression_lifts (
    id        bigint generated always as identity primary key,
    member_id text not null,
    channel   text not null,
    address   text not null,
    reason    text not null,
    lifted_by text not null,
    at        timestamptz not null default now()
);
