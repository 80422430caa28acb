-- no-transaction
-- As 0014, for SMS: the members whose number a STOP or START names.
create index concurrently if not exists members_phone on members (phone)
    where phone is not null;
