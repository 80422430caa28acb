-- Every event id that changed state. A redelivered event finds its id here and is acked
-- without effect; an event that was rejected or deferred leaves no row, so it can come back.
create table inbox (
    event_id   text primary key,
    event_type text not null,
    applied_at timestamptz not null default now()
);

-- A loyalty member as the platform last described them.
create table members (
    member_id      text primary key,
    email          text,
    -- E.164, e.g. +821012345678
    phone          text,
    first_name     text,
    -- BCP 47 tag in canonical case (ko-KR); templates fall back ko-KR -> ko -> en
    locale         text not null,
    -- IANA zone of quiet hours and birthdays
    timezone       text not null,
    -- platforms often send only MM-DD, so the year is optional
    birthday_month smallint,
    birthday_day   smallint,
    birthday_year  smallint,
    consent_email  boolean not null,
    consent_sms    boolean not null,
    enrolled_at    timestamptz not null,
    updated_at     timestamptz not null
);

-- The outbox: one row per planned message and channel, and what became of it.
create table messages (
    id            bigint generated always as identity primary key,
    -- one per trigger occurrence and channel (welcome:<member>:email); planning the same
    -- thing twice inserts nothing
    dedupe_key    text not null unique,
    -- no foreign key: the ledger plans messages only for a member it loaded or saved in the
    -- same transaction, and the key's check (with its row lock) cost half of this insert
    member_id     text not null,
    trigger       text not null,
    channel       text not null check (channel in ('email', 'sms')),
    -- the trigger's template variables, fixed when the message was planned
    context       jsonb not null,
    status        text not null default 'pending'
                  check (status in ('pending', 'sending', 'sent', 'suppressed', 'cancelled', 'failed')),
    -- business time (the clock, which LIFECYCLE_NOW may fix) from which the message may go
    due_at        timestamptz not null,
    -- a dispatcher's claim, in database time; when a crashed dispatcher's lease lapses the
    -- message is claimed again
    claimed_until timestamptz,
    attempts      integer not null default 0,
    -- where it went: the address or number used, the provider, and the provider's reference
    -- (message id, file name)
    recipient     text,
    provider      text,
    provider_ref  text,
    last_error    text,
    created_at    timestamptz not null default now(),
    finished_at   timestamptz
);
create index messages_due on messages (due_at) where status in ('pending', 'sending');

-- Every attempt to hand a message to a provider, successful or not.
create table delivery_attempts (
    id         bigint generated always as identity primary key,
    message_id bigint not null references messages on delete cascade,
    attempt    integer not null,
    provider   text not null,
    outcome    text not null check (outcome in ('sent', 'transient', 'permanent', 'suppressed')),
    error      text,
    latency_ms integer not null,
    at         timestamptz not null default now()
);
create index delivery_attempts_message on delivery_attempts (message_id);
