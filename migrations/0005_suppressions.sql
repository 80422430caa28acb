-- Addresses that must not be messaged on a channel: unsubscribed, bounced, complained, or
-- opted out by SMS STOP. Checked at send time, so a suppression stops messages already queued.
create table suppressions (
    channel    text not null check (channel in ('email', 'sms')),
    -- the email address (as stored on the member) or the E.164 number
    address    text not null,
    reason     text not null,
    -- where it came from: unsubscribe, sendgrid, twilio, smtp
    source     text not null,
    at         timestamptz not null default now(),
    primary key (channel, address)
);

-- Secrets lifecycle makes for itself (the unsubscribe token key), shared by every replica.
create table secrets (
    name  text primary key,
    value bytea not null
);

-- The provider's later word on a sent message (Twilio status callbacks: delivered, failed…).
alter table messages add column provider_status text;
create index messages_twilio_sid on messages (provider_ref) where provider = 'twilio';
