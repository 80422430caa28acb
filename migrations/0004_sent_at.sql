-- Business time (the clock) at which a message was handed to a provider: the frequency cap
-- of marketing messages counts from it.
alter table messages add column sent_at timestamptz;

-- The cap's lookup: the last marketing message sent to a member on a channel. Partial, so the
-- planning of other messages never touches it.
create index messages_marketing_sent on messages (member_id, channel, sent_at)
    where trigger in ('birthday', 'abandoned-cart') and status = 'sent';
