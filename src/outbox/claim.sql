with due as (
         select id, member_id, status = 'sending' as lapsed, attempts from messages
         where due_at <= greatest($1, now())
           and ((status = 'pending' and due_at <= $1)
                or (status = 'sending' and claimed_until < now()))
         order by due_at
         limit $2
         for update skip locked
     ), lost as (
         insert into delivery_attempts (message_id, attempt, provider, outcome, error, latency_ms)
         select id, attempts, 'unknown', 'unsure',
                'the dispatcher that claimed it stopped before recording a result; it may have been sent',
                0
         from due where lapsed
     )
     update messages m
     set status = 'sending', claimed_until = now() + make_interval(secs => $3),
         claimed_by = $4, attempts = m.attempts + 1
     -- a test send may be for no member
     from due left join members mem on mem.member_id = due.member_id
     where m.id = due.id and (mem.member_id is not null or m.test)
     returning m.id, m.member_id, coalesce(mem.timezone, 'UTC') as "timezone!", m.attempts,
               m.trigger, m.channel, m.context, mem.email as "email?", mem.phone as "phone?",
               mem.first_name as "first_name?",
               coalesce(m.test_locale, mem.locale, 'en') as "locale!",
               coalesce(mem.consent_email, false) as "consent_email!",
               coalesce(mem.consent_sms, false) as "consent_sms!",
               (select s.reason from suppressions s
                where s.channel = m.channel
                  and s.address = coalesce(m.test_to,
                      case m.channel when 'email' then mem.email else mem.phone end)
               ) as "suppressed?",
               m.test, m.template_version, m.template_locale, m.test_locale, m.test_to,
               m.created_at
