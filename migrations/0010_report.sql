-- Holdouts (`[program] holdout_percent`): a message of a member in its trigger's control group
-- is planned like any other and, when it would have gone, recorded `held_out` instead of sent;
-- its `sent_at` is when it would have been sent, which is when the report counts it.
alter table messages drop constraint messages_status_check;
alter table messages add constraint messages_status_check
    check (status in ('pending', 'sending', 'sent', 'suppressed', 'cancelled', 'failed', 'held_out'));

-- The loyalty report reads sends and holdouts by `sent_at`, and orders by `placed_at`. Both
-- arrive nearly in time order (a message row is rewritten at the end of the table when it is
-- sent), so BRIN indexes find a period's rows for almost nothing on insert.
create index messages_sent_brin on messages using brin (sent_at);
create index orders_placed_brin on orders using brin (placed_at);

-- Journal entries from before event times were kept happened at their business time.
update point_entries set event_at = at where event_at is null;
alter table point_entries alter column event_at set not null;
