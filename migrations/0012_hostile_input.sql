-- What the hostile-input issue needs. Expand only: the release before keeps working against it.

-- A console user's own address and number: test sends may always go there.
alter table users
    add column email text,
    add column phone text;

-- Test sends record who queued them (the per-user hourly limit counts them).
alter table messages add column test_by text;
create index messages_test_by on messages (test_by, created_at) where test;

-- The locale of the pair whose version a message was rendered with (`template_version`): a
-- pin is kept only while the message's pair still resolves to this locale.
alter table messages add column template_locale text;

-- Retention keeps the inbox rows of events that were dead-lettered, so that replaying such a
-- letter never applies its event a second time, however old the first application is.
create index dead_letters_event on dead_letters (event_id) where event_id is not null;
