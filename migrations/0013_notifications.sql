-- Events back to the platform (DESIGN.md, "Notifications"): a transactional outbox. A row is
-- written in the transaction of the change it tells of; the notifier publishes it to the
-- notifications exchange with publisher confirms, then clears `amqp_pending`, and POSTs it
-- to LIFECYCLE_NOTIFY_URL when that is set. Expand only: the release before never reads it.
create table notifications (
    id bigserial primary key,
    type text not null,
    member_id text not null,
    -- The CloudEvent's data as JSON text: written once, sent as it is, never queried into.
    data text not null,
    at timestamptz not null default now(),
    -- Published to the exchange once this is false; false from the start when it is off.
    amqp_pending boolean not null,
    published_at timestamptz,
    -- Over HTTP: null when not sent that way, else pending, delivered or dead.
    http_state text check (http_state in ('pending', 'delivered', 'dead')),
    http_attempts integer not null default 0,
    http_next_at timestamptz,
    http_error text,
    http_done_at timestamptz
);
create index notifications_amqp_pending on notifications (id) where amqp_pending;
create index notifications_http_pending on notifications (member_id, id)
    where http_state = 'pending';
