-- no-transaction
-- A suppression names an address; the platform is told which members it concerns. Built
-- concurrently, as `members` is large and the running release keeps writing it; one statement
-- a file, since several in one would run as one transaction.
create index concurrently if not exists members_email on members (email)
    where email is not null;
