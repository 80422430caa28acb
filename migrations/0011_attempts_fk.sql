-- The foreign key from an attempt to its message ran a query and took a row lock (FOR KEY
-- SHARE, one more WAL record) on the message for every attempt recorded: 24 of the 32 µs each
-- attempt's insert cost PostgreSQL under dispatch load. Attempts are only inserted joined to
-- their message (outbox::record, and the claim's lost claims), and pruning deletes a
-- message's attempts with it (scheduler::prune), so nothing can point at a missing message.
alter table delivery_attempts drop constraint delivery_attempts_message_id_fkey;
