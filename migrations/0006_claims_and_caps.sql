-- Each claim names its dispatcher, so that only the owner renews or settles it: a dispatcher
-- whose lease lapsed cannot overwrite the work of the one that took the message over.
alter table messages add column claimed_by text;

-- `unsure`: the provider may have taken the message (a timeout after the request went out,
-- a connection lost after the mail data, or a claim lost with its dispatcher). A duplicate
-- send is possible only for a message with such an attempt.
alter table delivery_attempts drop constraint delivery_attempts_outcome_check;
alter table delivery_attempts add constraint delivery_attempts_outcome_check
    check (outcome in ('sent', 'transient', 'permanent', 'suppressed', 'unsure'));

-- The marketing frequency cap, one row per member and channel, taken under its row lock
-- before a marketing message is sent: two dispatchers cannot both send inside one window.
create table marketing_caps (
    member_id  text not null,
    channel    text not null,
    -- the message that holds (or last held) the cap
    message_id bigint not null,
    -- the cap is taken until then (the send's time plus the cap)
    until      timestamptz not null,
    primary key (member_id, channel)
);
create index marketing_caps_message on marketing_caps (message_id);
-- Marketing messages sent before this table: their windows (at the default 16 h).
insert into marketing_caps (member_id, channel, message_id, until)
select distinct on (member_id, channel) member_id, channel, id, sent_at + interval '16 hours'
from messages
where trigger in ('birthday', 'abandoned-cart') and status = 'sent' and sent_at is not null
order by member_id, channel, sent_at desc;

-- Keys that scheduled scans claim (a birthday bonus once per member and year), apart from the
-- event inbox: no event id, whatever the platform sends, can collide with one.
create table scan_claims (
    key        text primary key,
    claimed_at timestamptz not null default now()
);
insert into scan_claims (key, claimed_at)
select event_id, applied_at from inbox where event_type = 'scan';
delete from inbox where event_type = 'scan';

-- Retention (`[retention]`): the pruning scan finds old rows by these. BRIN indexes, because
-- the rows arrive in time order and a BRIN index costs next to nothing on insert.
create index inbox_applied_brin on inbox using brin (applied_at);
create index delivery_attempts_at_brin on delivery_attempts using brin (at);
create index messages_created_brin on messages using brin (created_at);

-- Dedupe keys of messages pruned by retention: planning checks them as it checks the outbox,
-- so a pruned message is never planned (and sent) again.
create table retired_keys (
    dedupe_key text primary key
);
