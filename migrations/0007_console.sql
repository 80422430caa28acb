-- The marketer's console: template versions, users and sessions, coupons, test sends.

-- A version of one (trigger, locale)'s templates, both channels' files. Version 0 is the
-- shipped files (compiled into the binary) and has no row.
create table template_versions (
    trigger    text not null,
    locale     text not null,
    version    integer not null check (version > 0),
    -- at most one draft per (trigger, locale); publishing makes it published, and the version
    -- it replaces archived
    state      text not null check (state in ('draft', 'published', 'archived')),
    -- file name (email.subject.hbs, email.mjml.hbs, ...) to source
    files      jsonb not null,
    author     text not null,
    created_at timestamptz not null default now(),
    primary key (trigger, locale, version)
);
create unique index template_versions_one_draft on template_versions (trigger, locale)
    where state = 'draft';

-- The version dispatch uses for a (trigger, locale). No row: version 0. `seq` grows with every
-- publish, so a replica sees a change by reading max(seq).
create sequence template_publish_seq;
create table template_heads (
    trigger      text not null,
    locale       text not null,
    version      integer not null,
    seq          bigint not null default nextval('template_publish_seq'),
    published_by text not null,
    published_at timestamptz not null default now(),
    primary key (trigger, locale)
);

-- Console and API users. Passwords are argon2 hashes (PHC strings); API tokens are random and
-- stored as their SHA-256.
create table users (
    name          text primary key,
    role          text not null check (role in ('ops', 'marketer')),
    password_hash text not null,
    token_sha256  text not null unique,
    created_at    timestamptz not null default now()
);

-- Console sessions, by the SHA-256 of the cookie's value.
create table sessions (
    token_sha256 text primary key,
    user_name    text not null references users (name) on delete cascade,
    csrf         text not null,
    expires_at   timestamptz not null
);

-- Unique coupon codes by pool. A code is drawn once, in the transaction that plans its message:
-- `occurrence` is the trigger occurrence (the dedupe key without its channel), so the email
-- and SMS of one abandoned cart carry the same code and no code goes to two occurrences.
create table coupons (
    id         bigint generated always as identity primary key,
    pool       text not null,
    code       text not null,
    occurrence text unique,
    drawn_at   timestamptz,
    unique (pool, code)
);
create index coupons_free on coupons (pool, id) where occurrence is null;

-- The template version a message was rendered with; test sends (never counted as the
-- trigger's send, never holding its dedupe key) with the locale and recipient they were
-- asked for.
alter table messages
    add column template_version integer,
    add column test boolean not null default false,
    add column test_locale text,
    add column test_to text;
